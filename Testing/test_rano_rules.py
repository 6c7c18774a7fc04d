"""Tests of the rule-based RANO decision (RANOResponseLib.rano.rules): one test per row of the
decision table, for the bidimensional (RANO) and the volumetric (RANO 2.0) reading, on the pure
table (:func:`rano_decision`) and on measured lesions. Expected classes are RANO's (Wen et al.
2010; RANO 2.0 2023), written here by hand."""

from __future__ import annotations

import json

import pytest
import SimpleITK as sitk
from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.rano.measurement import BINARY, measure_pair
from RANOResponseLib.rano.rules import (
    ROWS,
    RANOThresholds,
    RuleInputs,
    compare_with_prediction,
    decide,
    decide_inputs,
    rano_decision,
    read_assessment,
    write_assessment,
)


# (before, after, enhancing lesion left, new measurable lesion) -> RANO category, deciding row
DECISIONS = {
    "+25 % exactly is PD": ((100.0, 125.0, True, False), "PD", "growth"),
    "+24.9 % is SD": ((100.0, 124.9, True, False), "SD", "stable"),
    "-50 % exactly is PR": ((100.0, 50.0, True, False), "PR", "shrinkage"),
    "-49.9 % is SD": ((100.0, 50.1, True, False), "SD", "stable"),
    "unchanged is SD": ((100.0, 100.0, True, False), "SD", "stable"),
    "all enhancing disease gone is CR": ((100.0, 0.0, False, False), "CR", "no enhancing disease"),
    "measurable gone, non-measurable enhancement left is PR, not CR": ((100.0, 0.0, True, False), "PR", "shrinkage"),
    "nothing at either timepoint is CR": ((0.0, 0.0, False, False), "CR", "no enhancing disease"),
    "non-measurable only, before and after, is SD": ((0.0, 0.0, True, False), "SD", "non-measurable only"),
    "measurable disease where there was none is PD": ((0.0, 30.0, True, False), "PD", "measurable from none"),
    "a new lesion wins over shrinkage": ((100.0, 40.0, True, True), "PD", "new lesion"),
    "a new lesion when the old ones are gone": ((100.0, 150.0, True, True), "PD", "new lesion"),
}


@pytest.mark.parametrize("name", list(DECISIONS))
def test_rano_decision_rows(name):
    args, category, row = DECISIONS[name]
    d = rano_decision(*args)
    assert (d.category, d.row) == (category, row)
    assert d.row in ROWS
    before, after = args[:2]
    assert d.change_percent == (None if before == 0 else pytest.approx((after - before) / before * 100))


def test_rano_decision_thresholds_and_bad_input():
    # RANO 2.0 volumetric thresholds: +30 % is not yet PD, -60 % not yet PR
    assert rano_decision(100.0, 130.0, True, False).category == "PD"
    assert rano_decision(100.0, 130.0, True, False, pd_percent=40.0).category == "SD"
    assert rano_decision(100.0, 40.0, True, False).category == "PR"
    assert rano_decision(100.0, 40.0, True, False, pr_percent=-65.0).category == "SD"
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(RANOInputError, match="finite non-negative"):
            rano_decision(bad, 10.0, True, False)
        with pytest.raises(RANOInputError, match="finite non-negative"):
            rano_decision(10.0, bad, True, False)
    with pytest.raises(RANOInputError, match="no enhancing disease"):
        rano_decision(100.0, 20.0, False, False)  # measurable disease cannot be left without enhancement


def inputs(spd=(400.0, 400.0), vol=(4.0, 4.0), n=(1, 1), new=(), new_small=(), lost=()) -> RuleInputs:
    """Decision inputs: sums at baseline and follow-up, enhancing lesion counts, new lesions."""
    return RuleInputs(
        spd_baseline_mm2=spd[0], spd_followup_mm2=spd[1], volume_baseline_ml=vol[0], volume_followup_ml=vol[1],
        enhancing_baseline=n[0], enhancing_followup=n[1],
        measurable_baseline=[f"L1 {spd[0]:.0f} mm2"] if spd[0] else [],
        measurable_followup=[f"L1 {spd[1]:.0f} mm2"] if spd[1] else [],
        new_measurable=list(new), new_non_measurable=list(new_small), lost_measurability=list(lost),
    )


