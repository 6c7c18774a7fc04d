"""Scene logic of the measurement assistant: Slicer segmentations in, editable diameters out.

MRML only (no Qt, no application object), so pytest drives it on the real MRML of ``slicer-core``:

* :func:`segmentation_image` turns a ``vtkMRMLSegmentationNode`` (chosen segments) or a
  labelmap/scalar volume node into a SimpleITK label map that :mod:`measurement` measures;
* :func:`add_diameter_lines` puts each lesion's two RANO diameters into the scene as
  ``vtkMRMLMarkupsLineNode`` pairs the reader can drag;
* :func:`recompute` reads the lines' current endpoints and gives back the updated measurements
  and the RANO category; :func:`observe_lines` calls back whenever a line moves, so the panel can
  call :func:`recompute` and refresh.

Slicer's world is RAS, SimpleITK's physical space is LPS: points cross with ``(-x, -y, z)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import SimpleITK as sitk

from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.styles import DIAMETER_COLORS
from RANOResponseLib.imaging.geometry import lps_to_ras, ras_to_lps
from RANOResponseLib.mrml.volumes import image_to_node, node_to_image
from RANOResponseLib.rano.measurement import (
    BINARY,
    DEEPBRATUMIA,
    LabelScheme,
    PairMeasurement,
    TimepointMeasurement,
    with_diameters,
)
from RANOResponseLib.rano.rules import RANOThresholds, RuleResult, decide

ATTR = "RANOResponse.diameter"  # "<timepoint>:<lesion id>:<long|perpendicular>"
TIMEPOINTS = ("baseline", "followup")
PERPENDICULAR_TOLERANCE_DEG = 10.0


# ------------------------------------------------------------------------------ volumes


def volume_node_from_image(scene: Any, image: sitk.Image, name: str, labelmap: bool = True) -> Any:
    """Add a SimpleITK label map (or scalar image) to the scene as a labelmap (or scalar) volume
    node, through :func:`~RANOResponseLib.mrml.volumes.image_to_node`."""
    node = None
    if labelmap:
        node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
        node.CreateDefaultDisplayNodes()  # a labelmap display, not image_to_node's grey one
    return image_to_node(scene, image, name, node=node)


# ------------------------------------------------------------------------------ segmentations


_ENHANCING_NAME = re.compile(r"enhanc", re.IGNORECASE)
_NON_ENHANCING_NAME = re.compile(r"non[\s_-]*enhanc", re.IGNORECASE)
_CORE_NAME = re.compile(r"necro|core|cavity|non[\s_-]*enhanc", re.IGNORECASE)


def segment_names(seg_node: Any) -> dict[str, str]:
    """Segment id -> name."""
    s = seg_node.GetSegmentation()
    return {s.GetNthSegmentID(i): s.GetNthSegment(i).GetName() for i in range(s.GetNumberOfSegments())}


def _resolve_segments(seg_node: Any, wanted: Sequence[str] | None, pattern: re.Pattern | None,
                      exclude: re.Pattern | None, what: str) -> list[str]:
    names = segment_names(seg_node)
    if wanted is None:
        return [i for i, n in names.items() if pattern is not None and pattern.search(n)
                and not (exclude is not None and exclude.search(n))]
    ids = []
    by_name = {n.lower(): i for i, n in names.items()}
    for w in wanted:
        if w in names:
            ids.append(w)
        elif w.lower() in by_name:
            ids.append(by_name[w.lower()])
        else:
            raise RANOInputError(f"{seg_node.GetName()}: no {what} segment {w!r} "
                                 f"(segments: {', '.join(names.values()) or 'none'})")
    return ids


def labelmap_from_segmentation(
    seg_node: Any,
    enhancing: Sequence[str] | None = None,
    core: Sequence[str] | None = (),
    reference_node: Any = None,
) -> sitk.Image:
    """Export chosen segments as a DeepBraTumIA-style label map: 1 enhancing, 2 core.

    Segments are given by id or name; ``enhancing=None`` picks segments whose name says
    "enhancing" (not "non-enhancing"), ``core=None`` those saying necrosis/core/cavity. The map
    uses ``reference_node``'s grid if given, else the segments' own extent. Uses
    ``vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode``.
    """
    import slicer
    import vtk

    enh = _resolve_segments(seg_node, enhancing, _ENHANCING_NAME, _NON_ENHANCING_NAME, "enhancing")
    if not enh:
        raise RANOInputError(f"{seg_node.GetName()}: no enhancing segment chosen or found by name "
                             f"(segments: {', '.join(segment_names(seg_node).values()) or 'none'})")
    cor = [i for i in _resolve_segments(seg_node, core, _CORE_NAME, None, "core") if i not in enh]
    ids = vtk.vtkStringArray()
    for i in cor + enh:  # later segments win where they overlap: enhancing over core
        ids.InsertNextValue(i)
    scene = seg_node.GetScene()
    out = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "RANOResponse-export")
    try:
        logic = slicer.vtkSlicerSegmentationsModuleLogic()
        if not logic.ExportSegmentsToLabelmapNode(seg_node, ids, out, reference_node):
            raise RANOInputError(f"{seg_node.GetName()}: exporting the segments to a labelmap failed")
        image = node_to_image(out)
    finally:
        scene.RemoveNode(out)
    arr = sitk.GetArrayViewFromImage(image)
    labels = np.zeros(arr.shape, np.uint8)
    labels[(arr >= 1) & (arr <= len(cor))] = 2
    labels[arr > len(cor)] = 1
    result = sitk.GetImageFromArray(labels)
    result.CopyInformation(image)
    return result


def segmentation_image(node: Any, enhancing: Sequence[str] | None = None, core: Sequence[str] | None = None,
                       scheme: LabelScheme | None = None, reference_node: Any = None) -> tuple[sitk.Image, LabelScheme]:
    """Any segmentation-like node as ``(label map, scheme)`` for :func:`measurement.measure_segmentation`.

    A segmentation node is exported with :func:`labelmap_from_segmentation` (DeepBraTumIA
    scheme); a labelmap or scalar volume node is taken as it is, with ``scheme`` (default
    DeepBraTumIA labels, or ``BINARY`` for a 0/1 map).
    """
    if node is None:
        raise RANOInputError("no segmentation node given")
    if node.IsA("vtkMRMLSegmentationNode"):
        return labelmap_from_segmentation(node, enhancing, core, reference_node), DEEPBRATUMIA
    if node.IsA("vtkMRMLVolumeNode"):
        image = node_to_image(node)
        if scheme is None:
            values = set(np.unique(sitk.GetArrayViewFromImage(image)).tolist())
            scheme = BINARY if values <= {0, 1} else DEEPBRATUMIA
        return image, scheme
    raise RANOInputError(f"{node.GetName()}: a {node.GetClassName()} is not a segmentation or labelmap")


# ------------------------------------------------------------------------------ lines


@dataclass
class DiameterLines:
    """The two line markups of one lesion at one timepoint."""

    timepoint: str  # "baseline" or "followup"
    lesion_id: int
    long: Any  # vtkMRMLMarkupsLineNode, d1
    perpendicular: Any  # vtkMRMLMarkupsLineNode, d2

    def lengths(self) -> tuple[float, float]:
        return line_length(self.long), line_length(self.perpendicular)

    def angle_deg(self) -> float:
        """Angle between the two lines (90 = perpendicular)."""
        a, b = np.diff(line_points(self.long), axis=0)[0], np.diff(line_points(self.perpendicular), axis=0)[0]
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        if na == 0 or nb == 0:
            return 90.0
        return float(np.degrees(np.arccos(np.clip(abs(a @ b) / (na * nb), 0.0, 1.0))))


def line_points(node: Any) -> np.ndarray:
    """The two control points of a line node, RAS, in the node's own coordinates (2, 3)."""
    if node.GetNumberOfControlPoints() != 2:
        raise RANOInputError(f"{node.GetName()}: a diameter line needs exactly 2 points, "
                             f"has {node.GetNumberOfControlPoints()}")
    pts = []
    for i in range(2):
        p = [0.0, 0.0, 0.0]
        node.GetNthControlPointPosition(i, p)
        pts.append(p)
    return np.array(pts, dtype=float)


