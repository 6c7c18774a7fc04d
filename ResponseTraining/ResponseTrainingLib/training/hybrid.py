"""Deep hybrid learning: scikit-learn classifiers on a fold model's class probabilities plus
clinical features, fitted inside the same fold.

No leakage: in fold *k* the classifiers are fitted on the fold model's predictions for that
fold's *validation* patients (``fit_on="val"``, default: the CNN never trained on them) or on
its training and validation patients (``fit_on="trainval"``: more samples, but the CNN's
predictions on its own training patients are over-confident), and scored on the test fold only.
Missing clinical values are imputed with the fitting set's medians.

``suggested`` is the one hybrid predict applies: a multinomial logistic regression on the fold
model's *calibrated* probabilities, the measured RANO category (one-hot) and, with ``--clinical``,
the clinical features. At training time the measured category of a pair comes from the cohort's
own masks (:func:`measured_from_cohort_masks`: the DeepBraTumIA-layout segmentations next to the
studies, measured by :mod:`RANOResponseLib.rano.measurement`); at predict time from the automatic
segmentation. The model fitted on every fold's validation pairs goes into the bundle as numbers
(:func:`suggestion_json`, no pickle).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
from RANOResponseLib.core.names import CLASS_NAMES
from RANOResponseLib.datasets.lumiere import CLINICAL_FEATURES, Pair
from RANOResponseLib.inference.calibration import CLINICAL_PREFIX
from sklearn.ensemble import RandomForestClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

HYBRID_FIT = ("val", "trainval")


def _knn(n: int, seed: int):
    return KNeighborsClassifier(n_neighbors=max(1, min(5, n - 1)), weights="distance")


CLASSIFIERS: dict[str, Callable[[int, int], Any]] = {
    "knn": _knn,
    "logreg": lambda n, seed: LogisticRegression(max_iter=2000, class_weight="balanced"),
    # multinomial (lbfgs) on [calibrated probabilities, measured one-hot, clinical]: see the module docstring
    "suggested": lambda n, seed: LogisticRegression(max_iter=5000, class_weight="balanced"),
    "rf": lambda n, seed: RandomForestClassifier(n_estimators=200, class_weight="balanced", random_state=seed,
                                                 n_jobs=1),
    "svc": lambda n, seed: SVC(probability=True, class_weight="balanced", random_state=seed),
}


def fit_model(name: str, x_fit: np.ndarray, y_fit: np.ndarray, seed: int = 0) -> Pipeline:
    """Classifier ``name`` (imputer -> scaler -> classifier) fitted on ``(x_fit, y_fit)``.

    Raises ValueError when the fitting set has fewer than two classes.
    """
    if name not in CLASSIFIERS:
        raise ValueError(f"unknown hybrid classifier {name!r} (known: {', '.join(CLASSIFIERS)})")
    if len(np.unique(y_fit)) < 2:
        raise ValueError("the fitting set has fewer than two classes")
    model = make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler(),
                          CLASSIFIERS[name](len(y_fit), seed))
    with warnings.catch_warnings():  # tiny folds: rare classes trigger sklearn's small-sample warnings
        warnings.simplefilter("ignore")
        model.fit(x_fit, y_fit)
    return model


def fit_predict(name: str, x_fit: np.ndarray, y_fit: np.ndarray, x_test: np.ndarray, n_classes: int,
                seed: int = 0) -> np.ndarray:
    """Fit classifier ``name`` (:func:`fit_model`) and return test probabilities (N_test,
    n_classes); classes absent from the fitting set get probability 0.

    Raises ValueError when the fitting set has fewer than two classes.
    """
    model = fit_model(name, x_fit, y_fit, seed)
    out = np.zeros((len(x_test), n_classes))
    if len(x_test):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[:, model.classes_.astype(int)] = model.predict_proba(x_test)
    return out


# A class never seen while fitting gets this linear score in the exported model (probability
# ~1e-13 next to a score of 0): JSON has no -inf, and predict must not suggest it.
_ABSENT_CLASS_SCORE = -30.0


def suggestion_json(model: Pipeline, features: Sequence[str], class_names: Sequence[str] = CLASS_NAMES,
                    **info: Any) -> dict[str, Any]:
    """A fitted ``suggested`` pipeline as bundle.json's ``suggestion`` block: imputation values,
    standardisation, coefficients and intercepts per class (plain numbers, no pickle); ``info``
    (``fitted_on``, ``cv``, ...) is added as is. :func:`RANOResponseLib.inference.calibration.suggestion_probabilities`
    gives the pipeline's ``predict_proba`` from it."""
    imputer, scaler, lr = model.named_steps["simpleimputer"], model.named_steps["standardscaler"], model[-1]
    n = len(features)
    coef = np.zeros((len(class_names), n))
    intercept = np.full(len(class_names), _ABSENT_CLASS_SCORE)
    fitted = lr.classes_.astype(int)
    if len(fitted) == 2:  # scikit-learn keeps one row for two classes: p(second) = sigmoid(w.z + b)
        coef[fitted[1]], intercept[fitted[0]], intercept[fitted[1]] = lr.coef_[0], 0.0, lr.intercept_[0]
    else:
        coef[fitted], intercept[fitted] = lr.coef_, lr.intercept_
    return {"method": "multinomial-logistic-regression", "classes": list(class_names), "features": list(features),
            "classes_fitted": [class_names[i] for i in fitted],
            "impute": np.nan_to_num(imputer.statistics_.astype(float), nan=0.0).tolist(),
            "mean": scaler.mean_.astype(float).tolist(), "scale": scaler.scale_.astype(float).tolist(),
            "coef": coef.tolist(), "intercept": intercept.tolist(), **info}