# row: (inputs, expected bidimensional, expected volumetric, a phrase the reasoning must contain)
TABLE = {
    "CR: all enhancing disease gone": (inputs(spd=(400, 0), vol=(4, 0), n=(2, 0)), "CR", "CR", "resolved"),
    "CR: none at either timepoint": (inputs(spd=(0, 0), vol=(0, 0), n=(0, 0)), "CR", "CR", "either timepoint"),
    "PR: -60 % SPD, -70 % volume": (inputs(spd=(400, 160), vol=(4, 1.2)), "PR", "PR", "-60.0 %"),
    "PR: exactly -50 % SPD": (inputs(spd=(400, 200), vol=(4, 1.3)), "PR", "PR", "-50.0 %"),
    "PR not CR: measurable gone, small lesion left": (inputs(spd=(400, 0), vol=(4, 0), n=(1, 1)), "PR", "PR",
                                                      "not CR"),
    "SD: +10 %": (inputs(spd=(400, 440), vol=(4, 4.4)), "SD", "SD", "between -50 % and +25 %"),
    "SD: -45 %": (inputs(spd=(400, 220), vol=(4, 2.0)), "SD", "SD", "-45.0 %"),
    "PD by growth: +30 %": (inputs(spd=(400, 520), vol=(4, 6.0)), "PD", "PD", "progression threshold"),
    "PD by growth: exactly +25 %": (inputs(spd=(400, 500), vol=(4, 5.6)), "PD", "PD", "+25.0 %"),
    "PD by new measurable lesion despite shrinkage": (inputs(spd=(400, 150), vol=(4, 1.0), n=(1, 2),
                                                             new=["L2 12.0 x 11.0 mm"]), "PD", "PD", "L2 12.0 x 11.0"),
    "RANO 2.0: 2D PR at -55 %, volume -50 % is SD": (inputs(spd=(400, 180), vol=(4, 2.0)), "PR", "SD", "disagree"),
    "RANO 2.0: 2D PD at +30 %, volume +35 % is SD": (inputs(spd=(400, 520), vol=(4, 5.4)), "PD", "SD", "+35.0 %"),
    "RANO 2.0: volume +45 % is PD, 2D +20 % is SD": (inputs(spd=(400, 480), vol=(4, 5.8)), "SD", "PD", "+40 %"),
    "RANO 2.0: volume -66 % is PR": (inputs(spd=(400, 150), vol=(4, 1.36)), "PR", "PR", "-66.0 %"),
    "non-measurable only, at both timepoints": (inputs(spd=(0, 0), vol=(0, 0), n=(1, 1)), "SD", "SD",
                                                "non-measurable enhancing disease only"),
    "non-measurable at baseline, measurable now": (inputs(spd=(0, 150), vol=(0, 1.0), n=(1, 1)), "PD", "PD",
                                                   "no measurable disease at baseline"),
    "new non-measurable lesion alone is not PD": (inputs(spd=(400, 420), vol=(4, 4.1), n=(1, 2),
                                                          new_small=["L2 6.0 x 5.0 mm"]), "SD", "SD",
                                                  "not PD by itself"),
}


@pytest.mark.parametrize("row", list(TABLE))
def test_decision_table(row):
    x, two_d, vol, phrase = TABLE[row]
    r = decide_inputs(x)
    assert (r.bidimensional, r.volumetric) == (two_d, vol)
    assert r.category == two_d and r.criteria == "RANO"
    assert any(phrase in s for s in r.reasoning), r.reasoning
    assert r.reasoning[-1].startswith("Not assessed")  # what images cannot tell is always said
    r2 = decide_inputs(x, criteria="RANO2")
    assert r2.category == vol and r2.criteria == "RANO 2.0 volumetric"


def test_changes_reported():
    r = decide_inputs(inputs(spd=(400, 520), vol=(4, 5.0)))
    assert r.spd_change_percent == pytest.approx(30.0)
    assert r.volume_change_percent == pytest.approx(25.0)
    assert decide_inputs(inputs(spd=(0, 0), vol=(0, 0), n=(0, 0))).spd_change_percent is None


