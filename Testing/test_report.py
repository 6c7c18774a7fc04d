"""Tests of the per-case report (RANOResponseLib.report) built from a real predict output folder
(tiny bundle, 4 mm phantom pair), the phantom's segmentations and a review database."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import copy_study, png_size
from RANOResponseLib.cli import main as cli_main
from RANOResponseLib.review.report import gather, model_card_summary, write_report
from RANOResponseLib.review.store import Case, ReviewStore, make_verdict


@pytest.fixture(scope="module")
def predicted(tmp_path_factory, case_pair, tiny_bundle) -> Path:
    from RANOResponseLib.inference.pipeline import run_predict
    from RANOResponseLib.mrml.outputs import output_writers

    out = tmp_path_factory.mktemp("report") / "prediction"
    run_predict(case_pair.baseline, case_pair.followup, out, bundle=tiny_bundle, device="cpu", writers=output_writers(),
                segmentation=False)  # the automatic measurement: test_report_uses_the_automatic_measurement...
    return out


@pytest.fixture(scope="module")
def expected_category(case_pair) -> str:
    truth = pd.read_csv(case_pair.baseline.parents[2] / "phantom_truth.csv", dtype={"date": str})
    return truth[truth["date"] == case_pair.followup.name].iloc[0]["rating_measured"]


@pytest.fixture(scope="module")
def review_db(tmp_path_factory, case_pair, predicted) -> Path:
    db = tmp_path_factory.mktemp("db") / "review.db"
    store = ReviewStore(db)
    case = Case("case-1", str(case_pair.baseline), str(case_pair.followup), "Patient-001")
    pred = json.loads((predicted / "prediction.json").read_text())
    store.save(make_verdict(case, "dr.a", "SD", 2, "first look", pred, "SD"))
    store.save(make_verdict(case, "dr.a", "PD", 4, "new nodule posteriorly", pred, "PD"))
    store.close()
    return db


def pdf_pages(path: Path) -> int:
    data = path.read_bytes()
    assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
    return len(re.findall(rb"/Type\s*/Page[^s]", data))


def test_report_pdf_and_page_images(predicted, review_db, expected_category, tmp_path):
    out = write_report(predicted, tmp_path / "report.pdf", db=review_db, png_prefix=tmp_path / "report")
    assert pdf_pages(out) == 2
    for page in (1, 2):
        w, h = png_size(tmp_path / f"report-page{page}.png")
        assert abs(w - 8.27 * 110) <= 1 and abs(h - 11.69 * 110) <= 1  # A4 portrait at 110 dpi


def test_report_content(predicted, review_db, expected_category, tiny_bundle):
    inputs = gather(predicted, db=review_db)
    assert inputs.rule is not None and inputs.rule.category == expected_category
    assert inputs.comparison is not None and inputs.comparison.model == inputs.prediction["label"]
    assert inputs.comparison.agree == (inputs.prediction["label"] == expected_category)
    # the verdict is found by the study folders; the latest one, with its revision counted
    assert [(v.reviewer, v.label) for v in inputs.verdicts] == [("dr.a", "PD")] and inputs.revisions == 1
    assert any("tiny-test" in line for line in inputs.model_card)
    assert inputs.notes == []


def test_report_is_greyscale(predicted, review_db, tmp_path):
    """Nothing is said by colour: every pixel of both pages is grey (prints the same in B/W)."""
    import matplotlib.image as mpimg

    write_report(predicted, tmp_path / "r.pdf", db=review_db, png_prefix=tmp_path / "r")
    for page in (1, 2):
        rgb = mpimg.imread(tmp_path / f"r-page{page}.png")[..., :3]
        assert np.abs(rgb - rgb.mean(axis=-1, keepdims=True)).max() < 0.02
        assert rgb.min() < 0.1 and rgb.max() > 0.9  # and it is not blank


def test_report_without_segmentations_or_verdicts(predicted, case_pair, tmp_path):
    """Studies without segmentation folders: the report still comes out and says what is missing."""
    base = copy_study(case_pair.baseline, tmp_path / "Patient-001" / case_pair.baseline.name)
    fu = copy_study(case_pair.followup, tmp_path / "Patient-001" / case_pair.followup.name)
    pred_dir = tmp_path / "prediction"
    shutil.copytree(predicted, pred_dir)
    summary = json.loads((pred_dir / "prediction.json").read_text())
    for tp, folder in (("baseline", base), ("followup", fu)):
        summary["inputs"][tp] = {m: str(folder / Path(p).name) for m, p in summary["inputs"][tp].items()}
    (pred_dir / "prediction.json").write_text(json.dumps(summary))
    empty_db = tmp_path / "empty.db"
    ReviewStore(empty_db).close()
    inputs = gather(pred_dir, db=empty_db)
    assert inputs.pair is None and inputs.rule is None and inputs.verdicts == []
    assert any("No lesion measurements" in n and str(base) in n for n in inputs.notes)
    assert any("No reviewer verdict" in n for n in inputs.notes)
    out = write_report(pred_dir, tmp_path / "report.pdf", db=empty_db)
    assert pdf_pages(out) == 2


def test_cli_report_with_measurements(predicted, review_db, tmp_path, capsys):
    meas = tmp_path / "measurements.json"
    assert cli_main(["measure", "--prediction", str(predicted), "--out", str(meas)]) == 0
    assert json.loads(meas.read_text())["comparison"]["model"]
    out = tmp_path / "case.pdf"
    assert cli_main(["report", "--prediction", str(predicted), "--measurements", str(meas), "--db", str(review_db),
                     "--case-id", "case-1", "--out", str(out), "--png"]) == 0
    assert pdf_pages(out) == 2 and (tmp_path / "case-page1.png").is_file()
    assert str(out.absolute()) in capsys.readouterr().out
    assert cli_main(["report", "--prediction", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.pdf")]) == 2
    assert f"error: {tmp_path / 'nothing' / 'prediction.json'}: not found" in capsys.readouterr().err
    assert not (tmp_path / "x.pdf").exists()


def test_model_card_summary(tmp_path):
    (tmp_path / "bundle.json").write_text(json.dumps({
        "id": "demo-v2", "architecture": {"name": "densenet121"}, "modalities": ["T1", "FLAIR"],
        "weights": [{"sha256": "ab" * 32}], "training": {"date": "2026-01-02T00:00:00"}}))
    (tmp_path / "MODEL_CARD.md").write_text(
        "# Model card: demo-v2\n\n**Research software.** Not for clinical use.\n\n- Architecture: a\n  long line\n"
        "- Command: `train ...`\n\n## Hold-out test metrics\n\n| metric | value |\n|---|---|\n"
        "| balanced accuracy | 0.61 |\n| macro F1 | 0.55 |\n| AUC | 0.9 |\n\n## Limits\nSmall data.\n")
    lines = model_card_summary(tmp_path)
    assert lines[0].startswith("Bundle demo-v2 (densenet121") and "trained 2026-01-02" in lines[0]
    assert "- Architecture: a long line" in lines  # Markdown hard wrap joined
    assert not any("Command" in line for line in lines)
    assert "Hold-out test: balanced accuracy 0.61, macro F1 0.55." in lines
    assert lines[-1] == "Limits: Small data."


# ------------------------------------------------------------- automatic measurements, study folders


def _without_masks(automatic_prediction, case_pair, tmp_path) -> Path:
    """The automatic prediction's folder, its inputs moved to copies of the studies that hold no
    segmentation (a clinical pair: no manual mask)."""
    pred_dir = tmp_path / "prediction"
    shutil.copytree(automatic_prediction.out, pred_dir)
    summary = json.loads((pred_dir / "prediction.json").read_text())
    for tp, study in (("baseline", case_pair.baseline), ("followup", case_pair.followup)):
        folder = copy_study(study, tmp_path / "Patient-001" / study.name)
        summary["inputs"][tp] = {m: str(folder / Path(p).name) for m, p in summary["inputs"][tp].items()}
    (pred_dir / "prediction.json").write_text(json.dumps(summary))
    return pred_dir


def test_report_uses_the_automatic_measurement_without_a_manual_mask(automatic_prediction, case_pair, tmp_path):
    measured = automatic_prediction.summary["measured"]
    manual = gather(automatic_prediction.out)  # the phantom's masks lie next to its studies: they come first
    assert manual.measured_from == "manual mask (DeepBraTumIA: seg_mask.nii.gz)"
    pred_dir = _without_masks(automatic_prediction, case_pair, tmp_path)
    inputs = gather(pred_dir)
    assert inputs.measured_from == "automatic segmentation, bundle phantom-masks"
    assert Path(inputs.pair.followup.source) == pred_dir / "segmentation_followup.nii.gz"
    assert inputs.rule.category == measured["category"] and inputs.rule.volumetric == measured["category_rano2"]
    assert [le.d1_mm for le in inputs.pair.followup.lesions] == pytest.approx(
        [r["d1_mm"] for r in measured["lesions"] if r["timepoint"] == "follow-up"])
    assert pdf_pages(write_report(pred_dir, tmp_path / "auto.pdf")) == 2


def test_report_finds_dicom_studies_by_their_recorded_folder(predicted, case_pair, tmp_path):
    """A DICOM input is recorded as its study folder (not a file in it): the case, its masks and
    its verdicts are found there, not in the folder above."""
    pred_dir = tmp_path / "prediction"
    shutil.copytree(predicted, pred_dir)
    summary = json.loads((pred_dir / "prediction.json").read_text())
    for tp, study in (("baseline", case_pair.baseline), ("followup", case_pair.followup)):
        summary["inputs"][tp] = {m: str(study) for m in summary["inputs"][tp]}
        for m, seq in summary["inputs"]["studies"][tp]["sequences"].items():
            seq["source"] = {"kind": "dicom", "path": str(study), "series_uid": f"1.2.3.{m}"}
    (pred_dir / "prediction.json").write_text(json.dumps(summary))
    inputs = gather(pred_dir)
    assert inputs.pair is not None and inputs.notes == []
    assert inputs.measured_from == "manual mask (DeepBraTumIA: seg_mask.nii.gz)"
    assert inputs.case_id == f"{case_pair.followup.parent.name}_{case_pair.baseline.name}_{case_pair.followup.name}"


# ------------------------------------------------------------- the three opinions (issue 12)


def _page_texts(monkeypatch) -> list[list[str]]:
    """Every text each page of the next PDF holds, taken from the figures as they are saved."""
    from matplotlib.backends.backend_pdf import PdfPages
    from matplotlib.text import Text

    pages: list[list[str]] = []
    save = PdfPages.savefig

    def spy(self, figure=None, **kw):
        pages.append([t.get_text() for t in figure.findobj(Text)])
        return save(self, figure, **kw)

    monkeypatch.setattr(PdfPages, "savefig", spy)
    return pages


def test_report_shows_network_measured_and_suggested(predicted, tmp_path, monkeypatch):
    """A prediction with calibrated probabilities flagged uncertain and a suggestion: page 1's box
    says all three, the suggestion marked; page 2 the network before calibration and what the
    suggestion combined."""
    pred_dir = tmp_path / "prediction"
    shutil.copytree(predicted, pred_dir)
    summary = json.loads((pred_dir / "prediction.json").read_text())
    label = summary["label"]
    p = summary["probabilities"][label]
    summary.update(calibrated=True,
                   uncertain={"flag": True, "why": "top probability below 0.99 (thresholds chosen on validation patients)"},
                   suggested={"category": "PD", "probabilities": {"CR": 0.0, "PR": 0.1, "SD": 0.2, "PD": 0.7},
                              "used": ["network probabilities (calibrated)", "measured RANO category (PD, automatic)"],
                              "model": {"method": "multinomial-logistic-regression", "fitted_on": "validation pairs"}})
    (pred_dir / "prediction.json").write_text(json.dumps(summary))
    pages = _page_texts(monkeypatch)
    write_report(pred_dir, tmp_path / "r.pdf")
    first, second = ("\n".join(t) for t in pages)
    assert f"Network: {label} (probability {p:.2f}, calibrated)  - bundle tiny-test" in first
    assert "   UNCERTAIN: top probability below 0.99 (thresholds chosen on validation patients)" in first
    assert "Suggested: PD (network + measured RANO)\n   a suggestion (probability 0.70): the reader decides" in first
    assert "Network probabilities (calibrated)" in first
    # measured here from the phantom's masks next to the studies (the report's own measurement)
    inputs = gather(pred_dir)
    assert f"Measured: RANO {inputs.rule.bidimensional}, RANO 2.0 {inputs.rule.volumetric}" in first
    assert "Network calibration and the suggested category" in second
    raw = summary["probabilities_uncalibrated"]
    assert "- Network probabilities before calibration: " + ", ".join(f"{c} {v:.2f}" for c, v in raw.items()) in second
    assert "- Combined from: network probabilities (calibrated); measured RANO category (PD, automatic)" in second


def test_report_of_an_older_prediction_leaves_the_new_fields_out(predicted, tmp_path, monkeypatch):
    pred_dir = tmp_path / "prediction"
    shutil.copytree(predicted, pred_dir)
    summary = json.loads((pred_dir / "prediction.json").read_text())
    for key in ("calibrated", "uncertain", "suggested", "probabilities_uncalibrated", "measured", "explanations"):
        summary.pop(key, None)
    (pred_dir / "prediction.json").write_text(json.dumps(summary))
    pages = _page_texts(monkeypatch)
    assert pdf_pages(write_report(pred_dir, tmp_path / "old.pdf")) == 2
    text = "\n".join(pages[0] + pages[1])
    assert f"Network: {summary['label']} (probability {summary['probabilities'][summary['label']]:.2f})  -" in text
    assert "Suggested" not in text and "UNCERTAIN" not in text and "calibrated" not in text
    assert "Network probabilities" in pages[0]  # the bars' title, without "(calibrated)"


def test_report_without_segmentation_says_why_there_is_no_suggestion(predicted, tmp_path, monkeypatch):
    """predict --no-segmentation with a bundle without suggestion model: measured from the masks
    next to the studies, no suggestion, and why."""
    pages = _page_texts(monkeypatch)
    write_report(predicted, tmp_path / "r.pdf")
    first = "\n".join(pages[0])
    assert "Suggested: none (needs the measured RANO category; predicted without segmentation)" in first
    assert "(probability" in first and ", not calibrated)" in first
