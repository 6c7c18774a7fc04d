"""The reference study's experiments as one command: a named grid of cross-validated runs.

Matoso et al. 2025 compared five things on LUMIERE: subtraction of the inputs, modality
combinations, DenseNet depth (121/169/264), pretraining, and clinical data. A grid here is a base
configuration plus rows, each row one configuration of one experiment; rows with the same
settings share one run (the clinical-data row is the base run's ``hybrid-logreg`` model: the CNN's
probabilities plus clinical features, fitted inside the folds). Every run goes through
:func:`ResponseTrainingLib.training.cv.train` under ``OUT/runs/<name>`` with one shared
preprocessing cache.

``--resume`` skips runs that finished with the same settings (``OUT/runs/<name>/experiment.json``)
and continues an interrupted one from its last epoch. ``results.csv`` holds one row per
configuration, ``results.md`` the paper's layout (median and mean +- sd over the test folds of
balanced accuracy, F1, precision and recall), ``results.png`` the folds per configuration.

As in the reference study's grids, picking the best row by these test-fold figures is itself a
choice made on the test folds: report the grid, or confirm the choice on unseen pairs
(``rano-response evaluate``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.files import write_text

from ResponseTrainingLib.training.card import fmt
from ResponseTrainingLib.training.config import TrainConfig

METRICS = {"balanced_accuracy": "Balanced accuracy", "f1_macro": "F1 (macro)",
           "precision_weighted": "Precision (weighted)", "recall_weighted": "Recall (weighted)"}
DONE_MARKER = "experiment.json"


@dataclass(frozen=True)
class Row:
    """One configuration of one experiment: settings on top of the grid's base, and which model
    of the run's cross-validation it reports (``cnn``, or ``hybrid-logreg`` for clinical data)."""

    experiment: str
    configuration: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    model: str = "cnn"
    needs_pretrained: bool = False  # skipped unless --pretrained-weights names a local file


@dataclass(frozen=True)
class Grid:
    """A named grid: its base settings (TrainConfig fields) and its rows."""

    name: str
    description: str
    base: Mapping[str, Any]
    rows: tuple[Row, ...]


ALL4 = ("CT1", "T1", "T2", "FLAIR")
_CLINICAL = {"clinical": True, "hybrid": ("logreg",)}

GRIDS: dict[str, Grid] = {
    "paper": Grid(
        "paper", "Matoso et al. 2025's five comparisons with 3D DenseNets (GPU-sized: 100 epochs, patience 10, "
        "lr 1e-4, 5 patient-grouped folds)",
        {"arch": "densenet121", "modalities": ALL4, "channels": "stack", "lr": 1e-4, "epochs": 100, "patience": 10,
         "folds": 5, **_CLINICAL},
        (
            Row("subtraction", "stacked [follow-up, baseline]"),
            Row("subtraction", "subtraction (follow-up - baseline)", {"channels": "difference"}),
            Row("subtraction", "stacked + subtraction", {"channels": "stack+difference"}),
            Row("subtraction", "subtraction + segmentation labels", {"channels": "difference+segmentation"}),
            Row("modalities", "CT1, T1, T2, FLAIR"),
            Row("modalities", "T1, T2, FLAIR", {"modalities": ("T1", "T2", "FLAIR")}),
            Row("modalities", "CT1, FLAIR", {"modalities": ("CT1", "FLAIR")}),
            Row("modalities", "CT1", {"modalities": ("CT1",)}),
            Row("architecture", "DenseNet121"),
            Row("architecture", "DenseNet169", {"arch": "densenet169"}),
            Row("architecture", "DenseNet264", {"arch": "densenet264"}),
            Row("pretraining", "2.5D ResNet18, random init", {"arch": "timm25d", "backbone": "resnet18"}),
            Row("pretraining", "2.5D ResNet18, pretrained", {"arch": "timm25d", "backbone": "resnet18"},
                needs_pretrained=True),
            Row("clinical data", "images only (CNN)"),
            Row("clinical data", "CNN + clinical (logistic regression)", model="hybrid-logreg"),
        ),
    ),
    "cpu-small": Grid(
        "cpu-small", "a CPU-sized version: compact 3D DenseNet, 40x48x40 voxels of 4 mm, 3 folds, up to 8 epochs",
        {"arch": "compact", "modalities": ALL4, "channels": "stack", "size": (40, 48, 40), "spacing": (4.0, 4.0, 4.0),
         "folds": 3, "epochs": 8, "patience": 4, "batch_size": 4, **_CLINICAL},
        (
            Row("subtraction", "stacked [follow-up, baseline]"),
            Row("subtraction", "subtraction (follow-up - baseline)", {"channels": "difference"}),
            Row("subtraction", "subtraction + segmentation labels", {"channels": "difference+segmentation"}),
            Row("modalities", "CT1, T1, T2, FLAIR"),
            Row("modalities", "CT1", {"modalities": ("CT1",)}),
            Row("clinical data", "images only (CNN)"),
            Row("clinical data", "CNN + clinical (logistic regression)", model="hybrid-logreg"),
        ),
    ),
}


