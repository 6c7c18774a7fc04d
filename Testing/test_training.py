"""ResponseTrainingLib: the LUMIERE reader on a quirky phantom cohort (both pairings, clinical
join), leak-free patient-grouped folds and LOOCV, the class-weight grid, a tiny cross-validated
run with hybrid classifiers whose outputs and ensemble bundle are checked (the bundle predicts
through the clinical path), a run killed mid-fold that resumes to the same numbers, and the
2.5D and subtraction variants."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, cli_env, png_size
from RANOResponseLib.core.names import CLASS_NAMES
from RANOResponseLib.datasets.lumiere import (
    CLINICAL_FEATURES,
    build_pairs,
    clinical_features,
    read_clinical,
    read_ratings,
    week_key,
)
from RANOResponseLib.model.bundle import read_bundle
from RANOResponseLib.phantom.generator import PhantomConfig, generate_cohort
from ResponseTrainingLib.cli import build_parser, config_from_args
from ResponseTrainingLib.training.config import TrainConfig
from ResponseTrainingLib.training.cv import train
from ResponseTrainingLib.training.folds import class_weights, folds_table, make_folds

MODS = ("CT1", "T1", "T2", "FLAIR")
TINY = dict(size=(32, 32, 32), spacing=(6.0, 6.0, 6.0), batch_size=4, seed=5, device="cpu")
TINY_ARGS = ["--size", "32", "--spacing", "6", "--batch-size", "4", "--seed", "5", "--device", "cpu"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train-cohort")
    generate_cohort(root, PhantomConfig(patients=7, seed=11, spacing=4.0, min_followups=2, max_followups=4))
    return root


@pytest.fixture(scope="module")
def cache(cohort, tmp_path_factory) -> Path:
    """The cohort preprocessed once on the tiny grid; every run in this module shares it."""
    cache = tmp_path_factory.mktemp("cache")
    train(TrainConfig(data=cohort, out=tmp_path_factory.mktemp("prep"), cache=cache, preprocess_only=True, **TINY))
    return cache


def _silent(fn, *args, **kwargs):
    """Run ``fn`` with stdout captured (the --progress-json lines); return (result, stdout)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        result = fn(*args, **kwargs)
    return result, buf.getvalue()


# ------------------------------------------------------------------------------------ reader


def test_week_key_orders_same_week_suffixes():
    names = ["week-044", "week-000-2", "week-000-1", "week-101", "week-012"]
    assert sorted(names, key=week_key) == ["week-000-1", "week-000-2", "week-012", "week-044", "week-101"]


def test_reader_takes_csv_as_distributed(cohort):
    """Long column names and dirty values are read without editing the CSV."""
    raw = pd.read_csv(cohort / "LUMIERE-ExpertRating-v202211.csv", dtype=str, keep_default_na=False)
    assert any(c.startswith("Rating (according to RANO, PD:") for c in raw.columns)
    assert "Post-Op " in set(raw.iloc[:, 4]) and "Post-Op/PD" in set(raw.iloc[:, 4])
    r = read_ratings(cohort)
    assert len(r) == len(raw)
    assert not r["rating"].str.endswith(" ").any()
    assert "Post-Op/PD" in set(r["rating"])
    assert r["less_than_3_months"].any()


def test_pairs_skip_quirks_with_reasons(cohort, capsys):
    from RANOResponseLib.datasets.lumiere import print_pair_table

    pairs, table = build_pairs(cohort, MODS)
    truth = pd.read_csv(cohort / "phantom_truth.csv", dtype=str, keep_default_na=False)
    assert len(table) == len(truth)  # every rating row is in the table, used or skipped
    assert set(table["status"]) == {"used", "skipped"}
    reasons = " | ".join(table.loc[table.status == "skipped", "reason"])
    for expected in ("'Post-Op '", "'Post-Op/PD'", "LessThan3Months", "not a RANO timepoint", "folder", "lacks"):
        assert expected in reasons, expected
    assert (table.loc[table.status == "skipped", "reason"] != "").all()
    assert len(pairs) == int((table.status == "used").sum())
    for p in pairs:  # every pair: same patient, baseline strictly before follow-up, a response label
        assert p.baseline.parent == p.followup.parent
        assert week_key(p.baseline.name) < week_key(p.followup.name)
        row = truth[(truth.patient == p.patient) & (truth.date == p.followup.name)]
        assert row["rating_written"].str.strip().iloc[0] == p.label
    print_pair_table(table, sys.stdout)
    printed = capsys.readouterr().out
    assert f"{len(pairs)} used, {len(table) - len(pairs)} skipped" in printed
    assert "flagged LessThan3Months" in printed


