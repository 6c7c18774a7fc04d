"""Slicer scene logic: studies, registration, crop region, maps and results as MRML nodes.

Every function takes a ``vtkMRMLScene`` and uses MRML classes only, so the same code runs inside
3D Slicer (``slicer.mrmlScene``), in ``rano-response predict`` (which writes a scene beside its
outputs) and in plain pytest against the real MRML of the ``slicer-core`` wheel.

Coordinates. MRML is RAS, the core (SimpleITK, ITK) is LPS: points differ by the sign of x and y
(:func:`~RANOResponseLib.preprocessing.ras_to_lps`). The registration transform maps baseline
(fixed) points to follow-up (moving) points, the ITK *resampling* direction; Slicer reads such a
transform (a ``.tfm`` file) as the follow-up's *from parent* transform, so a follow-up volume placed
under it is drawn on the baseline anatomy in world (RAS) coordinates. :func:`add_transform_node`
does the same conversion for an in-memory transform (and the tests check both against each other
and against a known motion).

The one way a prediction enters a scene is :func:`assemble` (transform, ROI, maps, table, views),
fed by :func:`populate_scene` from an in-memory :class:`~RANOResponseLib.pipeline.PairResult`
(what ``predict`` uses to write its scene) or by :func:`load_outputs` from a ``predict`` output
folder (what the Slicer module uses after running ``predict`` in a child process).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import slicer
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonCore import vtkDoubleArray, vtkObject, vtkStringArray
from vtkmodules.vtkCommonDataModel import vtkImageData, vtkTable
from vtkmodules.vtkCommonMath import vtkMatrix4x4

from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.files import atomic_file, write_text
from RANOResponseLib.core.names import REFERENCE_ORDER
from RANOResponseLib.core.styles import BRAIN_SEGMENT, MAP_KINDS, MAP_THRESHOLD, display_window
from RANOResponseLib.imaging.geometry import grid_center, lps_to_ras, model_grid, ras_to_lps
from RANOResponseLib.imaging.dicom import contains_dicom
from RANOResponseLib.imaging.io import Study, find_modality_file
from RANOResponseLib.imaging.studies import is_file_study, load_study
from RANOResponseLib.imaging.preprocessing import InputSpec

FLIP = np.diag([-1.0, -1.0, 1.0])  # LPS <-> RAS, its own inverse
GREY_ID = "vtkMRMLColorTableNodeGrey"  # Slicer's built-in grey table, the volumes' default
ROLE = "RANOResponse.role"  # node attribute naming what a node is in a prediction
CASE = "RANOResponse.case"  # node attribute: the follow-up node (or folder) the outputs belong to
STUDY = "RANOResponse.study"  # node attribute of a loaded study volume: "<study>:<modality>"
# Slicer's three standard slice views: (layout name, orientation, label, colour)
VIEWS = (("Red", "Axial", "R", (0.952941, 0.290196, 0.2)),
         ("Yellow", "Sagittal", "Y", (0.929412, 0.835294, 0.298039)),
         ("Green", "Coronal", "G", (0.431373, 0.690196, 0.294118)))


# ------------------------------------------------------------------------------ geometry


def _to_numpy(m: vtkMatrix4x4) -> np.ndarray:
    return np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])


def _to_vtk(a: np.ndarray) -> vtkMatrix4x4:
    m = vtkMatrix4x4()
    for i in range(4):
        for j in range(4):
            m.SetElement(i, j, float(a[i, j]))
    return m


def ijk_to_ras(image: sitk.Image) -> np.ndarray:
    """The 4x4 voxel-index -> RAS matrix of a SimpleITK image (whose geometry is LPS)."""
    m = np.eye(4)
    m[:3, :3] = FLIP @ np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    m[:3, 3] = FLIP @ np.array(image.GetOrigin())
    return m


def image_to_node(scene, image: sitk.Image, name: str, file: Path | str | None = None, node=None,
                  share: bool = False, window: tuple[float, float] | None = None):
    """A scalar volume node holding ``image`` (geometry converted LPS -> RAS).

    The voxels are copied, or with ``share`` used in place (no copy of a large study: the node
    then keeps ``image`` alive and must not outlive changes to it). ``file``: a file that holds
    the same image (e.g. the study file it was read from); it becomes the node's storage file,
    so a saved scene refers to it instead of writing a copy. ``window``: display range (min, max);
    by default the brain voxels' 0.5-99.9 percentiles.
    """
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise RANOInputError(f"{name}: not a 3D scalar image")
    if share:
        flat = sitk.GetArrayViewFromImage(image).reshape(-1)
        scalars = numpy_support.numpy_to_vtk(flat, deep=False)
        scalars._sitk_image = image  # the view is valid only while the image lives
    else:
        scalars = numpy_support.numpy_to_vtk(sitk.GetArrayFromImage(image).reshape(-1), deep=True)
    data = vtkImageData()
    data.SetDimensions(image.GetSize())
    data.GetPointData().SetScalars(scalars)
    node = node or scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetIJKToRASMatrix(_to_vtk(ijk_to_ras(image)))
    node.SetAndObserveImageData(data)
    if node.GetDisplayNode() is None:
        if node.IsA("vtkMRMLLabelMapVolumeNode"):
            _add_display(scene, node)  # Slicer's label display
        else:
            _add_display(scene, node, window or display_window(sitk.GetArrayViewFromImage(image), stride=13))
    if file is not None:
        _set_storage(scene, node, "vtkMRMLVolumeArchetypeStorageNode", file)
    return node


def _add_display(scene, node, window: tuple[float, float] | None = None) -> None:
    """A grey scalar display node; ``window`` (min, max) instead of Slicer's automatic one."""
    _ensure_grey(scene)
    if window is None:
        node.CreateDefaultDisplayNodes()
        return
    display = scene.AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode")
    display.SetAndObserveColorNodeID(GREY_ID)
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(*window)
    node.SetAndObserveDisplayNodeID(display.GetID())


