"""The RANO Response module's self-test as plain functions, without Qt.

Slicer's ``RANOResponseTest`` (Reload and Test) runs them through the module's logic on
``slicer.mrmlScene``; pytest runs the same functions on a
:class:`~RANOResponseLib.mrml.logic.PanelLogic` over a slicer-core scene, so the self-test is
tested too. Each takes the logic and its parameter object, works on the shipped sample pair
(:mod:`~RANOResponseLib.datasets.samples`: nothing generated or downloaded), runs the child
processes on the CPU and raises AssertionError saying what is wrong. Light to import, like the
logic.
"""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path
from typing import Any

from RANOResponseLib.core.names import CLASS_NAMES

COURSE_START = date(2020, 1, 6)  # any date: the course CSV's weeks count from its first row


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise AssertionError(what)


def load_sample(logic: Any, p: Any) -> Any:
    """Load the shipped sample pair's studies into the panel; returns the sample (a SampleCase)."""
    from RANOResponseLib.datasets.samples import sample_case

    sample = sample_case()
    p.baselineFolder, p.followupFolder = sample.baseline, sample.followup
    logic.load_studies(p)
    return sample


def check_sample_prediction(logic: Any, p: Any) -> dict:
    """Apply on the sample pair: the probabilities sum to 1 and name the label, the follow-up
    observes the registration, the Grad-CAM map and the results table are there, no work folder
    is left, and loading the same case again adds no volume node. Returns the summary."""
    load_sample(logic, p)
    job, _ = logic.start_prediction(p, "cpu")
    summary = logic.finish_prediction(p, job)
    probabilities = summary["probabilities"]
    _expect(round(sum(probabilities.values()) - 1.0, 4) == 0, f"the probabilities sum to {sum(probabilities.values())}")
    _expect(summary["label"] in probabilities, f"the label {summary['label']} is not one of the classes")
    _expect(p.followupCT1.GetTransformNodeID() == p.transform.GetID(), "the follow-up does not observe the registration")
    _expect(p.gradcam is not None, "no Grad-CAM map in the scene")
    _expect(p.table.GetNumberOfRows() > 0, "the results table is empty")
    _expect(not job.workdir.exists(), f"{job.workdir}: Apply's work folder was left behind")
    volumes = logic.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    logic.load_studies(p)  # the same case again: the same nodes, nothing added
    _expect(logic.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == volumes,
            "loading the same case again added volume nodes")
    return summary


def check_cancel_leaves_scene_clean(logic: Any, p: Any) -> None:
    """Cancel a running Apply: the child stops, its work folder is gone, the scene is unchanged."""
    load_sample(logic, p)
    before = logic.scene.GetNumberOfNodes()
    job, _ = logic.start_prediction(p, "cpu")
    _expect(job.run.running, "the prediction did not start")
    logic.cancel(job)
    _expect(not job.run.running, "the prediction still runs after Cancel")
    _expect(not job.workdir.exists(), f"{job.workdir}: the work folder outlived Cancel")
    _expect(logic.scene.GetNumberOfNodes() == before, "Cancel left nodes in the scene")


def sample_course_csv(folder: Path | str) -> Path:
    """A course CSV of the sample pair in ``folder``: its baseline, rated Post-Op, then its
    follow-up as many weeks later as ``sample.json`` says it was simulated."""
    from RANOResponseLib.datasets.samples import sample_case

    sample = sample_case()
    later = COURSE_START + timedelta(weeks=int(sample.truth["weeks_after_surgery"]))
    csv = Path(folder) / "sample-course.csv"
    csv.write_text("study,date,timepoint,rating,patient\n"
                   f"{sample.baseline},{COURSE_START},baseline,Post-Op,{sample.name}\n"
                   f"{sample.followup},{later},followup,,{sample.name}\n", encoding="utf-8")
    return csv


def check_sample_course(logic: Any, p: Any, folder: Path | str) -> str:
    """The Course section on the sample pair as a two-timepoint course (:func:`sample_course_csv`
    in ``folder``, the course written to ``folder/course``): Run timeline, then show the follow-up.

    The table lists the CSV's two timepoints, the baseline is the one rated Post-Op, the follow-up
    lies the sample's weeks later and has a RANO category, and the timepoint view shows the
    follow-up's own voxels (its reference modality's file, read here). Returns the course text.
    """
    import numpy as np
    import SimpleITK as sitk

    from RANOResponseLib.datasets.samples import sample_case
    from RANOResponseLib.mrml.course_scene import VIEWS
    from RANOResponseLib.mrml.scene import node_to_image

    sample = sample_case()
    p.coursePatient, p.courseFolder = sample_course_csv(folder), Path(folder) / "course"
    job, _ = logic.start_course(p, "cpu")
    table = logic.finish_course(job)
    rows = logic.course.rows
    _expect(table.GetNumberOfRows() == 2 and [r["timepoint"] for r in rows] == ["baseline", "followup"],
            f"the course table lists {[r['timepoint'] for r in rows]}, not the CSV's baseline and followup")
    _expect(logic.course.doc["baseline"] == "baseline", f"baseline {logic.course.doc['baseline']}, not the Post-Op scan")
    weeks = float(sample.truth["weeks_after_surgery"])
    _expect(abs(float(rows[1]["weeks"]) - weeks) < 0.01, f"the follow-up is at week {rows[1]['weeks']}, not {weeks:g}")
    _expect(rows[1].get("category") in CLASS_NAMES, f"the follow-up has no RANO category ({rows[1].get('category')!r})")
    text = logic.show_course_timepoint(1)
    _expect(logic.course.shown == 1 and "followup" in text and sample.name in text,
            "the course text does not name the patient and the shown follow-up")
    composite = logic.scene.GetSingletonNode(VIEWS["timepoint"][0], "vtkMRMLSliceCompositeNode")
    shown = logic.scene.GetNodeByID(composite.GetBackgroundVolumeID())
    modality = rows[1]["reference_modality"]
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(sample.followup / f"{modality}.nii.gz"), sitk.sitkFloat32))
    got = sitk.GetArrayFromImage(node_to_image(shown))
    _expect(got.shape == expected.shape and np.array_equal(got, expected),
            f"the timepoint view does not show the follow-up's {modality} ({shown.GetName()}: shape {got.shape} "
            f"vs {expected.shape}, max difference "
            f"{float(np.abs(got - expected).max()) if got.shape == expected.shape else 'n/a'})")
    return text
