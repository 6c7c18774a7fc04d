"""The Slicer module's self-test (RANOResponseLib.mrml.module_checks) on the real MRML of slicer-core,
through PanelLogic as RANOResponseTest runs it in Slicer, and Apply with the panel's "Segment and
measure the tumour" box off (predict's ``--no-segmentation``)."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from types import SimpleNamespace

import pytest
from RANOResponseLib.core.names import CLASS_NAMES, MODALITIES
from RANOResponseLib.datasets.samples import sample_case
from RANOResponseLib.mrml.logic import PanelLogic
from RANOResponseLib.mrml.module_checks import (
    check_cancel_leaves_scene_clean,
    check_sample_course,
    check_sample_prediction,
    sample_course_csv,
)
from RANOResponseLib.mrml.scene import ROLE, new_scene


def params(**values) -> SimpleNamespace:
    """The module's parameter node as a plain object: unset paths are ``.``, the box is on."""
    p = dict(baselineFolder=Path("."), followupFolder=Path("."), bundle=Path("."), roi=None, segmentation=True,
             mapName="Grad-CAM", opacity=0.4, reviewDatabase=Path("."), transform=None, gradcam=None,
             saliency=None, table=None, coursePatient=Path("."), courseFolder=Path("."))
    p.update({f"{r}{m}": None for r in ("baseline", "followup") for m in MODALITIES})
    p.update(values)
    return SimpleNamespace(**p)


def test_the_course_csv_is_the_sample_pair(tmp_path):
    """What the course check runs on: the sample's two study folders, rated and dated as sample.json says."""
    sample = sample_case()
    lines = sample_course_csv(tmp_path).read_text().splitlines()
    assert lines[0] == "study,date,timepoint,rating,patient"
    base, fu = (line.split(",") for line in lines[1:])
    assert (Path(base[0]), base[3], Path(fu[0]), fu[3]) == (sample.baseline, "Post-Op", sample.followup, "")
    weeks = json.loads((sample.folder / "sample.json").read_text())["truth"]["weeks_after_surgery"]
    assert (date.fromisoformat(fu[1]) - date.fromisoformat(base[1])).days == 7 * weeks


@pytest.mark.slow
def test_the_self_test_passes_on_slicer_core(tmp_path):
    """RANOResponseTest's three checks, each on a fresh scene (as its setUp clears Slicer's)."""
    summary = check_sample_prediction(PanelLogic(new_scene()), params())
    assert summary["label"] in summary["probabilities"]
    check_cancel_leaves_scene_clean(PanelLogic(new_scene()), params())
    logic = PanelLogic(new_scene())
    text = check_sample_course(logic, params(), tmp_path)
    assert (tmp_path / "course" / "timeline.json").is_file()
    assert "Research use only" in text


@pytest.mark.slow
def test_apply_without_segmentation_measures_nothing(tiny_bundle):
    """The box off: predict runs with --no-segmentation, and the scene gets the prediction without
    tumour segmentations, diameter lines or a measured class."""
    logic = PanelLogic(new_scene())
    sample = sample_case()
    p = params(bundle=tiny_bundle, segmentation=False, baselineFolder=sample.baseline, followupFolder=sample.followup)
    logic.load_studies(p)
    job, _ = logic.start_prediction(p, "cpu")
    assert "--no-segmentation" in job.run.command
    summary = logic.finish_prediction(p, job)
    assert p.transform is not None and p.table.GetNumberOfRows() == len(CLASS_NAMES)
    assert summary["measured"] is None  # prediction.json: not segmented
    assert not {"segmentation_baseline", "segmentation_followup"} & set(summary["outputs"])
    roles = {logic.scene.GetNthNode(i).GetAttribute(ROLE) for i in range(logic.scene.GetNumberOfNodes())}
    assert not roles & {"segmentation_baseline", "segmentation_followup"}
    assert logic.scene.GetNumberOfNodesByClass("vtkMRMLMarkupsLineNode") == 0
    assert logic.assessment is None and "Measured RANO" not in logic.result_text()


def test_a_segmentation_input_that_is_not_assigned_skips_the_segmentation_and_says_so(tmp_path, case_pair):
    """The box on, but no CT1 for the segmentation bundle (which needs every sequence, unlike a T1 +
    FLAIR classifier): Apply still runs, without the segmentation, and tells the user why."""
    from conftest import make_bundle
    from RANOResponseLib.model.segmentation import read_seg_bundle

    logic = PanelLogic(new_scene())
    p = params(bundle=make_bundle(tmp_path / "t1-flair", modalities=("T1", "FLAIR"), bundle_id="tiny-t1-flair"),
               baselineFolder=case_pair.baseline, followupFolder=case_pair.followup)
    logic.load_studies(p)
    seg = read_seg_bundle().modalities
    assert logic.apply_inputs(p) == (tuple(dict.fromkeys(("T1", "FLAIR", *seg))), True, "")
    p.segmentation = False
    assert logic.apply_inputs(p) == (("T1", "FLAIR"), False, "")
    p.segmentation, p.baselineCT1 = True, None
    job, notice = logic.start_prediction(p, "cpu")
    logic.cancel(job)
    assert "--no-segmentation" in job.run.command
    assert notice.startswith("Segmentation skipped: no baseline CT1 volume")
