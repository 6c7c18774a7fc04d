"""Where the follow-up and the crop sit: the registration as a transform node, and the crop ROI.

Owns the conversion of ``predict``'s registration (an ITK transform, baseline -> follow-up, LPS)
into a linear transform node the follow-up volumes observe (:func:`transform_to_ras_matrix`,
:func:`add_transform_node`; see :mod:`~RANOResponseLib.mrml.scene` for the directions), hardening
it (:func:`harden`), and the box ROI of the model's field of view (:func:`add_roi`,
:func:`fit_roi`, :func:`roi_center`: what ``--roi-center`` takes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.imaging.geometry import grid_center, lps_to_ras, model_grid, ras_to_lps
from RANOResponseLib.imaging.io import Study
from RANOResponseLib.imaging.preprocessing import InputSpec
from RANOResponseLib.mrml.volumes import _set_storage, _to_vtk, node_to_image


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
    centred like :func:`~RANOResponseLib.imaging.geometry.model_grid` (on the brain of
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
