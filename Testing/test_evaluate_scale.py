"""``rano-response evaluate`` at cohort scale (issue 12): worker processes give the same
predictions as one process, finished pairs are skipped on resume, the full path agrees with the
preprocessing cache, and the written confusion matrix, balanced accuracy with its bootstrap
interval and ECE agree with the per-pair predictions."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_bundle, png_size
from RANOResponseLib.core.names import CLASS_NAMES
from RANOResponseLib.phantom.generator import PhantomConfig, generate_cohort
from ResponseTrainingLib.analysis import evaluate as ev
from ResponseTrainingLib.analysis.calibration import expected_calibration_error
from ResponseTrainingLib.analysis.metrics import bootstrap_balanced_accuracy

PCOLS = [f"p_{c}" for c in CLASS_NAMES]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A 3-patient phantom at 4 mm, a 2-member random bundle with a calibration, a shared cache."""
    root = tmp_path_factory.mktemp("eval")
    data = root / "cohort"
    generate_cohort(data, PhantomConfig(patients=3, seed=8, spacing=4.0, min_followups=2, max_followups=2,
                                        quirks=False))
    bundle = make_bundle(root / "bundle", n_models=2, seed=4)
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["calibration"] = {"method": "temperature", "temperatures": [0.5, 2.0],
                           "uncertain": {"top_probability_below": 0.5, "spread_above": 0.2, "chosen_on": "validation"}}
    (bundle / "bundle.json").write_text(json.dumps(meta))
    return data, bundle, root / "cache"


def _quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*args, **kwargs)


@pytest.fixture(scope="module")
def parallel(setup, tmp_path_factory) -> tuple[Path, dict]:
    data, bundle, cache = setup
    out = tmp_path_factory.mktemp("eval-out") / "parallel"
    m = _quiet(ev.evaluate, bundle, data, out, "cpu", workers=2, threads=1, fast=True, cache=cache, bootstrap=300)
    return out, m


def test_workers_give_the_same_predictions_as_one_process(setup, parallel, tmp_path):
    data, bundle, cache = setup
    out, m = parallel
    single = _quiet(ev.evaluate, bundle, data, tmp_path / "one", "cpu", workers=1, fast=True, cache=cache, bootstrap=300)
    a, b = pd.read_csv(out / "predictions.csv"), pd.read_csv(tmp_path / "one" / "predictions.csv")
    assert len(a) == m["n"] >= 4 and list(a["pair"]) == list(b["pair"])
    np.testing.assert_allclose(a[PCOLS].to_numpy(), b[PCOLS].to_numpy(), atol=1e-6)
    assert single["balanced_accuracy"] == m["balanced_accuracy"]
    assert len(list((out / "pairs").glob("*.json"))) == len(a)


def test_written_metrics_agree_with_the_per_pair_predictions(parallel):
    out, m = parallel
    preds = pd.read_csv(out / "predictions.csv")
    y = preds["label"].map(CLASS_NAMES.index).to_numpy()
    p = preds[PCOLS].to_numpy()
    cm = pd.read_csv(out / "confusion.csv", index_col=0).to_numpy()
    by_hand = pd.crosstab(pd.Categorical(y, categories=range(4)), pd.Categorical(p.argmax(1), categories=range(4)),
                          dropna=False).to_numpy()
    np.testing.assert_array_equal(cm, by_hand)
    recalls = [cm[i, i] / cm[i].sum() for i in range(4) if cm[i].sum()]
    assert m["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    lo, hi = m["balanced_accuracy_ci95"]
    assert 0 <= lo <= m["balanced_accuracy"] <= hi <= 1
    assert m["ece"] == pytest.approx(expected_calibration_error(y, p))
    raw = preds[[f"p_uncalibrated_{c}" for c in CLASS_NAMES]].to_numpy()
    assert m["ece_uncalibrated"] == pytest.approx(expected_calibration_error(y, raw)) and m["calibrated"]
    assert not np.allclose(raw, p)  # the bundle's temperatures were applied
    assert m["uncertain"]["flagged"] == int(preds["uncertain"].sum())
    for png in ("confusion.png", "reliability.png"):
        w, h = png_size(out / png)
        assert w > 100 and h > 100


def test_resume_runs_only_unfinished_pairs(setup, parallel, monkeypatch):
    data, bundle, cache = setup
    out, _ = parallel
    files = sorted((out / "pairs").glob("*.json"))
    before = {f.name: f.stat().st_mtime_ns for f in files}
    files[0].unlink()  # as if the run was killed before this pair was written
    ran = []
    real = ev._run_pair
    monkeypatch.setattr(ev, "_run_pair", lambda pair, path: ran.append(pair.id) or real(pair, path))
    _quiet(ev.evaluate, bundle, data, out, "cpu", workers=1, resume=True, fast=True, cache=cache, bootstrap=300)
    assert ran == [files[0].stem]
    after = {f.name: f.stat().st_mtime_ns for f in (out / "pairs").glob("*.json")}
    assert {k: v for k, v in after.items() if k != files[0].name} == {k: v for k, v in before.items()
                                                                     if k != files[0].name}


def test_full_path_agrees_with_the_cache(setup, parallel, tmp_path):
    """predict_pair (float32 input) against the float16 cache: the same pairs, nearly the same numbers."""
    data, bundle, _ = setup
    out, _ = parallel
    m = _quiet(ev.evaluate, bundle, data, tmp_path / "full", "cpu", workers=1, maps=False, segmentation=False,
               bootstrap=300)
    full, fast = pd.read_csv(tmp_path / "full" / "predictions.csv"), pd.read_csv(out / "predictions.csv")
    np.testing.assert_allclose(full[PCOLS].to_numpy(), fast[PCOLS].to_numpy(), atol=0.02)
    assert m["mode"] == "full" and "explanations" not in m and "suggested" not in m


def test_bootstrap_resamples_patients():
    y = np.array([0, 1, 2, 3, 0, 1])
    assert bootstrap_balanced_accuracy(y, y, n=50) == (1.0, 1.0)
    pred = np.array([0, 1, 2, 3, 3, 3])
    # one patient: every resample is that patient, so the interval is the point estimate
    lo, hi = bootstrap_balanced_accuracy(y, pred, np.zeros(6), n=50)
    assert lo == hi == pytest.approx(np.mean([0.5, 0.5, 1.0, 1.0]))
    lo, hi = bootstrap_balanced_accuracy(y, pred, np.array([1, 1, 2, 2, 3, 3]), n=200, seed=1)
    assert lo < hi and bootstrap_balanced_accuracy(y, pred, np.array([1, 1, 2, 2, 3, 3]), n=200, seed=1) == (lo, hi)


def test_cli_evaluate_prints_the_interval(setup, tmp_path, capsys):
    from RANOResponseCLI import main

    data, bundle, cache = setup
    with contextlib.redirect_stderr(io.StringIO()):
        code = main(["evaluate", "--bundle", str(bundle), "--data", str(data), "--out", str(tmp_path / "cli"),
                     "--device", "cpu", "--fast", "--cache", str(cache), "--bootstrap", "100"])
    assert code == 0
    out = capsys.readouterr().out
    assert "95% CI" in out and "ECE" in out and (tmp_path / "cli" / "metrics.json").is_file()