def test_previous_and_reference_pairing(cohort):
    """previous: the row right before; reference: the latest earlier Post-Op / PR / CR row."""
    ratings = read_ratings(cohort)
    prev_pairs, prev_table = build_pairs(cohort, MODS, "previous")
    ref_pairs, ref_table = build_pairs(cohort, MODS, "reference")
    assert len(ref_table) == len(prev_table)
    for pairs, pairing in ((prev_pairs, "previous"), (ref_pairs, "reference")):
        for p in pairs:
            rows = ratings[ratings.patient == p.patient].assign(k=lambda d: d.week.map(week_key)).sort_values("k")
            weeks = list(rows.week)
            before = rows.iloc[: weeks.index(p.followup.name)]
            if pairing == "previous":
                assert p.baseline.name == before.week.iloc[-1]
            else:
                refs = before[before.rating.str.split("/").str[0].str.strip().isin(["Post-Op", "PR", "CR"])]
                assert p.baseline.name == refs.week.iloc[-1]
    # after a PR or CR, the reference pairing measures against that nadir, not the Post-Op scan
    nadir = [p for p in ref_pairs if not p.baseline.name.startswith("week-000")]
    post_op = [p for p in ref_pairs if p.baseline.name.startswith("week-000")]
    assert post_op and len({p.id for p in ref_pairs} - {p.id for p in prev_pairs}) > 0
    for p in nadir:
        rating = ratings[(ratings.patient == p.patient) & (ratings.week == p.baseline.name)].rating.iloc[0]
        assert rating in ("PR", "CR")


def test_clinical_features_join(cohort):
    pairs, _ = build_pairs(cohort, MODS)
    demo = pd.read_csv(cohort / "LUMIERE-Demographics_Pathology.csv", dtype=str).set_index("Patient")
    feats = clinical_features(pairs, read_clinical(cohort))
    assert list(feats.columns) == list(CLINICAL_FEATURES) and list(feats.index) == [p.id for p in pairs]
    for p in pairs:
        row, d = feats.loc[p.id], demo.loc[p.patient]
        assert row["age"] == float(d["Age at surgery (years)"])
        assert row["sex_male"] == (1.0 if d["Sex"] == "male" else 0.0)
        assert row["idh_mutant"] == (1.0 if d["IDH (WT: wild type)"] == "Mutated" else 0.0)
        assert row["mgmt_methylated"] == (1.0 if d["MGMT qualitative"] == "methylated" else 0.0)
        assert row["interval_weeks"] == week_key(p.followup.name)[0] - week_key(p.baseline.name)[0] > 0


def test_clinical_unknown_values_are_missing(tmp_path):
    (tmp_path / "LUMIERE-Demographics_Pathology.csv").write_text(
        "Patient,Survival time (weeks),Sex,Age at surgery (years),IDH (WT: wild type),IDH method,"
        "MGMT qualitative,MGMT quantitative\nPatient-001,50, Female ,61,NA,,unknown,\n", encoding="utf-8")
    c = read_clinical(tmp_path).loc["Patient-001"]
    assert c["sex_male"] == 0 and c["age"] == 61 and np.isnan(c["idh_mutant"]) and np.isnan(c["mgmt_methylated"])


# ------------------------------------------------------------------------------------ splits


def _synthetic(n_patients=30, seed=0):
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"P{i:02d}" for i in range(n_patients)], rng.integers(1, 6, n_patients))
    labels = rng.choice(4, size=len(groups), p=[0.07, 0.06, 0.2, 0.67])
    return labels, groups


def test_kfold_groups_patients_and_validation_comes_from_training_patients():
    labels, groups = _synthetic()
    plan = make_folds(labels, groups, folds=5, val_fraction=0.2, seed=3)
    assert plan.n_folds == 5 and (plan.test_fold >= 0).all()
    table = pd.DataFrame({"g": groups, "f": plan.test_fold})
    assert (table.groupby("g")["f"].nunique() == 1).all()  # no patient in two test folds
    for k in range(5):
        train_idx, val_idx, test_idx = plan.indices(k)
        assert len(train_idx) and len(val_idx) and len(test_idx)
        tr, va, te = (set(groups[i]) for i in (train_idx, val_idx, test_idx))
        assert not (tr & va) and not (tr & te) and not (va & te)
        assert sorted([*train_idx, *val_idx, *test_idx]) == list(range(len(labels)))
    again = make_folds(labels, groups, folds=5, val_fraction=0.2, seed=3)
    assert (again.test_fold == plan.test_fold).all() and all((a == b).all() for a, b in zip(again.val, plan.val))
    other = make_folds(labels, groups, folds=5, val_fraction=0.2, seed=4)
    assert not (other.test_fold == plan.test_fold).all()


