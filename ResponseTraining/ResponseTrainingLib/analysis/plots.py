"""PNG figures of a cross-validation run (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from RANOResponseLib.core.files import atomic_file


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return Path(path)


def plot_confusion(cm: Sequence[Sequence[int]], class_names: Sequence[str], path: Path, title: str) -> Path:
    """Confusion matrix (rows true, columns predicted) with counts and row-normalised shading."""
    plt = _pyplot()
    cm = np.asarray(cm, dtype=float)
    rows = cm.sum(1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    fig, ax = plt.subplots(figsize=(4.6, 4))
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center",
                    color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(class_names)), class_names)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_roc(y_true: np.ndarray, proba: np.ndarray, class_names: Sequence[str], path: Path, title: str) -> Path:
    """One-vs-rest ROC curve per class present in ``y_true`` (pooled out-of-fold predictions)."""
    from sklearn.metrics import auc, roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4))
    for c, name in enumerate(class_names):
        pos = np.asarray(y_true) == c
        if pos.any() and (~pos).any():
            fpr, tpr, _ = roc_curve(pos, proba[:, c])
            ax.plot(fpr, tpr, label=f"{name} (AUC {auc(fpr, tpr):.2f}, n={int(pos.sum())})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def plot_learning_curves(histories: dict[int, pd.DataFrame], path: Path) -> Path:
    """Per fold: training and validation loss, and validation balanced accuracy, per epoch."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    n = max(1, len(histories))
    cols = min(n, 5)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (fold, h) in zip(axes.flat, sorted(histories.items())):
        ax.plot(h["epoch"], h["train_loss"], label="train loss")
        ax.plot(h["epoch"], h["val_loss"], label="val loss")
        ax2 = ax.twinx()
        ax2.plot(h["epoch"], h["val_balanced_accuracy"], color="tab:green", ls=":", label="val bal. acc")
        ax2.set_ylim(0, 1)
        ax.set_title(f"fold {fold}", fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if fold == min(histories):
            lines = ax.get_lines() + ax2.get_lines()
            ax.legend(lines, [ln.get_label() for ln in lines], fontsize=6)
    fig.tight_layout()
    return _save(fig, path)


def plot_reliability(panels: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]], path: Path,
                     bins: int = 15) -> Path:
    """Reliability diagrams, one panel per entry ``title -> (y_true, {curve name: probabilities})``:
    accuracy against mean top probability per confidence bin (marker size: pairs in the bin),
    the diagonal of perfect calibration, and each curve's ECE in the legend."""
    from ResponseTrainingLib.analysis.calibration import expected_calibration_error, reliability

    plt = _pyplot()
    n = max(1, len(panels))
    cols = min(n, 4)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (title, (y, curves)) in zip(axes.flat, panels.items()):
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        for name, proba in curves.items():
            table = reliability(y, proba, bins)
            filled = table[table["count"] > 0]
            ece = expected_calibration_error(y, proba, bins)
            ax.plot(filled["confidence"], filled["accuracy"], marker="o", lw=1,
                    label=f"{name} (ECE {ece:.3f})")
            ax.scatter(filled["confidence"], filled["accuracy"], s=8 + 6 * filled["count"], alpha=0.3)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("top probability", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
        ax.set_title(f"{title} (n={len(y)})", fontsize=9)
        ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    return _save(fig, path)


def plot_experiment(results: pd.DataFrame, per_fold: dict[str, Sequence[float]], path: Path,
                    metric: str = "balanced accuracy") -> Path:
    """An experiment grid: per configuration (rows of ``results``, column ``configuration`` and
    ``experiment``) its folds' values (``per_fold[configuration]``) as dots and the median as a
    bar, grouped and coloured by experiment."""
    plt = _pyplot()
    names = list(results["configuration"])
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(names) + 1.5), 3.6))
    experiments = list(dict.fromkeys(results["experiment"]))
    colours = {e: plt.get_cmap("tab10")(i % 10) for i, e in enumerate(experiments)}
    for i, (_, row) in enumerate(results.iterrows()):
        values = np.asarray(per_fold.get(row["configuration"], []), dtype=float)
        values = values[~np.isnan(values)]
        c = colours[row["experiment"]]
        if len(values):
            ax.bar(i, np.median(values), color=c, alpha=0.35, width=0.7)
            ax.scatter(np.full(len(values), i), values, color=c, s=14, zorder=3)
    ax.axhline(0.25, color="grey", lw=0.8, ls=":", label="chance (4 classes)")
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"{metric} (test folds)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[e], alpha=0.5) for e in experiments]
    ax.legend(handles, experiments, fontsize=6, loc="upper right")
    ax.set_title("bars: median over folds; dots: folds; dotted: chance", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
