"""ResponseTrainingLib: the LUMIERE reader on a quirky phantom cohort, leak-free splits, and a
tiny end-to-end training run that is killed, resumed, and exports a bundle predict can load."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from RANOResponseLib.bundle import read_bundle
from RANOResponseLib.phantom import PhantomConfig, generate_cohort
from ResponseTrainingLib.lumiere import build_pairs, read_ratings, week_key
from ResponseTrainingLib.training import class_weights, holdout_split

MODS = ("CT1", "T1", "T2", "FLAIR")
TINY = ["--size", "32", "--spacing", "6", "--batch-size", "4", "--no-augment"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train-cohort")
    generate_cohort(root, PhantomConfig(patients=7, seed=11, spacing=4.0, min_followups=2, max_followups=4))
    return root


def test_week_key_orders_same_week_suffixes():
    names = ["week-044", "week-000-2", "week-000-1", "week-101", "week-012"]
    assert sorted(names, key=week_key) == ["week-000-1", "week-000-2", "week-012", "week-044", "week-101"]


def test_reader_takes_csv_as_distributed(cohort):
    """Long column names and dirty values are read without editing the CSV."""
    raw = pd.read_csv(cohort / "LUMIERE-ExpertRating-v202211.csv", dtype=str, keep_default_na=False)
    assert any(c.startswith("Rating (according to RANO, PD:") for c in raw.columns)
    r = read_ratings(cohort)
    assert len(r) == len(raw)
    assert not r["rating"].str.endswith(" ").any()
    assert "Post-Op/PD" in set(r["rating"])
    assert r["less_than_3_months"].any()


def test_pairs_skip_quirks_with_reasons(cohort):
    pairs, table = build_pairs(cohort, MODS)
    truth = pd.read_csv(cohort / "phantom_truth.csv", dtype=str, keep_default_na=False)
    assert set(table["status"]) == {"used", "skipped"}
    reasons = " | ".join(table.loc[table.status == "skipped", "reason"])
    for expected in ("not a response class", "LessThan3Months", "not a RANO timepoint", "missing", "lacks"):
        assert expected in reasons, expected
    assert len(pairs) == int((table.status == "used").sum())
    for p in pairs:  # every pair: same patient, baseline strictly before follow-up, a response label
        assert p.baseline.parent == p.followup.parent
        assert week_key(p.baseline.name) < week_key(p.followup.name)
        assert p.label in ("CR", "PR", "SD", "PD")
        row = truth[(truth.patient == p.patient) & (truth.date == p.followup.name)]
        assert row["rating_written"].str.strip().iloc[0] == p.label


def test_holdout_split_groups_patients():
    rng = np.random.default_rng(0)
    groups = np.repeat([f"P{i}" for i in range(30)], 4)
    labels = rng.choice(4, size=len(groups), p=[0.07, 0.06, 0.2, 0.67])
    split = holdout_split(labels, groups, 0.2, 0.2, seed=3)
    for s in ("train", "val", "test"):
        assert (split == s).any()
    per_patient = pd.DataFrame({"g": groups, "s": split}).groupby("g")["s"].nunique()
    assert (per_patient == 1).all()
    again = holdout_split(labels, groups, 0.2, 0.2, seed=3)
    assert (split == again).all()


def test_class_weights():
    labels = np.array([3] * 6 + [2] * 2 + [0] * 2)
    inv = class_weights(labels, "inverse")
    assert inv[1] == 0  # absent class
    assert inv[0] == pytest.approx(inv[2]) and inv[0] == pytest.approx(3 * inv[3])
    assert np.allclose(class_weights(labels, "equal")[[0, 2, 3]], 1)
    om = class_weights(labels, "one-minus")
    assert om[0] > om[3]


def _train_cmd(data: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "RANOResponseLib.cli", "train", "--data", str(data), "--out", str(out),
            "--epochs", str(epochs), "--seed", "5", "--device", "cpu", *TINY, *extra]


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory) -> Path:
    """An uninterrupted 3-epoch run."""
    full = tmp_path_factory.mktemp("runs") / "full"
    subprocess.run(_train_cmd(cohort, full, 3), check=True, capture_output=True)
    return full


@pytest.mark.slow
def test_evaluate_scores_every_usable_pair(cohort, trained, tmp_path):
    """`rano-response evaluate` runs the clinical path on each usable pair and reports metrics
    over exactly those pairs."""
    from RANOResponseLib.cli import main

    out = tmp_path / "eval"
    assert main(["evaluate", "--bundle", str(trained / "bundle"), "--data", str(cohort), "--out", str(out),
                 "--device", "cpu"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    pairs = pd.read_csv(out / "pairs.csv")
    preds = pd.read_csv(out / "predictions.csv")
    assert metrics["n"] == len(preds) == int((pairs.status == "used").sum())
    assert np.allclose(preds[[f"p_{c}" for c in ("CR", "PR", "SD", "PD")]].sum(1), 1, atol=1e-5)
    assert np.array(metrics["confusion_matrix"]).sum() == metrics["n"]


@pytest.mark.slow
def test_train_killed_mid_epoch_resumes_and_matches(cohort, trained, tmp_path):
    """A run killed during its second epoch resumes from the last checkpoint, finishes, and
    ends with the same history as an uninterrupted run on the same seed."""
    full = trained
    killed = tmp_path / "killed"
    # share the preprocessed cache so the second run starts training at once
    (killed).mkdir()
    os.symlink(full / "cache", killed / "cache")
    proc = subprocess.Popen(_train_cmd(cohort, killed, 3), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.time() + 240
    while not (killed / "history.csv").exists():  # written right after the epoch-1 checkpoint
        assert proc.poll() is None and time.time() < deadline, "no checkpoint written"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # during epoch 2
    proc.wait()
    history = pd.read_csv(killed / "history.csv")
    assert len(history) < 3 and not (killed / "bundle").exists()

    res = subprocess.run(_train_cmd(cohort, killed, 3, "--resume"), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed after epoch" in res.stderr
    h_full, h_resumed = pd.read_csv(full / "history.csv"), pd.read_csv(killed / "history.csv")
    assert list(h_resumed["epoch"]) == [1, 2, 3]
    np.testing.assert_allclose(h_resumed["val_loss"], h_full["val_loss"], rtol=1e-4, atol=1e-5)

    for run in (full, killed):
        for name in ("folds.csv", "pairs.csv", "summary.json", "history.csv", "test_predictions.csv"):
            assert (run / name).is_file(), name
    folds = pd.read_csv(full / "folds.csv")
    assert (folds.groupby("patient")["split"].nunique() == 1).all()
    summary = json.loads((full / "summary.json").read_text())
    assert 0.0 <= summary["holdout_test"]["balanced_accuracy"] <= 1.0
    assert summary["provenance"]["command"].startswith("rano-response train")
    bundle = read_bundle(full / "bundle")
    assert bundle.spec.size == (32, 32, 32)
    assert "holdout_test" in bundle.meta["metrics"]
    assert (full / "bundle" / "MODEL_CARD.md").read_text().count("Not for clinical use") == 1
