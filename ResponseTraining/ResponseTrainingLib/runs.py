"""A training run as the Slicer module sees it, without Qt: the command for the widget's settings,
the child process that runs it, and what a finished run folder holds.

The widget's defaults are :class:`~ResponseTrainingLib.training.config.TrainConfig`'s; this
module adds only what is the widget's own (its spin-box ranges, the architectures it offers,
resuming by default). Imported when Slicer loads the module, before the user has been asked to
install anything: at load time it imports the standard library and the training configuration
only (see :mod:`ResponseTrainingLib.training.config`), the rest inside the functions.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

from RANOResponseLib.core.errors import RANOInputError

from ResponseTrainingLib.training.config import ARCHS, TrainConfig, parse_modalities

if TYPE_CHECKING:
    from RANOResponseLib.mrml.process import BackgroundRun

# the widget's spin-box ranges (inclusive); the lower bounds are those TrainConfig.check enforces
RANGES: dict[str, tuple[int, int]] = {"folds": (2, 20), "epochs": (1, 1000), "seed": (0, 2**31 - 1)}
# timm25d needs the optional timm package and a backbone name: the command line offers it
WIDGET_ARCHS: tuple[str, ...] = tuple(a for a in ARCHS if a != "timm25d")
# Train after a cancel or a crash continues the run from its last epoch
WIDGET_RESUME = True
TRAIN_PROGRAM = "RANOResponseCLI"  # `rano-response`, with the training commands


def is_set(path: Path | str | None) -> bool:
    """Whether a folder field holds a path (the parameter node's empty Path reads as ``.``)."""
    return path is not None and str(path) not in ("", ".")


def train_arguments(data: Path | str, out: Path | str, *, arch: str, modalities: str, pairing: str, folds: int,
                    loocv: bool, epochs: int, seed: int, resume: bool, device: str | None = "auto") -> list[str]:
    """The ``rano-response train`` arguments for the widget's settings (``modalities`` as typed,
    comma-separated). Settings left at their default are omitted. RANOInputError for an unset
    folder or unknown modality names, before any process starts."""
    if not is_set(data) or not is_set(out):
        raise RANOInputError("choose a dataset folder and an output folder")
    cfg = TrainConfig(data=Path(data), out=Path(out), arch=arch, modalities=parse_modalities(modalities),
                      pairing=pairing, folds=folds, loocv=loocv, epochs=epochs, seed=seed, device=device or "auto",
                      resume=resume)
    return cfg.argv()


def start_training(args: list[str], python: str | None = None) -> BackgroundRun:
    """``rano-response train ARGS --progress-json`` in a child process (Slicer's ``PythonSlicer``
    by default). A cancelled run keeps its files: its checkpoints are what ``--resume`` continues."""
    from RANOResponseLib.mrml.process import BackgroundRun, core_command, slicer_python

    return BackgroundRun(core_command(python or slicer_python(), "train", *args, "--progress-json",
                                      module=TRAIN_PROGRAM, packages=("ResponseTrainingLib",)))


def metrics_table(out: Path | str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a finished run's ``metrics.csv`` (per model: folds, summaries, pooled)."""
    path = Path(out) / "metrics.csv"
    if not path.is_file():
        raise RANOInputError(f"{path}: not found (the run has not finished)")
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        raise RANOInputError(f"{path}: empty")
    return rows[0], rows[1:]


def run_plots(out: Path | str) -> list[Path]:
    """The PNG figures of a run folder (its own and those of grid cells), sorted by path."""
    return sorted(Path(out).rglob("*.png"))


def bundle_folder(out: Path | str) -> Path | None:
    """The run's ensemble bundle (``OUT/bundle``), or None before the run has exported it."""
    bundle = Path(out) / "bundle"
    return bundle if (bundle / "bundle.json").is_file() else None
