"""The tumour segmentations of a prediction and its measured RANO in a Slicer scene (MRML only).

``predict`` segments each timepoint (a label map on that timepoint's reference grid: 1 enhancing,
2 necrotic / non-enhancing, 3 edema) and measures RANO from the two label maps
(``prediction.json["measured"]``). Here they become what a reader edits in Slicer:

* :func:`add_tumour_segmentation`: a label map as a ``vtkMRMLSegmentationNode`` with the three
  named, coloured segments (:data:`~RANOResponseLib.core.names.LABEL_NAMES`,
  :data:`~RANOResponseLib.core.styles.TUMOUR_COLORS`), all three present even when empty, so
  Segment Editor offers each of them;
* :func:`tumour_labels`: the reverse (segments found by name, back to a 1/2/3 label map);
* :func:`measured_pair`: the lesion measurements of a prediction summary.

:func:`~RANOResponseLib.mrml.assembly.assemble` puts both segmentations and the measurable lesions'
diameter lines (:mod:`~RANOResponseLib.mrml.measurement_scene`) into the scene, the follow-up's
under the registration transform as its volumes are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.names import LABEL_NAMES
from RANOResponseLib.core.outputs import SEGMENTATION_FILES
from RANOResponseLib.core.styles import TUMOUR_COLORS, TUMOUR_FILL_OPACITY
from RANOResponseLib.mrml.volumes import image_to_node, node_to_image
from RANOResponseLib.rano.measurement import PairMeasurement

TIMEPOINTS = ("baseline", "followup")
SEGMENTATION_ROLES = {tp: f"segmentation_{tp}" for tp in TIMEPOINTS}  # scene.ROLE, and predict's output keys
NODE_NAMES = {"baseline": "RANO tumour baseline", "followup": "RANO tumour follow-up"}


def _ensure_converter_rules() -> None:
    """Segmentations make empty segments through the converter rules that Slicer's Segmentations
    module registers at start-up; a bare MRML (slicer-core: predict, pytest) has none."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if factory.GetConverterRules():
        return
    factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
    factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


def add_tumour_segmentation(scene: Any, labels: sitk.Image | Path | str, name: str, node: Any = None,
                            reference: Any = None, transform_node_id: str | None = None) -> Any:
    """A segmentation node holding a tumour label map (an image or its file; labels 1/2/3).

    One segment per label of :data:`LABEL_NAMES`, named and coloured, in label order; a label the
    map lacks is an empty segment. ``reference``: the volume node whose grid the segmentation keeps
    (its study's reference volume, for Segment Editor; by default the label map's). An existing
    ``node`` is emptied and refilled. ``transform_node_id``: the transform the study's volumes
    observe (the follow-up's registration); the segmentation observes it too, and the label map is
    taken in the volumes' own coordinates (not resampled through it). Other label values are
    refused (a map in another convention is converted first, e.g. by a bundle's label mapping).
    """
    image = labels if isinstance(labels, sitk.Image) else sitk.ReadImage(str(labels))
    values = set(np.unique(sitk.GetArrayViewFromImage(image)).tolist()) - {0}
    if not values <= set(LABEL_NAMES):
        raise RANOInputError(f"{name}: labels {sorted(values - set(LABEL_NAMES))} are not tumour labels "
                             f"({', '.join(f'{k} {v}' for k, v in LABEL_NAMES.items())})")
    image = sitk.Cast(image, sitk.sitkUInt8)
    _ensure_converter_rules()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{name} (labelmap)")
    labelmap.CreateDefaultDisplayNodes()
    image_to_node(scene, image, f"{name} (labelmap)", node=labelmap)
    node = node or scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    # all three under one transform first: Slicer resamples between differently transformed nodes
    for n in (node, labelmap):
        n.SetAndObserveTransformNodeID(transform_node_id)
    segmentation = node.GetSegmentation()
    segmentation.RemoveAllSegments()
    segmentation.SetSourceRepresentationName(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference if reference is not None else labelmap)
    try:
        if values and not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, node):
            raise RANOInputError(f"{name}: the label map could not become a segmentation")
    finally:
        display = labelmap.GetDisplayNode()
        scene.RemoveNode(labelmap)
        if display is not None:
            scene.RemoveNode(display)
    by_value = {segmentation.GetNthSegment(i).GetLabelValue(): segmentation.GetNthSegmentID(i)
                for i in range(segmentation.GetNumberOfSegments())}
    for index, (value, segment_name) in enumerate(LABEL_NAMES.items()):
        colour = TUMOUR_COLORS[value]
        if value in by_value:
            segment = segmentation.GetSegment(by_value[value])
            segment.SetName(segment_name)
            segment.SetColor(*colour)
            segment_id = by_value[value]
        else:
            segment_id = segmentation.AddEmptySegment(f"{name} {segment_name}", segment_name, list(colour))
        segmentation.SetSegmentIndex(segment_id, index)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    node.GetDisplayNode().SetOpacity2DFill(TUMOUR_FILL_OPACITY)
    node.GetDisplayNode().SetOpacity2DOutline(1.0)
    return node