def line_length(node: Any) -> float:
    p = line_points(node)
    return float(np.linalg.norm(p[1] - p[0]))


def new_line(scene: Any, name: str, a: Sequence[float], b: Sequence[float], tag: str,
             color: tuple[float, float, float], transform_node_id: str | None, attribute: str = ATTR) -> Any:
    """A line markup from LPS point ``a`` to ``b``, tagged ``attribute = tag``, in ``color``, under
    the transform node ``transform_node_id`` (None: none)."""
    import vtk

    node = scene.AddNewNodeByClass("vtkMRMLMarkupsLineNode", name)
    node.AddControlPoint(vtk.vtkVector3d(*lps_to_ras(a)))
    node.AddControlPoint(vtk.vtkVector3d(*lps_to_ras(b)))
    node.SetAttribute(attribute, tag)
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if display is not None:
        display.SetSelectedColor(*color)
        display.SetColor(*color)
    if transform_node_id:
        node.SetAndObserveTransformNodeID(transform_node_id)
    return node


def add_diameter_lines(
    scene: Any,
    measurement: TimepointMeasurement,
    timepoint: str,
    measurable_only: bool = False,
    transform_node_id: str | None = None,
) -> list[DiameterLines]:
    """Put the two diameters of every lesion (or of the measurable ones) into the scene.

    Line nodes are named ``"<timepoint> L<id> d1|d2"`` and tagged with the attribute
    ``RANOResponse.diameter = "<timepoint>:<id>:long|perpendicular"``; existing lines of the same
    timepoint are replaced. ``transform_node_id``: put the lines under the transform the
    timepoint's volume is under (e.g. the follow-up's registration), so they stay on it.
    """
    if timepoint not in TIMEPOINTS:
        raise ValueError(f"timepoint must be one of {TIMEPOINTS}, got {timepoint!r}")
    remove_diameter_lines(scene, timepoint)
    out = []
    label = "follow-up" if timepoint == "followup" else "baseline"
    for le in measurement.lesions:
        if measurable_only and not le.measurable:
            continue
        long = new_line(scene, f"{label} {le.name} d1", *le.d1_points, f"{timepoint}:{le.id}:long",
                         DIAMETER_COLORS[timepoint], transform_node_id)
        perp = new_line(scene, f"{label} {le.name} d2", *le.d2_points, f"{timepoint}:{le.id}:perpendicular",
                         DIAMETER_COLORS[timepoint], transform_node_id)
        out.append(DiameterLines(timepoint, le.id, long, perp))
    return out


