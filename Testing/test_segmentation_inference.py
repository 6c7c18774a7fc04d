"""Segmentation bundles and segmenting one timepoint (model.segmentation, inference.segmentation).

Our bundle format round trip (sha256 recorded and checked, ensembles); a MONAI bundle folder with a
different label convention (TC/WT/ET sigmoid channels) brought in through a label-mapping JSON and
run through predict's path, its labels checked against thresholds computed here on the phantom's
own images; what a network definition from a folder may not do; the array layouts; the small-lesion
filter; and the one-line refusal of a missing segmentation bundle.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage
from RANOResponseCLI import main as cli_main
from RANOResponseLib.core.errors import BundleError
from RANOResponseLib.core.names import LABEL_NAMES
from RANOResponseLib.imaging.io import read_study
from RANOResponseLib.inference.pipeline import run_predict
from RANOResponseLib.inference.segmentation import (
    _from_layout,
    _to_layout,
    class_scores,
    remove_small_enhancing,
    segment_study,
)
from RANOResponseLib.model.segmentation import (
    SEG_ARCHITECTURES,
    SegBundle,
    load_seg_models,
    read_seg_bundle,
    write_seg_bundle,
)

MODALITIES = ("CT1", "T1", "T2", "FLAIR")
TINY_SEGRESNET = {"name": "SegResNet", "args": {"spatial_dims": 3, "in_channels": 4, "out_channels": 4,
                                                "init_filters": 8, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]}}


def _random_state(seed: int) -> dict:
    torch.manual_seed(seed)
    return SEG_ARCHITECTURES["SegResNet"](**TINY_SEGRESNET["args"]).state_dict()


@pytest.fixture(scope="module")
def seg_bundle(tmp_path_factory) -> Path:
    """Two tiny SegResNets with different random weights (an ensemble), written as a bundle."""
    out = tmp_path_factory.mktemp("seg") / "tiny-seg"
    return write_seg_bundle(out, [_random_state(1), _random_state(2)], TINY_SEGRESNET, MODALITIES, (6.0, 6.0, 6.0),
                            LABEL_NAMES, {"cohort": "none (random weights)"}, {"dice": {}}, "# tiny\n",
                            meta={"id": "tiny-seg", "min_lesion_ml": 0.05})


# ------------------------------------------------------------------------------ our bundles


def test_write_read_round_trip(seg_bundle):
    b = read_seg_bundle(seg_bundle)
    doc = json.loads((seg_bundle / "bundle.json").read_text())
    assert (b.id, b.kind, b.activation, b.modalities) == ("tiny-seg", "rano", "softmax", MODALITIES)
    assert b.spacing == (6.0, 6.0, 6.0) and b.labels == (0, 1, 2, 3) and b.label_names == LABEL_NAMES
    assert b.min_lesion_ml == 0.05 and doc["provenance"] == {"cohort": "none (random weights)"}
    assert [w["file"] for w in b.weights] == ["weights-0.pt", "weights-1.pt"]
    assert (seg_bundle / "MODEL_CARD.md").read_text() == "# tiny\n"
    import hashlib

    for w in b.weights:  # the recorded digest is the file's
        assert w["sha256"] == hashlib.sha256((seg_bundle / w["file"]).read_bytes()).hexdigest()
    models = load_seg_models(b)
    assert len(models) == 2 and not any(m.training for m in models)
    # float16 storage, float32 back: each model holds its own weights
    first = dict(models[0].named_parameters())["convInit.conv.weight"]
    assert torch.allclose(first, _random_state(1)["convInit.conv.weight"], atol=1e-3)
    assert not torch.allclose(first, dict(models[1].named_parameters())["convInit.conv.weight"])


def test_swapped_weights_refused(seg_bundle, tmp_path):
    bad = tmp_path / "bundle"
    shutil.copytree(seg_bundle, bad)
    data = bytearray((bad / "weights-1.pt").read_bytes())
    data[len(data) // 2] ^= 0x01
    (bad / "weights-1.pt").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"weights-1\.pt: sha256 mismatch"):
        load_seg_models(read_seg_bundle(bad))


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(architecture={"name": "VNet", "args": {}}), "unknown architecture 'VNet'"),
    (lambda d: d["architecture"]["args"].update(out_channels=3), "out_channels 3 != 4 labels"),
    (lambda d: d.update(modalities=["CT1", "T1", "T2", "DWI"]), "modalities"),
    (lambda d: d.pop("weights"), "missing key 'weights'"),
])
def test_malformed_bundle_json_refused(seg_bundle, tmp_path, edit, message):
    bad = tmp_path / "bundle"
    shutil.copytree(seg_bundle, bad)
    doc = json.loads((bad / "bundle.json").read_text())
    edit(doc)
    (bad / "bundle.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match=message) as e:
        read_seg_bundle(bad)
    assert str(bad / "bundle.json") in str(e.value)


# ------------------------------------------------------------------------------ MONAI bundles

# The MONAI bundle below takes its channels in this order (not ours) and answers with
# brats_mri_segmentation's channels (TC, WT, ET as sigmoids), from thresholds of z-scores:
ORDER = ["FLAIR", "T1", "CT1", "T2"]
ET_CT1_Z = 3.0  # enhancing: CT1 z-score above 3
TC_T2_Z = 2.6  # tumour core: T2 z-score above 2.6 (necrosis and fluid are bright in T2)
WT_FLAIR_Z = 1.3  # whole tumour: FLAIR z-score above 1.3
STEEP = 50.0  # sigmoid(STEEP * (z - threshold)): 0.5 exactly at the threshold


def _write_monai_bundle(root: Path, spacing: float, config_extra: dict | None = None, network_def: dict | None = None,
                        mapping_extra: dict | None = None) -> Path:
    """A MONAI bundle folder: configs/inference.json (a 1x1x1 Conv3d network_def, plus entries a
    zoo config has that must never be evaluated), models/model.pt, rano_labels.json."""
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    config = {"imports": ["$import os"], "device": "$torch.device('cuda')",
              "network_def": network_def or {"_target_": "torch.nn.Conv3d", "in_channels": 4, "out_channels": 3,
                                             "kernel_size": 1},
              "network": "$@network_def.to(@device)", **(config_extra or {})}
    (root / "configs" / "inference.json").write_text(json.dumps(config))
    w, b = torch.zeros(3, 4, 1, 1, 1), torch.zeros(3)
    tc, wt, et = 0, 1, 2
    w[et, ORDER.index("CT1")], b[et] = STEEP, -STEEP * ET_CT1_Z
    w[tc, ORDER.index("T2")], b[tc] = STEEP, -STEEP * TC_T2_Z
    w[wt, ORDER.index("FLAIR")], b[wt] = STEEP, -STEEP * WT_FLAIR_Z
    torch.save({"weight": w, "bias": b}, root / "models" / "model.pt")
    mapping = {"modalities": ORDER, "spacing_mm": [spacing] * 3, "activation": "sigmoid", "threshold": 0.5,
               "channels": ["TC", "WT", "ET"], "normalization": {"method": "zscore", "clip": None},
               "mapping": [{"label": 1, "channels": ["ET"]},
                           {"label": 2, "channels": ["TC"], "minus": ["ET"]},
                           {"label": 3, "channels": ["WT"], "minus": ["TC"]}],
               **(mapping_extra or {})}
    (root / "rano_labels.json").write_text(json.dumps(mapping))
    return root


def _threshold_truth(study_folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The labels the MONAI bundle's thresholds give, computed here on the timepoint's own grid
    (z-scores over the skull-stripped brain), and the brain."""
    study = read_study(study_folder)
    arr = {m: sitk.GetArrayFromImage(img).astype(np.float64) for m, img in study.images.items()}
    brain = arr["CT1"] != 0
    z = {m: (a - a[brain].mean()) / a[brain].std() for m, a in arr.items()}
    et = z["CT1"] > ET_CT1_Z
    tc = z["T2"] > TC_T2_Z
    wt = z["FLAIR"] > WT_FLAIR_Z
    truth = np.zeros(brain.shape, np.uint8)
    truth[wt & ~tc] = 3
    truth[tc & ~et] = 2
    truth[et] = 1
    truth[~brain] = 0
    return truth, brain


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


