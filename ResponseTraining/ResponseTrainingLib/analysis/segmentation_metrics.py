"""Segmentation figures: Dice per tumour region, the small-lesion threshold, and their plots.

Regions follow the LUMIERE/DeepBraTumIA labels (1 enhancing, 2 necrotic / non-enhancing, 3 edema)
plus the two BraTS composites (core = 1+2, whole tumour = 1+2+3). Dice is undefined (NaN) when
neither the prediction nor the truth holds the region (e.g. no enhancing tumour after a complete
response); means skip those, and the false-positive volume on such cases is reported beside them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from RANOResponseLib.core.names import LABEL_CORE, LABEL_EDEMA, LABEL_ENHANCING
from scipy import ndimage

from ResponseTrainingLib.analysis.plots import _pyplot, _save

REGIONS: dict[str, tuple[int, ...]] = {
    "enhancing": (LABEL_ENHANCING,),
    "necrotic": (LABEL_CORE,),
    "edema": (LABEL_EDEMA,),
    "core": (LABEL_ENHANCING, LABEL_CORE),
    "whole": (LABEL_ENHANCING, LABEL_CORE, LABEL_EDEMA),
}
# Candidate thresholds (ml) for removing small enhancing components, chosen on validation cases.
MIN_LESION_CANDIDATES = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks; NaN when both are empty."""
    total = int(pred.sum()) + int(truth.sum())
    return float("nan") if total == 0 else 2.0 * int(np.logical_and(pred, truth).sum()) / total


def region_dice(pred: np.ndarray, truth: np.ndarray, voxel_ml: float) -> dict[str, float]:
    """Dice of every :data:`REGIONS` entry between two label maps on one grid, the true and
    predicted volumes (ml) of each, and the enhancing volume predicted where there is none."""
    row: dict[str, float] = {}
    for name, labels in REGIONS.items():
        p, t = np.isin(pred, labels), np.isin(truth, labels)
        row[f"dice_{name}"] = dice(p, t)
        row[f"true_ml_{name}"] = float(t.sum() * voxel_ml)
        row[f"pred_ml_{name}"] = float(p.sum() * voxel_ml)
    return row


def remove_small_enhancing(labels: np.ndarray, min_ml: float, voxel_ml: float) -> np.ndarray:
    """``labels`` with enhancing components (26-connected) smaller than ``min_ml`` removed: the
    rule predict applies with the bundle's ``min_lesion_ml``, used here to choose that threshold."""
    if min_ml <= 0:
        return labels
    comp, n = ndimage.label(labels == LABEL_ENHANCING, structure=np.ones((3, 3, 3)))
    if n == 0:
        return labels
    sizes = np.bincount(comp.ravel())[1:] * voxel_ml
    small = np.flatnonzero(sizes < min_ml) + 1
    out = labels.copy()
    out[np.isin(comp, small)] = 0
    return out


def choose_min_lesion_ml(preds: Sequence[np.ndarray], truths: Sequence[np.ndarray], voxel_ml: float,
                         candidates: Sequence[float] = MIN_LESION_CANDIDATES) -> tuple[float, pd.DataFrame]:
    """The threshold of ``candidates`` that maximises the mean enhancing score on (validation)
    cases, where a case without enhancing tumour scores 1 when none is predicted and 0 otherwise
    (that is what the threshold protects: a complete response spoiled by a few voxels). Ties go
    to the smallest threshold. Returns it and the table of every candidate's score."""
    rows = []
    for c in candidates:
        scores = []
        for p, t in zip(preds, truths):
            d = dice(remove_small_enhancing(p, c, voxel_ml) == LABEL_ENHANCING, t == LABEL_ENHANCING)
            scores.append(1.0 if np.isnan(d) else d)
        rows.append({"min_lesion_ml": c, "enhancing_score": float(np.mean(scores)) if scores else float("nan")})
    table = pd.DataFrame(rows)
    best = table["enhancing_score"].max()
    return float(table.loc[table["enhancing_score"] >= best - 1e-9, "min_lesion_ml"].iloc[0]), table


def dice_summary(metrics: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Mean, median, SD and count (non-NaN) of each region's Dice in a metrics table."""
    out = {}
    for name in REGIONS:
        col = metrics[f"dice_{name}"].dropna()
        out[name] = {"mean": float(col.mean()) if len(col) else float("nan"),
                     "median": float(col.median()) if len(col) else float("nan"),
                     "sd": float(col.std(ddof=0)) if len(col) else float("nan"), "n": int(len(col))}
    return out


def missed_cases(metrics: pd.DataFrame, region: str = "whole") -> dict[str, float]:
    """Timepoints whose true ``region`` is not empty but has Dice 0 (missed entirely): how many,
    of how many, and the largest true volume among them (ml)."""
    truth = metrics[metrics[f"true_ml_{region}"] > 0]
    missed = truth[truth[f"dice_{region}"] == 0]
    return {"n": int(len(missed)), "of": int(len(truth)),
            "max_true_ml": float(missed[f"true_ml_{region}"].max()) if len(missed) else 0.0}


def plot_seg_curves(histories: dict[int, pd.DataFrame], path: Path) -> Path:
    """Training loss and validation Dice (enhancing, core, whole) per epoch, one line per fold."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for fold, h in sorted(histories.items()):
        axes[0].plot(h["epoch"], h["train_loss"], label=f"fold {fold}")
        for name, style in (("enhancing", "-"), ("core", "--"), ("whole", ":")):
            if f"val_dice_{name}" in h:
                axes[1].plot(h["epoch"], h[f"val_dice_{name}"], style, label=f"fold {fold} {name}")
    axes[0].set(xlabel="epoch", ylabel="Dice + CE loss", title="training loss")
    axes[1].set(xlabel="epoch", ylabel="Dice (model grid)", title="validation Dice", ylim=(0, 1))
    for ax in axes:
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_dice_per_fold(metrics: pd.DataFrame, path: Path) -> Path:
    """Mean test Dice per region (bars) per fold, at native resolution."""
    plt = _pyplot()
    folds = sorted(metrics["fold"].unique())
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / max(len(folds), 1)
    for i, fold in enumerate(folds):
        sub = metrics[metrics["fold"] == fold]
        means = [sub[f"dice_{r}"].mean() for r in REGIONS]
        ax.bar(np.arange(len(REGIONS)) + i * width, means, width, label=f"fold {fold}")
    ax.set_xticks(np.arange(len(REGIONS)) + width * (len(folds) - 1) / 2, list(REGIONS))
    ax.set(ylabel="mean Dice (native grid)", ylim=(0, 1), title="test Dice per region and fold")
    ax.legend(fontsize=8)
    return _save(fig, path)
