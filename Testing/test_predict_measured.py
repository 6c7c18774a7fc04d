"""predict's measured RANO: both timepoints segmented, measured, matched and decided beside the network.

The segmentation network is replaced here by the cohort's own masks (``segment_study`` returns the
phantom's ``seg_mask.nii.gz`` of the study it is given), so every other step is the real one
(files on each timepoint's grid, lesions matched through predict's registration, the rules, the
comparison, prediction.json) and the truth is the phantom's: its written RANO rating and whether
a new lesion appeared (phantom_truth.csv).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
from RANOResponseCLI import main as cli_main
from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.names import LABEL_NAMES
from RANOResponseLib.inference import segmentation as inference_segmentation
from RANOResponseLib.inference.pipeline import run_predict
from RANOResponseLib.inference.segmentation import Segmentation, label_volumes
from RANOResponseLib.model.segmentation import SEG_ARCHITECTURES, write_seg_bundle
from RANOResponseLib.rano.measurement import measure_prediction
from RANOResponseLib.rano.rules import decide

MASK = "DeepBraTumIA-segmentation/native/segmentation/seg_mask.nii.gz"
FOLLOWUPS = ("week-017", "week-025", "week-037")  # PD (growth), PD (new lesion), SD: see conftest.SEG_COHORT
MEASURED_KEYS = {"source", "segmentation_bundle", "segmentations", "lesions", "sums", "ratio", "ratio_rano2",
                 "category", "category_rano2", "reasoning", "reasoning_rano2", "agrees", "comparison", "measurements"}


@pytest.fixture(scope="module")
def seg_bundle(tmp_path_factory) -> Path:
    args = {"spatial_dims": 3, "in_channels": 4, "out_channels": 4, "init_filters": 8, "blocks_down": [1, 1],
            "blocks_up": [1]}
    net = SEG_ARCHITECTURES["SegResNet"](**args)
    return write_seg_bundle(tmp_path_factory.mktemp("seg") / "stand-in", [net.state_dict()],
                            {"name": "SegResNet", "args": args}, ("CT1", "T1", "T2", "FLAIR"), (4.0, 4.0, 4.0),
                            LABEL_NAMES, {}, {}, "# stand-in\n", meta={"id": "cohort-masks"})


def _cohort_mask(study, brain, bundle, device="cpu", models=None) -> Segmentation:
    """The segmentation network replaced by the phantom's own mask of ``study`` (on its grid)."""
    mask = sitk.Cast(sitk.ReadImage(str(Path(study.folder) / MASK)), sitk.sitkUInt8)
    return Segmentation(mask, 0.0, bundle.id, label_volumes(mask, bundle.label_names))


@pytest.fixture(scope="module")
def runs(seg_cohort, tiny_bundle, seg_bundle, tmp_path_factory):
    """run_predict on each rated follow-up pair, segmentations from the cohort's masks."""
    mp = pytest.MonkeyPatch()
    mp.setattr(inference_segmentation, "segment_study", _cohort_mask)
    out = {}
    try:
        for week in FOLLOWUPS:
            pair = seg_cohort.pair(week)
            folder = tmp_path_factory.mktemp("measured") / week
            stages = []
            result, files = run_predict(pair.baseline, pair.followup, folder, bundle=tiny_bundle, device="cpu",
                                        attributions=False, seg_bundle=seg_bundle,
                                        progress=lambda s, f, stages=stages: stages.append(s))
            truth = seg_cohort.truth.set_index("date").loc[week]
            out[week] = SimpleNamespace(pair=pair, out=folder, result=result, files=files, truth=truth, stages=stages,
                                        summary=json.loads((folder / "prediction.json").read_text()))
    finally:
        mp.undo()
    return out


@pytest.mark.parametrize("week", FOLLOWUPS)
def test_measured_category_is_the_cohorts_rating(runs, week, seg_bundle):
    r = runs[week]
    m = r.summary["measured"]
    assert set(m) == MEASURED_KEYS
    assert m["source"] == "automatic"
    assert m["category"] == r.truth["rating_written"]
    assert m["agrees"] == (m["category"] == r.summary["label"])
    assert m["comparison"]["model"] == r.summary["label"] and m["comparison"]["rule"] == m["category"]
    assert m["category_rano2"] in ("CR", "PR", "SD", "PD") and m["reasoning"] and m["reasoning_rano2"]
    # the sums and their ratio are the phantom's (measured on its template, so within a few percent)
    truth_ratio = r.truth["spd_mm2"] / r.truth["spd_prev_mm2"]
    assert m["ratio"] == pytest.approx(m["sums"]["spd_followup_mm2"] / m["sums"]["spd_baseline_mm2"])
    assert m["ratio"] == pytest.approx(truth_ratio, rel=0.15)
    assert m["sums"]["spd_baseline_mm2"] == pytest.approx(r.truth["spd_prev_mm2"], rel=0.15)
    weights = json.loads((seg_bundle / "bundle.json").read_text())["weights"]
    assert m["segmentation_bundle"] == {"id": "cohort-masks", "path": str(seg_bundle), "sha256": [weights[0]["sha256"]]}
    assert r.stages[-3:] == ["predicted", "segmented", "written"]