def test_loocv_one_patient_per_test_fold():
    labels, groups = _synthetic(n_patients=9, seed=1)
    plan = make_folds(labels, groups, loocv=True, val_fraction=0.25, seed=0)
    assert plan.n_folds == 9
    for k in range(9):
        train_idx, val_idx, test_idx = plan.indices(k)
        assert len(set(groups[test_idx])) == 1
        assert not set(groups[val_idx]) & set(groups[test_idx]) and not set(groups[val_idx]) & set(groups[train_idx])
    ft = folds_table(plan, [f"pair{i}" for i in range(len(labels))], groups, [CLASS_NAMES[y] for y in labels])
    assert (ft.groupby("patient")["fold"].nunique() == 1).all() and ft["fold"].nunique() == 9


def test_class_weight_grid():
    """The reference study's 3 x 3 grid: loss and sampler weights each equal, 1-prevalence or
    1/prevalence (scaled to mean 1 over present classes; absent classes 0)."""
    labels = np.array([3] * 6 + [2] * 2 + [0] * 2)  # prevalence CR .2, PR 0, SD .2, PD .6
    eq = class_weights(labels, "equal")
    om = class_weights(labels, "1-prevalence")
    inv = class_weights(labels, "1/prevalence")
    np.testing.assert_allclose(eq, [1, 0, 1, 1])
    np.testing.assert_allclose(om, np.array([0.8, 0, 0.8, 0.4]) / (2.0 / 3))
    np.testing.assert_allclose(inv, np.array([5, 0, 5, 5 / 3]) / ((5 + 5 + 5 / 3) / 3))
    np.testing.assert_allclose(class_weights(labels, "inverse"), inv)  # old names still accepted
    np.testing.assert_allclose(class_weights(labels, "one-minus"), om)
    with pytest.raises(ValueError):
        class_weights(labels, "sqrt")


# ------------------------------------------------------------------------------ training runs


@pytest.fixture(scope="module")
def cv_run(cohort, cache, tmp_path_factory) -> tuple[Path, str]:
    """A 3-fold, 2-epoch run with clinical features and all hybrid classifiers (``suggested``:
    calibrated probabilities + the category measured on the cohort's masks)."""
    out = tmp_path_factory.mktemp("runs") / "cv"
    _, stdout = _silent(train, _cv_config(cohort, out, cache))
    return out, stdout


def _cv_config(cohort: Path, out: Path, cache: Path) -> TrainConfig:
    return TrainConfig(data=cohort, out=out, cache=cache, folds=3, epochs=2, clinical=True,
                       hybrid=("knn", "logreg", "rf", "svc", "suggested"), progress_json=True, bundle_id="tiny-cv",
                       **TINY)


def test_cv_run_writes_tables_plots_and_summary(cv_run):
    out, stdout = cv_run
    for name in ("pairs.csv", "folds.csv", "clinical.csv", "metrics.csv", "summary.json", "test_predictions.csv",
                 "hybrid_predictions.csv"):
        assert (out / name).is_file(), name
    for png in ("confusion_cnn.png", "roc_cnn.png", "learning_curves.png", "confusion_hybrid-logreg.png"):
        w, h = png_size(out / "plots" / png)
        assert w > 100 and h > 100
    folds = pd.read_csv(out / "folds.csv")
    assert (folds.groupby("patient")["fold"].nunique() == 1).all()
    preds = pd.read_csv(out / "test_predictions.csv")
    assert sorted(preds["pair"]) == sorted(folds["pair"])  # every pair tested exactly once
    assert (preds.merge(folds, on="pair")["fold_x"] == preds.merge(folds, on="pair")["fold_y"]).all()
    for k in range(3):  # validation pairs of fold k: training patients of fold k, never its test patients
        fp = pd.read_csv(out / "folds" / f"fold-{k}" / "predictions.csv").merge(folds, on="pair")
        val_patients = set(fp.loc[fp.role == "val", "patient"])
        assert val_patients and not val_patients & set(folds.loc[folds.fold == k, "patient"])
        assert set(fp.loc[fp.role == "test", "pair"]) == set(folds.loc[folds.fold == k, "pair"])
    metrics = pd.read_csv(out / "metrics.csv")
    assert set(metrics["model"]) == {"cnn", "hybrid-knn", "hybrid-logreg", "hybrid-rf", "hybrid-svc",
                                     "hybrid-suggested", "measured-cohort-masks"}
    cnn = metrics[metrics.model == "cnn"].set_index("fold")
    assert set(cnn.index) == {"0", "1", "2", "median", "mean", "sd", "pooled"}
    per_fold = cnn.loc[["0", "1", "2"], "balanced_accuracy"].astype(float)
    assert cnn.loc["median", "balanced_accuracy"] == pytest.approx(per_fold.median())
    assert cnn.loc["mean", "balanced_accuracy"] == pytest.approx(per_fold.mean())
    assert cnn.loc["sd", "balanced_accuracy"] == pytest.approx(per_fold.std(ddof=1))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cv"]["cnn"]["pooled"]["n"] == len(folds)
    assert np.array(summary["cv"]["cnn"]["confusion_matrix"]).sum() == len(folds)
    assert summary["provenance"]["device"] == "cpu" and summary["provenance"]["cv_scheme"].startswith("3-fold")
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    epochs = [e for e in events if e["event"] == "epoch"]
    assert len(epochs) == 3 * 2 and {"fold", "epoch", "loss", "val_bal_acc", "frac"} <= set(epochs[0])
    fracs = [e["frac"] for e in events]
    assert fracs == sorted(fracs) and events[-1]["event"] == "done" and fracs[-1] == 1.0


