"""Physical space: LPS <-> RAS, the model grid, resampling."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk

from RANOResponseLib.core.errors import RANOInputError


def ras_to_lps(point: Sequence[float]) -> tuple[float, float, float]:
    """A point in Slicer's RAS millimetres as an ITK/SimpleITK (LPS) physical point, and back:
    the two frames differ by the sign of x and y, so the conversion is its own inverse."""
    x, y, z = (float(v) for v in point)
    return (-x, -y, z)


lps_to_ras = ras_to_lps


def mask_center(mask: sitk.Image) -> tuple[float, float, float]:
    """The physical (LPS) centre of the axis-aligned box around a mask's non-zero voxel centres.

    The box is taken in physical space, so an obliquely stored brain gets the same centre as the
    same brain stored along the axes. Raises :class:`RANOInputError` for an empty mask (no brain
    to centre on)."""
    nz = np.nonzero(sitk.GetArrayViewFromImage(mask))
    if len(nz[0]) == 0:
        raise RANOInputError("reference image has no brain voxels")
    index = np.stack([nz[2], nz[1], nz[0]]).astype(np.float32)  # (x, y, z) voxel indices, one column each
    to_physical = np.array(mask.GetDirection(), float).reshape(3, 3) @ np.diag(mask.GetSpacing())
    offsets = to_physical.astype(np.float32) @ index  # physical point minus origin, per voxel
    centre = np.array(mask.GetOrigin()) + (offsets.min(1).astype(float) + offsets.max(1).astype(float)) / 2
    return tuple(float(v) for v in centre)  # type: ignore[return-value]


def model_grid(reference: sitk.Image, spacing: Sequence[float], size: Sequence[int],
               center: Sequence[float] | None = None) -> sitk.Image:
    """An empty image defining the model grid: ``size`` voxels of ``spacing`` mm, axis-aligned
    in LPS (identity direction), centred on ``center`` (an LPS physical point: the brain mask's
    :func:`mask_center`, or a crop ROI's centre from :func:`ras_to_lps`) or, without one, on the
    bounding box of the reference's non-zero voxels (a skull-stripped image's brain).

    The grid's orientation does not follow the reference's storage order, so the network sees
    the same anatomy orientation whether a study was stored RAS, LPS or oblique.
    """
    if center is None:
        centre = np.asarray(mask_center(reference), float)
    else:
        centre = np.asarray(center, float)
        if centre.shape != (3,) or not np.isfinite(centre).all():
            raise RANOInputError(f"crop centre {tuple(center)} is not a finite 3D point")
    half = (np.array(size, float) - 1) / 2 * np.array(spacing, float)
    grid = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    grid.SetSpacing([float(s) for s in spacing])
    grid.SetOrigin([float(v) for v in centre - half])
    return grid


def grid_center(grid: sitk.Image) -> tuple[float, float, float]:
    """The physical (LPS) centre of a grid: the point :func:`model_grid` centred it on."""
    return tuple(float(v) for v in grid.TransformContinuousIndexToPhysicalPoint(
        [(s - 1) / 2 for s in grid.GetSize()]))  # type: ignore[return-value]


def resample(image: sitk.Image, grid: sitk.Image, transform: sitk.Transform | None = None,
             interpolator: int = sitk.sitkLinear) -> sitk.Image:
    """Resample ``image`` onto ``grid`` through ``transform`` (grid points -> image points)."""
    return sitk.Resample(image, grid, transform or sitk.Transform(), interpolator, 0.0, sitk.sitkFloat32)


def shrink_to(image: sitk.Image, spacing_mm: float | Sequence[float]) -> sitk.Image:
    """Box-average by integer factors so the voxels approach ``spacing_mm`` (never finer).

    An exact, cheap anti-aliasing step before resampling onto a coarser grid (BinShrink keeps
    the physical geometry right); images already that coarse are returned as they are.
    """
    target = [spacing_mm] * 3 if isinstance(spacing_mm, (int, float)) else list(spacing_mm)
    factors = [max(1, int(t / s + 1e-3)) for t, s in zip(target, image.GetSpacing())]
    return sitk.BinShrink(image, factors) if max(factors) > 1 else image


def same_space(a: sitk.Image, b: sitk.Image, tolerance_mm: float = 1e-3) -> bool:
    """Whether two images share one voxel grid: the same size and direction, and spacing and
    origin equal within ``tolerance_mm`` (then a voxel of one is the same point of the other)."""
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tolerance_mm)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tolerance_mm))


def field_of_view_ml(image: sitk.Image) -> float:
    """The volume the image covers, in millilitres."""
    return float(np.prod(image.GetSpacing()) * np.prod(image.GetSize())) / 1000.0
