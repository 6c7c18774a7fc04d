"""Calibration and the suggested category (issue 12): temperature scaling against softmax of
known logits, a temperature recovered from labels drawn at a known one, ECE and reliability on
hand-placed confidences, the "uncertain" thresholds, bundle.json validation, the suggestion
model exported as numbers (checked against scikit-learn's own predict_proba), and predict
reporting calibrated probabilities next to the network's."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from RANOResponseLib.core.errors import BundleError
from RANOResponseLib.core.names import CLASS_NAMES
from RANOResponseLib.inference.attributions import Prediction
from RANOResponseLib.inference.calibration import (
    apply_calibration,
    calibrate_members,
    suggest,
    suggestion_probabilities,
    temperature_scale,
)
from RANOResponseLib.model.bundle import read_bundle
from ResponseTrainingLib.analysis.calibration import (
    calibrate_folds,
    expected_calibration_error,
    fit_temperature,
    reliability,
    spread_threshold,
    top_probability_threshold,
)
from ResponseTrainingLib.training.hybrid import fit_model, suggestion_feature_names, suggestion_json


def test_temperature_scaling_is_softmax_of_logits_over_t():
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 3.0]], dtype=torch.float64)
    p = torch.softmax(logits, 1).numpy()
    for t in (0.5, 1.0, 3.0):
        np.testing.assert_allclose(temperature_scale(p, t), torch.softmax(logits / t, 1).numpy(), atol=1e-10)


def test_fitted_temperature_recovers_the_one_labels_were_drawn_at():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2.5, (6000, 4))
    true_t = 2.0  # the network is over-confident: the labels follow softmax(logits / 2)
    truth = torch.softmax(torch.from_numpy(logits / true_t), 1).numpy()
    y = np.array([rng.choice(4, p=row) for row in truth])
    t = fit_temperature(torch.softmax(torch.from_numpy(logits), 1).numpy(), y)
    assert t == pytest.approx(true_t, rel=0.08)


def test_ece_and_reliability_on_hand_placed_confidences():
    # confidences 0.9 (two pairs, one right), 0.5 (one pair, right), 0.3 (one pair, wrong)
    proba = np.array([[0.9, 0.1, 0, 0], [0.9, 0.1, 0, 0], [0.5, 0.2, 0.2, 0.1], [0.3, 0.25, 0.25, 0.2]])
    y = np.array([0, 1, 0, 1])
    # by hand: bin of 0.9: |0.5 - 0.9| * 2; bin of 0.5: |1 - 0.5|; bin of 0.3: |0 - 0.3|; over 4 pairs
    assert expected_calibration_error(y, proba) == pytest.approx((0.8 + 0.5 + 0.3) / 4)
    table = reliability(y, proba)
    assert len(table) == 15 and table["count"].sum() == 4
    row = table[(table["low"] < 0.9) & (table["high"] >= 0.9)].iloc[0]
    assert row["count"] == 2 and row["accuracy"] == 0.5 and row["confidence"] == pytest.approx(0.9)
    assert np.isnan(expected_calibration_error(np.zeros(0, int), np.zeros((0, 4))))


def test_uncertain_thresholds_chosen_for_the_target_accuracy():
    top = np.array([0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    right = np.array([0, 0, 1, 0, 1, 1, 1], bool)
    # from 0.7 up all 3 are right; from 0.6 up 3 of 4 (0.75): the smallest threshold reaching 0.85 is 0.7
    assert top_probability_threshold(top, right, target=0.85) == 0.7
    assert top_probability_threshold(top, np.zeros(7, bool), target=0.85) == 1.0  # never accurate: flag all
    spread = np.array([0.01, 0.02, 0.05, 0.1, 0.2, 0.3])
    ok = np.array([1, 1, 1, 1, 0, 0], bool)
    assert spread_threshold(spread, ok, target=0.85) == 0.1  # up to 0.1 all right; 0.2 brings 4/5 = 0.8
    assert spread_threshold(spread[:4], ok[:4], min_pairs=5) is None


def test_calibrate_folds_fits_on_validation_pairs_only():
    import pandas as pd

    rng = np.random.default_rng(1)
    frames = {}
    for k in range(2):
        n = 30
        logits = rng.normal(0, 3, (n, 4))
        p = torch.softmax(torch.from_numpy(logits), 1).numpy()
        y = p.argmax(1)
        role = np.array(["val"] * 20 + ["test"] * 10)
        y[20:] = (y[20:] + 1) % 4  # the test pairs are all wrong: fitting on them would flatten a lot
        frames[k] = pd.DataFrame({"pair": [f"f{k}-{i}" for i in range(n)], "role": role, "label": y,
                                  **{f"p_{c}": p[:, i] for i, c in enumerate(CLASS_NAMES)}})
    cal = calibrate_folds(frames)
    for k, df in frames.items():
        val = df[df.role == "val"]
        expected = fit_temperature(val[[f"p_{c}" for c in CLASS_NAMES]].to_numpy(), val["label"].to_numpy())
        assert cal["temperatures"][k] == pytest.approx(expected)
        assert cal["temperatures"][k] < 1.0  # all validation pairs right: sharpen, whatever the test pairs say
    assert cal["uncertain"]["chosen_on"] == "validation" and cal["uncertain"]["validation_pairs"] == 40


def _calibrated_bundle(src, dst, temperatures, uncertain=None, suggestion=None):
    shutil.copytree(src, dst)
    meta = json.loads((dst / "bundle.json").read_text())
    meta["calibration"] = {"method": "temperature", "temperatures": temperatures,
                           "uncertain": uncertain or {"top_probability_below": 0.6, "spread_above": 0.1,
                                                      "chosen_on": "validation"}}
    if suggestion is not None:
        meta["suggestion"] = suggestion
    (dst / "bundle.json").write_text(json.dumps(meta))
    return dst


def test_bundle_validates_calibration_and_suggestion(tiny_bundle, tmp_path):
    ok = read_bundle(_calibrated_bundle(tiny_bundle, tmp_path / "ok", [1.5]))
    assert ok.calibration["temperatures"] == [1.5] and ok.suggestion is None
    assert read_bundle(tiny_bundle).calibration is None  # optional
    with pytest.raises(BundleError, match="1 positive numbers"):
        read_bundle(_calibrated_bundle(tiny_bundle, tmp_path / "two", [1.0, 2.0]))  # one model, two temperatures
    with pytest.raises(BundleError, match="positive"):
        read_bundle(_calibrated_bundle(tiny_bundle, tmp_path / "zero", [0.0]))
    with pytest.raises(BundleError, match="top_probability_below"):
        read_bundle(_calibrated_bundle(tiny_bundle, tmp_path / "top", [1.0], {"top_probability_below": 1.5}))
    bad = {"method": "multinomial-logistic-regression", "classes": list(CLASS_NAMES), "features": ["p_CR"],
           "impute": [0.0], "mean": [0.0], "scale": [1.0], "coef": [[1.0]] * 3, "intercept": [0.0] * 4}
    with pytest.raises(BundleError, match="coef"):
        read_bundle(_calibrated_bundle(tiny_bundle, tmp_path / "sug", [1.0], suggestion=bad))


def test_apply_calibration_scales_each_member():
    members = np.array([[0.5, 0.3, 0.1, 0.1], [0.2, 0.6, 0.1, 0.1]])
    pred = Prediction(members.mean(0), members.std(0), 0, members=members)
    apply_calibration(pred, {"temperatures": [0.5, 2.0], "uncertain": {"top_probability_below": 0.9,
                                                                        "spread_above": None}}, CLASS_NAMES)
    by_hand = np.stack([temperature_scale(members[0], 0.5), temperature_scale(members[1], 2.0)])
    np.testing.assert_allclose(pred.probabilities, by_hand.mean(0))
    np.testing.assert_allclose(pred.uncalibrated, members.mean(0))
    assert pred.uncertain["flag"] and "below 0.90" in pred.uncertain["why"]
    plain = Prediction(members.mean(0), members.std(0), 0, members=members)
    apply_calibration(plain, None, CLASS_NAMES)
    np.testing.assert_allclose(plain.probabilities, members.mean(0))  # no calibration: unchanged
    assert plain.uncertain["flag"] is False
    mean, spread = calibrate_members(members, [1.0, 1.0])
    np.testing.assert_allclose(spread, members.std(0), atol=1e-12)


@pytest.mark.parametrize("classes", [(0, 1, 2, 3), (0, 2, 3), (2, 3)])
def test_suggestion_as_numbers_gives_scikit_learns_probabilities(classes):
    rng = np.random.default_rng(len(classes))
    y = rng.choice(classes, 60)
    probs = np.eye(4)[y] * 0.5 + rng.random((60, 4)) * 0.5
    probs /= probs.sum(1, keepdims=True)
    measured = np.eye(4)[np.where(rng.random(60) < 0.8, y, rng.choice(4, 60))]
    clinical = rng.normal(50, 10, (60, 5))
    clinical[::4, 0] = np.nan
    x = np.hstack([probs, measured, clinical])
    model = fit_model("suggested", x, y, seed=0)
    js = json.loads(json.dumps(suggestion_json(model, suggestion_feature_names(True))))  # through JSON
    xt = x[:10].copy()
    xt[0, 8] = np.nan
    expected = np.zeros((10, 4))
    expected[:, model.classes_] = model.predict_proba(xt)
    np.testing.assert_allclose(suggestion_probabilities(js, xt), expected, atol=1e-9)
    assert js["classes_fitted"] == [CLASS_NAMES[c] for c in classes]


def test_suggest_needs_a_measured_category_and_says_what_it_used():
    model = {"method": "multinomial-logistic-regression", "classes": list(CLASS_NAMES),
             "features": [f"p_{c}" for c in CLASS_NAMES] + [f"measured_{c}" for c in CLASS_NAMES] + ["clinical:age"],
             "impute": [0.0] * 8 + [60.0], "mean": [0.0] * 9, "scale": [1.0] * 9,
             # the measured category decides, unless the network is very sure
             "coef": [[2.0 * (i == j) for j in range(4)] + [5.0 * (i == j) for j in range(4)] + [0.0] for i in range(4)],
             "intercept": [0.0] * 4}
    probs = {"CR": 0.1, "PR": 0.2, "SD": 0.6, "PD": 0.1}
    assert suggest(model, probs, None) is None and suggest(None, probs, {"category": "PD"}) is None
    s = suggest(model, probs, {"category": "PD", "source": "automatic"})
    assert s["category"] == "PD" and sum(s["probabilities"].values()) == pytest.approx(1.0)
    assert any("measured RANO category (PD" in u for u in s["used"])
    assert any("imputed" in u and "age" in u for u in s["used"])


def test_predict_reports_calibrated_and_network_probabilities(tiny_bundle, case_pair, tmp_path):
    from RANOResponseLib.inference.pipeline import predict_pair

    hot = _calibrated_bundle(tiny_bundle, tmp_path / "hot", [3.0],
                             {"top_probability_below": 0.99, "spread_above": None, "chosen_on": "validation"})
    kw = dict(device="cpu", attributions=False, notice=lambda m: None, segmentation=False)
    plain = predict_pair(case_pair.baseline, case_pair.followup, tiny_bundle, **kw).summary()
    cal = predict_pair(case_pair.baseline, case_pair.followup, hot, **kw).summary()
    assert plain["calibrated"] is False and plain["uncertain"]["flag"] is False
    assert plain["probabilities"] == pytest.approx(plain["probabilities_uncalibrated"])
    net = np.array([plain["probabilities"][c] for c in CLASS_NAMES])
    assert np.array([cal["probabilities_uncalibrated"][c] for c in CLASS_NAMES]) == pytest.approx(net, abs=1e-6)
    # one member at T = 3: softmax(log p / 3), computed here from the uncalibrated bundle's output
    z = np.log(net) / 3.0
    expected = np.exp(z) / np.exp(z).sum()
    assert np.array([cal["probabilities"][c] for c in CLASS_NAMES]) == pytest.approx(expected, abs=1e-5)
    assert cal["calibrated"] is True and cal["uncertain"]["flag"] is True  # nothing reaches 0.99
    assert cal["label"] == plain["label"]  # one temperature never changes the argmax
    assert cal["suggested"] is None  # no suggestion model, no segmentation


def test_summary_suggests_from_the_measured_block(automatic_prediction, tiny_bundle, tmp_path):
    """prediction.json's ``suggested`` comes from the bundle's model, the calibrated probabilities
    and the measured category of the segmentation (here a model that follows the measured one)."""
    import dataclasses

    r = automatic_prediction.result
    measured = r.measured["category"]
    follow = {"method": "multinomial-logistic-regression", "classes": list(CLASS_NAMES),
              "features": [f"p_{c}" for c in CLASS_NAMES] + [f"measured_{c}" for c in CLASS_NAMES],
              "impute": [0.0] * 8, "mean": [0.0] * 8, "scale": [1.0] * 8,
              "coef": [[0.0] * 4 + [8.0 * (i == j) for j in range(4)] for i in range(4)], "intercept": [0.0] * 4}
    bundle = read_bundle(_calibrated_bundle(tiny_bundle, tmp_path / "sug", [1.0], suggestion=follow))
    s = dataclasses.replace(r, bundle=bundle).summary()
    assert s["suggested"]["category"] == measured and s["label"] == r.label
    assert s["suggested"]["probabilities"][measured] == pytest.approx(np.exp(8) / (np.exp(8) + 3))
    assert r.summary()["suggested"] is None  # the tiny bundle has no suggestion model
