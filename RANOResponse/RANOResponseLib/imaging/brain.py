"""Brain masks without a network: skull-stripped images, mask files, volumes.

A skull-stripped image (LUMIERE, BraTS, the phantom) has a background of one exact value (0 after
stripping) over a large part of its field of view, and what is not background is brain-sized. A
full head is not brain-sized, and a real scan's background is noise, never one exact value: a
stripped image with noise added to its background is no longer stripped (its zeros are gone, so
``image != 0`` would cover the field of view). Unstripped images go to the network
(:mod:`RANOResponseLib.model.brain_extraction`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.imaging.io import image_from_voxels, read_voxels

STRIPPED_MIN_BACKGROUND = 0.25  # fraction of the field of view at the background value
STRIPPED_BRAIN_ML = (400.0, 2500.0)  # a stripped brain (with lesions, cavities, CSF); a head is larger


def _background_value(arr: np.ndarray) -> float:
    """The most common value on the faces of the volume (where the background is)."""
    faces = np.concatenate([arr[[0, -1]].ravel(), arr[:, [0, -1]].ravel(), arr[:, :, [0, -1]].ravel()])
    values, counts = np.unique(faces, return_counts=True)
    return float(values[int(np.argmax(counts))])


def _voxel_ml(image: sitk.Image) -> float:
    return float(np.prod(image.GetSpacing())) / 1000.0


def is_skull_stripped(image: sitk.Image) -> bool:
    """Whether ``image`` is already skull-stripped.

    True when at least :data:`STRIPPED_MIN_BACKGROUND` of the voxels hold exactly the background
    value (the most common value on the volume's faces) and the rest measures
    :data:`STRIPPED_BRAIN_ML` millilitres. A full head (too large), a stripped image with noise in
    its background (no exact background) or an empty image are not stripped.
    """
    arr = sitk.GetArrayViewFromImage(image)
    background = arr == _background_value(arr)
    fraction = float(background.mean())
    volume = float((~background).sum()) * _voxel_ml(image)
    return fraction >= STRIPPED_MIN_BACKGROUND and STRIPPED_BRAIN_ML[0] <= volume <= STRIPPED_BRAIN_ML[1]


def mask_from_stripped(image: sitk.Image) -> sitk.Image:
    """The brain mask of a skull-stripped image: uint8 (0/1), everything that is not background,
    with enclosed background (dark cavities, zeros inside the brain) filled."""
    arr = sitk.GetArrayViewFromImage(image)
    mask = sitk.GetImageFromArray((arr != _background_value(arr)).astype(np.uint8))
    mask.CopyInformation(image)
    return sitk.BinaryFillhole(mask, fullyConnected=False, foregroundValue=1)


def same_space(a: sitk.Image, b: sitk.Image, tolerance_mm: float = 1e-3) -> bool:
    """Whether two images share one voxel grid (size, spacing, origin, direction)."""
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=0, atol=tolerance_mm)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=tolerance_mm)
            and np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=1e-5))


def read_mask(path: Path | str, reference: sitk.Image) -> sitk.Image:
    """A brain mask file as uint8 (0/1: every non-zero voxel is brain) on ``reference``'s grid.

    Checked like every input (:func:`~RANOResponseLib.imaging.io.read_voxels`: readable, 3D, one
    component). A mask on another grid is resampled onto the reference (nearest neighbour, through
    physical space). An empty mask, or one that does not overlap the reference, is an error naming
    the file.
    """
    path = Path(path)
    arr, reader = read_voxels(path, "brain mask")
    if not np.isfinite(arr).all():
        raise RANOInputError(f"{path}: brain mask contains NaN or infinite voxels")
    if not (arr != 0).any():
        raise RANOInputError(f"{path}: empty brain mask (no non-zero voxel)")
    mask = image_from_voxels((arr != 0).astype(np.uint8), reader, dtype=np.uint8)
    if same_space(mask, reference):
        mask.CopyInformation(reference)  # equal within rounding: take the reference's exact geometry
        return mask
    mask = sitk.Resample(mask, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    if not sitk.GetArrayViewFromImage(mask).any():
        raise RANOInputError(f"{path}: brain mask does not overlap the image it belongs to")
    return mask


def mask_volume_ml(mask: sitk.Image) -> float:
    """The volume of a mask's non-zero voxels in millilitres."""
    return float(np.count_nonzero(sitk.GetArrayViewFromImage(mask))) * _voxel_ml(mask)
