"""What a bundle adds to the network's probabilities: calibration, "uncertain", the suggested category.

Both parts are fitted at training time inside the cross-validation folds, on validation patients
only (:mod:`ResponseTrainingLib.analysis.calibration`), and stored in ``bundle.json`` as plain
numbers (validated by :func:`RANOResponseLib.model.bundle.read_bundle`):

- ``calibration``: temperature scaling, one temperature per ensemble member. Each member's
  probabilities ``p`` become ``softmax(log(p) / T)`` (the same as dividing its logits by ``T``:
  softmax is unchanged by the constant ``log`` subtracts); the ensemble averages the calibrated
  members and reports their spread. A prediction is *uncertain* when its calibrated top probability
  lies below a threshold or the members' spread of the top class above one (both chosen on
  validation patients).
- ``suggestion``: a multinomial logistic regression on the calibrated probabilities, the measured
  RANO category (one-hot, from the segmentation) and, when it was trained with them, clinical
  features: ``softmax(coef @ ((x - mean) / scale) + intercept)`` with missing values imputed first.

A bundle without these fields behaves as before: probabilities as the network gives them, no flag,
no suggestion.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

# probabilities are clipped here before the log, so that a member's exact 0 stays finite
_EPS = 1e-12
CLINICAL_PREFIX = "clinical:"  # suggestion feature names: p_<class>, measured_<class>, clinical:<name>


def temperature_scale(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log(p) / T)`` along the last axis: one member's probabilities at temperature ``T``."""
    z = np.log(np.clip(np.asarray(probabilities, dtype=np.float64), _EPS, 1.0)) / float(temperature)
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def calibrate_members(members: np.ndarray, temperatures: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Ensemble mean and spread (std over members, as predict reports it) of the members'
    probabilities ``(M, C)`` scaled by their temperatures."""
    members = np.asarray(members, dtype=np.float64)
    if len(temperatures) != len(members):
        raise ValueError(f"{len(temperatures)} temperatures for {len(members)} ensemble members")
    scaled = np.stack([temperature_scale(p, t) for p, t in zip(members, temperatures)])
    return scaled.mean(0), scaled.std(0)


def uncertain(probabilities: np.ndarray, spread: np.ndarray, thresholds: Mapping[str, Any] | None,
              class_names: Sequence[str]) -> dict[str, Any]:
    """``{"flag": bool, "why": str}``: whether the top probability or the members' spread of the
    top class crosses the bundle's thresholds (``calibration.uncertain``)."""
    top = int(np.argmax(probabilities))
    p, s = float(probabilities[top]), float(spread[top])
    if not thresholds:
        return {"flag": False, "why": "the bundle has no thresholds for uncertainty"}
    t_top, t_spread = float(thresholds["top_probability_below"]), thresholds.get("spread_above")
    reasons = []
    if p < t_top:
        reasons.append(f"top probability {p:.2f} ({class_names[top]}) is below {t_top:.2f}")
    if t_spread is not None and s > float(t_spread):
        reasons.append(f"the ensemble members' spread for {class_names[top]} ({s:.2f}) is above {float(t_spread):.2f}")
    where = f"thresholds chosen on {thresholds.get('chosen_on', 'validation')} patients"
    if reasons:
        return {"flag": True, "why": "; ".join(reasons) + f" ({where})"}
    spread_txt = "" if t_spread is None else f", spread {s:.2f} <= {float(t_spread):.2f}"
    return {"flag": False, "why": f"top probability {p:.2f} >= {t_top:.2f}{spread_txt} ({where})"}


def apply_calibration(prediction: Any, calibration: Mapping[str, Any] | None, class_names: Sequence[str]) -> None:
    """Calibrate an :class:`~RANOResponseLib.inference.attributions.Prediction` in place: its
    ``probabilities`` and ``spread`` become the calibrated ensemble's, the network's own are kept
    in ``uncalibrated``, and ``uncertain`` says whether to trust it. Without a calibration nothing
    changes but ``uncertain`` (no thresholds) is set."""
    prediction.uncalibrated = np.asarray(prediction.probabilities).copy()
    if not calibration or prediction.members is None:
        prediction.uncertain = uncertain(prediction.probabilities, prediction.spread, None, class_names)
        return
    mean, spread = calibrate_members(prediction.members, calibration["temperatures"])
    prediction.probabilities, prediction.spread = mean, spread
    prediction.uncertain = uncertain(mean, spread, calibration.get("uncertain"), class_names)


def suggestion_features(names: Sequence[str], probabilities: Mapping[str, float], measured: str | None,
                        clinical: Mapping[str, float] | None = None) -> np.ndarray:
    """The feature vector a suggestion model expects (``names`` from its ``features``): ``p_<class>``
    the calibrated probabilities, ``measured_<class>`` the measured category one-hot (all 0 when it
    is unknown), ``clinical:<name>`` clinical values (NaN when not given: imputed)."""
    clinical = clinical or {}
    x = np.full(len(names), np.nan)
    for i, n in enumerate(names):
        if n.startswith("p_"):
            x[i] = float(probabilities[n[2:]])
        elif n.startswith("measured_"):
            x[i] = 1.0 if measured == n[len("measured_"):] else 0.0
        elif n.startswith(CLINICAL_PREFIX):
            v = clinical.get(n[len(CLINICAL_PREFIX):])
            x[i] = np.nan if v is None else float(v)
        else:
            raise ValueError(f"unknown suggestion feature {n!r}")
    return x


def suggestion_probabilities(model: Mapping[str, Any], x: np.ndarray) -> np.ndarray:
    """The logistic regression of ``model`` (bundle.json's ``suggestion``) on feature rows ``x``
    ``(N, F)`` or one row ``(F,)``: impute NaN, standardise, softmax of the linear scores."""
    x = np.array(x, dtype=np.float64)
    one = x.ndim == 1
    x = np.atleast_2d(x)
    impute = np.asarray(model["impute"], dtype=np.float64)
    x = np.where(np.isnan(x), impute, x)
    z = (x - np.asarray(model["mean"])) / np.asarray(model["scale"])
    scores = z @ np.asarray(model["coef"], dtype=np.float64).T + np.asarray(model["intercept"])
    scores -= scores.max(axis=1, keepdims=True)
    e = np.exp(scores)
    p = e / e.sum(axis=1, keepdims=True)
    return p[0] if one else p


def suggest(model: Mapping[str, Any] | None, probabilities: Mapping[str, float], measured: Mapping[str, Any] | None,
            clinical: Mapping[str, float] | None = None) -> dict[str, Any] | None:
    """``prediction.json["suggested"]``: the category the bundle's suggestion model gives from the
    network's (calibrated) probabilities and the segmentation's measured category, with what it
    used; None without a model or without a measured block (no segmentation)."""
    if not model or not measured or not measured.get("category"):
        return None
    names = list(model["features"])
    category = str(measured["category"])
    x = suggestion_features(names, probabilities, category, clinical)
    p = suggestion_probabilities(model, x)
    classes = list(model["classes"])
    used = ["network probabilities (calibrated)" if any(n.startswith("p_") for n in names) else None,
            f"measured RANO category ({category}, {measured.get('source', 'segmentation')})"
            + ("" if category in classes else ": not a class of the model, left out")]
    clin = [n[len(CLINICAL_PREFIX):] for n in names if n.startswith(CLINICAL_PREFIX)]
    if clin:
        given = [c for c in clin if (clinical or {}).get(c) is not None]
        missing = [c for c in clin if c not in given]
        used.append("clinical: " + (", ".join(given) if given else "none given")
                    + (f" (imputed with training medians: {', '.join(missing)})" if missing else ""))
    return {"category": classes[int(np.argmax(p))],
            "probabilities": {c: float(v) for c, v in zip(classes, p)},
            "used": [u for u in used if u],
            "model": {"method": model["method"], "fitted_on": model.get("fitted_on", ""),
                      "cv": model.get("cv", {})}}


def summary_fields(result: Any) -> dict[str, Any]:
    """What a predict result's ``prediction.json`` gets from here: the network's own probabilities
    (``probabilities_uncalibrated``; ``probabilities`` are the calibrated ones when the bundle has
    a calibration), whether they were calibrated, ``uncertain`` and ``suggested`` (None without a
    suggestion model or a measured block)."""
    pred, names = result.prediction, result.bundle.class_names
    raw = pred.uncalibrated if pred.uncalibrated is not None else pred.probabilities
    return {"probabilities_uncalibrated": {c: float(p) for c, p in zip(names, raw)},
            "calibrated": bool(result.bundle.calibration) and pred.members is not None,
            "uncertain": pred.uncertain or uncertain(pred.probabilities, pred.spread, None, names),
            "suggested": suggest(result.bundle.suggestion, result.probabilities, getattr(result, "measured", None))}
