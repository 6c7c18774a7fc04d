"""Patient-grouped splits and class weights: which pairs train, validate and test each fold.

Stratified group k-fold (scikit-learn ``StratifiedGroupKFold``) or leave-one-patient-out
(``LeaveOneGroupOut``) for the test folds; in each fold a validation split is carved from the
training patients only (it picks the checkpoint and drives early stopping), so the test fold is
touched once, at the end. ``folds.csv`` records each pair's test fold and the folds it validates.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.names import CLASS_NAMES

from ResponseTrainingLib.training.config import WEIGHTING_ALIASES, WEIGHTINGS


def class_weights(labels: np.ndarray, mode: str, n_classes: int = len(CLASS_NAMES)) -> np.ndarray:
    """Per-class weights from training prevalence: ``equal``, ``1-prevalence`` or ``1/prevalence``
    (the reference study's grid), scaled to mean 1 over the classes present; absent classes get 0."""
    mode = WEIGHTING_ALIASES.get(mode, mode)
    if mode not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}")
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=n_classes).astype(float)
    prev = counts / max(counts.sum(), 1)
    if mode == "equal":
        w = np.ones(n_classes)
    elif mode == "1-prevalence":
        w = 1 - prev
    else:
        w = np.where(prev > 0, 1 / np.maximum(prev, 1e-12), 0.0)
    w[counts == 0] = 0.0
    return w / w[w > 0].mean()


@dataclass
class FoldPlan:
    """Per pair: the fold whose test set holds it; per fold: the validation pairs' indices."""

    test_fold: np.ndarray  # (n_pairs,) int
    val: list[np.ndarray]
    scheme: str

    @property
    def n_folds(self) -> int:
        """How many test folds the plan has."""
        return len(self.val)

    def indices(self, fold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(train, val, test) pair indices of ``fold``."""
        test = np.flatnonzero(self.test_fold == fold)
        val = self.val[fold]
        train = np.setdiff1d(np.flatnonzero(self.test_fold != fold), val)
        return train, val, test


def _grouped_splits(n_splits: int, labels: np.ndarray, groups: np.ndarray, seed: int) -> list:
    """``StratifiedGroupKFold``; on cohorts too small to stratify (every class has fewer pairs
    than splits) plain ``GroupKFold`` with shuffling: still grouped by patient."""
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    with warnings.catch_warnings():  # rare classes with fewer members than folds: expected
        warnings.filterwarnings("ignore", message="The least populated class")
        if np.bincount(labels).max() >= n_splits:
            return list(StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed).split(labels, labels, groups))
        return list(GroupKFold(n_splits, shuffle=True, random_state=seed).split(labels, labels, groups))


def make_folds(labels: np.ndarray, groups: np.ndarray, folds: int = 5, loocv: bool = False,
               val_fraction: float = 0.2, seed: int = 0) -> FoldPlan:
    """Patient-grouped splits: stratified group k-fold or leave-one-patient-out for the test
    folds; in each fold, a stratified group split of the *training* patients for validation."""
    from sklearn.model_selection import LeaveOneGroupOut

    labels, groups = np.asarray(labels), np.asarray(groups)
    n_groups = len(set(groups.tolist()))
    if loocv:
        splits = list(LeaveOneGroupOut().split(labels, labels, groups))
        scheme = f"leave-one-patient-out ({len(splits)} folds)"
    else:
        if folds > n_groups:
            raise RANOInputError(f"--folds {folds}: only {n_groups} patients with usable pairs")
        splits = _grouped_splits(folds, labels, groups, seed)
        scheme = f"{folds}-fold stratified group k-fold (patients)"
    test_fold = np.full(len(labels), -1, dtype=int)
    vals = []
    for f, (rest, test) in enumerate(splits):
        test_fold[test] = f
        rest_groups = groups[rest]
        k_val = min(max(2, round(1 / val_fraction)), len(set(rest_groups.tolist())))
        if k_val < 2:
            raise RANOInputError(f"fold {f}: fewer than 2 training patients; cannot carve a validation split")
        _, val_rel = _grouped_splits(k_val, labels[rest], rest_groups, seed + 1 + f)[0]
        vals.append(np.sort(rest[val_rel]))
    return FoldPlan(test_fold, vals, scheme)


def folds_table(plan: FoldPlan, pair_ids: list[str], groups: np.ndarray, labels: list[str]) -> pd.DataFrame:
    """``folds.csv``: each pair's patient, label, test fold and the folds it validates."""
    val_for = [[] for _ in pair_ids]
    for f, v in enumerate(plan.val):
        for i in v:
            val_for[i].append(str(f))
    return pd.DataFrame({"patient": groups, "pair": pair_ids, "label": labels, "fold": plan.test_fold,
                         "val_for_folds": [";".join(v) for v in val_for]})