@pytest.fixture(scope="module")
def two_mm_pair(seg_cohort):
    return seg_cohort.pair("week-017")


def test_monai_bundle_through_predict(two_mm_pair, tiny_bundle, tmp_path):
    root = _write_monai_bundle(tmp_path / "brats_like", spacing=2.0)
    b = read_seg_bundle(root)
    assert (b.kind, b.activation, b.labels, b.modalities, b.layout) == ("monai", "sigmoid", (0, 1, 2, 3), tuple(ORDER), "RAS")
    out = tmp_path / "out"
    result, files = run_predict(two_mm_pair.baseline, two_mm_pair.followup, out, bundle=tiny_bundle, device="cpu",
                                attributions=False, seg_bundle=root)
    assert result.measured["segmentation_bundle"]["id"] == "brats_like"
    for tp, folder in (("baseline", two_mm_pair.baseline), ("followup", two_mm_pair.followup)):
        written = sitk.ReadImage(str(out / f"segmentation_{tp}.nii.gz"))
        reference = sitk.ReadImage(str(folder / "CT1.nii.gz"))
        assert written.GetSize() == reference.GetSize()  # on the timepoint's own grid
        assert np.allclose(written.GetOrigin(), reference.GetOrigin(), atol=1e-4)
        assert np.allclose(written.GetDirection(), reference.GetDirection(), atol=1e-6)
        labels = sitk.GetArrayFromImage(written)
        truth, brain = _threshold_truth(folder)
        assert not labels[~brain].any()
        for label in (1, 2, 3):
            here = truth == label
            inside = ndimage.binary_erosion(here)  # away from the boundary
            assert inside.sum() > 100, f"the thresholds give too little label {label} to test"
            # the network sees the images resampled onto its own grid, so boundary voxels (and
            # thin structures: fluid is bright in T2 too) may differ; inside a region none may
            assert (labels[inside] == label).mean() > 0.99, (tp, label)
            assert _dice(labels == label, here) > 0.6, (tp, label)
        # ET became our label 1, the phantom's enhancing tumour (its own mask, not thresholds)
        mask = sitk.GetArrayFromImage(sitk.ReadImage(
            str(folder / "DeepBraTumIA-segmentation/native/segmentation/seg_mask.nii.gz")))
        assert _dice(labels == 1, mask == 1) > 0.7


