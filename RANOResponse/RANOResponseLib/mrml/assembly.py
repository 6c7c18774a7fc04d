"""One prediction put together in a scene over its study volumes (:func:`assemble`).

Owns the prediction's own nodes besides the maps and the transform: the baseline brain mask as a
segmentation (:func:`add_brain_segmentation`), the results table (:func:`add_results_table`),
the IDs of everything a prediction added (:class:`SceneNodes`), and :func:`assemble`, the one
way a prediction enters a scene: transform, crop ROI, maps, brain mask, table, tumour
segmentations with their diameters, slice views. Its two callers, from memory and from a
``predict`` folder, are in :mod:`~RANOResponseLib.mrml.prediction_scene`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import SimpleITK as sitk
import slicer
from vtkmodules.vtkCommonCore import vtkDoubleArray, vtkStringArray
from vtkmodules.vtkCommonDataModel import vtkTable

from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.names import REFERENCE_ORDER
from RANOResponseLib.core.styles import BRAIN_SEGMENT, MAP_KINDS
from RANOResponseLib.mrml.display import (
    _id,
    add_map_node,
    ensure_slice_views,
    fit_slice_views,
    jump_slices,
    show_overlay,
)
from RANOResponseLib.mrml.measurement_scene import add_pair_lines
from RANOResponseLib.mrml.transform_roi import add_roi, add_transform_node
from RANOResponseLib.mrml.tumour_scene import NODE_NAMES, SEGMENTATION_ROLES, add_tumour_segmentation
from RANOResponseLib.mrml.volumes import CASE, ROLE, _present, image_to_node, peak_ras


def add_brain_segmentation(scene, mask: sitk.Image | Path | str, name: str, node=None, reference=None):
    """A segmentation node with one segment, the brain (:data:`~RANOResponseLib.core.styles.BRAIN_SEGMENT`),
    from a brain mask (an image or a file, non-zero = brain); slice views draw its outline.
    ``reference``: the volume node whose grid the segmentation keeps (the mask's own grid, for
    Segment Editor). An existing ``node`` is emptied and refilled."""
    image = mask if isinstance(mask, sitk.Image) else sitk.ReadImage(str(mask))
    image = sitk.Cast(image != 0, sitk.sitkUInt8)
    labelmap = image_to_node(scene, image, f"{name} (labelmap)", window=(0.0, 1.0),
                             node=scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{name} (labelmap)"))
    node = node or scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.GetSegmentation().RemoveAllSegments()
    if reference is not None:
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    try:
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, node):
            raise RANOInputError(f"{name}: the brain mask could not become a segmentation")
    finally:
        display = labelmap.GetDisplayNode()
        scene.RemoveNode(labelmap)
        if display is not None:
            scene.RemoveNode(display)
    segment = node.GetSegmentation().GetNthSegment(0)
    segment.SetName(BRAIN_SEGMENT[0])
    segment.SetColor(*BRAIN_SEGMENT[1])
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    node.GetDisplayNode().SetOpacity2DFill(0.0)
    node.GetDisplayNode().SetOpacity2DOutline(1.0)
    return node


# ---------------------------------------------------------------------------------- table


def add_results_table(scene, summary: Mapping[str, Any], name: str, node=None):
    """A table node of the prediction: one row per class with its probability, the ensemble
    spread, a mark on the predicted class and the model (bundle id) that made it, visible in
    Slicer's table view; the label, bundle id, map target and version are also node attributes
    (``RANOResponse.label``, ``.bundle``, ``.maps_explain``, ``.version``), and so is the input
    guard's verdict (``.input_check``: ok or warning, ``.input_reasons``: one reason a line, also
    in the node's description)."""
    probs = summary["probabilities"]
    spread = summary.get("ensemble_spread", {})
    bundle = summary.get("bundle", {}).get("id", "")
    cls, prob, spr, pred, model = (vtkStringArray(), vtkDoubleArray(), vtkDoubleArray(), vtkStringArray(),
                                   vtkStringArray())
    for arr, col in ((cls, "Class"), (prob, "Probability"), (spr, "Ensemble spread"), (pred, "Predicted"),
                     (model, "Model")):
        arr.SetName(col)
    for c, p in probs.items():
        cls.InsertNextValue(c)
        prob.InsertNextValue(float(p))
        spr.InsertNextValue(float(spread.get(c, 0.0)))
        pred.InsertNextValue("yes" if c == summary["label"] else "")
        model.InsertNextValue(str(bundle))
    table = vtkTable()
    for arr in (cls, prob, spr, pred, model):
        table.AddColumn(arr)
    node = node or scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    node.SetAndObserveTable(table)
    node.SetAttribute("RANOResponse.label", str(summary["label"]))
    node.SetAttribute("RANOResponse.bundle", str(bundle))
    node.SetAttribute("RANOResponse.maps_explain", str(summary.get("maps_explain") or ""))
    node.SetAttribute("RANOResponse.version", str(summary.get("rano_response_version", "")))
    check = summary.get("input_check") or {}
    node.SetAttribute("RANOResponse.input_check", str(check.get("verdict", "")))
    node.SetAttribute("RANOResponse.input_reasons", "\n".join(check.get("reasons", [])))
    said = f" Input check: {check['verdict']}" + "".join(f"; {r}" for r in check.get("reasons", [])) + "." \
        if check else ""
    node.SetDescription(f"Predicted RANO response {summary['label']} (model {bundle}).{said} "
                        "Research use only, not for clinical use.")
    return node


# ------------------------------------------------------------------------ a whole result


