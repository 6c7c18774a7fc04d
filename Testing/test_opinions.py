"""The three opinions (network, measured, suggested) as the panel, the report and the review station
say them (RANOResponseLib.review.opinions, mrml.panel_text.result_html), on hand-written
prediction.json contents: the current fields (calibrated, uncertain, measured, suggested), each
of them missing or empty, and a prediction written before any of them existed. Every expected
line is written out here by hand."""

from __future__ import annotations

import copy

from RANOResponseLib.mrml.panel_text import ClassComparison, result_html
from RANOResponseLib.review.opinions import Measured, opinion_lines, opinions

FULL = {
    "label": "SD",
    "probabilities": {"CR": 0.05, "PR": 0.15, "SD": 0.45, "PD": 0.35},
    "probabilities_uncalibrated": {"CR": 0.02, "PR": 0.08, "SD": 0.6, "PD": 0.3},
    "calibrated": True,
    "uncertain": {"flag": True, "why": "top probability 0.45 (SD) is below 0.55 (thresholds chosen on "
                                       "validation patients)"},
    "ensemble_spread": {"CR": 0.01, "PR": 0.02, "SD": 0.03, "PD": 0.04},
    "measured": {"category": "PD", "category_rano2": "SD", "source": "automatic",
                 "segmentation_bundle": {"id": "seg-v1", "path": "", "sha256": []}},
    "suggested": {"category": "PD", "probabilities": {"CR": 0.01, "PR": 0.04, "SD": 0.2, "PD": 0.75},
                  "used": ["network probabilities (calibrated)", "measured RANO category (PD, automatic)"],
                  "model": {"method": "multinomial-logistic-regression", "fitted_on": "validation pairs",
                            "cv": {"folds": 3, "pooled_balanced_accuracy": 0.931}}},
    "bundle": {"id": "net-v2"},
}
# as rano-response predict wrote it before calibration, segmentation and suggestions
OLD = {"label": "PD", "probabilities": {"CR": 0.1, "PR": 0.1, "SD": 0.2, "PD": 0.6}, "bundle": {"id": "old-v1"}}


def test_all_three_opinions_with_the_uncertain_flag_and_calibration():
    assert opinion_lines(FULL) == [
        "Network: SD (probability 0.45, calibrated)",
        "   UNCERTAIN: top probability 0.45 (SD) is below 0.55 (thresholds chosen on validation patients)",
        "Measured: RANO PD, RANO 2.0 SD",
        "   from automatic segmentation, bundle seg-v1",
        "Suggested: PD (network + measured RANO)",
        "   a suggestion (probability 0.75): the reader decides",
    ]
    assert [(o.role, o.category, o.warning) for o in opinions(FULL)] == [
        ("network", "SD", True), ("measured", "PD", False), ("suggested", "PD", False)]


def test_details_name_what_the_suggestion_combined_and_the_network_before_calibration():
    lines = opinion_lines(FULL, details=True, indent="- ")
    assert lines == [
        "Network: SD (probability 0.45, calibrated)",
        "- UNCERTAIN: top probability 0.45 (SD) is below 0.55 (thresholds chosen on validation patients)",
        "- Network probabilities before calibration: CR 0.02, PR 0.08, SD 0.60, PD 0.30",
        "Measured: RANO PD, RANO 2.0 SD",
        "- from automatic segmentation, bundle seg-v1",
        "Suggested: PD (network + measured RANO)",
        "- a suggestion (probability 0.75): the reader decides",
        "- Suggested probabilities: CR 0.01, PR 0.04, SD 0.20, PD 0.75",
        "- Combined from: network probabilities (calibrated); measured RANO category (PD, automatic)",
        "- Combination model: multinomial logistic regression, fitted on validation pairs; cross-validated "
        "balanced accuracy 0.93 (3 folds, pooled)",
    ]


def test_clinical_data_given_is_named_in_the_suggestion_and_imputed_only_is_not():
    pred = copy.deepcopy(FULL)
    pred["suggested"]["used"].append("clinical: age, sex")
    assert opinion_lines(pred)[4] == "Suggested: PD (network + measured RANO + clinical data)"
    pred["suggested"]["used"][-1] = "clinical: none given (imputed with training medians: age, sex)"
    assert opinion_lines(pred)[4] == "Suggested: PD (network + measured RANO)"


