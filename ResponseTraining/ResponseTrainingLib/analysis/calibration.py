"""Calibration of a fold ensemble: temperature scaling, ECE, reliability, the "uncertain" thresholds.

Everything is fitted on validation patients only. In fold *k* the fold model's temperature is
fitted on its validation pairs (the patients carved from its training patients, never trained on)
and judged on its test fold; the bundle carries one temperature per member
(:mod:`RANOResponseLib.inference.calibration` applies them). The thresholds that make a
prediction "uncertain" are chosen on the same validation predictions:

- top probability: the smallest calibrated top probability above which the validation pairs are
  right at least ``target`` of the time (all flagged when no threshold reaches it);
- members' spread: measured on validation pairs that two or more fold models validate (so that
  none of those models trained on them), as the largest spread of the top class up to which those
  pairs are right at least ``target`` of the time; not used (null) with fewer than
  ``min_pairs`` such pairs.

Both are computed from the folds' ``predictions.csv`` (roles ``val`` and ``test``): no extra
forward passes.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from RANOResponseLib.core.names import CLASS_NAMES
from RANOResponseLib.inference.calibration import temperature_scale

ECE_BINS = 15
TEMPERATURE_BOUNDS = (0.05, 20.0)  # a tiny, perfectly separated validation set drives T to 0
UNCERTAIN_TARGET_ACCURACY = 0.85  # "certain" predictions should be right this often (validation)
MIN_SPREAD_PAIRS = 5


def proba_of(df: pd.DataFrame, class_names: Sequence[str] = CLASS_NAMES, prefix: str = "p_") -> np.ndarray:
    """The ``<prefix><class>`` columns as an (n, classes) array."""
    return df[[f"{prefix}{c}" for c in class_names]].to_numpy(dtype=float)


def fit_temperature(proba: np.ndarray, y: np.ndarray, bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The temperature ``T`` that minimises the negative log-likelihood of ``softmax(log(p) / T)``
    on ``(proba, y)`` (torch L-BFGS on log T), clipped to ``bounds``; 1.0 without data."""
    y = np.asarray(y, dtype=int)
    if len(y) == 0:
        return 1.0
    logp = torch.log(torch.as_tensor(np.clip(proba, 1e-12, 1.0), dtype=torch.float64))
    target = torch.tensor(y, dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")
    lo, hi = np.log(bounds[0]), np.log(bounds[1])

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logp / torch.exp(log_t.clamp(lo, hi)), target)
        loss.backward()
        return loss

    opt.step(closure)
    return float(np.clip(np.exp(float(log_t.detach())), *bounds))