def run_name(row: Row) -> str:
    """A run folder's name from the settings a row changes (``base`` for none)."""
    parts = []
    for k, v in sorted(row.settings.items()):
        v = "+".join(str(x) for x in v) if isinstance(v, (tuple, list)) else str(v)
        parts.append(f"{k}={v}".replace("/", "over"))
    if row.needs_pretrained:
        parts.append("pretrained")
    return "_".join(parts) or "base"


def row_config(grid: Grid, row: Row, data: Path, out: Path, overrides: Mapping[str, Any]) -> TrainConfig:
    """The TrainConfig of a row: the grid's base, the command line's overrides (``cache``,
    ``pretrained_weights`` apart), the row's settings; the local pretrained weights only for a row
    that needs them."""
    own = {"cache", "pretrained_weights"}
    settings = {**grid.base, **{k: v for k, v in overrides.items() if k not in own}, **row.settings}
    name = run_name(row)
    weights = overrides.get("pretrained_weights") if row.needs_pretrained else None
    return TrainConfig(data=Path(data), out=Path(out) / "runs" / name, cache=Path(overrides.get("cache") or out / "cache"),
                       bundle_id=f"experiment-{grid.name}-{name}",
                       pretrained_weights=Path(weights) if weights else None, **settings)


def _finished(cfg: TrainConfig) -> dict[str, Any] | None:
    """The run's summary if it finished with these settings, else None."""
    marker, summary = Path(cfg.out) / DONE_MARKER, Path(cfg.out) / "summary.json"
    if not (marker.is_file() and summary.is_file()):
        return None
    if json.loads(marker.read_text(encoding="utf-8")).get("result_key") != cfg.result_key():
        return None
    return json.loads(summary.read_text(encoding="utf-8"))