def test_label_mapping_json_beside_the_bundle(tmp_path):
    """The mapping may live outside the zoo folder and name it (the downloaded folder stays as it is)."""
    root = _write_monai_bundle(tmp_path / "zoo" / "brats_mri_segmentation", spacing=2.0)
    mapping = json.loads((root / "rano_labels.json").read_text())
    (root / "rano_labels.json").unlink()
    with pytest.raises(BundleError, match="rano_labels.json: a MONAI bundle needs a label mapping"):
        read_seg_bundle(root)
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({**mapping, "bundle": "zoo/brats_mri_segmentation", "id": "brats"}))
    b = read_seg_bundle(mine)
    assert (b.id, b.path) == ("brats", root.resolve())
    assert b.weights == [{"file": "models/model.pt", "sha256": None}]


def test_monai_weights_sha256_checked_when_given(tmp_path):
    root = _write_monai_bundle(tmp_path / "b", spacing=2.0, mapping_extra={"sha256": "0" * 64})
    with pytest.raises(BundleError, match=r"model\.pt: sha256 mismatch"):
        load_seg_models(read_seg_bundle(root))
    import hashlib

    good = hashlib.sha256((root / "models" / "model.pt").read_bytes()).hexdigest()
    (root / "rano_labels.json").write_text(json.dumps({**json.loads((root / "rano_labels.json").read_text()),
                                                       "sha256": good}))
    assert len(load_seg_models(read_seg_bundle(root))) == 1


@pytest.mark.parametrize("network_def, message", [
    ({"_target_": "os.system", "command": "touch pwned"}, "_target_ 'os.system' is not a MONAI or torch network"),
    ({"_target_": "torch.hub.load", "repo_or_dir": "x/y", "model": "z"}, "_target_ 'torch.hub.load'"),
    ({"_target_": "torch.nn.Conv3d", "in_channels": "$__import__('os').system('touch pwned')", "out_channels": 3,
      "kernel_size": 1}, "expressions"),
    ({"_target_": "torch.nn.Conv3d", "in_channels": "@evil", "out_channels": 3, "kernel_size": 1}, "expressions"),
    ({"_target_": "SegResNet", "_mode_": "callable"}, "'_mode_' is not allowed"),
])
def test_network_def_that_could_run_code_refused(tmp_path, monkeypatch, network_def, message):
    monkeypatch.chdir(tmp_path)
    root = _write_monai_bundle(tmp_path / "b", spacing=2.0, network_def=network_def,
                               config_extra={"evil": "$__import__('os').system('touch pwned')"})
    with pytest.raises(BundleError, match=message) as e:
        read_seg_bundle(root)
    assert str(root / "configs" / "inference.json") in str(e.value)
    assert not (tmp_path / "pwned").exists()


