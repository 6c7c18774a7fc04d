"""The RANO Response module's logic without Qt: what each button of the panel does to a scene.

:class:`PanelLogic` takes a ``vtkMRMLScene``; the Slicer module's ``RANOResponseLogic`` subclasses
it with ``slicer.mrmlScene``, and pytest drives it on the real MRML of ``slicer-core``. It reads
and writes the panel's state through a parameter object (:class:`PanelParameters`: the module's
``parameterNodeWrapper`` in Slicer, a plain object in tests).

What it keeps tidy, so that a reviewer can step through a long worklist:

* one volume node per study and modality: loading another case reads the files into the same
  nodes (``scene.load_study_nodes(reuse=True)``); a modality the new case lacks loses its node;
* a new case removes the previous case's prediction (transform, maps, table, crop region) and
  diameter lines, with their display and storage nodes;
* Apply's work folder is gone once its outputs are in the scene (:func:`runner.finish_predict`);
  the report is built from the scene in a temporary folder that is removed afterwards.

Importing this file costs nothing heavy (the module file imports it when Slicer starts, before
the runtime's packages may be installed): everything else is imported where it is used.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Protocol

from RANOResponseLib.core.errors import BundleError, DeviceError, RANOInputError
from RANOResponseLib.core.names import MODALITIES, REFERENCE_ORDER
from RANOResponseLib.mrml.course_panel import CoursePanel

ROLES = ("baseline", "followup")
MAP_CHOICES = {"Grad-CAM": "gradcam", "Saliency": "saliency"}  # the panel's map menu -> map kind
# scene.ROLE values of a case's nodes (the last two: tumour_scene.SEGMENTATION_ROLES)
PREDICTION_ROLES = ("transform", "gradcam", "saliency", "roi", "table", "brain", "segmentation_baseline",
                    "segmentation_followup")
STEP_MESSAGES = {
    "next": "End of the worklist: this is its last case.",
    "previous": "Start of the worklist: this is its first case.",
    "first_unreviewed": "Every case of the worklist has your verdict.",
}
READY_TEXT = "Register, crop, classify and compute the maps (runs in the background; click again to cancel)"


class PanelParameters(Protocol):
    """What the panel's state holds (the module's parameter node has these, and the volume nodes
    ``baseline<M>`` / ``followup<M>`` for each modality M of :data:`MODALITIES`)."""

    baselineFolder: Path
    followupFolder: Path
    bundle: Path
    roi: Any
    mapName: str
    opacity: float
    reviewDatabase: Path
    transform: Any
    gradcam: Any
    saliency: Any
    table: Any
    coursePatient: Path  # a patient folder (Patient-XXX/week-*) or a course CSV
    courseFolder: Path  # the timeline output folder (written by Run timeline, read by Load course)


@dataclass
class ShownResult:
    """The prediction the scene shows: the study folders it was made on and its scene nodes."""

    inputs: dict[str, Path]  # "baseline"/"followup" -> resolved study folder
    nodes: Any  # scene.SceneNodes


def given(path: Any) -> Optional[Path]:
    """A path parameter as a Path, or None when unset (the wrapper's unset Path is ``.``)."""
    return Path(path) if path is not None and str(path) not in ("", ".") else None


def remove_node(scene: Any, node: Any) -> None:
    """Remove a node with its display and storage nodes (``RemoveNode`` alone leaves them behind)."""
    if node is None or node.GetScene() is None:
        return
    extra = []
    for getter, count in (("GetNthDisplayNode", "GetNumberOfDisplayNodes"),
                          ("GetNthStorageNode", "GetNumberOfStorageNodes")):
        if hasattr(node, count):
            extra += [getattr(node, getter)(i) for i in range(getattr(node, count)())]
    scene.RemoveNode(node)
    for n in extra:
        if n is not None and n.GetScene() is not None:
            scene.RemoveNode(n)


def _tagged(scene: Any, attribute: str, values: tuple[str, ...] | None = None) -> list:
    found = []
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        value = node.GetAttribute(attribute)
        if value and (values is None or value in values):
            found.append(node)
    return found


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


class PanelLogic(CoursePanel):
    """The RANO Response panel on one scene: studies, Apply, overlay, review, report.

    ``python``: the interpreter that runs ``predict`` (``PythonSlicer`` in Slicer; None: this one).
    Both have defaults because Slicer's ``ScriptedLoadableModuleLogic.__init__`` calls
    ``super().__init__()`` without arguments when a Logic subclasses both.
    """

    def __init__(self, scene: Any = None, python: str | None = None) -> None:
        self.scene = scene
        self.python = python
        self.result: ShownResult | None = None
        self.assessment: Any = None  # measurement_scene.CaseAssessment of the shown case
        self.on_change: Callable[[], None] | None = None  # called when a moved line changed the measurement
        self.course: Any = None  # course_scene.CourseNodes of the loaded course
        self.review: Any = None  # review.store.ReviewSession
        self._folders: dict[str, Path] = {}
        self._overlay: tuple | None = None
        self._stop_observing: Callable[[], None] | None = None

    # ----------------------------------------------------------------------------- inputs
    @staticmethod
    def required_modalities(bundle: Any = None) -> tuple[str, ...]:
        """The modalities the bundle needs (``bundle.json`` re-read only when it changes)."""
        from RANOResponseLib.model.bundle import bundle_modalities

        return bundle_modalities(given(bundle))

    def apply_readiness(self, p: PanelParameters) -> tuple[bool, str]:
        """Whether Apply can run with these parameters, and the button's tooltip saying why not."""
        try:
            needed = self.required_modalities(p.bundle)
        except BundleError as e:
            return False, f"Model bundle: {e}"
        except ImportError as e:  # a clean Slicer: Load studies installs the packages first
            return False, f"Press Load studies: it installs the Python packages RANO Response needs ({e.name})."
        missing = [f"{role} {m}" for role in ROLES for m in needed if getattr(p, f"{role}{m}") is None]
        if missing:
            return False, "Assign the volumes the model needs: " + ", ".join(missing)
        return True, READY_TEXT

    @staticmethod
    def device_notice(requested: str | None) -> str:
        """What the device menu's choice means here: a fallback notice, a warning, an error, or ''."""
        from RANOResponseLib.model.device import choose_device

        try:
            return choose_device(requested or "auto")[1] or ""
        except DeviceError as e:
            return f"error: {e}"

    def load_studies(self, p: PanelParameters) -> Any:
        """Load the two study folders into the panel's volume nodes; returns the baseline node to show.

        The bundle's modalities are required (checked in both folders before anything changes),
        the others are loaded when present. Another case than the one shown first clears it
        (:meth:`clear_case`).
        """
        from RANOResponseLib.imaging.studies import missing_modalities
        from RANOResponseLib.mrml.scene import find_study_node, load_study_nodes

        needed = self.required_modalities(p.bundle)
        folders = {role: given(getattr(p, f"{role}Folder")) for role in ROLES}
        folders = {role: f for role, f in folders.items() if f is not None}
        for folder in folders.values():
            if not folder.is_dir():
                raise RANOInputError(f"{folder}: study folder not found")
            missing = missing_modalities(folder, needed)  # a DICOM folder: its series assigned, none read
            if missing:
                raise RANOInputError(f"{folder}: missing {', '.join(missing)} (the model bundle needs "
                                     f"{', '.join(needed)})")
        if any(self._folders.get(role) != folder.resolve() for role, folder in folders.items()):
            self.clear_case(p)
        for role, folder in folders.items():
            nodes = load_study_nodes(self.scene, folder, MODALITIES, role, missing_ok=True, reuse=True)
            for m in MODALITIES:
                if m not in nodes:
                    remove_node(self.scene, find_study_node(self.scene, f"{role}:{m}"))
                setattr(p, f"{role}{m}", nodes.get(m))
            self._folders[role] = folder.resolve()
        return self.background(p)

    @staticmethod
    def background(p: PanelParameters) -> Any:
        """The baseline volume the maps are drawn over (CT1, else T1, T2, FLAIR)."""
        return next((n for m in REFERENCE_ORDER if (n := getattr(p, f"baseline{m}")) is not None), None)

    def clear_case(self, p: PanelParameters | None = None) -> None:
        """Remove the shown case's prediction nodes, crop region and diameter lines from the scene."""
        from RANOResponseLib.mrml.scene import ROLE, STUDY

        self._stop_line_observers()
        for node in _tagged(self.scene, STUDY):
            node.SetAndObserveTransformNodeID(None)
        removed = _tagged(self.scene, ROLE, PREDICTION_ROLES) + self._diameter_line_nodes()
        if p is not None:
            for name in ("transform", "gradcam", "saliency", "table", "roi"):
                if getattr(p, name) is not None and (name != "roi" or getattr(p, name) in removed):
                    setattr(p, name, None)
        for node in removed:
            remove_node(self.scene, node)
        self.result = self.assessment = self._overlay = None

    def reset(self) -> None:
        """Forget the scene's nodes (the scene was closed); the review session stays open."""
        self._stop_line_observers()
        self.result = self.assessment = self._overlay = self.course = None
        self._folders = {}

    def fit_roi(self, p: PanelParameters) -> Any:
        """Fit the crop region to the baseline brain (the panel's own region is moved, not duplicated)."""
        from RANOResponseLib.model.bundle import read_bundle
        from RANOResponseLib.mrml.scene import ROLE, fit_roi

        bundle = read_bundle(given(p.bundle))
        modality = bundle.spec.reference_modality
        reference = getattr(p, f"baseline{modality}")
        if reference is None:
            raise RANOInputError(f"assign the baseline {modality} volume first: the region is fitted to it")
        own = p.roi if p.roi is not None and p.roi.GetAttribute(ROLE) == "roi" else None
        p.roi = fit_roi(self.scene, reference, bundle.spec, "RANO crop region", node=own)
        p.roi.SetAttribute(ROLE, "roi")
        return p.roi

    # ------------------------------------------------------------------------------ Apply
    def start_prediction(self, p: PanelParameters, requested_device: str | None = "auto") -> tuple[Any, str]:
        """Start ``predict`` in a child process; returns the job and the device notice ('' if none).

        An explicit device that is absent raises :class:`DeviceError` (no silent switch to the CPU).
        """
        from RANOResponseLib.model.device import choose_device
        from RANOResponseLib.mrml.runner import PredictRequest, start_predict

        device, notice = choose_device(requested_device or "auto")
        request = PredictRequest(
            baseline={m: getattr(p, f"baseline{m}") for m in MODALITIES},
            followup={m: getattr(p, f"followup{m}") for m in MODALITIES},
            modalities=self.required_modalities(p.bundle), bundle=given(p.bundle), device=device, roi=p.roi)
        return start_predict(request, python=self.python), notice or ""

    @staticmethod
    def cancel(job: Any) -> None:
        """Stop a running prediction and remove its work folder; the scene is unchanged."""
        from RANOResponseLib.mrml.runner import discard

        discard(job)

    def finish_prediction(self, p: PanelParameters, job: Any) -> dict:
        """Put a finished job's outputs into the scene and the parameters; returns its summary."""
        from RANOResponseLib.mrml.runner import finish_predict

        return self.show_prediction(p, finish_predict(self.scene, job), job.inputs)

    def show_prediction(self, p: PanelParameters, nodes: Any, inputs: Mapping[str, Path]) -> dict:
        """Make a prediction already in the scene (``scene.SceneNodes``, made on the study folders
        ``inputs``) the shown one; returns its summary. With the automatic segmentation's
        measurement, its diameter lines are watched: moving one recomputes the measured classes
        and calls :attr:`on_change`."""
        self._stop_line_observers()
        self.result = ShownResult({role: Path(f).resolve() for role, f in inputs.items()}, nodes)
        self.assessment = self._automatic_assessment()
        if self.assessment is not None:
            self._watch_lines()
        get = self.scene.GetNodeByID
        p.transform, p.table = get(nodes.transform), get(nodes.table)
        p.gradcam = get(nodes.gradcam) if nodes.gradcam else None
        p.saliency = get(nodes.saliency) if nodes.saliency else None
        if nodes.roi and p.roi is None:
            p.roi = get(nodes.roi)
        self._overlay = None
        self.update_overlay(p)
        return nodes.summary

    def update_overlay(self, p: PanelParameters) -> bool:
        """Show the chosen map over the baseline when the map, its opacity or the result changed
        since the last call (the panel calls this on every parameter change); True if it did."""
        foreground = getattr(p, MAP_CHOICES.get(p.mapName, "gradcam"))
        background = self.background(p)
        if foreground is None or background is None:
            return False
        key = (background.GetID(), foreground.GetID(), round(float(p.opacity), 4))
        if key == self._overlay:
            return False
        from RANOResponseLib.mrml.scene import show_overlay

        show_overlay(self.scene, background, foreground, opacity=float(p.opacity))
        self._overlay = key
        return True

    def save_scene(self, path: Path | str) -> Path:
        """Save the scene (``.mrml`` with its files beside it, or one ``.mrb``)."""
        from RANOResponseLib.mrml.scene import write_scene

        return write_scene(self.scene, Path(path))

    # ----------------------------------------------------------------------------- review
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

    def result_text(self) -> str:
        """The results panel: the network's class and probabilities, and the measured classes
        (RANO, RANO 2.0) beside it with a disagreement flagged; the current measurement (the
        reader's moved lines included) when there is one."""
        if self.result is None:
            return "No prediction yet."
        from RANOResponseLib.mrml.panel_text import compare_classes, result_html

        summary = self.result.nodes.summary
        return result_html(summary, compare_classes(summary, self.assessment))

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

        return _tagged(self.scene, ATTR)

    def _stop_line_observers(self) -> None:
        if self._stop_observing is not None:
            self._stop_observing()
            self._stop_observing = None