def test_hybrid_classifiers_fit_inside_folds(cv_run):
    """Each hybrid model is fitted on its fold's validation pairs only and scored on the test fold:
    refitting by hand from the fold's files gives the same test probabilities. A fold whose
    validation pairs hold one class only cannot fit one: its test probabilities are left empty."""
    from ResponseTrainingLib.training.hybrid import fit_predict

    out, _ = cv_run
    clinical = pd.read_csv(out / "clinical.csv").set_index("pair")
    hyb = pd.read_csv(out / "hybrid_predictions.csv")
    pcols = [f"p_{c}" for c in CLASS_NAMES]
    refitted = 0
    for k in range(3):
        fp = pd.read_csv(out / "folds" / f"fold-{k}" / "predictions.csv")
        assert set(fp["role"]) == {"val", "test"}  # the CNN's own training pairs are not used (fit on val)
        x = np.hstack([fp[pcols].to_numpy(), clinical.loc[fp["pair"]].to_numpy()])
        fit, test = (fp.role == "val").to_numpy(), (fp.role == "test").to_numpy()
        y = fp["label"].to_numpy()
        theirs = hyb[(hyb.model == "hybrid-logreg") & (hyb.fold == k)].set_index("pair").loc[fp["pair"][test]]
        if len(set(y[fit])) < 2:
            assert theirs[pcols].isna().all().all(), f"fold {k}: a one-class fit must leave no probabilities"
            continue
        mine = fit_predict("logreg", x[fit], y[fit], x[test], 4, seed=5 + k)
        np.testing.assert_allclose(theirs[pcols].to_numpy(), mine, atol=1e-9)
        refitted += 1
    assert refitted >= 1, "no fold had two classes among its validation pairs: nothing was checked"
    summary = json.loads((out / "summary.json").read_text())
    for name in ("hybrid-knn", "hybrid-logreg", "hybrid-rf", "hybrid-svc"):
        assert summary["cv"][name]["folds"] == 3 and "median" in summary["cv"][name]


def _nll_at(p: np.ndarray, y: np.ndarray, t: float) -> float:
    """Mean NLL of softmax(log p / t), written out here (not the code under test)."""
    z = np.log(np.clip(p, 1e-12, 1)) / t
    z -= z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


def test_calibration_fitted_on_each_folds_validation_pairs(cv_run):
    """Each member's temperature minimises the NLL on its fold's validation pairs (not the test
    pairs'); the bundle, calibration.csv, the card and the reliability diagrams carry it."""
    out, _ = cv_run
    bundle = read_bundle(out / "bundle")
    cal, kept = bundle.calibration, bundle.meta["ensemble"]["kept"]
    pcols = [f"p_{c}" for c in CLASS_NAMES]
    assert len(cal["temperatures"]) == len(kept) >= 1 and cal["uncertain"]["chosen_on"] == "validation"
    table = pd.read_csv(out / "calibration.csv")
    assert len(table) == 3  # every fold calibrated; the bundle carries its members' temperatures
    for k, t in zip(kept, cal["temperatures"]):
        fp = pd.read_csv(out / "folds" / f"fold-{k}" / "predictions.csv")
        val = fp[fp.role == "val"]
        p, y = val[pcols].to_numpy(), val["label"].to_numpy()
        assert table.loc[k, "temperature"] == pytest.approx(t) and table.loc[k, "validation_pairs"] == len(val)
        for other in (t * 1.05, t / 1.05):  # a minimum of the validation NLL (or at a bound of the search)
            assert _nll_at(p, y, t) <= _nll_at(p, y, other) + 1e-6 or t in (0.05, 20.0)
    assert 0 <= cal["ece_test_pooled"]["calibrated"] <= 1
    assert "## Calibration" in (out / "bundle" / "MODEL_CARD.md").read_text()
    for png in ("reliability_cnn.png", "reliability_folds.png"):
        w, h = png_size(out / "plots" / png)
        assert w > 100 and h > 100