def segment_ids(node: Any) -> dict[int, str]:
    """Label value -> segment id, found by the segments' names (:data:`LABEL_NAMES`, any case)."""
    segmentation = node.GetSegmentation()
    wanted = {n.lower(): value for value, n in LABEL_NAMES.items()}
    found = {}
    for i in range(segmentation.GetNumberOfSegments()):
        value = wanted.get(segmentation.GetNthSegment(i).GetName().strip().lower())
        if value is not None and value not in found:
            found[value] = segmentation.GetNthSegmentID(i)
    return found


def tumour_labels(node: Any, reference: Any = None) -> sitk.Image:
    """The label map (1/2/3) a tumour segmentation node holds now (with the reader's edits).

    Segments are found by name (:func:`segment_ids`); the map lies on ``reference``'s grid if given
    (the node's own coordinates: a parent transform is not applied, as in
    :func:`~RANOResponseLib.mrml.volumes.node_to_image`), else on the segmentation's own geometry.
    """
    found = segment_ids(node)
    if not found:
        raise RANOInputError(f"{node.GetName()}: no segment named {', '.join(LABEL_NAMES.values())}")
    order = sorted(found)
    ids = vtk.vtkStringArray()
    for value in order:
        ids.InsertNextValue(found[value])
    scene = node.GetScene()
    out = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{node.GetName()} (export)")
    try:
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(node, ids, out, reference):
            raise RANOInputError(f"{node.GetName()}: exporting the segments to a label map failed")
        exported = sitk.GetArrayViewFromImage(image := node_to_image(out))
    finally:
        scene.RemoveNode(out)
    # the export numbers the segments 1..n in the order given; back to their label values
    lookup = np.zeros(len(order) + 1, np.uint8)
    lookup[1:] = order
    labels = sitk.GetImageFromArray(lookup[np.rint(exported).astype(np.int64)])
    labels.CopyInformation(image)
    return labels


def measured_pair(summary: Mapping[str, Any]) -> PairMeasurement | None:
    """The lesion measurements of a prediction summary's ``measured`` block (None without one).

    Each timepoint's ``source`` is its segmentation file's name in predict's output folder
    (:data:`~RANOResponseLib.core.outputs.SEGMENTATION_FILES`): predict measured the label maps
    in memory, and the name is how a report tells an automatic measurement from a manual one.
    """
    measured = summary.get("measured") or {}
    if not measured.get("measurements"):
        return None
    try:
        pair = PairMeasurement.from_dict(measured["measurements"])
    except (KeyError, TypeError, ValueError) as e:
        raise RANOInputError(f"prediction.json: 'measured' block unreadable ({e})") from None
    for tp in TIMEPOINTS:
        m = getattr(pair, tp)
        m.source = m.source or SEGMENTATION_FILES[tp]
    return pair

