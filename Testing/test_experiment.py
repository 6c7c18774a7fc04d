"""``rano-response experiment`` (issue 12): the cpu-small grid on a tiny phantom cohort (1 epoch,
2 folds, 32^3 voxels of 6 mm): one row per configuration read from its own run, the paper's
table layout, the plot, resuming without retraining, and the paper grid's runs and skips."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import png_size
from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.phantom.generator import PhantomConfig, generate_cohort
from ResponseTrainingLib.training import experiment
from ResponseTrainingLib.training.experiment import GRIDS, row_config, run_grid, run_name

OVERRIDES = {"epochs": 1, "folds": 2, "size": (32, 32, 32), "spacing": (6.0, 6.0, 6.0), "device": "cpu", "seed": 3}


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory) -> tuple[Path, pd.DataFrame, Path]:
    data = tmp_path_factory.mktemp("exp-cohort")
    generate_cohort(data, PhantomConfig(patients=5, seed=4, spacing=4.0, min_followups=2, max_followups=3))
    out = tmp_path_factory.mktemp("exp") / "grid"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        table = run_grid("cpu-small", data, out, overrides=OVERRIDES)
    return out, table, data


def test_one_row_per_configuration_from_its_run(grid_run):
    out, table, _ = grid_run
    grid = GRIDS["cpu-small"]
    csv = pd.read_csv(out / "results.csv")
    assert list(csv["configuration"]) == [r.configuration for r in grid.rows] and (csv["status"] == "done").all()
    assert len(set(csv["run"])) == 4  # stacked = all four modalities = images only: one run
    for _, row in csv.iterrows():
        summary = json.loads((out / row["run"] / "summary.json").read_text())
        cv = summary["cv"][row["model"]]
        folds = [f["balanced_accuracy"] for f in cv["per_fold"]]
        assert len(folds) == 2 and row["folds"] == 2
        # NaN: a fold whose hybrid could not be fitted (one class among its validation pairs) is left out
        np.testing.assert_allclose(row["median_balanced_accuracy"], np.nanmedian(folds), equal_nan=True)
        np.testing.assert_allclose(row["mean_f1_macro"], np.nanmean([f["f1_macro"] for f in cv["per_fold"]]),
                                   equal_nan=True)
        config = summary["provenance"]["config"]
        assert config["epochs"] == 1 and config["size"] == [32, 32, 32]
    clinical = csv[csv["configuration"].str.contains("clinical")].iloc[0]
    assert clinical["model"] == "hybrid-logreg" and clinical["run"] == "runs/base"
    ct1 = json.loads((out / csv.loc[csv.configuration == "CT1", "run"].iloc[0] / "summary.json").read_text())
    assert ct1["provenance"]["config"]["modalities"] == ["CT1"]


def test_table_in_the_papers_layout_and_plot(grid_run):
    out, table, _ = grid_run
    md = (out / "results.md").read_text()
    assert "| Experiment | Configuration | Balanced accuracy | F1 (macro) | Precision (weighted) | Recall (weighted) |" in md
    row = table.iloc[1]  # subtraction: a CNN row, always scored
    cell = f"{row['median_balanced_accuracy']:.3f} ({row['mean_balanced_accuracy']:.3f} ± "
    assert cell in md and "over 2 patient-grouped test folds" in md
    w, h = png_size(out / "results.png")
    assert w > 200 and h > 100


def test_resume_skips_finished_runs_and_reruns_an_unfinished_one(grid_run, monkeypatch):
    out, table, data = grid_run
    calls = []
    real = experiment._train

    def spy(cfg):
        calls.append(cfg.out.name)
        return real(cfg)

    monkeypatch.setattr(experiment, "_train", spy)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        again = run_grid("cpu-small", data, out, resume=True, overrides=OVERRIDES)
    assert calls == []
    pd.testing.assert_frame_equal(again, table)
    (out / "runs" / "channels=difference" / "experiment.json").unlink()  # as if killed before it finished
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        run_grid("cpu-small", data, out, resume=True, overrides=OVERRIDES)
    assert calls == ["channels=difference"]


def test_paper_grid_rows_and_pretraining_needs_a_local_file(tmp_path):
    grid = GRIDS["paper"]
    experiments = {r.experiment for r in grid.rows}
    assert experiments == {"subtraction", "modalities", "architecture", "pretraining", "clinical data"}
    archs = {row_config(grid, r, tmp_path, tmp_path, {}).arch for r in grid.rows}
    assert {"densenet121", "densenet169", "densenet264"} <= archs
    names = [run_name(r) for r in grid.rows]
    pre = [r for r in grid.rows if r.needs_pretrained][0]
    scratch = [r for r in grid.rows if r.experiment == "pretraining" and not r.needs_pretrained][0]
    assert run_name(pre) != run_name(scratch) and len(set(names)) == 11  # the base run serves 4 rows
    weights = tmp_path / "resnet18.pth"
    assert row_config(grid, pre, tmp_path, tmp_path, {"pretrained_weights": weights}).pretrained_weights == weights
    assert row_config(grid, scratch, tmp_path, tmp_path, {"pretrained_weights": weights}).pretrained_weights is None
    table, _ = experiment.results_table(grid, {run_name(pre): "skipped: needs --pretrained-weights"})
    assert table.loc[table.configuration == pre.configuration, "status"].iloc[0].startswith("skipped")
    with pytest.raises(RANOInputError, match="unknown"):
        run_grid("nope", tmp_path, tmp_path / "o")