def test_thresholds_are_parameters():
    strict = RANOThresholds(pd_percent=10.0)
    assert decide_inputs(inputs(spd=(400, 448)), strict).bidimensional == "PD"
    assert decide_inputs(inputs(spd=(400, 448))).bidimensional == "SD"
    with pytest.raises(RANOInputError, match="criteria"):
        decide_inputs(inputs(), criteria="RECIST")


def test_lost_measurability_and_edits_explained():
    x = inputs(spd=(400, 0), vol=(4, 0), n=(1, 1), lost=["L1 (now L1 9.0 x 8.0 mm)"])
    x.edited = ["follow-up L1"]
    r = decide_inputs(x)
    assert any("no longer measurable" in s for s in r.reasoning)
    assert any("edited by the reader" in s for s in r.reasoning)


def lesion_image(halves: list[tuple[float, float]]) -> sitk.Image:
    """A 1 mm, 9-slice map with square lesions (centre x, half side in mm) on slices 2..6."""
    img = sitk.Image([96, 64, 9], sitk.sitkUInt8)
    img.SetOrigin((-48, -32, -4))
    for cx, h in halves:
        for z in range(2, 7):
            for x in range(int(cx - h + 48), int(cx + h + 48)):
                for y in range(int(32 - h), int(32 + h)):
                    img[x, y, z] = 1
    return img


def test_decide_on_measured_pair():
    """From masks: a 20 mm square growing to 25 mm is PD (d1 is the diagonal: same ratio)."""
    pair = measure_pair(lesion_image([(-20, 10)]), lesion_image([(-20, 12.5)]), None, BINARY)
    r = decide(pair)
    assert r.bidimensional == "PD"
    assert r.spd_change_percent == pytest.approx(56.25, abs=2.0)
    # and a new lesion far away with the old one stable
    pair = measure_pair(lesion_image([(-20, 10)]), lesion_image([(-20, 10), (25, 7)]), None, BINARY)
    r = decide(pair)
    assert r.inputs.new_measurable and r.category == "PD"
    assert any("new measurable lesion" in s for s in r.reasoning)


PRED = {"label": "PD", "probabilities": {"CR": 0.05, "PR": 0.05, "SD": 0.3, "PD": 0.6},
        "bundle": {"id": "tiny"}}


def test_compare_with_prediction(tmp_path):
    sd = decide_inputs(inputs(spd=(400, 440)))
    c = compare_with_prediction(sd, PRED)
    assert not c.agree and c.model == "PD" and c.rule == "SD"
    assert c.model_probability == pytest.approx(0.6) and c.rule_probability == pytest.approx(0.3)
    assert c.message.startswith("DISAGREEMENT") and "SD" in c.message
    pd_ = decide_inputs(inputs(spd=(400, 600)))
    assert compare_with_prediction(pd_, PRED).agree
    # from a predict output folder
    (tmp_path / "prediction.json").write_text(json.dumps(PRED))
    assert compare_with_prediction(sd, tmp_path).model == "PD"
    with pytest.raises(RANOInputError, match="prediction.json"):
        compare_with_prediction(sd, tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "prediction.json").write_text("{not json")
    with pytest.raises(RANOInputError, match="not valid JSON"):
        compare_with_prediction(sd, tmp_path / "bad")
    (tmp_path / "bad" / "prediction.json").write_text(json.dumps({"label": "PD", "probabilities": {"PD": "high"}}))
    with pytest.raises(RANOInputError, match="map class names to numbers"):
        compare_with_prediction(sd, tmp_path / "bad" / "prediction.json")


def test_assessment_file_round_trip(tmp_path):
    pair = measure_pair(lesion_image([(-20, 10)]), lesion_image([(-20, 12.5)]), None, BINARY)
    rule = decide(pair)
    comp = compare_with_prediction(rule, PRED)
    path = write_assessment(tmp_path / "measurements.json", pair, rule, comp)
    pair2, rule2, comp2 = read_assessment(path)
    assert rule2 == rule and comp2 == comp
    assert pair2.followup.spd_mm2 == pytest.approx(pair.followup.spd_mm2)
    assert decide(pair2).category == rule.category  # the JSON keeps what the decision needs
    (tmp_path / "junk.json").write_text("[]")
    with pytest.raises(RANOInputError, match="junk.json"):
        read_assessment(tmp_path / "junk.json")
