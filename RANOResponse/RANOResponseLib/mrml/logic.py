"""The RANO Response module's logic without Qt: what each button of the panel does to a scene.

:class:`PanelLogic` takes a ``vtkMRMLScene``; the Slicer module's ``RANOResponseLogic`` subclasses
it with ``slicer.mrmlScene``, and pytest drives it on the real MRML of ``slicer-core``. It reads
and writes the panel's state through a parameter object (:class:`PanelParameters`: the module's
``parameterNodeWrapper`` in Slicer, a plain object in tests). This module owns the Studies,
Model, Apply and Results parts; the other sections are mixed in:

- :mod:`.panel_state`  the parameters, the shown result, removing a case's nodes (shared)
- :mod:`.review_panel` Review: worklist, measurement and its diameter lines, verdicts, case report
- :mod:`.course_panel` Course: run or load a patient's timeline, show a timepoint

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

from pathlib import Path
from typing import Any, Callable, Mapping

from RANOResponseLib.core.errors import BundleError, DeviceError, RANOInputError
from RANOResponseLib.core.names import MODALITIES, REFERENCE_ORDER
from RANOResponseLib.mrml.course_panel import CoursePanel
from RANOResponseLib.mrml.panel_state import PanelParameters, ShownResult, given, remove_node, tagged_nodes
from RANOResponseLib.mrml.review_panel import (  # noqa: F401 (imported from here by the tests)
    STEP_MESSAGES,
    ReviewPanel,
    export_result,
    transform_from_node,
)

ROLES = ("baseline", "followup")
MAP_CHOICES = {"Grad-CAM": "gradcam", "Saliency": "saliency"}  # the panel's map menu -> map kind
# scene.ROLE values of a case's nodes (the last two: tumour_scene.SEGMENTATION_ROLES)
PREDICTION_ROLES = ("transform", "gradcam", "saliency", "roi", "table", "brain", "segmentation_baseline",
                    "segmentation_followup")
READY_TEXT = "Register, crop, classify and compute the maps (runs in the background; click again to cancel)"


class PanelLogic(ReviewPanel, CoursePanel):
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
        for node in tagged_nodes(self.scene, STUDY):
            node.SetAndObserveTransformNodeID(None)
        removed = tagged_nodes(self.scene, ROLE, PREDICTION_ROLES) + self._diameter_line_nodes()
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
        """Start ``predict`` in a child process; returns the job and what to tell the user ('' if
        nothing): the device notice, and that the segmentation is skipped (see :meth:`apply_inputs`).

        An explicit device that is absent raises :class:`DeviceError` (no silent switch to the CPU).
        """
        from RANOResponseLib.model.device import choose_device
        from RANOResponseLib.mrml.runner import PredictRequest, start_predict

        device, notice = choose_device(requested_device or "auto")
        modalities, segmentation, skipped = self.apply_inputs(p)
        request = PredictRequest(
            baseline={m: getattr(p, f"baseline{m}") for m in MODALITIES},
            followup={m: getattr(p, f"followup{m}") for m in MODALITIES},
            modalities=modalities, bundle=given(p.bundle), device=device, roi=p.roi, segmentation=segmentation)
        return start_predict(request, python=self.python), "\n".join(t for t in (notice, skipped) if t)

    def apply_inputs(self, p: PanelParameters) -> tuple[tuple[str, ...], bool, str]:
        """What Apply hands to ``predict``: the modalities, whether it segments, and why not if it
        cannot. With "Segment and measure the tumour" off (``p.segmentation``): the bundle's
        modalities, no segmentation (``--no-segmentation``). On (also when the parameter object has
        no such field): the segmentation bundle's modalities too, unless a volume it needs is not
        assigned; then the prediction runs without the segmentation and the third value says so.
        """
        from RANOResponseLib.model.segmentation import read_seg_bundle

        needed = self.required_modalities(p.bundle)
        if not getattr(p, "segmentation", True):
            return needed, False, ""
        seg = read_seg_bundle()  # the one predict uses by default
        lacking = [f"{role} {m}" for role in ROLES for m in seg.modalities if getattr(p, f"{role}{m}") is None]
        if lacking:
            return needed, False, (f"Segmentation skipped: no {', '.join(lacking)} volume (the segmentation "
                                   f"bundle {seg.id} needs {', '.join(seg.modalities)}).")
        return tuple(dict.fromkeys((*needed, *seg.modalities))), True, ""

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

    def result_text(self) -> str:
        """The results panel: the network's class and probabilities, and the measured classes
        (RANO, RANO 2.0) beside it with a disagreement flagged; the current measurement (the
        reader's moved lines included) when there is one."""
        if self.result is None:
            return "No prediction yet."
        from RANOResponseLib.mrml.panel_text import compare_classes, result_html

        summary = self.result.nodes.summary
        return result_html(summary, compare_classes(summary, self.assessment))