def test_suggested_category_fitted_inside_folds_and_exported(cv_run, cache):
    """The suggestion's test predictions per fold come from a model fitted on that fold's
    validation pairs (calibrated probabilities + measured category + clinical); the measured
    category of the phantom's own masks is its label (the phantom rates by those masks); the
    bundle carries the model fitted on all folds' validation pairs as numbers."""
    from RANOResponseLib.inference.calibration import suggestion_probabilities
    from ResponseTrainingLib.training.hybrid import MEASURED_CSV, fit_predict, suggestion_features

    out, _ = cv_run
    measured = pd.read_csv(cache / MEASURED_CSV, keep_default_na=False)  # the run's --cache
    cat = dict(zip(measured["pair"], measured["category"]))
    pairs = pd.read_csv(out / "folds.csv")
    assert np.mean([cat[p] == lbl for p, lbl in zip(pairs["pair"], pairs["label"])]) >= 0.9
    clinical = pd.read_csv(out / "clinical.csv").set_index("pair")
    hyb = pd.read_csv(out / "hybrid_predictions.csv")
    pcols = [f"p_{c}" for c in CLASS_NAMES]
    calibrated = pd.read_csv(out / "test_predictions_calibrated.csv")
    refitted = 0
    summary = json.loads((out / "summary.json").read_text())
    for k, t in enumerate(summary["calibration"]["temperatures"]):
        fp = pd.read_csv(out / "folds" / f"fold-{k}" / "predictions.csv")
        z = np.log(np.clip(fp[pcols].to_numpy(), 1e-12, 1)) / t
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        test = (fp.role == "test").to_numpy()
        np.testing.assert_allclose(calibrated[calibrated.fold == k][pcols].to_numpy(), p[test], atol=1e-9)
        x = suggestion_features(p, [cat[q] or None for q in fp["pair"]], clinical.loc[fp["pair"]].to_numpy())
        fit, y = (fp.role == "val").to_numpy(), fp["label"].to_numpy()
        if len(set(y[fit])) < 2:
            continue
        theirs = hyb[(hyb.model == "hybrid-suggested") & (hyb.fold == k)].set_index("pair").loc[fp["pair"][test]]
        np.testing.assert_allclose(theirs[pcols].to_numpy(), fit_predict("suggested", x[fit], y[fit], x[test], 4,
                                                                          seed=5 + k), atol=1e-9)
        refitted += 1
    assert refitted >= 1
    sug = read_bundle(out / "bundle").suggestion
    assert sug["features"][:8] == [f"p_{c}" for c in CLASS_NAMES] + [f"measured_{c}" for c in CLASS_NAMES]
    assert len(sug["features"]) == 8 + len(CLINICAL_FEATURES)  # --clinical: clinical features too
    probe = np.zeros(len(sug["features"]))
    assert np.isclose(suggestion_probabilities(sug, probe).sum(), 1.0)


def test_cv_bundle_is_the_fold_ensemble_and_predicts(cv_run, cohort, case_pair, tmp_path):
    from RANOResponseCLI import main as cli_main
    from RANOResponseLib.inference.pipeline import predict_pair

    out, _ = cv_run
    bundle = read_bundle(out / "bundle")
    kept = bundle.meta["ensemble"]["kept"]
    assert len(bundle.weights) == len(kept) >= 1 and bundle.spec.size == (32, 32, 32)
    for k in range(3):  # the ensemble rule, recomputed from each fold's history at its chosen epoch
        fold = json.loads((out / "folds" / f"fold-{k}" / "fold.json").read_text())
        history = pd.read_csv(out / "folds" / f"fold-{k}" / "history.csv").set_index("epoch")
        val = history.loc[fold["best_epoch"], "val_balanced_accuracy"]
        assert (k in kept) == (val >= 0.35) or bundle.meta["ensemble"]["left_out"] == [], (k, val)
    assert bundle.meta["training"]["command"] and bundle.meta["training"]["device"] == "cpu"
    assert bundle.meta["metrics"]["cv"]["cnn"]["folds"] == 3
    stats = bundle.input_statistics  # what the training inputs looked like, for predict's input guard
    assert stats["pairs"] == len(pd.read_csv(out / "folds.csv")) and stats["stripped_fraction"] == 1.0
    assert set(stats["channels"]) == {str(c) for c in bundle.spec.channels}
    card = (out / "bundle" / "MODEL_CARD.md").read_text()
    assert card.count("Not for clinical use") == 1 and "| cnn | balanced accuracy |" in card
    r = predict_pair(case_pair.baseline, case_pair.followup, bundle, "cpu", attributions=True, notice=lambda m: None)
    assert r.label in CLASS_NAMES and r.summary()["ensemble_size"] == len(kept)
    assert np.isclose(sum(r.probabilities.values()), 1, atol=1e-5) and r.maps["gradcam"].GetSize()
    ev = tmp_path / "eval"  # `rano-response evaluate` on the ensemble
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert cli_main(["evaluate", "--bundle", str(out / "bundle"), "--data", str(cohort),
                         "--out", str(ev), "--device", "cpu"]) == 0
    m = json.loads((ev / "metrics.json").read_text())
    assert m["n"] == len(pd.read_csv(out / "folds.csv"))


