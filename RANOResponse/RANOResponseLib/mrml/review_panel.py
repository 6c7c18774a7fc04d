"""The RANO Response panel's Review section without Qt: worklist, measurement, verdicts, case report.

:class:`ReviewPanel` is a part of :class:`~RANOResponseLib.mrml.logic.PanelLogic` (which inherits
it, as it does :class:`~RANOResponseLib.mrml.course_panel.CoursePanel`): a reviewer's session over
a worklist (:mod:`~RANOResponseLib.review.store`), the shown case's measurement with its editable
diameter lines (a manual mask next to the studies, else the prediction's automatic segmentation;
:mod:`~RANOResponseLib.mrml.measurement_scene`), verdicts, and the PDF case report, built from the
scene through :func:`export_result` in a temporary folder that is removed afterwards.
Light to import, like the logic.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.mrml.panel_state import ShownResult, given, remove_node, tagged_nodes

if TYPE_CHECKING:
    from RANOResponseLib.mrml.panel_state import PanelParameters

STEP_MESSAGES = {
    "next": "End of the worklist: this is its last case.",
    "previous": "Start of the worklist: this is its first case.",
    "first_unreviewed": "Every case of the worklist has your verdict.",
}


def transform_from_node(node: Any):
    """The registration a linear transform node holds, as the SimpleITK transform ``predict`` wrote
    (baseline LPS point -> follow-up LPS point): the inverse of ``scene.transform_to_ras_matrix``."""
    import numpy as np
    import SimpleITK as sitk
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    m = vtkMatrix4x4()
    node.GetMatrixTransformFromParent(m)
    ras = np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps = flip @ ras @ flip
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(lps[:3, :3].ravel().tolist())
    transform.SetTranslation(lps[:3, 3].tolist())
    return transform


def export_result(scene: Any, nodes: Any, folder: Path | str) -> Path:
    """Write the prediction the scene shows as a ``predict`` output folder (what the report reads).

    prediction.json is the prediction's summary; its input studies stay the files it was made on
    while they exist, else the scene's study nodes are written there. The transform, the maps and
    the tumour segmentations (as the reader may have edited them) come from their scene nodes
    (Apply's own folder is gone by then).
    """
    import SimpleITK as sitk

    from RANOResponseLib.mrml.scene import export_study_nodes, node_to_image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    summary = json.loads(json.dumps(nodes.summary))  # a deep copy
    inputs = summary.setdefault("inputs", {})
    for role, ids in (("baseline", nodes.baseline), ("followup", nodes.followup)):
        files = inputs.get(role) or {}
        if not files or not all(Path(f).is_file() for f in files.values()):
            written = export_study_nodes({m: scene.GetNodeByID(i) for m, i in ids.items()}, folder / role)
            inputs[role] = {m: str(p) for m, p in written.items()}
    outputs = {"transform": "followup_to_baseline.tfm"}
    sitk.WriteTransform(transform_from_node(scene.GetNodeByID(nodes.transform)), str(folder / outputs["transform"]))
    for kind, node_id in nodes.maps.items():
        outputs[kind] = f"{kind}.nii.gz"
        sitk.WriteImage(node_to_image(scene.GetNodeByID(node_id)), str(folder / outputs[kind]), True)
    if nodes.segmentations:
        from RANOResponseLib.mrml.scene import reference_node
        from RANOResponseLib.mrml.tumour_scene import SEGMENTATION_ROLES, tumour_labels

        for tp, node_id in nodes.segmentations.items():
            key = SEGMENTATION_ROLES[tp]
            outputs[key] = f"{key}.nii.gz"
            volumes = {m: scene.GetNodeByID(i) for m, i in getattr(nodes, tp).items()}
            labels = tumour_labels(scene.GetNodeByID(node_id), reference_node(volumes))
            sitk.WriteImage(labels, str(folder / outputs[key]), True)
    summary["outputs"] = outputs
    (folder / "prediction.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return folder


class ReviewPanel:
    """The Review section of the panel (needs ``self.scene``, ``self.result`` and
    ``self.load_studies``; keeps ``self.review``, ``self.assessment`` and the lines' observer)."""

    scene: Any
    result: ShownResult | None
    load_studies: Callable[[Any], Any]
    review: Any = None  # review.store.ReviewSession
    assessment: Any = None  # measurement_scene.CaseAssessment of the shown case
    on_change: Callable[[], None] | None = None  # called when a moved line changed the measurement
    _stop_observing: Callable[[], None] | None = None

    def open_review(self, worklist: Any, database: Any, reviewer: str) -> str:
        """Open a worklist for a reviewer at their first unreviewed case; returns the case line."""
        from RANOResponseLib.review.store import open_session

        if given(worklist) is None:
            raise RANOInputError("choose a worklist (a CSV of case pairs or a LUMIERE folder)")
        self.review = open_session(Path(worklist), Path(database) if given(database) else "", reviewer)
        return self.case_text()

    def step_review(self, where: str) -> str | None:
        """Move through the worklist (``next``, ``previous``, ``first_unreviewed``). At either end it
        stays on the current case and returns what to tell the reader; None when it moved."""
        if self.review is None:
            raise RANOInputError("open a worklist first")
        if where not in STEP_MESSAGES:
            raise ValueError(f"unknown step {where!r}; expected one of {', '.join(STEP_MESSAGES)}")
        return STEP_MESSAGES[where] if getattr(self.review, where)() is None else None

    def load_review_case(self, p: PanelParameters) -> Any:
        """Load the worklist's current case into the panel (see :meth:`load_studies`)."""
        case = self.review.current
        p.baselineFolder, p.followupFolder = Path(case.baseline), Path(case.followup)
        return self.load_studies(p)

    def case_text(self) -> str:
        """Where the reviewer is in the worklist, and their verdict on this case if any."""
        from RANOResponseLib.review.store import session_text

        return session_text(self.review) if self.review is not None else ""

    def result_for(self, case: Any) -> ShownResult | None:
        """The shown prediction if it was made on this case's two study folders."""
        r = self.result
        if r is None:
            return None
        wanted = {"baseline": Path(case.baseline).resolve(), "followup": Path(case.followup).resolve()}
        return r if r.inputs == wanted else None

    def measure_case(self) -> str:
        """Measure the current case, draw the editable diameters and apply RANO; returns the panel's
        text. A manual mask next to the studies (DeepBraTumIA, HD-GLIO) is measured when there is
        one; else the shown prediction's automatic segmentation is (its lines, as predict drew
        them). Moving a line recomputes the measurement and calls :attr:`on_change`."""
        from RANOResponseLib.mrml.measurement_scene import assess_case, assessment_html, reassess
        from RANOResponseLib.rano.measurement import find_pair_segmentations

        if self.review is None:
            raise RANOInputError("open a worklist first")
        case = self.review.current
        shown = self.result_for(case)
        try:
            find_pair_segmentations(case.baseline, case.followup)
        except RANOInputError as no_mask:
            automatic = self._automatic_assessment() if shown is not None else None
            if automatic is None:
                raise RANOInputError(f"{no_mask} -- and no automatic segmentation: run Apply (with the "
                                     "segmentation) on this case first") from None
            self.assessment = reassess(self.scene, automatic)  # the lines as the reader left them
        else:
            self._stop_line_observers()  # before their lines go
            for node in self._diameter_line_nodes():
                remove_node(self.scene, node)
            transform_id = shown.nodes.transform if shown else None
            self.assessment = assess_case(
                self.scene, case.baseline, case.followup,
                transform=transform_from_node(self.scene.GetNodeByID(transform_id)) if shown else None,
                followup_transform_node_id=transform_id, prediction=shown.nodes.summary if shown else None)
        self._watch_lines()
        return assessment_html(self.assessment)


    def measurement_text(self) -> str:
        """The review panel's measurement text ('' before a measurement)."""
        from RANOResponseLib.mrml.measurement_scene import assessment_html

        return assessment_html(self.assessment) if self.assessment is not None else ""

    def save_verdict(self, agree: bool, label: str, confidence: int, note: str) -> str:
        """Save the reviewer's verdict on the current case (with the model's and the rules' answer
        when the panel shows them); returns the new case line."""
        if self.review is None:
            raise RANOInputError("open a worklist first")
        shown = self.result_for(self.review.current)
        self.review.save(label=None if agree else label, confidence=confidence, note=note,
                         prediction=shown.nodes.summary if shown else None,
                         rule=self.assessment.rule if self.assessment is not None else None)
        return self.case_text()

    @staticmethod
    def export_verdicts(database: Any, path: Path | str) -> None:
        """Write the review database's verdicts as a training-label CSV."""
        from RANOResponseLib.review.store import ReviewStore

        with ReviewStore(Path(database), create=False) as store:
            store.export_csv(Path(path))

    def write_report(self, p: PanelParameters, path: Path | str) -> Path:
        """The PDF case report of the shown prediction (and of the measurement, if one was made)."""
        from RANOResponseLib.rano.rules import write_assessment
        from RANOResponseLib.review.report import write_report

        shown = self.result_for(self.review.current) if self.review is not None else self.result
        if shown is None:
            raise RANOInputError("Run Apply on this case first: the report is built from its prediction.")
        with tempfile.TemporaryDirectory(prefix="RANOResponse-report-") as tmp:
            prediction = export_result(self.scene, shown.nodes, Path(tmp) / "prediction")
            measurements = None
            if self.assessment is not None:
                measurements = Path(tmp) / "measurements.json"
                a = self.assessment
                write_assessment(measurements, a.pair, a.rule, a.comparison)
            return write_report(prediction, Path(path), measurements=measurements,
                                db=p.reviewDatabase if self.review is not None else None,
                                case_id=self.review.current.case_id if self.review is not None else None)

    # ---------------------------------------------------------------------------- helpers
    def _automatic_assessment(self) -> Any:
        """The shown prediction's measurement of its own segmentations, over the diameter lines it
        put into the scene (None without one)."""
        from RANOResponseLib.mrml.measurement_scene import assess_pair, find_diameter_lines
        from RANOResponseLib.mrml.tumour_scene import measured_pair
        from RANOResponseLib.review.report import measurement_source

        summary = self.result.nodes.summary if self.result is not None else {}
        pair = measured_pair(summary)
        if pair is None:
            return None
        return assess_pair(pair, find_diameter_lines(self.scene), summary,
                           source=measurement_source(pair, summary))

    def _watch_lines(self) -> None:
        """Re-measure when a diameter line moves, then tell the panel (:attr:`on_change`)."""
        from RANOResponseLib.mrml.measurement_scene import observe_lines, reassess

        def moved() -> None:
            self.assessment = reassess(self.scene, self.assessment)
            if self.on_change is not None:
                self.on_change()

        self._stop_line_observers()
        self._stop_observing = observe_lines(self.assessment.lines, moved)

    def _diameter_line_nodes(self) -> list:
        from RANOResponseLib.mrml.measurement_scene import ATTR

        return tagged_nodes(self.scene, ATTR)

    def _stop_line_observers(self) -> None:
        if self._stop_observing is not None:
            self._stop_observing()
            self._stop_observing = None