@dataclass
class SceneNodes:
    """IDs of the nodes a prediction put into a scene (look them up with ``scene.GetNodeByID``)."""

    baseline: dict[str, str]  # modality -> volume node id
    followup: dict[str, str]  # modality -> volume node id (under ``transform``)
    transform: str
    table: str
    roi: str | None = None
    saliency: str | None = None
    gradcam: str | None = None
    summary: dict = field(default_factory=dict)
    brain: str | None = None  # the baseline brain mask's segmentation node
    segmentations: dict[str, str] = field(default_factory=dict)  # timepoint -> tumour segmentation node

    @property
    def maps(self) -> dict[str, str]:
        return {k: v for k, v in (("gradcam", self.gradcam), ("saliency", self.saliency)) if v}


def reference_node(nodes: Mapping[str, Any]):
    """The baseline volume maps are drawn over: CT1, else T1, T2, FLAIR (the bundle's order)."""
    present = _present(nodes)
    for m in REFERENCE_ORDER:
        if m in present:
            return present[m]
    return next(iter(present.values()), None)


def _previous(scene, case: str, role: str):
    """The node of ``role`` an earlier run on the same case added (reused, not duplicated)."""
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        if node.GetAttribute(ROLE) == role and node.GetAttribute(CASE) == case:
            return node
    return None


def assemble(
    scene,
    summary: Mapping[str, Any],
    baseline_nodes: Mapping[str, Any],
    followup_nodes: Mapping[str, Any],
    transform: sitk.Transform | Path | str,
    maps: Mapping[str, sitk.Image | Path | str],
    files: Mapping[str, Path] | None = None,
    roi=None,
    opacity: float = 0.4,
    brain_mask: sitk.Image | Path | str | None = None,
    segmentations: Mapping[str, sitk.Image | Path | str] | None = None,
    measured: Any = None,
) -> SceneNodes:
    """Put one prediction into ``scene`` over its study volume nodes: the registration as a
    transform node the follow-up volumes observe, the crop ROI (``summary['model_grid']``; an
    existing ``roi`` is kept), the maps with heat colours, the baseline ``brain_mask`` as a
    segmentation, the results table, and every slice view showing Grad-CAM over the baseline
    reference volume through the Grad-CAM peak.

    ``segmentations`` (timepoint -> tumour label map, on that study's reference grid) become
    segmentation nodes over their study, the follow-up's under the transform; ``measured`` (the
    :class:`~RANOResponseLib.rano.measurement.PairMeasurement` of those label maps) adds the two
    diameters of each measurable lesion as line markups the reader can move.

    Re-running the same case (same follow-up node) updates its earlier output nodes.
    """
    files = files or {}
    base, fu = _present(baseline_nodes), _present(followup_nodes)
    if not base or not fu:
        raise RANOInputError("a prediction needs baseline and follow-up volume nodes")
    ref = reference_node(base)
    case = reference_node(fu).GetID()

    def tagged(node, role: str):
        node.SetAttribute(ROLE, role)
        node.SetAttribute(CASE, case)
        return node

    tnode = add_transform_node(scene, transform, "RANO follow-up to baseline", file=files.get("transform"),
                               node=_previous(scene, case, "transform"))
    tagged(tnode, "transform")
    for node in fu.values():
        node.SetAndObserveTransformNodeID(tnode.GetID())

    map_ids = {}
    for kind, source in maps.items():
        node = add_map_node(scene, source, f"RANO {MAP_KINDS[kind][0]}", kind, file=files.get(kind),
                            node=_previous(scene, case, kind), share=True)
        map_ids[kind] = tagged(node, kind).GetID()

    brain = None
    if brain_mask is not None:
        brain = tagged(add_brain_segmentation(scene, brain_mask, "RANO brain mask",
                                              node=_previous(scene, case, "brain"), reference=ref), "brain")

    grid = summary.get("model_grid")
    if roi is None and grid:
        roi = tagged(add_roi(scene, grid["center_ras"], grid["fov_mm"], "RANO crop region",
                             node=_previous(scene, case, "roi")), "roi")
    table = tagged(add_results_table(scene, summary, "RANO results", node=_previous(scene, case, "table")),
                   "table")
    tumour = {}
    for tp, labels in (segmentations or {}).items():
        role = SEGMENTATION_ROLES[tp]
        node = add_tumour_segmentation(scene, labels, NODE_NAMES[tp], node=_previous(scene, case, role),
                                       reference=reference_node(base if tp == "baseline" else fu),
                                       transform_node_id=tnode.GetID() if tp == "followup" else None)
        tumour[tp] = tagged(node, role).GetID()
    if measured is not None:
        add_pair_lines(scene, measured, tnode.GetID(), measurable_only=True)

    created = ensure_slice_views(scene)
    shown = scene.GetNodeByID(map_ids.get("gradcam") or map_ids.get("saliency") or "")
    show_overlay(scene, ref, shown, opacity)
    if created:
        fit_slice_views(scene, created)
    if shown is not None:
        jump_slices(scene, peak_ras(shown))
    elif grid:
        jump_slices(scene, grid["center_ras"])
    return SceneNodes(baseline={m: n.GetID() for m, n in base.items()},
                      followup={m: n.GetID() for m, n in fu.items()},
                      transform=tnode.GetID(), table=table.GetID(), roi=_id(roi),
                      saliency=map_ids.get("saliency"), gradcam=map_ids.get("gradcam"), summary=dict(summary),
                      brain=_id(brain), segmentations=tumour)
