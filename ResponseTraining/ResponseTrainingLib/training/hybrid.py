"""Deep hybrid learning: scikit-learn classifiers on a fold model's class probabilities plus
clinical features, fitted inside the same fold.

No leakage: in fold *k* the classifiers are fitted on the fold model's predictions for that
fold's *validation* patients (``fit_on="val"``, default: the CNN never trained on them) or on
its training and validation patients (``fit_on="trainval"``: more samples, but the CNN's
predictions on its own training patients are over-confident), and scored on the test fold only.
Missing clinical values are imputed with the fitting set's medians.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np
from sklearn.ensemble import RandomForestClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

HYBRID_FIT = ("val", "trainval")


def _knn(n: int, seed: int):
    return KNeighborsClassifier(n_neighbors=max(1, min(5, n - 1)), weights="distance")


CLASSIFIERS: dict[str, Callable[[int, int], Any]] = {
    "knn": _knn,
    "logreg": lambda n, seed: LogisticRegression(max_iter=2000, class_weight="balanced"),
    "rf": lambda n, seed: RandomForestClassifier(n_estimators=200, class_weight="balanced", random_state=seed,
                                                 n_jobs=1),
    "svc": lambda n, seed: SVC(probability=True, class_weight="balanced", random_state=seed),
}


def fit_predict(name: str, x_fit: np.ndarray, y_fit: np.ndarray, x_test: np.ndarray, n_classes: int,
                seed: int = 0) -> np.ndarray:
    """Fit classifier ``name`` (imputer -> scaler -> classifier) and return test probabilities
    (N_test, n_classes); classes absent from the fitting set get probability 0.

    Raises ValueError when the fitting set has fewer than two classes.
    """
    if name not in CLASSIFIERS:
        raise ValueError(f"unknown hybrid classifier {name!r} (known: {', '.join(CLASSIFIERS)})")
    classes = np.unique(y_fit)
    if len(classes) < 2:
        raise ValueError("the fitting set has fewer than two classes")
    model = make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler(),
                          CLASSIFIERS[name](len(y_fit), seed))
    with warnings.catch_warnings():  # tiny folds: rare classes trigger sklearn's small-sample warnings
        warnings.simplefilter("ignore")
        model.fit(x_fit, y_fit)
        p = model.predict_proba(x_test) if len(x_test) else np.zeros((0, len(classes)))
    out = np.zeros((len(x_test), n_classes))
    out[:, model.classes_.astype(int)] = p
    return out