def test_a_measurement_shown_instead_of_the_automatic_one_and_a_suggestion_made_from_the_other():
    manual = Measured("SD", "SD", "manual mask (DeepBraTumIA: seg_mask.nii.gz)")
    assert opinion_lines(FULL, manual)[2:] == [
        "Measured: RANO SD, RANO 2.0 SD",
        "   from manual mask (DeepBraTumIA: seg_mask.nii.gz)",
        "Suggested: PD (network + measured RANO)",
        "   a suggestion (probability 0.75): the reader decides",
        "   made from the automatic measurement (RANO PD), not from the one shown here",
    ]
    same = Measured("PD", "SD", "automatic segmentation, bundle seg-v1")
    assert opinion_lines(FULL, same) == opinion_lines(FULL)


def test_not_uncertain_not_calibrated_no_suggestion_model():
    pred = dict(FULL, calibrated=False, suggested=None,
                uncertain={"flag": False, "why": "the bundle has no thresholds for uncertainty"})
    assert opinion_lines(pred) == [
        "Network: SD (probability 0.45, not calibrated)",
        "Measured: RANO PD, RANO 2.0 SD",
        "   from automatic segmentation, bundle seg-v1",
        "Suggested: none (the bundle has no suggestion model)",
    ]
    assert opinion_lines(pred, details=True)[1] == "   Not flagged uncertain: the bundle has no thresholds for uncertainty"
    assert not any("before calibration" in line for line in opinion_lines(pred, details=True))


def test_predicted_without_segmentation():
    pred = dict(FULL, measured=None, suggested=None)
    assert opinion_lines(pred)[2:] == [
        "Measured: not available (predicted without segmentation)",
        "Suggested: none (needs the measured RANO category; predicted without segmentation)",
    ]


def test_an_old_prediction_still_displays():
    assert opinion_lines(OLD, details=True) == [
        "Network: PD (probability 0.60)",
        "Measured: not available (no segmentation in this prediction)",
    ]
    html = result_html(OLD)
    assert "<b>Network: PD (probability 0.60)</b>" in html and "(model old-v1)" in html
    assert "Suggested" not in html and "UNCERTAIN" not in html and "calibrated" not in html


def test_the_panel_shows_the_three_opinions_the_suggestion_marked_and_uncertain_in_red():
    comparison = ClassComparison("SD", "PD", "SD", "automatic segmentation, bundle seg-v1")
    html = result_html(FULL, comparison)
    assert html.startswith("<b>Network: SD (probability 0.45, calibrated)</b> &nbsp; (model net-v2)")
    assert ("<p style='color:#b00000'><b>UNCERTAIN: top probability 0.45 (SD) is below 0.55 (thresholds chosen "
            "on validation patients)</b></p>") in html
    assert ("<p style='background-color:#e8eef8'><b>Suggested: PD (network + measured RANO)</b>"
            "<br>a suggestion (probability 0.75): the reader decides</p>") in html
    assert "DISAGREEMENT" in html and "<td align='center'><b>PD</b></td>" in html  # the measured table stays
    # the order on the panel: network, uncertain, probabilities, measured, suggested
    assert html.index("UNCERTAIN") < html.index("<table>") < html.index("Measured RANO") < html.index("Suggested")


def test_the_panel_without_segmentation_says_why_there_is_neither_measurement_nor_suggestion():
    html = result_html(dict(FULL, measured=None, suggested=None))
    assert "<p>Measured: not available (predicted without segmentation)</p>" in html
    assert "<b>Suggested: none (needs the measured RANO category; predicted without segmentation)</b>" in html
    assert "Measured RANO" not in html  # no measured table


def test_the_panel_escapes_what_it_shows():
    pred = dict(FULL, uncertain={"flag": True, "why": "spread <b>0.3</b> > 0.2"})
    assert "UNCERTAIN: spread &lt;b&gt;0.3&lt;/b&gt; &gt; 0.2" in result_html(pred)


def test_the_panel_says_when_the_suggestion_used_another_measurement_than_the_readers():
    """The reader moved the diameters (measured PR now): the suggestion was made from the
    automatic measurement (PD), and the panel says so."""
    moved = ClassComparison("SD", "PR", "PR", "automatic segmentation, bundle seg-v1", ["follow-up L1"])
    html = result_html(FULL, moved)
    assert ("<b>Suggested: PD (network + measured RANO)</b><br>a suggestion (probability 0.75): the reader decides"
            "<br>made from the automatic measurement (RANO PD), not from the one shown here</p>") in html