def add_pair_lines(scene: Any, pair: PairMeasurement, followup_transform_node_id: str | None = None,
                   measurable_only: bool = False) -> list[DiameterLines]:
    """Both timepoints' diameter lines (:func:`add_diameter_lines`); the follow-up's under the
    transform node its volumes observe (e.g. the registration), so they lie on them."""
    return (add_diameter_lines(scene, pair.baseline, "baseline", measurable_only)
            + add_diameter_lines(scene, pair.followup, "followup", measurable_only, followup_transform_node_id))


def find_diameter_lines(scene: Any, timepoint: str | None = None) -> list[DiameterLines]:
    """The diameter line pairs in the scene (found by their attribute), by timepoint and id."""
    found: dict[tuple[str, int], dict[str, Any]] = {}
    nodes = scene.GetNodesByClass("vtkMRMLMarkupsLineNode")
    for i in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(i)
        tag = node.GetAttribute(ATTR)
        if not tag:
            continue
        tp, lid, kind = tag.split(":")
        if timepoint is None or tp == timepoint:
            found.setdefault((tp, int(lid)), {})[kind] = node
    return [DiameterLines(tp, lid, d["long"], d["perpendicular"])
            for (tp, lid), d in sorted(found.items()) if "long" in d and "perpendicular" in d]