def run_grid(grid_name: str, data: Path | str, out: Path | str, resume: bool = False,
             overrides: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Run every configuration of grid ``grid_name`` (each distinct run once), then write
    ``results.csv``, ``results.md`` and ``results.png`` into ``out``; returns the results table."""
    if grid_name not in GRIDS:
        raise RANOInputError(f"--grid {grid_name}: unknown (known: {', '.join(GRIDS)})")
    grid, out, overrides = GRIDS[grid_name], Path(out), dict(overrides or {})
    out.mkdir(parents=True, exist_ok=True)
    summaries: dict[str, dict[str, Any] | str] = {}
    todo = list(dict.fromkeys(run_name(r) for r in grid.rows))
    for row in grid.rows:
        name = run_name(row)
        if name in summaries:
            continue
        if row.needs_pretrained and not overrides.get("pretrained_weights"):
            summaries[name] = "skipped: needs --pretrained-weights (a local weights file; nothing is downloaded)"
            continue
        cfg = row_config(grid, row, Path(data), out, overrides)
        print(f"experiment {grid.name}: run {todo.index(name) + 1}/{len(todo)} {name}", file=sys.stderr, flush=True)
        summary = _finished(cfg) if resume else None
        if summary is None:
            summary = _train(replace(cfg, resume=resume))
            write_text(json.dumps({"result_key": cfg.result_key(), "grid": grid.name, "run": name}, indent=2) + "\n",
                       Path(cfg.out) / DONE_MARKER)
        else:
            print(f"  finished earlier with the same settings: {cfg.out}", file=sys.stderr, flush=True)
        summaries[name] = summary
    table, per_fold = results_table(grid, summaries)
    write_results(grid, table, per_fold, out)
    return table


def _train(cfg: TrainConfig) -> dict[str, Any]:
    from ResponseTrainingLib.training.cv import train

    return train(cfg)


def results_table(grid: Grid, summaries: Mapping[str, dict[str, Any] | str]) -> tuple[pd.DataFrame, dict]:
    """One row per configuration: median, mean and sd over the test folds of each metric, the
    pooled balanced accuracy and the calibrated pooled ECE; and each row's per-fold balanced
    accuracies (for the plot)."""
    rows, per_fold = [], {}
    for r in grid.rows:
        name = run_name(r)
        s = summaries.get(name)
        base = {"experiment": r.experiment, "configuration": r.configuration, "model": r.model, "run": f"runs/{name}"}
        if not isinstance(s, dict):
            rows.append({**base, "status": s or "not run"})
            continue
        cv = s["cv"].get(r.model)
        if cv is None:
            rows.append({**base, "status": f"no {r.model} model in the run"})
            continue
        row = {**base, "status": "done", "folds": cv["folds"], "pairs": s["provenance"]["pairs"]}
        for m in METRICS:
            for stat in ("median", "mean", "sd"):
                row[f"{stat}_{m}"] = cv[stat][m]
        row["pooled_balanced_accuracy"] = cv["pooled"]["balanced_accuracy"]
        if r.model == "cnn" and "calibration" in s:
            row["ece_pooled_calibrated"] = s["calibration"]["ece_test_pooled"]["calibrated"]
        rows.append(row)
        per_fold[r.configuration] = [f["balanced_accuracy"] for f in cv["per_fold"]]
    return pd.DataFrame(rows), per_fold


def markdown(grid: Grid, table: pd.DataFrame) -> str:
    """The paper's layout: per configuration, median (mean +- sd) over the test folds."""
    head = ("| Experiment | Configuration | " + " | ".join(METRICS.values()) + " |\n|---|---|"
            + "---|" * len(METRICS) + "\n")
    lines = []
    for _, r in table.iterrows():
        if r["status"] != "done":
            cells = [f"({r['status']})"] + [""] * (len(METRICS) - 1)
        else:
            cells = [f"{fmt(r[f'median_{m}'])} ({fmt(r[f'mean_{m}'])} ± {fmt(r[f'sd_{m}'])})" for m in METRICS]
        lines.append(f"| {r['experiment']} | {r['configuration']} | " + " | ".join(cells) + " |")
    done = table[table["status"] == "done"]
    folds = int(done["folds"].max()) if len(done) else 0
    pairs = int(done["pairs"].max()) if len(done) else 0
    return (f"# Experiment grid `{grid.name}`\n\n{grid.description}.\n\n"
            f"Median (mean ± sd) over {folds} patient-grouped test folds, {pairs} pairs. Precision and recall "
            "are class-weighted, F1 is the macro mean.\n\n" + head + "\n".join(lines) + "\n")


def write_results(grid: Grid, table: pd.DataFrame, per_fold: dict, out: Path) -> None:
    """``results.csv``, ``results.md`` and ``results.png`` of a grid."""
    from ResponseTrainingLib.analysis.plots import plot_experiment

    write_text(table.to_csv(index=False), out / "results.csv")
    write_text(markdown(grid, table), out / "results.md")
    done = table[table["status"] == "done"]
    if len(done):
        plot_experiment(done, per_fold, out / "results.png")