def node_to_image(node) -> sitk.Image:
    """A float32 SimpleITK image (LPS geometry) of a scalar volume node's own voxels.

    The node's parent transform, if any, is not applied: this is the image as stored, the same
    one :func:`export_study_nodes` writes, so a registration computed on it belongs to the node.
    """
    data = node.GetImageData() if node is not None else None
    name = node.GetName() if node is not None else "volume"
    if data is None or data.GetPointData().GetScalars() is None:
        raise RANOInputError(f"{name}: volume node has no voxels")
    dims = data.GetDimensions()
    scalars = data.GetPointData().GetScalars()
    if scalars.GetNumberOfComponents() != 1 or min(dims) < 2:
        raise RANOInputError(f"{name}: not a 3D scalar volume (size {'x'.join(map(str, dims))}, "
                             f"{scalars.GetNumberOfComponents()} components)")
    arr = numpy_support.vtk_to_numpy(scalars).reshape(dims[::-1]).astype(np.float32)
    m = vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    lps = FLIP @ _to_numpy(m)[:3]
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps[:, :3] / spacing).ravel().tolist())
    image.SetOrigin(lps[:, 3].tolist())
    return image


def peak_ras(volume_node) -> tuple[float, float, float]:
    """RAS position of a volume's maximum (e.g. the Grad-CAM peak), in its own coordinates."""
    data = volume_node.GetImageData()
    dims = data.GetDimensions()
    arr = numpy_support.vtk_to_numpy(data.GetPointData().GetScalars()).reshape(dims[::-1])
    k, j, i = np.unravel_index(int(np.argmax(arr)), arr.shape)
    m = vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return tuple(float(v) for v in (_to_numpy(m) @ [i, j, k, 1.0])[:3])  # type: ignore[return-value]


# ------------------------------------------------------------------------------- studies


def _ensure_grey(scene) -> None:
    """Volumes are displayed with Slicer's grey table; a bare scene (pytest, the CLI) lacks it.

    Added the way Slicer's colour logic does (a singleton not saved with the scene), so a saved
    scene opened in Slicer uses Slicer's own.
    """
    if scene.GetNodeByID(GREY_ID) is None:
        grey = slicer.vtkMRMLColorTableNode()
        grey.SetTypeToGrey()
        grey.SetSingletonTag(grey.GetTypeAsString())
        grey.SaveWithSceneOff()
        grey.HideFromEditorsOn()
        scene.AddNode(grey)


def _set_storage(scene, node, cls: str, file: Path | str):
    storage = node.GetStorageNode()
    if storage is None or storage.GetClassName() != cls:
        storage = scene.AddNewNodeByClass(cls)
        node.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(Path(file).absolute()))
    return storage


def load_volume(scene, path: Path | str, name: str, node=None):
    """Read a volume file into a scalar volume node (a new one, or ``node``) through its storage
    node, as Slicer does."""
    path = Path(path)
    if not path.is_file():
        raise RANOInputError(f"{path}: file not found")
    new = node is None
    node = node or scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = _set_storage(scene, node, "vtkMRMLVolumeArchetypeStorageNode", path)
    if not storage.ReadData(node) or node.GetImageData() is None:
        if new:
            scene.RemoveNode(storage)
            scene.RemoveNode(node)
        raise RANOInputError(f"{path}: unreadable image")
    if node.GetDisplayNode() is None:
        _add_display(scene, node)
    return node