def remove_diameter_lines(scene: Any, timepoint: str | None = None) -> None:
    for lines in find_diameter_lines(scene, timepoint):
        scene.RemoveNode(lines.long)
        scene.RemoveNode(lines.perpendicular)


def measurement_from_lines(measurement: TimepointMeasurement, lines: Sequence[DiameterLines]) -> TimepointMeasurement:
    """A copy of ``measurement`` with each lesion's diameters and endpoints read from its lines
    (lesions without lines keep theirs); measurability is re-evaluated."""
    diameters, points = {}, {}
    for ln in lines:
        d1, d2 = ln.lengths()
        diameters[ln.lesion_id] = (d1, d2)
        p1 = tuple(ras_to_lps(p) for p in line_points(ln.long))
        p2 = tuple(ras_to_lps(p) for p in line_points(ln.perpendicular))
        points[ln.lesion_id] = (p1, p2)
    return with_diameters(measurement, diameters, points)


def recompute(
    scene: Any,
    pair: PairMeasurement,
    thresholds: RANOThresholds | None = None,
    criteria: str = "RANO",
) -> tuple[PairMeasurement, RuleResult]:
    """Re-read every diameter line in the scene and re-apply the RANO rules.

    Returns the updated measurements (lesion matching is kept) and the rule result; lines that
    are far from perpendicular are mentioned in the reasoning.
    """
    lines = {tp: find_diameter_lines(scene, tp) for tp in TIMEPOINTS}
    updated = PairMeasurement(measurement_from_lines(pair.baseline, lines["baseline"]),
                              measurement_from_lines(pair.followup, lines["followup"]),
                              pair.transform, pair.margin_mm)
    rule = decide(updated, thresholds, criteria)
    for tp, group in lines.items():
        for ln in group:
            angle = ln.angle_deg()
            if abs(angle - 90.0) > PERPENDICULAR_TOLERANCE_DEG:
                rule.reasoning.insert(-2, f"{'Follow-up' if tp == 'followup' else 'Baseline'} L{ln.lesion_id}: "
                                          f"the diameters are {angle:.0f} degrees apart, not perpendicular.")
    return updated, rule


def observe_lines(lines: Sequence[DiameterLines], callback: Callable[[], None]) -> Callable[[], None]:
    """Call ``callback()`` whenever a control point of one of the lines moves.

    Returns a function that removes the observers (call it before deleting the lines or the panel).
    """
    import slicer

    event = slicer.vtkMRMLMarkupsNode.PointModifiedEvent
    tags = []
    for ln in lines:
        for node in (ln.long, ln.perpendicular):
            tags.append((node, node.AddObserver(event, lambda caller, ev: callback())))

    def remove() -> None:
        for node, tag in tags:
            node.RemoveObserver(tag)
        tags.clear()

    return remove


# ------------------------------------------------------------------ the review panel's assessment


@dataclass
class CaseAssessment:
    """What the review panel shows for one case: measurements, the rule result, the lines, and the
    comparison with the model (when there is a prediction)."""

    pair: PairMeasurement
    rule: RuleResult
    lines: list[DiameterLines]
    comparison: Any = None  # rano_rules.Comparison
    prediction: dict | None = None
    source: str = ""  # what was measured: "manual mask (...)" or "automatic segmentation, bundle ..."

    def summary(self) -> dict:
        """What a verdict stores as the rule-based category and its reasons."""
        return {"category": self.rule.category, "criteria": self.rule.criteria,
                "reasoning": list(self.rule.reasoning)}


