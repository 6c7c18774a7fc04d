"""Grad-CAM layer choice for a bundle on a selection cohort (not the held-out ones): the pointing game
per candidate layer (is the peak inside tumour + edema?), and saliency's.

Usage: python Testing/gradcam_layers.py BUNDLE COHORT N_PAIRS [THREADS]
"""
import json
import sys

import numpy as np
import torch
from RANOResponseLib.datasets.lumiere import build_pairs
from RANOResponseLib.inference.pipeline import predict_pair, _load_models_cached
from RANOResponseLib.inference.attributions import predict_with_maps
from RANOResponseLib.inference.explanations import region_on_baseline, measure_map
from RANOResponseLib.imaging.preprocessing import to_reference
from RANOResponseLib.model.bundle import read_bundle
torch.set_num_threads(int(sys.argv[4]) if len(sys.argv) > 4 else 1)
bundle, data, n = read_bundle(sys.argv[1]), sys.argv[2], int(sys.argv[3])
pairs, _ = build_pairs(data, bundle.spec.modalities, "previous")
pairs = pairs[:n]
models = _load_models_cached(bundle, torch.device("cpu"))
names = [nm for nm, _ in models[0].named_modules() if nm.count(".") == 1 and nm.startswith("features.")]
cands = [nm for nm in names if "denseblock" in nm or "transition" in nm] + ["features.norm5"]
hits = {c: [] for c in cands}; sal = []
for p in pairs:
    r = predict_pair(p.baseline, p.followup, bundle, "cpu", attributions=False, notice=lambda m: None)
    ref = r.baseline.images[bundle.spec.reference_modality]
    brain = r.brains["baseline"].image
    region = region_on_baseline(ref, r.segmentations.get("baseline"), r.segmentations.get("followup"), r.registration.transform)
    x = torch.from_numpy(r.prepared.array[None])
    for c in cands:
        pred = predict_with_maps(models, x, c)
        g = to_reference(pred.gradcam, r.prepared.grid, ref, brain=brain)
        hits[c].append(measure_map(g, region)["peak_inside"])
        if c == cands[0]:
            s = to_reference(pred.saliency, r.prepared.grid, ref, brain=brain)
            sal.append(measure_map(s, region)["peak_inside"])
    print(p.id, p.label, r.label, {c: hits[c][-1] for c in cands}, "sal", sal[-1], flush=True)
print(json.dumps({c: float(np.mean(v)) for c, v in hits.items()}), "saliency", float(np.mean(sal)))