def nll(proba: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes."""
    y = np.asarray(y, dtype=int)
    if len(y) == 0:
        return float("nan")
    return float(-np.mean(np.log(np.clip(proba[np.arange(len(y)), y], 1e-12, 1.0))))


def reliability(y: np.ndarray, proba: np.ndarray, bins: int = ECE_BINS) -> pd.DataFrame:
    """Per equal-width bin of the top probability (confidence): its range, pair count, mean
    confidence and accuracy (empty bins have count 0 and NaN means)."""
    y = np.asarray(y, dtype=int)
    proba = np.asarray(proba, dtype=float)
    conf = proba.max(1) if len(y) else np.zeros(0)
    correct = (proba.argmax(1) == y) if len(y) else np.zeros(0, bool)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # bin i holds (edges[i], edges[i+1]]; a confidence of exactly 0 goes to the first bin
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    rows = []
    for i in range(bins):
        m = idx == i
        rows.append({"low": edges[i], "high": edges[i + 1], "count": int(m.sum()),
                     "confidence": float(conf[m].mean()) if m.any() else float("nan"),
                     "accuracy": float(correct[m].mean()) if m.any() else float("nan")})
    return pd.DataFrame(rows)


def expected_calibration_error(y: np.ndarray, proba: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-label ECE (Guo et al. 2017) over ``bins`` equal-width confidence bins: the pair-weighted
    mean of |accuracy - confidence| per bin. Written out because scikit-learn has no multiclass
    ECE (its ``calibration_curve`` is binary); NaN without pairs."""
    table = reliability(y, proba, bins)
    n = table["count"].sum()
    if n == 0:
        return float("nan")
    filled = table[table["count"] > 0]
    return float((filled["count"] * (filled["accuracy"] - filled["confidence"]).abs()).sum() / n)


def top_probability_threshold(top: np.ndarray, correct: np.ndarray, target: float = UNCERTAIN_TARGET_ACCURACY,
                              min_kept: int = 3) -> float:
    """The smallest top probability ``t`` such that the pairs with top >= ``t`` (at least
    ``min_kept``) are right at least ``target`` of the time; 1.0 (flag all) if none is."""
    top, correct = np.asarray(top, float), np.asarray(correct, bool)
    for t in np.unique(top):
        kept = top >= t
        if kept.sum() >= min(min_kept, len(top)) and correct[kept].mean() >= target:
            return float(t)
    return 1.0


def spread_threshold(spread: np.ndarray, correct: np.ndarray, target: float = UNCERTAIN_TARGET_ACCURACY,
                     min_pairs: int = MIN_SPREAD_PAIRS) -> float | None:
    """The largest spread ``s`` such that the pairs with spread <= ``s`` are right at least
    ``target`` of the time (0.0 if the least spread pair is already wrong); None with fewer than
    ``min_pairs`` pairs."""
    spread, correct = np.asarray(spread, float), np.asarray(correct, bool)
    if len(spread) < min_pairs:
        return None
    best = 0.0
    for s in np.unique(spread):
        if correct[spread <= s].mean() >= target:
            best = float(s)
    return best


def calibrate_folds(fold_predictions: dict[int, pd.DataFrame], class_names: Sequence[str] = CLASS_NAMES,
                    target: float = UNCERTAIN_TARGET_ACCURACY) -> dict[str, Any]:
    """Fit each fold model's temperature on its validation pairs and choose the thresholds.

    ``fold_predictions``: fold -> its ``predictions.csv`` (``pair``, ``role``, ``label``,
    ``p_<class>``). Returns ``temperatures`` (fold order), ``per_fold`` (temperature, validation
    pairs, test ECE / NLL before and after), ``calibrated``: fold -> the frame with calibrated
    ``p_<class>`` columns (the raw ones as ``raw_p_<class>``), and ``uncertain`` (bundle.json's
    block: thresholds and how they were chosen)."""
    folds = sorted(fold_predictions)
    temps, per_fold, calibrated = [], [], {}
    for k in folds:
        df = fold_predictions[k]
        raw = proba_of(df, class_names)
        y = df["label"].to_numpy(dtype=int)
        val, test = (df["role"] == "val").to_numpy(), (df["role"] == "test").to_numpy()
        t = fit_temperature(raw[val], y[val])
        cal = temperature_scale(raw, t)
        out = df.copy()
        for i, c in enumerate(class_names):
            out[f"raw_p_{c}"] = raw[:, i]
            out[f"p_{c}"] = cal[:, i]
        calibrated[k] = out
        temps.append(t)
        per_fold.append({"fold": k, "temperature": t, "validation_pairs": int(val.sum()), "test_pairs": int(test.sum()),
                         "ece_test_uncalibrated": expected_calibration_error(y[test], raw[test]),
                         "ece_test_calibrated": expected_calibration_error(y[test], cal[test]),
                         "nll_test_uncalibrated": nll(raw[test], y[test]), "nll_test_calibrated": nll(cal[test], y[test])})
    val_rows = pd.concat([calibrated[k][calibrated[k]["role"] == "val"].assign(fold=k) for k in folds],
                         ignore_index=True)
    vp = proba_of(val_rows, class_names)
    vy = val_rows["label"].to_numpy(dtype=int)
    t_top = top_probability_threshold(vp.max(1), vp.argmax(1) == vy, target) if len(vy) else 1.0
    # spread among the fold models that all validate (none trained on) the same pair
    spreads, right = [], []
    for _, g in val_rows.groupby("pair"):
        if len(g) >= 2:
            p = proba_of(g, class_names)
            mean = p.mean(0)
            top = int(mean.argmax())
            spreads.append(float(p[:, top].std()))
            right.append(top == int(g["label"].iloc[0]))
    t_spread = spread_threshold(np.array(spreads), np.array(right), target)
    uncertain = {"top_probability_below": t_top, "spread_above": t_spread, "chosen_on": "validation",
                 "target_accuracy": target, "validation_pairs": int(len(vy)),
                 "spread_pairs": len(spreads),
                 "rule": "flag when the calibrated top probability is below top_probability_below or the "
                         "members' spread of the top class is above spread_above (null: not used, fewer than "
                         f"{MIN_SPREAD_PAIRS} validation pairs validated by two or more folds)"}
    return {"temperatures": temps, "per_fold": per_fold, "calibrated": calibrated, "uncertain": uncertain}