def assess_case(
    scene: Any,
    baseline: Any,
    followup: Any,
    transform: Any = None,
    followup_transform_node_id: str | None = None,
    prediction: Any = None,
    criteria: str = "RANO",
    source: str = "auto",
) -> CaseAssessment:
    """Measure a case's two timepoint folders, draw the editable diameters, apply the rules.

    ``transform`` (baseline -> follow-up points, e.g. predict's ``followup_to_baseline.tfm``) relates
    native masks; ``followup_transform_node_id`` is the transform node the follow-up volumes observe,
    so the follow-up lines sit on them. ``prediction``: a predict output folder or its summary.
    """
    from RANOResponseLib.rano.measurement import measure_timepoints
    from RANOResponseLib.review.report import measurement_source

    pair = measure_timepoints(baseline, followup, transform=transform, source=source)
    lines = add_pair_lines(scene, pair, followup_transform_node_id)
    return assess_pair(pair, lines, prediction, criteria, measurement_source(pair))


def assess_pair(pair: PairMeasurement, lines: Sequence[DiameterLines], prediction: Any = None,
                criteria: str = "RANO", source: str = "") -> CaseAssessment:
    """The assessment of measurements whose diameter lines are already in the scene (e.g. those
    ``predict``'s automatic segmentation put there): the rules, and the comparison with the model."""
    from RANOResponseLib.rano.rules import compare_with_prediction

    rule = decide(pair, criteria=criteria)
    comparison = compare_with_prediction(rule, prediction) if prediction is not None else None
    return CaseAssessment(pair, rule, list(lines), comparison, prediction, source)


def reassess(scene: Any, assessment: CaseAssessment, criteria: str | None = None) -> CaseAssessment:
    """The same case after the reader moved diameter lines: re-read them and re-apply the rules."""
    from RANOResponseLib.rano.rules import compare_with_prediction

    pair, rule = recompute(scene, assessment.pair, criteria=criteria or assessment.rule.criteria)
    comparison = (compare_with_prediction(rule, assessment.prediction)
                  if assessment.prediction is not None else None)
    return CaseAssessment(pair, rule, assessment.lines, comparison, assessment.prediction, assessment.source)


def assessment_html(assessment: CaseAssessment) -> str:
    """A compact rich-text summary for the panel: lesion table, sums, category, reasons, agreement."""
    from html import escape

    from RANOResponseLib.rano.measurement import lesion_table

    rows = "".join(
        f"<tr><td>{escape(r['timepoint'])}</td><td>{escape(r['lesion'])}</td>"
        f"<td align='right'>{r['d1_mm']:.1f} x {r['d2_mm']:.1f}</td>"
        f"<td align='right'>{r['product_mm2']:.0f}</td><td align='right'>{r['volume_ml']:.2f}</td>"
        f"<td>{escape(r['measurable'])}</td><td>{escape(r['status'])}</td></tr>"
        for r in lesion_table(assessment.pair))
    table = ("<table border='1' cellspacing='0' cellpadding='2'><tr><th>time</th><th>lesion</th><th>d1 x d2 (mm)</th>"
             f"<th>product (mm²)</th><th>volume (mL)</th><th>measurable</th><th>status</th></tr>{rows}</table>")
    rule = assessment.rule
    reasons = "".join(f"<li>{escape(s)}</li>" for s in rule.reasoning)
    source = f"<p>Measured from {escape(assessment.source)}.</p>" if assessment.source else ""
    verdict = f"{source}<p><b>{escape(rule.criteria)}: {escape(rule.category)}</b></p><ul>{reasons}</ul>"
    if assessment.comparison is not None:
        c = assessment.comparison
        colour = "black" if c.agree else "#b00000"
        verdict += f"<p style='color:{colour}'><b>{escape(c.message)}</b></p>"
    return table + verdict
