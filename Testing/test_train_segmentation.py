"""``rano-response train-seg``: cases and cache, patient-grouped folds, resume, the exported
segmentation bundle, Dice, bad input, and the shipped bundle on a phantom it never saw.

The training runs are tiny (a 3-patient 3 mm cohort, a 6 mm model grid, 16^3 patches, a few
steps): they check the machinery, not the model's quality; the shipped bundle's test checks that.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
from RANOResponseLib.imaging.io import read_study
from RANOResponseLib.inference.inputs import find_brain
from RANOResponseLib.inference.segmentation import segment_study
from RANOResponseLib.model.segmentation import load_seg_models, read_seg_bundle
from RANOResponseLib.phantom.generator import PhantomConfig, generate_cohort
from ResponseTrainingLib.analysis.segmentation_metrics import choose_min_lesion_ml, region_dice
from ResponseTrainingLib.data.segmentation_data import cache_cases, find_seg_cases
from ResponseTrainingLib.training import segmentation as seg_training
from ResponseTrainingLib.training.segmentation import SegTrainConfig
from ResponseTrainingLib.training.segmentation_cv import train_segmentation

from conftest import REPO, cli_command, cli_env

COHORT = PhantomConfig(patients=3, seed=5, spacing=3.0, min_followups=1, max_followups=1, quirks=False)
# Seeds of the cohorts the shipped bundle was trained, selected and evaluated on (its card's
# provenance); the test's phantom must use another.
SHIPPED = REPO / "Resources" / "Models" / "rano-seg-phantom-v1"


def _masks(root: Path) -> list[Path]:
    return sorted(root.glob("Imaging/*/*/DeepBraTumIA-segmentation/native/segmentation/seg_mask.nii.gz"))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("seg-cohort")
    generate_cohort(root, COHORT)
    return root


def _cfg(cohort: Path, out: Path, **kw) -> SegTrainConfig:
    base = SegTrainConfig(data=[cohort], out=out, architecture="UNet", spacing=6.0, folds=3, only_fold=0,
                          epochs=1, steps=2, patch=16, batch_size=2, val_cases=1, test_limit=1, seed=3,
                          threads=1, progress=False)
    return replace(base, **kw)


@pytest.fixture(scope="module")
def run(cohort, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("seg-run")
    train_segmentation(_cfg(cohort, out, cache=out.parent / "seg-cache", only_fold=None, export="all"))
    return out


def test_every_masked_timepoint_is_a_case_and_folds_group_patients(cohort, run):
    masks = _masks(cohort)
    cases = find_seg_cases([cohort], ("CT1", "T1", "T2", "FLAIR"))
    assert sorted(c.mask for c in cases) == masks
    folds = pd.read_csv(run / "folds.csv", dtype={"val_for_folds": str}).fillna("")
    assert len(folds) == len(masks)
    assert folds.groupby("patient")["fold"].nunique().max() == 1  # a patient's timepoints share a fold
    assert sorted(folds["fold"].unique()) == [0, 1, 2]
    for f in range(3):  # validation patients come from the training patients of that fold
        val = folds[folds["val_for_folds"].str.split(";").map(lambda v, f=f: str(f) in v)]
        assert not val.empty and (val["fold"] != f).all()


def test_cache_is_reused_and_keyed_by_spacing(cohort, tmp_path):
    cases = find_seg_cases([cohort], ("CT1", "T1", "T2", "FLAIR"))[:2]
    first = cache_cases(cases, ("CT1", "T1", "T2", "FLAIR"), (6.0,) * 3, tmp_path, progress=False)
    stamps = [p.stat().st_mtime_ns for p in first]
    again = cache_cases(cases, ("CT1", "T1", "T2", "FLAIR"), (6.0,) * 3, tmp_path, progress=False)
    assert again == first and [p.stat().st_mtime_ns for p in again] == stamps
    other = cache_cases(cases, ("CT1", "T1", "T2", "FLAIR"), (8.0,) * 3, tmp_path, progress=False)
    assert set(other).isdisjoint(first)
    with np.load(first[0]) as z:  # the target is the mask's labels on the model grid
        assert z["image"].shape[0] == 4 and z["image"].shape[1:] == z["label"].shape
        truth = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(cases[0].mask))))) - {0}
        assert set(np.unique(z["label"])) - {0} <= truth and (z["label"] > 0).any()


def test_run_writes_tables_plots_and_a_bundle_that_reads_back(run):
    for name in ("metrics.csv", "summary.json", "plots/curves.png", "plots/dice_per_fold.png",
                 *(f"fold-{k}/{f}" for k in range(3) for f in ("history.csv", "checkpoint.pt", "min_lesion_ml.csv"))):
        assert (run / name).is_file(), name
    bundle = read_seg_bundle(run / "bundle")
    assert bundle.kind == "rano" and bundle.architecture["name"] == "UNet"
    assert bundle.spacing == (6.0, 6.0, 6.0) and bundle.labels == (0, 1, 2, 3)
    for w in bundle.weights:
        assert hashlib.sha256((run / "bundle" / w["file"]).read_bytes()).hexdigest() == w["sha256"]
    assert len(load_seg_models(bundle)) == 3  # --export all: the three fold models
    meta = json.loads((run / "bundle" / "bundle.json").read_text())
    chosen = [pd.read_csv(run / f"fold-{k}" / "min_lesion_ml.csv") for k in range(3)]
    assert min(c["min_lesion_ml"].min() for c in chosen) <= meta["min_lesion_ml"] <= max(
        c["min_lesion_ml"].max() for c in chosen)
    card = (run / "bundle" / "MODEL_CARD.md").read_text()
    assert "UNet" in card and "train-seg" in card and "Limitations" in card
    metrics = pd.read_csv(run / "metrics.csv")  # --test-limit 1: one test timepoint per fold
    assert sorted(metrics["fold"]) == [0, 1, 2] and metrics["dice_whole"].between(0, 1).all()
    folds = pd.read_csv(run / "folds.csv")
    for _, row in metrics.iterrows():  # each fold is scored on its own test patients
        assert folds.loc[folds["case"] == row["case"], "fold"].item() == row["fold"]


def test_resume_continues_from_the_checkpoint(cohort, run, tmp_path, monkeypatch):
    cache = run.parent / "seg-cache"
    straight = tmp_path / "straight"
    train_segmentation(_cfg(cohort, straight, epochs=2, cache=cache))
    resumed = tmp_path / "resumed"
    validate, calls = seg_training._validate, []

    def crash_in_epoch_two(*args, **kwargs):  # the run dies after epoch 1's checkpoint
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return validate(*args, **kwargs)

    monkeypatch.setattr(seg_training, "_validate", crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train_segmentation(_cfg(cohort, resumed, epochs=2, cache=cache))
    monkeypatch.setattr(seg_training, "_validate", validate)
    assert pd.read_csv(resumed / "fold-0" / "history.csv")["epoch"].tolist() == [1]
    train_segmentation(_cfg(cohort, resumed, epochs=2, cache=cache, resume=True))
    a = pd.read_csv(straight / "fold-0" / "history.csv")
    b = pd.read_csv(resumed / "fold-0" / "history.csv")
    assert b["epoch"].tolist() == [1, 2]
    np.testing.assert_allclose(b["train_loss"], a["train_loss"], rtol=1e-4)
    wa = torch.load(straight / "fold-0" / "checkpoint.pt", weights_only=True)["model"]
    wb = torch.load(resumed / "fold-0" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_dice_of_a_perfect_and_of_a_known_prediction(cohort):
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(_masks(cohort)[0]))).astype(np.uint8)
    assert {1, 3} <= set(np.unique(truth))
    row = region_dice(truth, truth, 0.027)
    assert all(row[f"dice_{r}"] == 1.0 for r in ("enhancing", "edema", "whole"))
    half = truth.copy()
    enh = np.argwhere(truth == 1)
    drop = enh[: len(enh) // 2]
    half[tuple(drop.T)] = 0
    n = int((truth == 1).sum())
    expected = 2 * (n - len(drop)) / (n + n - len(drop))
    assert region_dice(half, truth, 0.027)["dice_enhancing"] == pytest.approx(expected)


def test_min_lesion_threshold_removes_a_false_positive_speck():
    truth = np.zeros((20, 20, 20), np.uint8)
    pred = truth.copy()
    pred[5:7, 5:7, 5] = 1  # 4 voxels of 8 mm^3: 0.032 ml of enhancing where there is none
    lesion_truth = truth.copy()
    lesion_truth[8:16, 8:16, 8:16] = 1  # a real 4 ml lesion, predicted exactly
    chosen, table = choose_min_lesion_ml([pred, lesion_truth.copy()], [truth, lesion_truth], voxel_ml=0.008)
    assert 0.032 < chosen < 4.0
    assert table["enhancing_score"].max() == 1.0


def test_bad_data_is_a_one_line_error(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run([*cli_command(), "train-seg", "--data", str(tmp_path / "nowhere"), "--out", str(out)],
                       capture_output=True, text=True, env=cli_env(), timeout=300)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nowhere" in lines[0]
    assert not out.exists()


def test_shipped_bundle_segments_an_unseen_phantom(tmp_path):
    bundle = read_seg_bundle(SHIPPED)
    assert sum((SHIPPED / f).stat().st_size for f in [w["file"] for w in bundle.weights]) < 25e6
    seeds = json.dumps(bundle.meta["provenance"].get("data_source"))
    seed = 4242
    assert f'"seed": {seed}' not in seeds
    root = tmp_path / "unseen"
    generate_cohort(root, PhantomConfig(patients=1, seed=seed, spacing=2.0, min_followups=1, max_followups=1,
                                        quirks=False))
    models = load_seg_models(bundle)
    scores = []
    for mask in _masks(root):
        folder = mask.parents[3]
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(mask))) == 1
        if truth.sum() * 0.008 < 0.5:  # only timepoints with measurable enhancing tumour
            continue
        study = read_study(folder, bundle.modalities)
        seg = segment_study(study, find_brain(study, "CT1", "auto").image, bundle, models=models)
        pred = sitk.GetArrayFromImage(seg.image) == 1
        scores.append(2 * (pred & truth).sum() / (pred.sum() + truth.sum()))
    assert scores, "the phantom has no timepoint with enhancing tumour"
    assert float(np.mean(scores)) >= 0.8, scores