def test_network_with_too_few_channels_refused(tmp_path, seg_cohort):
    """A mapping that uses an output channel the network does not give is refused, naming the mapping."""
    root = _write_monai_bundle(tmp_path / "b", spacing=4.0, mapping_extra={
        "channels": [], "mapping": [{"label": 1, "channels": [3]}]})
    with pytest.raises(BundleError, match=r"rano_labels\.json: the network gives 3 output channels, the bundle "
                                          r"needs at least 4"):
        segment_study(read_study(seg_cohort.pair("week-017").followup), None, read_seg_bundle(root))


def test_bare_zoo_target_is_monai_network(tmp_path):
    """brats_mri_segmentation writes ``"_target_": "SegResNet"``: built from monai.networks.nets, references inlined."""
    net = {"_target_": "SegResNet", "blocks_down": [1, 1], "blocks_up": [1], "init_filters": 8,
           "in_channels": "@channels", "out_channels": 3}
    root = _write_monai_bundle(tmp_path / "b", spacing=2.0, network_def=net, config_extra={"channels": 4})
    b = read_seg_bundle(root)
    assert b.architecture["network_def"]["_target_"] == "monai.networks.nets.SegResNet"
    assert b.architecture["network_def"]["in_channels"] == 4
    from monai.networks.nets import SegResNet

    torch.manual_seed(0)
    torch.save(SegResNet(blocks_down=[1, 1], blocks_up=[1], init_filters=8, in_channels=4, out_channels=3).state_dict(),
               root / "models" / "model.pt")
    (model,) = load_seg_models(b)
    assert isinstance(model, SegResNet)


# ------------------------------------------------------------------------------ pieces


def test_ras_layout_puts_right_anterior_superior_first():
    """Our arrays are (z, y, x) of an LPS grid; MONAI's RAS arrays are (x, y, z) with x towards
    the right and y towards anterior: the voxel at LPS index (x=1, y=2, z=3) of a (4, 5, 6) grid
    sits at RAS index (4-1-1, 5-1-2, 3)."""
    a = np.zeros((1, 6, 5, 4), np.float32)  # (C, z, y, x)
    a[0, 3, 2, 1] = 1.0
    r = _to_layout(a, "RAS")
    assert r.shape == (1, 4, 5, 6)
    assert tuple(np.argwhere(r[0])[0]) == (2, 2, 3)
    assert np.array_equal(_from_layout(r, "RAS"), a)
    assert _to_layout(a, "zyx") is a


def test_sigmoid_channels_mapped_in_order():
    bundle = SegBundle(Path("."), "x", "monai", {}, ("CT1",), (1.0, 1.0, 1.0), (0, 1, 2, 3), dict(LABEL_NAMES), [],
                       activation="sigmoid", threshold=0.5,
                       mapping=[{"label": 1, "channels": [2], "minus": []}, {"label": 2, "channels": [0], "minus": [2]},
                                {"label": 3, "channels": [1], "minus": [0]}])
    # voxels: nothing; WT only; TC+WT; ET+TC+WT; ET alone (outside TC: still enhancing)
    tc = np.array([0.1, 0.2, 0.9, 0.9, 0.1])
    wt = np.array([0.1, 0.8, 0.9, 0.9, 0.1])
    et = np.array([0.2, 0.3, 0.4, 0.7, 0.6])
    scores = class_scores(np.stack([tc, wt, et])[:, None, None, :].astype(np.float32), bundle)
    assert scores.shape == (4, 1, 1, 5)
    assert np.array_equal(np.asarray(bundle.labels)[scores.argmax(0)][0, 0], [0, 3, 2, 1, 1])
    assert set(np.unique(scores)) == {0.0, 1.0} and np.all(scores.sum(0) == 1)