def _absolute_paths(text: str) -> list[str]:
    """The words of ``text`` that are absolute paths (POSIX, or Windows with a drive letter)."""
    words = re.split(r"[\s`'\"=,;()\[\]{}|]+", text)
    return [w for w in words if w.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:[\\/]", w)]


def test_bundle_names_no_path_of_this_machine(cv_run, cohort, cache):
    """bundle.json and MODEL_CARD.md travel with the model: the data set is named by its folder's
    name and the phantom recipe, the command's paths by their names; no path of this machine."""
    out, _ = cv_run
    texts = {name: (out / "bundle" / name).read_text(encoding="utf-8") for name in ("bundle.json", "MODEL_CARD.md")}
    for name, text in texts.items():
        for here in (cohort, out, cache, REPO, Path.home(), Path(tempfile.gettempdir())):
            assert str(here) not in text, f"{name} names {here}"
        assert _absolute_paths(text) == [], name
    training = json.loads(texts["bundle.json"])["training"]
    assert training["data"] == cohort.name
    assert training["data_source"]["command"] == json.loads((cohort / "phantom.json").read_text())["command"]
    assert f"data `{cohort.name}`, generated with `rano-response phantom " in texts["MODEL_CARD.md"]
    argv = shlex.split(training["command"])  # the run's command: parsed, the same settings
    assert argv[:2] == ["rano-response", "train"]
    parsed = config_from_args(build_parser().parse_args(argv[2:]))
    assert (parsed.data, parsed.out, parsed.cache) == (Path(cohort.name), Path(out.name), Path(cache.name))
    assert replace(parsed, data=cohort, out=out, cache=cache) == _cv_config(cohort, out, cache)


def test_shipped_bundle_names_no_path_of_the_machine_that_trained_it():
    from RANOResponseLib.model.bundle import default_bundle_path

    bundle = default_bundle_path()
    for name in ("bundle.json", "MODEL_CARD.md"):
        assert _absolute_paths((bundle / name).read_text(encoding="utf-8")) == [], name
    training = read_bundle(bundle).meta["training"]
    assert training["data"].startswith("phantom-train")
    assert training["data_source"]["command"].startswith("rano-response phantom")


def _cmd(data: Path, out: Path, cache: Path, epochs: int, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "ResponseTraining" / "ResponseTraining.py"), "--", "train", "--data", str(data),
            "--out", str(out), "--cache", str(cache), "--folds", "2", "--epochs", str(epochs), *TINY_ARGS, *extra]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_numbers(cohort, cache, tmp_path):
    """Killed during fold 1 (fold 0 finished, fold 1 checkpointed): ``--resume`` skips fold 0,
    continues fold 1 from its last epoch and ends with the numbers of an uninterrupted run."""
    full = tmp_path / "full"
    _silent(train, TrainConfig(data=cohort, out=full, cache=cache, folds=2, epochs=4, **TINY))
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(cohort, killed, cache, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=cli_env(), start_new_session=True)
    deadline = time.time() + 300
    hist = killed / "folds" / "fold-1" / "history.csv"
    while not hist.exists():  # written right after fold 1's first checkpoint
        assert proc.poll() is None and time.time() < deadline, "no fold-1 checkpoint written"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (killed / "folds" / "fold-0" / "fold.json").is_file()
    assert not (killed / "folds" / "fold-1" / "fold.json").exists() and not (killed / "bundle").exists()
    epochs_before = len(pd.read_csv(hist))

    res = subprocess.run(_cmd(cohort, killed, cache, 4, "--resume"), capture_output=True, text=True, env=cli_env())
    assert res.returncode == 0, res.stderr[-2000:]
    assert "fold 0: finished earlier" in res.stderr
    assert f"fold 1: resumed after epoch {epochs_before}" in res.stderr
    for k in (0, 1):
        h_full = pd.read_csv(full / "folds" / f"fold-{k}" / "history.csv")
        h_res = pd.read_csv(killed / "folds" / f"fold-{k}" / "history.csv")
        assert list(h_res["epoch"]) == list(h_full["epoch"])
        np.testing.assert_allclose(h_res[["train_loss", "val_loss"]], h_full[["train_loss", "val_loss"]],
                                   rtol=1e-5, atol=1e-6)
    p_full, p_res = pd.read_csv(full / "test_predictions.csv"), pd.read_csv(killed / "test_predictions.csv")
    np.testing.assert_allclose(p_res.filter(like="p_"), p_full.filter(like="p_"), atol=1e-5)
    m_full, m_res = pd.read_csv(full / "metrics.csv"), pd.read_csv(killed / "metrics.csv")
    np.testing.assert_allclose(m_res["balanced_accuracy"], m_full["balanced_accuracy"], atol=1e-9)
    bundle = read_bundle(killed / "bundle")
    assert len(bundle.weights) == 2 and bundle.meta["training"]["command"].startswith("rano-response train ")
    # the command as typed, its absolute paths by their names
    assert f"--data {cohort.name} --out {killed.name} --cache {cache.name} " in bundle.meta["training"]["command"]


