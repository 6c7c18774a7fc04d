"""Registration, crop/resample onto the model grid, normalisation and channel stacking.

All geometry is handled by SimpleITK in physical (LPS) coordinates: the follow-up is registered
rigidly to the baseline, and both are resampled onto one model grid that lives in the baseline's
physical space. Maps computed on that grid are resampled back onto the baseline image grid with
:func:`resample_to_reference`, so they overlay the baseline exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.names import REFERENCE_ORDER
from RANOResponseLib.imaging.geometry import lps_to_ras, model_grid, resample, shrink_to
from RANOResponseLib.imaging.io import Study
from RANOResponseLib.imaging.registration import brain_mask

TIMEPOINTS = ("followup", "baseline")
DIFFERENCE = "difference"  # a channel kind: z-scored follow-up minus z-scored baseline
NORMALIZATIONS = ("zscore",)


@dataclass(frozen=True)
class Channel:
    """One input channel of the network: a modality at a timepoint."""

    modality: str
    timepoint: str  # "followup", "baseline" or "difference" (follow-up minus baseline)

    def __str__(self) -> str:
        return f"{self.modality}:{self.timepoint}"

    @classmethod
    def parse(cls, text: str) -> "Channel":
        modality, _, timepoint = text.partition(":")
        if timepoint not in (*TIMEPOINTS, DIFFERENCE) or not modality:
            raise ValueError(f"channel {text!r} is not '<modality>:followup|baseline|difference'")
        return cls(modality, timepoint)


def default_channels(modalities: Sequence[str]) -> list[Channel]:
    """The reference study's order: for each modality ``[follow-up, baseline]``."""
    return [Channel(m, t) for m in modalities for t in TIMEPOINTS]


def difference_channels(modalities: Sequence[str]) -> list[Channel]:
    """The subtraction variant: per modality one channel, follow-up minus baseline."""
    return [Channel(m, DIFFERENCE) for m in modalities]


@dataclass(frozen=True)
class InputSpec:
    """What the network expects; read from a bundle's ``bundle.json``.

    ``size`` and ``spacing`` are in SimpleITK (x, y, z) order; arrays handed to the network are
    ``(C, z, y, x)``.
    """

    modalities: tuple[str, ...]
    channels: tuple[Channel, ...]
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)
    size: tuple[int, int, int] = (96, 96, 96)
    normalization: str = "zscore"
    clip: float = 5.0
    reference_order: tuple[str, ...] = REFERENCE_ORDER

    @property
    def reference_modality(self) -> str:
        """The baseline image whose grid the maps are written on: CT1, or T1 without CT1."""
        for m in self.reference_order:
            if m in self.modalities:
                return m
        return self.modalities[0]


def normalize(arr: np.ndarray, method: str = "zscore", clip: float = 5.0) -> np.ndarray:
    """Z-score over the brain (non-zero voxels), background stays 0, clipped to ±clip."""
    if method not in NORMALIZATIONS:
        raise ValueError(f"unknown normalisation {method!r}")
    mask = arr != 0
    out = np.zeros_like(arr, dtype=np.float32)
    if mask.sum() < 2:
        return out
    vals = arr[mask]
    std = float(vals.std()) or 1.0
    out[mask] = np.clip((vals - float(vals.mean())) / std, -clip, clip)
    return out


@dataclass
class PreparedPair:
    """The network input for one case pair and the grid it lives on."""

    array: np.ndarray  # (C, z, y, x) float32
    grid: sitk.Image  # model grid in the baseline's physical space
    channels: tuple[Channel, ...]
    resampled: dict[str, sitk.Image] = field(default_factory=dict)  # "CT1:followup" -> image


def prepare_pair(
    baseline: Study, followup: Study, transform: sitk.Transform, spec: InputSpec,
    center: Sequence[float] | None = None,
) -> PreparedPair:
    """Crop and resample both studies onto the model grid, normalise and stack the channels.

    ``center`` (LPS mm) places the crop, e.g. where a user moved the crop ROI; by default the
    grid is centred on the baseline brain. A crop that misses the brain is refused.
    """
    reference = baseline.images[spec.reference_modality]
    grid = model_grid(reference, spec.spacing, spec.size, center)
    resampled: dict[str, sitk.Image] = {}
    planes = []
    normed: dict[str, np.ndarray] = {}

    def plane(modality: str, timepoint: str) -> np.ndarray:
        key = f"{modality}:{timepoint}"
        if key in normed:  # a modality used both stacked and as a difference: resampled once
            return normed[key]
        study = followup if timepoint == "followup" else baseline
        if modality not in study.images:
            raise RANOInputError(f"{study.folder}: missing modality {modality} required by the model")
        t = transform if timepoint == "followup" else None
        img = resample(shrink_to(study.images[modality], spec.spacing), grid, t)
        resampled[key] = img
        normed[key] = normalize(sitk.GetArrayFromImage(img), spec.normalization, spec.clip)
        return normed[key]

    for ch in spec.channels:
        if ch.timepoint == DIFFERENCE:  # both z-scored on their own, then subtracted
            planes.append(plane(ch.modality, "followup") - plane(ch.modality, "baseline"))
        else:
            planes.append(plane(ch.modality, ch.timepoint))
    if center is not None:
        ref = resampled.get(f"{spec.reference_modality}:baseline")
        ref = resample(reference, grid) if ref is None else ref
        if not sitk.GetArrayViewFromImage(ref).any():
            ras = ", ".join(f"{v:g}" for v in lps_to_ras(center))
            raise RANOInputError(f"{baseline.folder}: the crop region centred at RAS ({ras}) mm holds no "
                                 f"brain voxels of {spec.reference_modality}; move the ROI onto the brain")
    return PreparedPair(np.stack(planes).astype(np.float32), grid, tuple(spec.channels), resampled)


def to_reference(array: np.ndarray, grid: sitk.Image, reference: sitk.Image, mask: bool = True) -> sitk.Image:
    """Put a (z, y, x) map computed on the model grid back onto the reference image grid.

    The result has the reference's size, spacing, origin and direction; with ``mask`` it is
    zero outside the reference's brain.
    """
    img = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    img.CopyInformation(grid)
    out = resample(img, reference)
    if mask:
        out = sitk.Mask(out, brain_mask(reference))
    return out