def load_study_nodes(scene, folder: Path | str, modalities: Sequence[str], study_name: str,
                     missing_ok: bool = False, reuse: bool = False) -> dict[str, Any]:
    """Load one study folder's modality files as volume nodes named ``"<study_name> <modality>"``.

    Files are found exactly as ``predict`` finds them (:func:`io.find_modality_file`); a folder of
    DICOM files goes through :func:`studies.load_study` as in ``predict`` (same series, same
    checks), each image becoming a node without a storage file. A missing modality is an error
    naming the folder, unless ``missing_ok`` (then it is left out). Each node is tagged
    ``RANOResponse.study = "<study_name>:<modality>"``; with ``reuse`` the node an earlier load
    tagged so is read again instead of a new one being added (a panel stepping through cases keeps
    one node per study and modality). All files are found (DICOM: all series read) before any node
    is touched.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise RANOInputError(f"{folder}: study folder not found")
    if not is_file_study(folder, modalities) and contains_dicom(folder):
        return _dicom_study_nodes(scene, load_study(folder, modalities, missing_ok=missing_ok), study_name, reuse)
    paths = {}
    for m in modalities:
        path = find_modality_file(folder, m)
        if path is None:
            if missing_ok:
                continue
            raise RANOInputError(f"{folder}: missing modality {m} (expected {m}.nii.gz, .nii or .nrrd)")
        paths[m] = path
    nodes = {}
    for m, path in paths.items():
        tag = f"{study_name}:{m}"
        previous = find_study_node(scene, tag) if reuse else None
        nodes[m] = load_volume(scene, path, f"{study_name} {m}", node=previous)
        nodes[m].SetAttribute(STUDY, tag)
    return nodes


def _dicom_study_nodes(scene, study: Study, study_name: str, reuse: bool) -> dict[str, Any]:
    """Nodes for the images of a DICOM study (they have no file of their own to refer to)."""
    nodes = {}
    for m, image in study.images.items():
        tag = f"{study_name}:{m}"
        previous = find_study_node(scene, tag) if reuse else None
        if previous is not None and previous.GetStorageNode() is not None:
            # the node held a file-based study before: a saved scene must not refer to that file
            storage = previous.GetStorageNode()
            previous.SetAndObserveStorageNodeID(None)
            scene.RemoveNode(storage)
        nodes[m] = image_to_node(scene, image, f"{study_name} {m}", node=previous)
        nodes[m].SetAttribute(STUDY, tag)
    return nodes


def find_study_node(scene, tag: str):
    """The scalar volume node :func:`load_study_nodes` tagged ``tag`` (``"<study>:<modality>"``), or None."""
    for node in _nodes(scene, "vtkMRMLScalarVolumeNode"):
        if node.GetAttribute(STUDY) == tag:
            return node
    return None


def _present(nodes: Mapping[str, Any] | None) -> dict[str, Any]:
    return {m: n for m, n in (nodes or {}).items() if n is not None}


def study_from_nodes(nodes: Mapping[str, Any], name: str) -> Study:
    """The core's :class:`~RANOResponseLib.io.Study` from volume nodes already in a scene.

    Voxels and geometry come from the nodes (RAS converted to LPS; parent transforms not applied,
    see :func:`node_to_image`); each image gets the checks ``read_study`` applies to files.
    ``Study.folder`` is ``Path(name)``; ``files`` are the nodes' storage files where they have one.
    """
    images, files = {}, {}
    for m, node in _present(nodes).items():
        label = f"{name} {m} ({node.GetName()})"
        image = node_to_image(node)
        arr = sitk.GetArrayViewFromImage(image)
        if not np.isfinite(arr).all():
            raise RANOInputError(f"{label}: contains {int((~np.isfinite(arr)).sum())} NaN or infinite voxels")
        if arr.min() == arr.max():
            raise RANOInputError(f"{label}: empty image (every voxel is {float(arr.min()):g})")
        images[m] = image
        storage = node.GetStorageNode()
        if storage is not None and storage.GetFileName():
            files[m] = Path(storage.GetFileName())
    if not images:
        raise RANOInputError(f"{name}: no volume nodes given")
    return Study(folder=Path(name), images=images, files=files)


def export_study_nodes(nodes: Mapping[str, Any], folder: Path | str) -> dict[str, Path]:
    """Write each node as ``folder/<modality>.nii.gz`` through a volume storage node (so the
    geometry is converted exactly as Slicer saves it); a study folder ``predict`` can read.

    The nodes keep their own storage nodes; each file appears atomically. Parent transforms are
    not applied (the file is the node's own image, as in :func:`node_to_image`).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for m, node in _present(nodes).items():
        path = folder / f"{m}.nii.gz"
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetUseCompression(1)
        with atomic_file(path) as tmp:
            storage.SetFileName(str(tmp))
            if not storage.WriteData(node):
                raise RANOInputError(f"{path}: could not write volume {node.GetName()}")
        written[m] = path
    return written


# ----------------------------------------------------------------------------- transform


def transform_to_ras_matrix(transform: sitk.Transform) -> np.ndarray:
    """The 4x4 RAS matrix of a linear SimpleITK transform; kept in ITK's direction (baseline ->
    follow-up), i.e. what Slicer calls the follow-up's transform *from parent*.

    Works for any linear transform type (Euler, versor, affine, composites of those): the matrix
    is read off the images of the origin and the unit vectors and checked on other points.
    """
    o = np.array(transform.TransformPoint((0.0, 0.0, 0.0)))
    a = np.stack([np.array(transform.TransformPoint(tuple(e))) - o for e in np.eye(3)], axis=1)
    probe = np.array([[37.0, -55.0, 81.0], [-120.0, 64.0, -9.0]])
    if any(np.abs(np.array(transform.TransformPoint(tuple(p))) - (a @ p + o)).max() > 1e-4 for p in probe):
        raise RANOInputError(f"{transform.GetName()}: not a linear transform")
    lps = np.eye(4)
    lps[:3, :3], lps[:3, 3] = a, o
    f = np.diag([-1.0, -1.0, 1.0, 1.0])
    return f @ lps @ f


def add_transform_node(scene, transform: sitk.Transform | Path | str, name: str,
                       file: Path | str | None = None, node=None):
    """A linear transform node holding the follow-up -> baseline registration.

    ``transform`` is the registration's ITK transform (baseline point -> follow-up point) or a
    ``.tfm``/``.h5`` file of it (read by Slicer's transform storage node). Follow-up volumes that
    observe the node (``SetAndObserveTransformNodeID``) appear aligned with the baseline in RAS.
    Nothing is hardened: the user can still edit or remove the transform (see :func:`harden`).
    ``file``: a file holding the same transform, referred to when the scene is saved.
    """
    node = node or scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    if isinstance(transform, (str, Path)):
        path = Path(transform)
        if not path.is_file():
            raise RANOInputError(f"{path}: transform file not found")
        storage = _set_storage(scene, node, "vtkMRMLTransformStorageNode", path)
        if not storage.ReadData(node) or not node.IsLinear():
            raise RANOInputError(f"{path}: not a readable linear transform")
    else:
        node.SetMatrixTransformFromParent(_to_vtk(transform_to_ras_matrix(transform)))
        if file is not None:
            _set_storage(scene, node, "vtkMRMLTransformStorageNode", file)
    return node


def harden(scene, node) -> bool:
    """Apply a node's parent transform to its data for good (Slicer's "Harden transform", the
    node's own ``HardenTransform``, which ``vtkSlicerTransformLogic.hardenTransform`` now calls).
    ``scene`` is the node's scene (kept for a uniform signature)."""
    if node.GetParentTransformNode() is None:
        return True
    return bool(node.HardenTransform())


# ------------------------------------------------------------------------------------ ROI


def _as_image(reference, spec: InputSpec) -> sitk.Image:
    if isinstance(reference, Study):
        return reference.images[spec.reference_modality]
    if isinstance(reference, sitk.Image):
        return reference
    return node_to_image(reference)


def add_roi(scene, center_ras: Sequence[float], size_mm: Sequence[float], name: str, node=None):
    """An axis-aligned box ROI of fixed size: only its translation handles are shown, since the
    model's field of view cannot change."""
    node = node or scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    node.SetCenter(*[float(v) for v in center_ras])
    node.SetSize(*[float(v) for v in size_mm])
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetScaleHandleVisibility(False)
    display.SetRotationHandleVisibility(False)
    return node


def fit_roi(scene, reference, spec: InputSpec, name: str, center_ras: Sequence[float] | None = None,
            node=None):
    """A box ROI where ``predict`` crops: the model grid's field of view (``size * spacing`` mm),
    centred like :func:`~RANOResponseLib.preprocessing.model_grid` (on the brain of
    ``reference``: the baseline reference volume node, a Study or an image), or at ``center_ras``.
    Move it and pass :func:`roi_center` to ``predict`` (``--roi-center``) to crop elsewhere."""
    center = None if center_ras is None else ras_to_lps(center_ras)
    grid = model_grid(_as_image(reference, spec), spec.spacing, spec.size, center)
    fov = np.array(spec.size, float) * np.array(spec.spacing, float)
    return add_roi(scene, lps_to_ras(grid_center(grid)), fov, name, node)


def roi_center(roi_node) -> tuple[float, float, float]:
    """The ROI's centre in world RAS mm (what ``--roi-center`` and ``predict_pair`` take)."""
    c = [0.0, 0.0, 0.0]
    roi_node.GetCenterWorld(c)
    return (float(c[0]), float(c[1]), float(c[2]))


# ----------------------------------------------------------------------------------- maps


def heat_color_node(scene, kind: str):
    """The colour table for a map kind (Grad-CAM: inferno, saliency: viridis, from matplotlib:
    perceptually uniform), transparent below :data:`MAP_THRESHOLD`.

    (Slicer's slice views blend a layer by its threshold and the view's opacity, not by table
    alpha; the threshold set by :func:`style_map` is what hides weak attribution there.)
    Built once per scene (found again by name); saved with the scene as a ``.ctbl``.
    """
    import matplotlib

    label, cmap_name = MAP_KINDS[kind]
    name = f"RANOResponse {label} ({cmap_name})"
    found = scene.GetFirstNodeByName(name)
    if found is not None and found.IsA("vtkMRMLColorTableNode"):
        return found
    cmap = matplotlib.colormaps[cmap_name]
    node = slicer.vtkMRMLColorTableNode()
    node.SetName(name)
    node.SetTypeToUser()
    node.SetNumberOfColors(256)
    for i in range(256):
        x = i / 255
        r, g, b, _ = cmap(x)
        node.SetColor(i, f"{x:.3f}", r, g, b, 1.0 if x >= MAP_THRESHOLD else 0.0)
    node.SetAttribute(ROLE, f"colors:{kind}")
    node.HideFromEditorsOff()  # listed in the Colors module like any table a user made
    scene.AddNode(node)
    return node


def style_map(scene, node, kind: str) -> None:
    """Display a 0..1 map so a radiologist can read it over the anatomy: the kind's heat colours
    over 0..1 and values below :data:`MAP_THRESHOLD` hidden (lower threshold)."""
    colors = heat_color_node(scene, kind)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    d = node.GetDisplayNode()
    d.SetAndObserveColorNodeID(colors.GetID())
    d.AutoWindowLevelOff()
    d.SetWindowLevelMinMax(0.0, 1.0)
    d.AutoThresholdOff()
    d.SetLowerThreshold(MAP_THRESHOLD)
    d.SetUpperThreshold(1e6)
    d.ApplyThresholdOn()
    d.SetInterpolate(1)


def add_map_node(scene, image: sitk.Image | Path | str, name: str, kind: str = "gradcam",
                 file: Path | str | None = None, node=None, share: bool = False):
    """A map (``predict``'s saliency or Grad-CAM, on the baseline reference grid) as a volume
    node styled by :func:`style_map`; ``image`` is the map or its file (``file``, ``share``: see
    :func:`image_to_node`)."""
    if kind not in MAP_KINDS:
        raise ValueError(f"unknown map kind {kind!r}; expected one of {', '.join(MAP_KINDS)}")
    if isinstance(image, (str, Path)):
        node = load_volume(scene, image, name, node=node)
    else:
        node = image_to_node(scene, image, name, file=file, node=node, share=share, window=(0.0, 1.0))
    style_map(scene, node, kind)
    node.SetAttribute("RANOResponse.map", kind)
    return node


# ---------------------------------------------------------------------------------- views


def ensure_slice_views(scene) -> list[str]:
    """Make sure the scene has Slicer's Red (axial), Yellow (sagittal) and Green (coronal) slice
    views with their composite nodes; returns the layout names that had to be created (none in
    Slicer itself; all three in a bare scene, e.g. one about to be saved by ``predict``)."""
    default = scene.GetDefaultNodeByClass("vtkMRMLSliceNode")
    if default is None or not default.HasSliceOrientationPreset("Axial"):
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    created = []
    for layout, orientation, label, colour in VIEWS:
        if _slice_node(scene, layout) is None:
            node = scene.AddNewNodeByClass("vtkMRMLSliceNode", layout)
            node.SetLayoutName(layout)
            node.SetLayoutLabel(label)
            node.SetLayoutColor(colour)
            node.SetSingletonTag(layout)
            node.SetOrientation(orientation)
            node.SetDefaultOrientation(orientation)
            node.SetDimensions(512, 512, 1)
            created.append(layout)
        if _composite_node(scene, layout) is None:
            composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
            composite.SetLayoutName(layout)
            composite.SetSingletonTag(layout)
    return created


def _slice_node(scene, layout: str):
    for node in _nodes(scene, "vtkMRMLSliceNode"):
        if node.GetLayoutName() == layout:
            return node
    return None


def _composite_node(scene, layout: str):
    for node in _nodes(scene, "vtkMRMLSliceCompositeNode"):
        if node.GetLayoutName() == layout:
            return node
    return None


def _nodes(scene, cls: str) -> list:
    collection = scene.GetNodesByClass(cls)
    return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]


