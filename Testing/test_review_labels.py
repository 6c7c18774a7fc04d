"""Review verdicts become training labels: the export of a review session, read by ResponseTraining."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.datasets.lumiere import build_pairs
from RANOResponseLib.phantom.generator import PhantomConfig, generate_cohort
from RANOResponseLib.review.store import ReviewSession, ReviewStore, load_worklist
from ResponseTrainingLib.data.labels import apply_review_labels, read_review_labels

MODS = ("CT1", "T1", "T2", "FLAIR")
PRED = {"label": "PD", "probabilities": {"CR": 0.1, "PR": 0.1, "SD": 0.1, "PD": 0.7}, "bundle": {"id": "b"}}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("review-cohort")
    generate_cohort(root, PhantomConfig(patients=3, seed=5, spacing=6.0, min_followups=2, max_followups=3))
    return root


def _other(label: str) -> str:
    return "SD" if label != "SD" else "PR"


def test_verdicts_replace_and_add_labels_and_ties_are_left_out(cohort, tmp_path):
    pairs, table = build_pairs(cohort, MODS, "previous")
    assert len(pairs) >= 3
    db = tmp_path / "review.sqlite"
    cases = {c.case_id: c for c in load_worklist(cohort)}
    first, second = pairs[0], pairs[1]
    with ReviewStore(db) as store:
        a, b = ReviewSession(store, "dr-a", list(cases.values())), ReviewSession(store, "dr-b")
        a.go_to(first.id), b.go_to(first.id)
        a.save(_other(first.label), 4, prediction=PRED)  # both override the expert label the same way
        b.save(_other(first.label), 3, prediction=PRED)
        a.go_to(second.id), b.go_to(second.id)
        a.save("CR", 2, prediction=PRED)  # a tie: this pair must not be trained on
        b.save("PD", 2, prediction=PRED)
        store.export_csv(tmp_path / "labels.csv")

    votes = read_review_labels(tmp_path / "labels.csv")
    assert len(votes) == 2 and set(votes["label"]) == {_other(first.label), ""}

    new_pairs, new_table = apply_review_labels(pairs, table, tmp_path / "labels.csv", cohort, MODS)
    by_id = {p.id: p for p in new_pairs}
    assert by_id[first.id].label == _other(first.label)
    assert second.id not in by_id
    assert len(new_pairs) == len(pairs) - 1
    row = new_table[(new_table["patient"] == second.patient) & (new_table["followup"] == second.followup.name)]
    assert row["status"].iloc[0] == "skipped" and "disagree" in row["reason"].iloc[0]
    assert new_table["label_source"].str.startswith("review").sum() == 2


def test_a_reviewed_pair_the_csv_did_not_give_is_added(cohort, tmp_path):
    pairs, table = build_pairs(cohort, MODS, "previous")
    patient = pairs[0].patient
    weeks = sorted(p.name for p in (cohort / "Imaging" / patient).iterdir() if p.is_dir())
    # first and last scan of the patient: not a `previous` pair unless the patient has only two scans
    key = (patient, weeks[0], weeks[-1])
    assert key not in {(p.patient, p.baseline.name, p.followup.name) for p in pairs}
    pd.DataFrame([{"patient": patient, "baseline_week": weeks[0], "followup_week": weeks[-1], "label": "PR"}]
                 ).to_csv(tmp_path / "labels.csv", index=False)
    new_pairs, new_table = apply_review_labels(pairs, table, tmp_path / "labels.csv", cohort, MODS)
    assert len(new_pairs) == len(pairs) + 1
    added = new_pairs[-1]
    assert (added.patient, added.baseline.name, added.followup.name, added.label) == (*key, "PR")
    assert new_table.iloc[-1]["pairing"] == "review"


def test_bad_label_files_are_named(cohort, tmp_path):
    pairs, table = build_pairs(cohort, MODS, "previous")
    bad = tmp_path / "bad.csv"
    pd.DataFrame([{"patient": "x", "followup_week": "week-001"}]).to_csv(bad, index=False)
    with pytest.raises(RANOInputError, match="bad.csv.*missing columns"):
        apply_review_labels(pairs, table, bad, cohort, MODS)
    pd.DataFrame([{"patient": "x", "baseline_week": "a", "followup_week": "b", "label": "Post-Op"}]).to_csv(bad, index=False)
    with pytest.raises(RANOInputError, match="not RANO classes"):
        read_review_labels(bad)
    pd.DataFrame([{"patient": "Patient-999", "baseline_week": "week-000", "followup_week": "week-010",
                   "label": "PD"}]).to_csv(bad, index=False)
    with pytest.raises(RANOInputError, match="Patient-999"):
        apply_review_labels(pairs, table, bad, cohort, MODS)