@pytest.mark.parametrize("week", FOLLOWUPS)
def test_new_lesion_found_through_the_registration(runs, week):
    """The follow-up is posed differently in the scanner (phantom_truth's rot_*/trans_*): a lesion
    is new only if matching through predict's registration finds no baseline tumour under it."""
    r = runs[week]
    rows = r.summary["measured"]["lesions"]
    new = [row for row in rows if row["timepoint"] == "follow-up" and row["status"] == "NEW lesion"]
    assert bool(new) == bool(r.truth["new_lesion"])
    if new:
        assert any(row["measurable"] == "yes" for row in new)
    assert all(row["status"] != "resolved" for row in rows if row["timepoint"] == "baseline")
    # matched lesions sit where their baseline lesion was once mapped through the registration
    # (the phantom poses them 14-19 mm apart in scanner coordinates)
    m = r.summary["measured"]["measurements"]
    baseline = {le["id"]: np.array(le["centroid"]) for le in m["baseline"]["lesions"]}
    matched = [(np.array(le["centroid_in_baseline"]), baseline[i]) for le in m["followup"]["lesions"]
               for i in le["matched"]]
    assert matched and all(np.linalg.norm(a - b) < 3.0 for a, b in matched)
    assert "predict's registration" in m["transform"]


@pytest.mark.parametrize("week", FOLLOWUPS[:1])
def test_segmentation_files_on_each_timepoints_grid(runs, week):
    r = runs[week]
    outputs = r.summary["outputs"]
    for tp, folder in (("baseline", r.pair.baseline), ("followup", r.pair.followup)):
        assert outputs[f"segmentation_{tp}"] == f"segmentation_{tp}.nii.gz"
        assert r.summary["measured"]["segmentations"][tp]["file"] == f"segmentation_{tp}.nii.gz"
        written = sitk.ReadImage(str(r.out / f"segmentation_{tp}.nii.gz"))
        mask = sitk.ReadImage(str(folder / MASK))
        assert written.GetSize() == mask.GetSize()
        assert np.allclose(written.GetOrigin(), mask.GetOrigin(), atol=1e-4)
        assert np.allclose(written.GetDirection(), mask.GetDirection(), atol=1e-6)
        assert np.array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(mask))
        vols = r.summary["measured"]["segmentations"][tp]["volumes_ml"]
        voxel_ml = np.prod(mask.GetSpacing()) / 1000
        assert vols["enhancing"] == pytest.approx((sitk.GetArrayFromImage(mask) == 1).sum() * voxel_ml, abs=1e-3)


def test_measure_prediction_reads_the_automatic_segmentations(runs, tmp_path):
    r = runs["week-025"]
    manual = measure_prediction(r.out)  # DeepBraTumIA masks lie next to the phantom's studies: they come first
    assert Path(manual.baseline.source) == r.pair.baseline / MASK
    automatic = measure_prediction(r.out, "automatic")
    assert Path(automatic.baseline.source) == r.out / "segmentation_baseline.nii.gz"
    assert decide(automatic).category == r.summary["measured"]["category"]
    # without its segmentations (--no-segmentation) and without masks beside the studies: one line
    bare = tmp_path / "bare"
    shutil.copytree(r.out, bare)
    for p in bare.glob("segmentation_*.nii.gz"):
        p.unlink()
    with pytest.raises(RANOInputError, match="segmentation_baseline.nii.gz: not found"):
        measure_prediction(bare, "automatic")


DICOM_SERIES = {  # what each sequence's series says about itself (the default series rules read it)
    "CT1": dict(description="AX T1 POST GD", protocol="AX T1 SE +C", tr=550, te=12, contrast="GADOVIST"),
    "T1": dict(description="AX T1 PRE", protocol="AX T1 SE", tr=550, te=12),
    "T2": dict(description="t2_tse_tra", protocol="t2_tse_tra", tr=5000, te=95),
    "FLAIR": dict(description="t2_tirm_tra_dark-fluid", protocol="t2_tirm_tra_dark-fluid", tr=9000, te=85, ti=2500),
}


