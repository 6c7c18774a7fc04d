"""The review panel's logic on real MRML: assess a case (lines in the scene, rules, comparison with
the model), recompute when a line moves, and a session saved and exported as training labels."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import slicer
from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.mrml.measurement_scene import (
    assess_case,
    assessment_html,
    find_diameter_lines,
    line_points,
    reassess,
)
from RANOResponseLib.review.store import ReviewStore, open_session, session_text


def prediction(label: str) -> dict:
    probabilities = {c: (0.7 if c == label else 0.1) for c in ("CR", "PR", "SD", "PD")}
    return {"label": label, "probabilities": probabilities, "bundle": {"id": "test-bundle"}}


@pytest.fixture
def intended(case_pair) -> str:
    """The response the phantom generator was told to simulate for this pair (its truth CSV),
    not what the rules under test make of the segmentations."""
    root = case_pair.followup.parents[2]
    with (root / "phantom_truth.csv").open(newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["date"] == case_pair.followup.name)
    return row["intended"]


def test_assessment_draws_lines_and_compares(case_pair, intended):
    assert intended == "PD"  # the conftest pair simulates growth of the enhancing lesion
    for model, agree in (("PD", True), ("SD", False)):
        scene = slicer.vtkMRMLScene()
        a = assess_case(scene, case_pair.baseline, case_pair.followup, prediction=prediction(model))
        assert a.lines, "no diameter lines for a phantom with lesions"
        assert len(find_diameter_lines(scene)) == len(a.lines)
        assert a.rule.category == intended
        assert a.comparison.agree is agree
        html = assessment_html(a)
        assert "PD" in html and (("DISAGREEMENT" in html) is not agree)


def test_moving_a_line_changes_the_measurement(case_pair):
    scene = slicer.vtkMRMLScene()
    a = assess_case(scene, case_pair.baseline, case_pair.followup)
    lines = [ln for ln in a.lines if ln.timepoint == "followup"] or a.lines
    ln = lines[0]
    before = {le.id: le.product_mm2 for le in (a.pair.followup if ln.timepoint == "followup" else a.pair.baseline).lesions}
    p0, p1 = line_points(ln.long)
    ln.long.SetNthControlPointPosition(1, *(p0 + 2.0 * (np.asarray(p1) - p0)))  # twice as long
    b = reassess(scene, a)
    after = {le.id: le.product_mm2 for le in (b.pair.followup if ln.timepoint == "followup" else b.pair.baseline).lesions}
    assert after[ln.lesion_id] == pytest.approx(2 * before[ln.lesion_id], rel=0.02)


def test_session_saves_and_exports_labels(tmp_path, case_pair):
    worklist = tmp_path / "worklist.csv"
    with worklist.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case_id", "baseline", "followup"])
        w.writerow(["case-1", case_pair.baseline, case_pair.followup])
    db = tmp_path / "review.sqlite"
    session = open_session(worklist, db, "dr-a")
    assert "Case 1 of 1" in session_text(session) and "0 reviewed" in session_text(session)
    session.save(label="SD", confidence=4, note="edge enhancement only", prediction=prediction("PD"), rule="SD")
    assert "1 reviewed" in session_text(session) and "SD" in session_text(session)
    out = tmp_path / "labels.csv"
    with ReviewStore(db, create=False) as store:
        store.export_csv(out)
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 1 and rows[0]["label"] == "SD" and rows[0]["model_label"] == "PD"
    with pytest.raises(RANOInputError) as refused:
        open_session(worklist, "", "dr-a")
    assert str(refused.value) == "choose a review database file (it is shared by all reviewers of the worklist)"