def _id(node) -> str | None:
    if node is None:
        return None
    return node if isinstance(node, str) else node.GetID()


def show_overlay(scene, background_node, foreground_node, opacity: float = 0.4) -> list:
    """Show ``foreground_node`` (a map) at ``opacity`` over ``background_node`` in every slice
    view of the scene (the three standard views are created if the scene has none).
    Returns the composite nodes. ``foreground_node`` may be None (anatomy only)."""
    ensure_slice_views(scene)
    composites = _nodes(scene, "vtkMRMLSliceCompositeNode")
    for c in composites:
        c.SetBackgroundVolumeID(_id(background_node))
        c.SetForegroundVolumeID(_id(foreground_node))
        c.SetForegroundOpacity(float(opacity))
    return composites


def jump_slices(scene, ras: Sequence[float]) -> None:
    """Move every slice view to the planes through ``ras`` (in-plane position unchanged)."""
    for node in _nodes(scene, "vtkMRMLSliceNode"):
        node.JumpSliceByOffsetting(*[float(v) for v in ras])


class slice_logic:
    """Context manager: a ``vtkMRMLSliceLogic`` for one slice node; on exit the helper nodes
    the logic adds to the scene (slice model, its display and transform) are removed again."""

    def __init__(self, scene, slice_node):
        self.scene, self.slice_node = scene, slice_node

    def __enter__(self):
        self.before = {self.scene.GetNthNode(i).GetID() for i in range(self.scene.GetNumberOfNodes())}
        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLScene(self.scene)
        self.logic.SetSliceNode(self.slice_node)
        return self.logic

    def __exit__(self, *exc) -> None:
        self.logic.SetSliceNode(None)
        self.logic.SetMRMLScene(None)
        added = [self.scene.GetNthNode(i) for i in range(self.scene.GetNumberOfNodes())]
        for node in added:
            if node.GetID() not in self.before and not node.GetSaveWithScene():
                self.scene.RemoveNode(node)