def test_dicom_pair_measured(seg_cohort, tiny_bundle, seg_bundle, tmp_path, monkeypatch):
    """DICOM study folders (no masks beside their series): prediction.json names series folders,
    and measure_prediction finds predict's own segmentations; the category is the cohort's rating."""
    from RANOResponseLib.imaging.io import read_study
    from RANOResponseLib.phantom.dicom_export import write_series

    pair = seg_cohort.pair("week-037")
    origin = {}
    for tp, folder in (("baseline", pair.baseline), ("followup", pair.followup)):
        study = read_study(folder)
        dicom = tmp_path / f"{tp}-dicom"
        for n, (m, spec) in enumerate(DICOM_SERIES.items(), start=2):
            write_series(study.images[m], dicom / f"{n:04d}", patient_id="P1", study_uid=f"1.2.826.0.1.77.{len(origin)}",
                         series_number=n, study_date=f"2024010{len(origin) + 1}", **spec)
        origin[dicom] = folder

    def cohort_mask(study, brain, bundle, device="cpu", models=None):
        mask = sitk.ReadImage(str(origin[Path(study.folder)] / MASK))
        mask = sitk.Resample(mask, study.images["CT1"], sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        return Segmentation(mask, 0.0, bundle.id, label_volumes(mask, bundle.label_names))

    monkeypatch.setattr(inference_segmentation, "segment_study", cohort_mask)
    out = tmp_path / "out"
    base, fu = origin
    run_predict(base, fu, out, bundle=tiny_bundle, device="cpu", attributions=False, seg_bundle=seg_bundle)
    summary = json.loads((out / "prediction.json").read_text())
    assert summary["inputs"]["studies"]["baseline"]["sequences"]["CT1"]["source"]["kind"] == "dicom"
    assert summary["measured"]["category"] == seg_cohort.truth.set_index("date").loc["week-037", "rating_written"]
    measured = measure_prediction(out)
    assert Path(measured.followup.source) == out / "segmentation_followup.nii.gz"
    assert decide(measured).category == summary["measured"]["category"]
    for p in out.glob("segmentation_*.nii.gz"):
        p.unlink()
    with pytest.raises(RANOInputError, match="nor are predict's own segmentations .*segmentation_baseline.nii.gz"):
        measure_prediction(out)


def test_no_segmentation(seg_cohort, tiny_bundle, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANO_RESPONSE_SEG_BUNDLE", str(tmp_path / "not-there"))  # never read
    pair = seg_cohort.pair("week-037")
    out = tmp_path / "out"
    rc = cli_main(["predict", "--baseline", str(pair.baseline), "--followup", str(pair.followup), "--out", str(out),
                   "--bundle", str(tiny_bundle), "--device", "cpu", "--no-maps", "--no-scene", "--no-segmentation"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads((out / "prediction.json").read_text())
    assert summary["measured"] is None
    assert not list(out.glob("segmentation_*")) and "segmented" not in captured.err
    assert not any(k.startswith("segmentation") for k in summary["outputs"])
    assert "measured" not in captured.out


# ------------------------------------------------------------------------------ the shipped model


@pytest.fixture(scope="module")
def shipped_runs(seg_cohort, tiny_bundle, tmp_path_factory, monkeypatch_module):
    """predict with the shipped segmentation bundle (the default) on each rated follow-up pair."""
    monkeypatch_module.delenv("RANO_RESPONSE_SEG_BUNDLE", raising=False)
    out = {}
    for week in FOLLOWUPS:
        pair = seg_cohort.pair(week)
        folder = tmp_path_factory.mktemp("shipped") / week
        result, _ = run_predict(pair.baseline, pair.followup, folder, bundle=tiny_bundle, device="cpu",
                                attributions=False)
        out[week] = SimpleNamespace(pair=pair, out=folder, result=result,
                                    truth=seg_cohort.truth.set_index("date").loc[week])
    return out


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_shipped_bundle_reads_and_is_small():
    from RANOResponseLib.model.segmentation import DEFAULT_SEG_BUNDLE_ID, default_seg_bundle_path, read_seg_bundle

    path = default_seg_bundle_path()
    assert path.name == DEFAULT_SEG_BUNDLE_ID and path.parent.name == "Models"
    b = read_seg_bundle(path)
    assert b.kind == "rano" and b.labels == (0, 1, 2, 3) and b.label_names == LABEL_NAMES
    assert sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) < 25 * 1024 * 1024
    assert (path / "MODEL_CARD.md").is_file()


@pytest.mark.parametrize("week", FOLLOWUPS)
def test_shipped_model_measures_the_cohorts_rating(shipped_runs, week):
    """The cohort's own masks and rating are the truth (the model never saw this cohort's seed)."""
    r = shipped_runs[week]
    assert r.result.measured["category"] == r.truth["rating_written"]
    for tp, folder in (("baseline", r.pair.baseline), ("followup", r.pair.followup)):
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(r.out / f"segmentation_{tp}.nii.gz")))
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / MASK)))
        enhancing = 2 * ((labels == 1) & (mask == 1)).sum() / ((labels == 1).sum() + (mask == 1).sum())
        assert enhancing > 0.8, (tp, enhancing)
