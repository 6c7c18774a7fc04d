"""Classification metrics (scikit-learn), the same for hold-out, CV folds and evaluation."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from RANOResponseLib.core.names import CLASS_NAMES
from sklearn.metrics import (
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, class_names=CLASS_NAMES) -> dict[str, Any]:
    """Balanced accuracy, macro F1, weighted precision/recall, one-vs-rest AUC, confusion matrix.

    AUC is the macro average over the classes present in ``y_true`` (NaN if fewer than two are).
    """
    y_true = np.asarray(y_true, dtype=int)
    labels = list(range(len(class_names)))
    if len(y_true) == 0:
        return {"n": 0, "balanced_accuracy": float("nan"), "f1_macro": float("nan"),
                "precision_weighted": float("nan"), "recall_weighted": float("nan"),
                "auc_ovr": float("nan"), "confusion_matrix": [[0] * len(labels) for _ in labels]}
    y_pred = np.asarray(proba).argmax(1)
    warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
    warnings.filterwarnings("ignore", message="A single label was found")  # tiny folds: one class only
    present = sorted(set(y_true.tolist()))
    auc = float("nan")
    if len(present) >= 2:
        aucs = [roc_auc_score(y_true == c, proba[:, c]) for c in present]
        auc = float(np.mean(aucs))
    return {
        "n": int(len(y_true)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "f1_macro": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "precision_weighted": float(precision_score(y_true, y_pred, labels=present, average="weighted", zero_division=0)),
        "recall_weighted": float(recall_score(y_true, y_pred, labels=present, average="weighted", zero_division=0)),
        "auc_ovr": auc,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


SCALAR_METRICS = ("balanced_accuracy", "f1_macro", "precision_weighted", "recall_weighted", "auc_ovr")


def summarise(per_fold: list[dict[str, Any]]) -> dict[str, Any]:
    """Median, mean and sd (ddof=1) over folds of each scalar metric (NaN folds left out), and
    the summed confusion matrix."""
    out: dict[str, Any] = {"folds": len(per_fold)}
    for stat in ("median", "mean", "sd"):
        out[stat] = {}
    for name in SCALAR_METRICS:
        v = np.array([m[name] for m in per_fold], dtype=float)
        v = v[~np.isnan(v)]
        out["median"][name] = float(np.median(v)) if len(v) else float("nan")
        out["mean"][name] = float(v.mean()) if len(v) else float("nan")
        out["sd"][name] = float(v.std(ddof=1)) if len(v) > 1 else float("nan")
    if per_fold:
        out["confusion_matrix"] = np.sum([m["confusion_matrix"] for m in per_fold], axis=0).tolist()
    return out


def bootstrap_balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray | None = None,
                                n: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the balanced accuracy. With ``groups`` (patients) whole
    groups are resampled, since one patient's pairs are not independent; NaN without data."""
    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    if len(y_true) == 0:
        return float("nan"), float("nan")
    groups = np.arange(len(y_true)) if groups is None else np.asarray(groups)
    ids, members = np.unique(groups, return_inverse=True)
    rows = [np.flatnonzero(members == i) for i in range(len(ids))]
    rng = np.random.default_rng(seed)
    stats = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a resample may lack a class
        for _ in range(n):
            idx = np.concatenate([rows[i] for i in rng.integers(0, len(ids), len(ids))])
            stats.append(balanced_accuracy_score(y_true[idx], y_pred[idx]))
    lo, hi = np.percentile(stats, [50 * (1 - level), 100 - 50 * (1 - level)])
    return float(lo), float(hi)