def fit_slice_views(scene, layouts: Sequence[str] | None = None) -> None:
    """Fit the slice views' field of view to their background volume (Slicer's "reset view")."""
    for layout, *_ in VIEWS:
        node = _slice_node(scene, layout)
        if node is not None and (layouts is None or layout in layouts):
            with slice_logic(scene, node) as logic:
                logic.FitSliceToBackground()


# ----------------------------------------------------------------------------- brain mask


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
    if segmentations or measured is not None:
        from RANOResponseLib.mrml.measurement_scene import add_pair_lines
        from RANOResponseLib.mrml.tumour_scene import NODE_NAMES, SEGMENTATION_ROLES, add_tumour_segmentation

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


def populate_scene(scene, result, baseline_nodes: Mapping[str, Any] | None = None,
                   followup_nodes: Mapping[str, Any] | None = None, files: Mapping[str, Path] | None = None,
                   roi=None) -> SceneNodes:
    """Put a finished in-memory prediction (:class:`~RANOResponseLib.pipeline.PairResult`) into
    ``scene``. Study volumes are created from ``result``'s images unless nodes are given (named
    ``"baseline <modality>"`` and ``"follow-up <modality>"``, referring to their study files).
    ``files``: files already written for ``"transform"``, ``"gradcam"``, ``"saliency"``, so a
    saved scene refers to them instead of writing copies (so do study volumes read from a file as
    they are; sequences resampled onto the reference grid are new images). The baseline brain
    mask becomes a segmentation node, and so do both tumour segmentations, with the measured
    lesions' diameters as lines."""
    files = dict(files or {})

    def volumes(timepoint: str, label: str) -> dict[str, Any]:
        study: Study = getattr(result, timepoint)
        same = result.image_files(timepoint)
        return {m: image_to_node(scene, img if m in same else _display_copy(img), f"{label} {m}", file=same.get(m),
                                 share=True)
                for m, img in study.images.items()}

    base = _present(baseline_nodes) or volumes("baseline", "baseline")
    fu = _present(followup_nodes) or volumes("followup", "follow-up")
    brain = result.brains["baseline"].image if "baseline" in result.brains else None
    segmentations = {tp: s.image for tp, s in result.segmentations.items()}
    return assemble(scene, result.summary(), base, fu, result.registration.transform, result.maps,
                    files=files, roi=roi, brain_mask=brain, segmentations=segmentations,
                    measured=result.pair_measurement)