def test_resume_refuses_other_settings(cohort, cache, tmp_path):
    from RANOResponseLib.core.errors import RANOInputError

    out = tmp_path / "run"
    _silent(train, TrainConfig(data=cohort, out=out, cache=cache, folds=2, epochs=1, only_fold=0, **TINY))
    with pytest.raises(RANOInputError, match="different settings"):
        # same folder, other learning rate: the unfinished fold 1 is fine, but fold 0 is not reused
        _silent(train, TrainConfig(data=cohort, out=out, cache=cache, folds=2, epochs=1, lr=5e-4, only_fold=0,
                                   resume=True, **TINY))


def test_only_fold_then_resume_aggregates(cohort, cache, tmp_path):
    """Folds run separately (e.g. one per GPU) and a final --resume run only aggregates."""
    out = tmp_path / "par"
    for k in (0, 1):
        summary, _ = _silent(train, TrainConfig(data=cohort, out=out, cache=cache, folds=2, epochs=1, only_fold=k,
                                                **TINY))
        assert summary == {} and not (out / "metrics.csv").exists()
    summary, _ = _silent(train, TrainConfig(data=cohort, out=out, cache=cache, folds=2, epochs=1, resume=True, **TINY))
    assert summary["cv"]["cnn"]["folds"] == 2 and len(read_bundle(out / "bundle").weights) == 2


# ------------------------------------------------------------------------------------ variants


def test_subtraction_channels_follow_up_minus_baseline(case_studies, registration, tmp_path):
    """A 'difference' channel is the z-scored follow-up minus the z-scored baseline, and a bundle
    declaring it is read back with that channel kind (so predict builds the same input)."""
    from RANOResponseLib.imaging.preprocessing import (
        InputSpec,
        default_channels,
        difference_channels,
        prepare_pair,
    )

    base, fu = case_studies
    stack = InputSpec(("CT1", "FLAIR"), tuple(default_channels(("CT1", "FLAIR"))), (6.0,) * 3, (32,) * 3)
    diff = InputSpec(("CT1", "FLAIR"), tuple(difference_channels(("CT1", "FLAIR"))), (6.0,) * 3, (32,) * 3)
    a = prepare_pair(base, fu, registration.transform, stack).array
    d = prepare_pair(base, fu, registration.transform, diff).array
    assert d.shape == (2, 32, 32, 32)
    np.testing.assert_allclose(d, a[0::2] - a[1::2], atol=1e-6)
    cfg = TrainConfig(data=tmp_path, out=tmp_path, modalities=("CT1", "FLAIR"), channels="stack+difference")
    assert [str(c) for c in cfg.spec().channels] == ["CT1:followup", "CT1:baseline", "FLAIR:followup",
                                                     "FLAIR:baseline", "CT1:difference", "FLAIR:difference"]