def suggestion_feature_names(clinical: bool, class_names: Sequence[str] = CLASS_NAMES) -> list[str]:
    """The ``suggested`` model's feature names, by which predict rebuilds its inputs
    (:func:`RANOResponseLib.inference.calibration.suggestion_features`)."""
    names = [f"p_{c}" for c in class_names] + [f"measured_{c}" for c in class_names]
    return names + ([f"{CLINICAL_PREFIX}{c}" for c in CLINICAL_FEATURES] if clinical else [])


def suggestion_features(probabilities: np.ndarray, measured: Sequence[str | None],
                        clinical: np.ndarray | None = None, class_names: Sequence[str] = CLASS_NAMES) -> np.ndarray:
    """The ``suggested`` model's inputs, columns as :func:`suggestion_feature_names`: calibrated
    probabilities, the measured category one-hot (all 0 when unknown) and, when given, the
    clinical features."""
    onehot = np.array([[1.0 if m == c else 0.0 for c in class_names] for m in measured], dtype=float)
    parts = [np.asarray(probabilities, float), onehot.reshape(len(measured), len(class_names))]
    if clinical is not None:
        parts.append(np.asarray(clinical, float))
    return np.hstack(parts)


MEASURED_CSV = "measured-cohort-masks.csv"


def measured_from_cohort_masks(pairs: Sequence[Pair], cache_dir: Path) -> dict[str, str | None]:
    """Pair id -> the RANO category measured on the cohort's own segmentations (``None`` where a
    pair has none or measuring failed; the reason is kept). Cached in ``cache_dir/measured-cohort-masks.csv``
    and resumed pair by pair. For a phantom these are the masks its labels were computed from, so a
    suggestion trained on them leans on the measured category more than automatic masks justify."""
    from RANOResponseLib.core.errors import RANOInputError
    from RANOResponseLib.core.files import write_text
    from RANOResponseLib.rano.measurement import measure_timepoints
    from RANOResponseLib.rano.rules import decide
    from tqdm import tqdm

    path = Path(cache_dir) / MEASURED_CSV
    rows = pd.read_csv(path, dtype=str, keep_default_na=False).to_dict("records") if path.is_file() else []
    done = {r["pair"]: r for r in rows}
    todo = [p for p in pairs if p.id not in done]
    for i, p in enumerate(tqdm(todo, desc="measure cohort masks", unit="pair", file=sys.stderr, disable=not todo)):
        try:
            category, reason = decide(measure_timepoints(p.baseline, p.followup)).category, ""
        except (RANOInputError, OSError, RuntimeError, ValueError) as e:  # no masks, or unusable ones
            category, reason = "", str(e).splitlines()[0]
        done[p.id] = {"pair": p.id, "category": category, "reason": reason}
        if (i + 1) % 10 == 0 or i + 1 == len(todo):  # resumable without rewriting per pair
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            write_text(pd.DataFrame(list(done.values())).to_csv(index=False), path)
    return {p.id: (done[p.id]["category"] or None) for p in pairs}