def _display_copy(image: sitk.Image) -> sitk.Image:
    """The scene's own copy of a study image that no file holds (a DICOM series, a sequence
    resampled onto its study's reference grid): 16-bit integers when its values span at least
    MR's usual range of hundreds of levels and fit (rounding then changes them by under 0.2 %),
    else as it is. A saved scene compresses a quarter of the bytes (0.6 s instead of 2.1 s for a
    1 mm head on 2 cores, eight of them in a DICOM pair's scene)."""
    arr = sitk.GetArrayViewFromImage(image)
    lo, hi = float(arr.min()), float(arr.max())
    if max(abs(lo), abs(hi)) < 255 or lo < -32768 or hi > 32767:
        return image
    return sitk.Cast(sitk.Round(image), sitk.sitkInt16)


def load_outputs(scene, out_dir: Path | str, baseline_nodes: Mapping[str, Any] | None = None,
                 followup_nodes: Mapping[str, Any] | None = None, roi=None) -> SceneNodes:
    """Put a ``rano-response predict`` output folder (prediction.json, maps, transform, brain
    mask, tumour segmentations and their measurement) into ``scene`` — what the Slicer module does
    after running ``predict`` in a child process. The segmentations are read into memory (the
    nodes keep no link to the folder's files).

    Without nodes, the studies are loaded from the inputs named in prediction.json: files as
    they are, DICOM series (``inputs.studies.<timepoint>.sequences``) by their series UID. Each
    volume appears in its own acquisition space.
    """
    # imported here: the pipeline imports torch, which the rest of the scene code does not need
    from RANOResponseLib.imaging.studies import load_study
    from RANOResponseLib.core.outputs import read_prediction

    out = Path(out_dir)
    summary = read_prediction(out)
    outputs = summary.get("outputs", {})
    inputs = summary.get("inputs", {})

    def volumes(key: str, label: str) -> dict[str, Any]:
        sources = inputs.get("studies", {}).get(key, {}).get("sequences", {})
        nodes = {}
        for m, path in inputs.get(key, {}).items():
            src = sources.get(m, {}).get("source", {})
            if src.get("kind") == "dicom":
                image = load_study(src["path"], [m], series={m: src["series_uid"]}).images[m]
                nodes[m] = image_to_node(scene, image, f"{label} {m}")
            else:
                nodes[m] = load_volume(scene, path, f"{label} {m}")
        return nodes

    base = _present(baseline_nodes) or volumes("baseline", "baseline")
    fu = _present(followup_nodes) or volumes("followup", "follow-up")
    transform = out / outputs.get("transform", "followup_to_baseline.tfm")
    maps = {k: out / outputs[k] for k in MAP_KINDS if k in outputs}
    brain = out / outputs["brain_mask"] if "brain_mask" in outputs else None
    from RANOResponseLib.mrml.tumour_scene import SEGMENTATION_ROLES, measured_pair

    segmentations = {tp: sitk.ReadImage(str(out / outputs[key])) for tp, key in SEGMENTATION_ROLES.items()
                     if key in outputs}
    return assemble(scene, summary, base, fu, transform, maps, roi=roi, brain_mask=brain,
                    segmentations=segmentations, measured=measured_pair(summary))


