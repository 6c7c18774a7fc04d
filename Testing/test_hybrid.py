"""Deep hybrid classifiers (scikit-learn on CNN probabilities + clinical features): column
mapping for classes missing from the fitting set, refusal of one-class fitting sets, missing
clinical values imputed from the fitting set only."""

from __future__ import annotations

import numpy as np
import pytest
from ResponseTrainingLib.training.hybrid import CLASSIFIERS, fit_predict


def _data(n, seed, classes=(0, 2, 3)):
    rng = np.random.default_rng(seed)
    y = rng.choice(classes, size=n)
    x = np.hstack([np.eye(4)[y] * 0.6 + rng.random((n, 4)) * 0.4, rng.normal(60, 10, (n, 1)),
                   rng.integers(0, 2, (n, 1)).astype(float)])
    return x, y


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_classifier_probabilities_cover_all_classes(name):
    x, y = _data(24, 0)
    xt, yt = _data(10, 1)
    p = fit_predict(name, x, y, xt, n_classes=4, seed=0)
    assert p.shape == (10, 4)
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-6)
    assert (p[:, 1] == 0).all()  # PR never seen while fitting: probability 0, not a shifted column
    if name != "svc":  # Platt scaling on 24 samples is too noisy to promise accuracy
        assert (p.argmax(1) == yt).mean() >= 0.6
    np.testing.assert_allclose(fit_predict(name, x, y, xt, n_classes=4, seed=0), p)  # seeded


def test_one_class_fitting_set_is_refused():
    x, _ = _data(6, 2)
    with pytest.raises(ValueError, match="two classes"):
        fit_predict("logreg", x, np.full(6, 3), x, n_classes=4)


def test_missing_clinical_values_are_imputed_from_the_fitting_set():
    x, y = _data(20, 3)
    x[::3, 4] = np.nan  # unknown ages
    xt, _ = _data(5, 4)
    xt[:, 4] = np.nan
    p = fit_predict("knn", x, y, xt, n_classes=4)
    assert np.isfinite(p).all()
