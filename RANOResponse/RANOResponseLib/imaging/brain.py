"""Brain masks without a network: skull-stripped images, mask files, volumes.

A skull-stripped image (LUMIERE, BraTS, the phantom) has no skull or scalp: what is bright is one
brain-sized blob. Two kinds are recognised:

- an exact background (0 after stripping) over a large part of the field of view, the rest
  brain-sized: the mask is everything that is not background;
- a noisy background (a stripped image resampled, or with noise added, so that ``image != 0``
  covers the whole field of view): the intensity foreground (Otsu on a lightly smoothed copy) is
  one brain-sized blob with nothing bright around it, where a full head's foreground (scalp, fat,
  muscle, face) measures litres. The mask is that blob, closed and filled.

Everything else, full heads in particular, goes to the network
(:mod:`RANOResponseLib.model.brain_extraction`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.imaging.geometry import same_space, shrink_to
from RANOResponseLib.imaging.io import image_from_voxels, read_voxels

STRIPPED_MIN_BACKGROUND = 0.25  # fraction of the field of view at the background value
STRIPPED_BRAIN_ML = (400.0, 2500.0)  # a stripped brain (with lesions, cavities, CSF); a head is larger
NOISY_CHECK_MM = 3.0  # the noisy-background check runs on a copy this coarse (a tenth of a second)
NOISY_STRAY_FRACTION = 0.02  # bright voxels away from the blob, as a fraction of it: a head has far more


def _background_value(arr: np.ndarray) -> float:
    """The most common value on the faces of the volume (where the background is)."""
    faces = np.concatenate([arr[[0, -1]].ravel(), arr[:, [0, -1]].ravel(), arr[:, :, [0, -1]].ravel()])
    values, counts = np.unique(faces, return_counts=True)
    return float(values[int(np.argmax(counts))])


def _voxel_ml(image: sitk.Image) -> float:
    return float(np.prod(image.GetSpacing())) / 1000.0


def _intensity_foreground(image: sitk.Image) -> tuple[np.ndarray, float, float]:
    """The largest bright blob of ``image`` (Otsu on a copy smoothed by one voxel), its volume in ml,
    and the volume of bright voxels more than two voxels away from it."""
    smooth = sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), float(min(image.GetSpacing())))
    bright = sitk.GetArrayFromImage(sitk.OtsuThreshold(smooth, 0, 1)).astype(bool)
    labels, n = ndimage.label(bright)
    if n == 0:
        return bright, 0.0, 0.0
    sizes = ndimage.sum(bright, labels, range(1, n + 1))
    blob = labels == 1 + int(np.argmax(sizes))
    stray = bright & ~ndimage.binary_dilation(blob, iterations=2)
    return blob, float(blob.sum()) * _voxel_ml(image), float(stray.sum()) * _voxel_ml(image)


def stripped_kind(image: sitk.Image) -> str | None:
    """``"exact"`` (a background of one exact value), ``"noisy"`` (a noisy background around one
    brain-sized blob) or None (not skull-stripped)."""
    arr = sitk.GetArrayViewFromImage(image)
    background = arr == _background_value(arr)
    volume = float((~background).sum()) * _voxel_ml(image)
    if background.mean() >= STRIPPED_MIN_BACKGROUND and STRIPPED_BRAIN_ML[0] <= volume <= STRIPPED_BRAIN_ML[1]:
        return "exact"
    if volume < STRIPPED_BRAIN_ML[0]:
        return None  # not even a brain's worth of signal
    coarse = shrink_to(image, NOISY_CHECK_MM) if max(image.GetSpacing()) < NOISY_CHECK_MM else image
    _, blob_ml, stray_ml = _intensity_foreground(coarse)
    if STRIPPED_BRAIN_ML[0] <= blob_ml <= STRIPPED_BRAIN_ML[1] and stray_ml <= NOISY_STRAY_FRACTION * blob_ml:
        return "noisy"
    return None


def is_skull_stripped(image: sitk.Image) -> bool:
    """Whether ``image`` is already skull-stripped, with an exact or a noisy background (see the
    module docstring). A full head, an empty image or a speck are not."""
    return stripped_kind(image) is not None


def mask_from_stripped(image: sitk.Image, kind: str | None = None) -> sitk.Image:
    """The brain mask of a skull-stripped image: uint8 (0/1) with enclosed background (dark
    cavities, zeros inside the brain) filled. With an exact background: everything that is not
    background; with a noisy one: the intensity foreground's brain blob, closed by one voxel.
    ``kind``: :func:`stripped_kind` of ``image`` when the caller has it already."""
    arr = sitk.GetArrayViewFromImage(image)
    if (kind or stripped_kind(image)) == "noisy":
        blob, _, _ = _intensity_foreground(image)
        inside = ndimage.binary_closing(blob, iterations=1)
    else:
        inside = arr != _background_value(arr)
    mask = sitk.GetImageFromArray(inside.astype(np.uint8))
    mask.CopyInformation(image)
    return sitk.BinaryFillhole(mask, fullyConnected=False, foregroundValue=1)


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