def test_difference_training_run_exports_a_predictable_bundle(cohort, tmp_path_factory, case_pair):
    from RANOResponseLib.inference.pipeline import predict_pair

    out = tmp_path_factory.mktemp("runs") / "diff"
    _silent(train, TrainConfig(data=cohort, out=out, folds=2, epochs=1, modalities=("CT1", "FLAIR"),
                               channels="difference", augment=False, **TINY))
    b = read_bundle(out / "bundle")
    assert [str(c) for c in b.spec.channels] == ["CT1:difference", "FLAIR:difference"]
    r = predict_pair(case_pair.baseline, case_pair.followup, b, "cpu", attributions=False, notice=lambda m: None)
    assert r.prepared.array.shape[0] == 2 and r.label in CLASS_NAMES


def test_25d_timm_run_exports_a_bundle_predict_runs(cohort, cache, tmp_path, case_pair):
    """2.5D: axial slices through the grid centre into a timm 2D CNN; trained in the same CV
    loop, exported as a bundle that predict (with Grad-CAM) runs like a 3D one."""
    from RANOResponseLib.inference.pipeline import predict_pair

    out = tmp_path / "run25d"
    _silent(train, TrainConfig(data=cohort, out=out, cache=cache, folds=2, epochs=1, arch="timm25d",
                               backbone="test_resnet", slices=3, slice_step=3, augment=False, **TINY))
    b = read_bundle(out / "bundle")
    assert b.architecture["name"] == "timm25d" and b.architecture["args"]["backbone"] == "test_resnet"
    r = predict_pair(case_pair.baseline, case_pair.followup, b, "cpu", attributions=True, notice=lambda m: None)
    assert r.label in CLASS_NAMES and r.maps["gradcam"].GetSize() == r.maps["saliency"].GetSize()


def test_25d_transfer_learning_from_a_local_file_only(tmp_path):
    """--pretrained-weights loads a local timm checkpoint (first conv adapted to k*C channels);
    without it nothing is pretrained and nothing is downloaded."""
    import timm
    import torch
    from RANOResponseLib.model.networks import architecture_args, build_network

    src = timm.create_model("test_resnet", pretrained=False, num_classes=4)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    args = architecture_args("timm25d", 8, 4, backbone="test_resnet", slices=3)
    net = build_network("timm25d", **args, pretrained_file=str(tmp_path / "w.pth"))
    first, name = "conv1.0.weight", "layer1.0.conv2.weight"  # the stem conv and a later one
    torch.testing.assert_close(net.net.state_dict()[name], src.state_dict()[name])
    assert src.state_dict()[first].shape[1] == 3 and net.net.state_dict()[first].shape[1] == 3 * 8
    fresh = build_network("timm25d", **args)
    assert not torch.equal(fresh.net.state_dict()[name], src.state_dict()[name])


# ------------------------------------------------------------------------------- entry points


def test_script_entry_point_parses_args_after_double_dash(tmp_path):
    """`python ResponseTraining.py -- train ...` (the Slicer --python-script form) reaches the
    same parser: bad input is a one-line error with exit status 2."""
    script = REPO / "ResponseTraining" / "ResponseTraining.py"
    res = subprocess.run([sys.executable, str(script), "--", "train", "--data", str(tmp_path / "none"), "--out",
                          str(tmp_path / "o"), "--device", "cpu"], capture_output=True, text=True, env=cli_env())
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: ") and "LUMIERE-ExpertRating" in res.stderr
    usage = build_parser().format_help()
    for flag in ("--folds", "--loocv", "--epochs", "--arch", "--modalities", "--pairing", "--seed", "--device",
                 "--resume", "--progress-json", "--hybrid", "--only-fold", "--grad-shards"):
        assert flag in usage, flag


def test_weighting_grid_runs_each_cell(cohort, cache, tmp_path):
    """`--loss-weighting equal,1/prevalence`: one CV run per cell (shared cache) and grid.csv."""
    from ResponseTrainingLib.cli import main

    out = tmp_path / "grid"
    code, _ = _silent(main, ["--data", str(cohort), "--out", str(out), "--cache", str(cache), "--folds", "2",
                             "--epochs", "1", "--no-augment", *TINY_ARGS, "--loss-weighting", "equal,1/prevalence",
                             "--sampler-weighting", "1-prevalence"])
    assert code == 0
    grid = pd.read_csv(out / "grid.csv")
    assert list(grid["loss_weighting"]) == ["equal", "1/prevalence"] and set(grid["sampler_weighting"]) == {
        "1-prevalence"}
    for run in grid["run"]:
        cfg = json.loads((Path(run) / "summary.json").read_text())["provenance"]["config"]
        assert cfg["sampler_weighting"] == "1-prevalence" and read_bundle(Path(run) / "bundle").weights
    assert {json.loads((Path(r) / "summary.json").read_text())["provenance"]["config"]["loss_weighting"]
            for r in grid["run"]} == {"equal", "1/prevalence"}
