"""Volume nodes: images and study folders in a scene, and the helpers every scene module shares.

Owns the LPS (SimpleITK) <-> RAS (MRML) conversion of voxel grids (:func:`ijk_to_ras`,
:func:`image_to_node`, :func:`node_to_image`), reading volume files through storage nodes
(:func:`load_volume`), study folders as tagged volume nodes and back (:func:`load_study_nodes`,
:func:`study_from_nodes`, :func:`export_study_nodes`), and the node attributes that say what a
node is (:data:`ROLE`, :data:`CASE`, :data:`STUDY`). Everything else in the scene code builds on
this module; it imports no other ``mrml`` module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import slicer
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonDataModel import vtkImageData
from vtkmodules.vtkCommonMath import vtkMatrix4x4

from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.files import atomic_file
from RANOResponseLib.core.styles import display_window
from RANOResponseLib.imaging.dicom import contains_dicom
from RANOResponseLib.imaging.io import Study, find_modality_file
from RANOResponseLib.imaging.studies import is_file_study, load_study

FLIP = np.diag([-1.0, -1.0, 1.0])  # LPS <-> RAS, its own inverse
GREY_ID = "vtkMRMLColorTableNodeGrey"  # Slicer's built-in grey table, the volumes' default
ROLE = "RANOResponse.role"  # node attribute naming what a node is in a prediction
CASE = "RANOResponse.case"  # node attribute: the follow-up node (or folder) the outputs belong to
STUDY = "RANOResponse.study"  # node attribute of a loaded study volume: "<study>:<modality>"


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
    """The core's :class:`~RANOResponseLib.imaging.io.Study` from volume nodes already in a scene.

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



# ----------------------------------------------------------------------------- shared helpers


def _nodes(scene, cls: str) -> list:
    collection = scene.GetNodesByClass(cls)
    return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