def test_small_enhancing_components_removed():
    arr = np.zeros((20, 20, 20), np.uint8)
    arr[2:5, 2:5, 2:5] = 1  # 27 voxels of 1 mm: 0.027 mL
    arr[10:16, 10:16, 10:16] = 1  # 216: 0.216 mL
    arr[10:16, 2:4, 2:4] = 3  # edema stays
    img = sitk.GetImageFromArray(arr)
    out = sitk.GetArrayFromImage(remove_small_enhancing(img, 0.1))
    assert not out[2:5, 2:5, 2:5].any() and (out[10:16, 10:16, 10:16] == 1).all() and (out[10:16, 2:4, 2:4] == 3).all()
    assert np.array_equal(sitk.GetArrayFromImage(remove_small_enhancing(img, 0.0)), arr)


# ------------------------------------------------------------------------------ refusals


def test_cli_missing_seg_bundle_is_one_line(two_mm_pair, tiny_bundle, tmp_path, capsys):
    out = tmp_path / "out"
    missing = tmp_path / "no-such-bundle"
    rc = cli_main(["predict", "--baseline", str(two_mm_pair.baseline), "--followup", str(two_mm_pair.followup),
                   "--out", str(out), "--bundle", str(tiny_bundle), "--device", "cpu", "--seg-bundle", str(missing),
                   "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err == [f"error: {missing}: segmentation bundle not found"]
    assert not out.exists() and not any(".partial" in p.name for p in tmp_path.iterdir())


def test_seg_bundle_env_is_the_default(monkeypatch, seg_bundle):
    monkeypatch.setenv("RANO_RESPONSE_SEG_BUNDLE", str(seg_bundle))
    assert read_seg_bundle().id == "tiny-seg"


def test_labels_to_reference_resamples_only_the_box_but_equals_the_whole(seg_cohort):
    """Only the reference's box under the grid (and the brain) is resampled: the labels are the
    same as resampling every class over the whole reference (done here with SimpleITK), also on
    an oblique reference grid that the model grid does not share."""
    from RANOResponseLib.imaging.preprocessing import labels_to_reference, labels_on_grid, prepare_timepoint
    from RANOResponseLib.imaging.registration import brain_mask

    folder = seg_cohort.pair("week-017").followup
    study = read_study(folder)
    mask = sitk.ReadImage(str(folder / "DeepBraTumIA-segmentation/native/segmentation/seg_mask.nii.gz"))
    prepared = prepare_timepoint(study, MODALITIES, (3.0, 3.0, 3.0))
    scores = (labels_on_grid(mask, prepared.grid)[None] == np.arange(4)[:, None, None, None]).astype(np.float32)
    scores += np.random.default_rng(0).uniform(0, 0.3, scores.shape).astype(np.float32)  # no ties
    oblique = sitk.Image([90, 100, 80], sitk.sitkUInt8)
    oblique.SetSpacing((1.7, 1.9, 2.3))
    rotation = sitk.Euler3DTransform((0, 0, 0), 0.3, -0.2, 0.5)
    oblique.SetDirection(rotation.GetMatrix())
    centre = np.array(prepared.grid.TransformContinuousIndexToPhysicalPoint([s / 2 for s in prepared.grid.GetSize()]))
    half = np.array(rotation.GetMatrix()).reshape(3, 3) @ (np.array(oblique.GetSize()) * oblique.GetSpacing() / 2)
    oblique.SetOrigin(tuple(centre - half + 20.0))  # the grid's box is cut by the reference's edge
    for reference, brain in ((study.images["CT1"], brain_mask(study.images["CT1"])), (oblique, None)):
        got = sitk.GetArrayFromImage(labels_to_reference(scores, (0, 1, 2, 3), prepared.grid, reference, brain))
        whole = []
        for p in scores:
            img = sitk.GetImageFromArray(p)
            img.CopyInformation(prepared.grid)
            whole.append(sitk.GetArrayFromImage(sitk.Resample(img, reference, sitk.Transform(), sitk.sitkLinear, 0.0,
                                                              sitk.sitkFloat32)))
        truth = np.argmax(np.stack(whole), axis=0).astype(np.uint8)
        if brain is not None:
            truth[sitk.GetArrayFromImage(brain) == 0] = 0
        assert (truth > 0).sum() > 1000 and np.array_equal(got, truth)