# ------------------------------------------------------------------------------ scene files

_EXTENSIONS = {"vtkMRMLVolumeArchetypeStorageNode": ".nii.gz", "vtkMRMLTransformStorageNode": ".tfm",
               "vtkMRMLTableStorageNode": ".tsv", "vtkMRMLColorTableStorageNode": ".ctbl"}


def _file_name(node, storage, used: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", node.GetName() or node.GetID()).strip("_") or node.GetID()
    ext = _EXTENSIONS.get(storage.GetClassName())
    if ext is None:
        ext = "." + (storage.GetDefaultWriteFileExtension() or "dat")
    name, n = stem + ext, 1
    while name.lower() in used:
        n += 1
        name = f"{stem}_{n}{ext}"
    used.add(name.lower())
    return name


def write_scene(scene, path: Path | str, copy_data: bool = True) -> Path:
    """Save ``scene`` as a ``.mrml`` file with its data files beside it, or as one ``.mrb``.

    ``.mrml``: every node with data is written next to the file (NIfTI volumes, ``.tfm``
    transforms, ``.tsv`` tables, ``.mrk.json`` markups, ``.ctbl`` colour tables) and referred to
    by a relative file name. With ``copy_data=False`` a node whose storage node already names an
    existing file keeps referring to it (``predict`` uses this for its inputs, maps and
    transform, so saving costs no re-encoding). ``.mrb``: Slicer's self-contained bundle
    (``vtkMRMLScene.WriteToMRB``). The scene file itself appears atomically.
    """
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".mrb":
        # staged under its own name in a private folder (the bundle's inner folder is named
        # after the file, and MRML refuses io.atomic_file's hidden ".name" form), then renamed
        stage = Path(tempfile.mkdtemp(prefix=f".{path.stem}.partial-", dir=path.parent))
        try:
            if not scene.WriteToMRB(str(stage / path.name)):
                raise RANOInputError(f"{path}: could not write the scene bundle")
            os.replace(stage / path.name, path)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return path
    if path.suffix.lower() != ".mrml":
        raise RANOInputError(f"{path}: a scene file must end in .mrml or .mrb")
    register_storage_classes(scene)
    _label_version(scene)
    used: set[str] = {path.name.lower()}
    for node in _nodes(scene, "vtkMRMLStorableNode"):
        if not node.GetSaveWithScene():
            continue
        storage = node.GetStorageNode()
        current = storage.GetFileName() if storage is not None else None
        if current and Path(current).is_file() and not copy_data:
            continue
        if storage is None:
            node.AddDefaultStorageNode()
            storage = node.GetStorageNode()
            if storage is None:  # a node that stores nothing
                continue
        if storage.IsA("vtkMRMLVolumeArchetypeStorageNode"):
            storage.SetUseCompression(1)
        target = path.parent / _file_name(node, storage, used)
        storage.SetFileName(str(target))
        if not storage.WriteData(node):
            raise RANOInputError(f"{target}: could not write {node.GetName()}")
    # The XML is made in memory and written atomically by us: Commit() to a file would also move
    # hidden storable nodes into a "<scene name>_Private" folder (data already written above).
    scene.SetRootDirectory(str(path.parent))
    scene.SetURL(str(path))
    scene.SetSaveToXMLString(1)
    try:
        if not scene.Commit():
            raise RANOInputError(f"{path}: could not write the scene")
        write_text(scene.GetSceneXMLString(), path)
    finally:
        scene.SetSaveToXMLString(0)
    return path


def _label_version(scene) -> None:
    """The slicer-core wheel labels scenes "slicer-core 4.0.0 0", which Slicer reports on loading
    as written by another application that "may not load correctly". The wheel is Slicer's own
    MRML at a known revision (its version 5.13.31053 is Slicer 5.13, revision 31053), so a scene
    it writes is labelled the way that Slicer labels its own. Scenes of Slicer itself are left as
    they are."""
    current = scene.GetVersion() or ""
    if not current.startswith("slicer-core"):
        return
    try:
        from importlib.metadata import version

        major, minor, revision = version("slicer-core").split(".")[:3]
    except Exception:  # noqa: BLE001 - not the wheel, or an unexpected version: keep the label
        return
    scene.SetVersion(f"Slicer {int(major)}.{int(minor)}.0 {int(revision)}")


def register_storage_classes(scene) -> None:
    """Markups storage nodes are registered by Slicer's Markups module, absent in a bare scene:
    without them an ROI would be saved without its box."""
    for cls in ("vtkMRMLMarkupsJsonStorageNode", "vtkMRMLMarkupsROIJsonStorageNode",
                "vtkMRMLMarkupsPlaneJsonStorageNode"):
        probe = scene.CreateNodeByClass(cls)
        if probe is None:
            scene.RegisterNodeClass(getattr(slicer, cls)())
        else:
            probe.UnRegister(None)


def new_scene():
    """An empty scene with what Slicer's application would provide: the grey colour table, the
    slice orientation presets and the markups storage classes (enough to show, render and save)."""
    scene = slicer.vtkMRMLScene()
    _ensure_grey(scene)
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    register_storage_classes(scene)
    selection = slicer.vtkMRMLSelectionNode()  # markups look up their length unit through it
    selection.SetSingletonTag("Singleton")
    selection.SaveWithSceneOff()
    scene.AddNode(selection)
    return scene


@contextlib.contextmanager
def quiet_vtk() -> Iterator[None]:
    """Silence VTK/MRML error and warning messages on stderr for the block (a command line tool's
    stderr carries its progress and its one-line errors; failures are detected by return value)."""
    warn = vtkObject.GetGlobalWarningDisplay()
    vtkObject.GlobalWarningDisplayOff()
    try:
        yield
    finally:
        vtkObject.SetGlobalWarningDisplay(warn)


def read_scene(path: Path | str):
    """Read a ``.mrml`` (with its data files) or ``.mrb`` into a new scene (see :func:`new_scene`).

    A ``.mrb`` is unpacked into a temporary folder that is removed once its data are read (MRML's
    own ReadFromMRB needs the application's cache manager); its nodes hold their data in memory.
    """
    path = Path(path).absolute()
    if not path.is_file():
        raise RANOInputError(f"{path}: scene file not found")
    scene = new_scene()
    if path.suffix.lower() != ".mrb":
        scene.SetURL(str(path))
        if not scene.Import():
            raise RANOInputError(f"{path}: could not read the scene")
        return scene
    with tempfile.TemporaryDirectory(prefix="rano-mrb-") as tmp:
        try:
            with zipfile.ZipFile(path) as bundle:
                bundle.extractall(tmp)
        except (zipfile.BadZipFile, OSError) as e:
            raise RANOInputError(f"{path}: not a readable scene bundle ({e})") from None
        mrml = sorted(Path(tmp).rglob("*.mrml"))
        if not mrml:
            raise RANOInputError(f"{path}: the bundle holds no .mrml scene")
        scene.SetURL(str(mrml[0]))
        if not scene.Import():
            raise RANOInputError(f"{path}: could not read the scene")
    return scene
