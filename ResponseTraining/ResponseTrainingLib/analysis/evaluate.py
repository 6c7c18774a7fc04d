"""Score a bundle on a labelled LUMIERE-layout cohort through the clinical prediction path."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
from RANOResponseLib.core.files import write_text
from RANOResponseLib.datasets.lumiere import build_pairs
from RANOResponseLib.inference.pipeline import predict_pair
from RANOResponseLib.model.bundle import read_bundle
from tqdm import tqdm

from ResponseTrainingLib.analysis.metrics import classification_metrics


def evaluate(bundle_path: Path | str | None, data: Path | str, out: Path | str, device: str = "auto") -> dict:
    """Predict every usable pair with ``predict_pair`` (no maps) and write per-pair predictions,
    the pair table and the metrics (``predictions.csv``, ``pairs.csv``, ``metrics.json``)."""
    bundle = read_bundle(bundle_path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pairing = bundle.meta.get("training", {}).get("config", {}).get("pairing", "previous")
    pairs, table = build_pairs(data, bundle.spec.modalities, pairing)  # as the bundle was trained
    write_text(table.to_csv(index=False), out / "pairs.csv")
    rows, probs = [], []
    for pair in tqdm(pairs, desc="evaluate", unit="pair", file=sys.stderr):
        r = predict_pair(pair.baseline, pair.followup, bundle, device, attributions=False, notice=lambda m: None)
        probs.append(r.prediction.probabilities)
        rows.append({"pair": pair.id, "patient": pair.patient, "label": pair.label, "predicted": r.label,
                     **{f"p_{c}": float(p) for c, p in r.probabilities.items()}})
    preds = pd.DataFrame(rows)
    write_text(preds.to_csv(index=False), out / "predictions.csv")
    y = [bundle.class_names.index(lbl) for lbl in preds["label"]] if rows else []
    import numpy as np

    metrics = classification_metrics(np.array(y), np.array(probs).reshape(len(rows), -1), bundle.class_names)
    metrics.update(bundle=bundle.id, data=str(Path(data).absolute()),
                   class_counts=preds["label"].value_counts().to_dict() if rows else {})
    write_text(json.dumps(metrics, indent=2) + "\n", out / "metrics.json")
    return metrics
