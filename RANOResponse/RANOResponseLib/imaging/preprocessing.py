"""Crop/resample onto the model grid, normalisation inside the brain and channel stacking.

All geometry is handled by SimpleITK in physical (LPS) coordinates: the follow-up is registered
rigidly to the baseline, and both are resampled onto one model grid that lives in the baseline's
physical space, centred on the baseline brain; each channel is z-scored inside its brain mask and
zero outside it. Maps computed on that grid are resampled back onto the baseline image grid with
:func:`to_reference`, so they overlay the baseline exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.names import REFERENCE_ORDER, TUMOUR_CHANNELS
from RANOResponseLib.imaging.geometry import lps_to_ras, mask_center, model_grid, resample, shrink_to
from RANOResponseLib.imaging.io import Study
from RANOResponseLib.imaging.registration import brain_mask, masked

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


def tumour_channels() -> list[Channel]:
    """The segmentation's labels as channels: per label of :data:`TUMOUR_CHANNELS` ``[follow-up,
    baseline]``, each the fraction of a model-grid voxel the timepoint's segmentation gives it."""
    return [Channel(name, t) for name in TUMOUR_CHANNELS for t in TIMEPOINTS]


def is_tumour_channel(channel: Channel) -> bool:
    """Whether ``channel`` is made from a segmentation (not from an MRI sequence)."""
    return channel.modality in TUMOUR_CHANNELS


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
    def reads_segmentation(self) -> bool:
        """Whether some channel is made from the timepoints' tumour segmentations."""
        return any(is_tumour_channel(c) for c in self.channels)

    @property
    def reference_modality(self) -> str:
        """The baseline image whose grid the maps are written on: CT1, or T1 without CT1."""
        for m in self.reference_order:
            if m in self.modalities:
                return m
        return self.modalities[0]


def normalize(arr: np.ndarray, method: str = "zscore", clip: float = 5.0,
              mask: np.ndarray | None = None) -> np.ndarray:
    """Z-score over the brain, zero outside it, clipped to ±clip.

    The brain is ``mask`` (a boolean array of ``arr``'s shape), or without one the non-zero
    voxels (a skull-stripped image's brain).
    """
    if method not in NORMALIZATIONS:
        raise ValueError(f"unknown normalisation {method!r}")
    mask = arr != 0 if mask is None else mask
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
    brains: dict[str, np.ndarray] = field(default_factory=dict)  # timepoint -> brain on the grid (z, y, x)


def prepare_pair(
    baseline: Study, followup: Study, transform: sitk.Transform, spec: InputSpec,
    center: Sequence[float] | None = None,
    masks: tuple[sitk.Image, sitk.Image] | None = None,
    labels: Mapping[str, sitk.Image] | None = None,
) -> PreparedPair:
    """Crop and resample both studies onto the model grid, normalise and stack the channels.

    ``masks``: the baseline's and the follow-up's brain masks, on the grid their images share
    (see :func:`~RANOResponseLib.imaging.registration.align_study`). Each image is then cut to
    its brain (zero outside, as a skull-stripped image), box-averaged towards the model spacing
    (anti-aliasing, per axis, so thick slices are averaged in-plane only), resampled onto the
    model grid and z-scored inside the brain as resampled onto that grid: a study and its
    skull-stripped copy give the same input. Without masks the images are taken as
    skull-stripped: each channel's non-zero voxels are its brain.

    ``labels``: timepoint -> its tumour labels on its images' grid, for the channels of
    :func:`tumour_channels`: each label as a 0/1 image, box-averaged and resampled like the
    sequences (so a voxel holds the fraction of it the label covers), not normalised.

    ``center`` (LPS mm) places the crop, e.g. where a user moved the crop ROI; by default the
    grid is centred on the baseline brain. A crop that misses the brain is refused.
    """
    reference = baseline.images[spec.reference_modality]
    on_brain = mask_center(masks[0]) if center is None and masks is not None else None
    grid = model_grid(reference, spec.spacing, spec.size, center if on_brain is None else on_brain)
    resampled: dict[str, sitk.Image] = {}
    brains: dict[str, np.ndarray] = {}
    planes = []
    normed: dict[str, np.ndarray] = {}

    def brain(timepoint: str) -> np.ndarray | None:
        """The timepoint's brain mask on the model grid: where its resampled brain is non-zero."""
        if masks is None:
            return None
        if timepoint not in brains:
            mask = sitk.Cast(masks[0 if timepoint == "baseline" else 1], sitk.sitkFloat32)
            t = transform if timepoint == "followup" else None
            brains[timepoint] = sitk.GetArrayFromImage(resample(shrink_to(mask, spec.spacing), grid, t)) > 0
        return brains[timepoint]

    def plane(modality: str, timepoint: str) -> np.ndarray:
        key = f"{modality}:{timepoint}"
        if key in normed:  # a modality used both stacked and as a difference: resampled once
            return normed[key]
        t = transform if timepoint == "followup" else None
        if modality in TUMOUR_CHANNELS:
            if labels is None or timepoint not in labels:
                raise RANOInputError(f"channel {key} needs the {timepoint}'s tumour segmentation")
            on = sitk.Cast(sitk.Equal(labels[timepoint], TUMOUR_CHANNELS[modality]), sitk.sitkFloat32)
            resampled[key] = resample(shrink_to(on, spec.spacing), grid, t)
            normed[key] = np.clip(sitk.GetArrayFromImage(resampled[key]), 0.0, 1.0).astype(np.float32)
            return normed[key]
        study = followup if timepoint == "followup" else baseline
        if modality not in study.images:
            raise RANOInputError(f"{study.folder}: missing modality {modality} required by the model")
        image = study.images[modality]
        if masks is not None:
            image = masked(image, masks[0 if timepoint == "baseline" else 1])
        img = resample(shrink_to(image, spec.spacing), grid, t)
        resampled[key] = img
        normed[key] = normalize(sitk.GetArrayFromImage(img), spec.normalization, spec.clip, brain(timepoint))
        return normed[key]

    for ch in spec.channels:
        if ch.timepoint == DIFFERENCE:  # both z-scored on their own, then subtracted
            planes.append(plane(ch.modality, "followup") - plane(ch.modality, "baseline"))
        else:
            planes.append(plane(ch.modality, ch.timepoint))
    if center is not None:
        if masks is not None:
            empty = not brain("baseline").any()
        else:
            ref = resampled.get(f"{spec.reference_modality}:baseline")
            ref = resample(reference, grid) if ref is None else ref
            empty = not sitk.GetArrayViewFromImage(ref).any()
        if empty:
            ras = ", ".join(f"{v:g}" for v in lps_to_ras(center))
            raise RANOInputError(f"{baseline.folder}: the crop region centred at RAS ({ras}) mm holds no "
                                 f"brain voxels of {spec.reference_modality}; move the ROI onto the brain")
    return PreparedPair(np.stack(planes).astype(np.float32), grid, tuple(spec.channels), resampled, brains)


def to_reference(array: np.ndarray, grid: sitk.Image, reference: sitk.Image, mask: bool = True,
                 brain: sitk.Image | None = None) -> sitk.Image:
    """Put a (z, y, x) map computed on the model grid back onto the reference image grid.

    The result has the reference's size, spacing, origin and direction; with ``mask`` it is
    zero outside the brain: ``brain`` (a mask on the reference grid), or without one the
    reference's non-zero voxels.
    """
    img = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    img.CopyInformation(grid)
    out = resample(img, reference)
    if mask:
        out = sitk.Mask(out, sitk.Cast(brain, sitk.sitkUInt8) if brain is not None else brain_mask(reference))
    return out


# ------------------------------------------------------------------------------ one timepoint
# The segmentation network sees one timepoint at a time, on a grid that covers its whole brain.
# Training (ResponseTrainingLib) and predict prepare timepoints with these same functions.

SEGMENTATION_MARGIN_MM = 6.0  # around the brain's bounding box
GRID_MULTIPLE = 16  # grid sizes are multiples of this (the networks halve the grid four times)


@dataclass
class PreparedTimepoint:
    """One timepoint's sequences on a brain-covering grid, as the segmentation network takes them."""

    array: np.ndarray  # (C, z, y, x) float32, z-scored inside the brain, zero outside
    grid: sitk.Image  # axis-aligned (LPS) grid over the brain's bounding box, at the model spacing
    brain: np.ndarray  # (z, y, x) bool: the brain on the grid
    modalities: tuple[str, ...]


def brain_grid(brain: sitk.Image, spacing: Sequence[float], margin_mm: float = SEGMENTATION_MARGIN_MM,
               multiple: int = GRID_MULTIPLE) -> sitk.Image:
    """An axis-aligned LPS grid of ``spacing`` mm holding the brain mask's physical bounding box
    plus ``margin_mm``, its size rounded up to a multiple of ``multiple`` voxels, centred on the brain."""
    nz = np.nonzero(sitk.GetArrayViewFromImage(brain))
    if len(nz[0]) == 0:
        raise RANOInputError("brain mask is empty: nothing to segment")
    index = np.stack([nz[2], nz[1], nz[0]]).astype(np.float64)
    to_physical = np.array(brain.GetDirection(), float).reshape(3, 3) @ np.diag(brain.GetSpacing())
    points = to_physical @ index
    extent = points.max(1) - points.min(1) + np.abs(to_physical).sum(1) + 2 * margin_mm
    spacing = np.asarray(spacing, float)
    size = np.ceil(extent / spacing / multiple).astype(int) * multiple
    return model_grid(brain, spacing, size, mask_center(brain))


def prepare_timepoint(study: Study, modalities: Sequence[str], spacing: Sequence[float],
                      brain: sitk.Image | None = None, normalization: str = "zscore",
                      clip: float = 5.0) -> PreparedTimepoint:
    """One study's ``modalities`` (all on one grid: see
    :func:`~RANOResponseLib.imaging.registration.align_study`) cut to the brain, box-averaged
    towards ``spacing``, resampled onto :func:`brain_grid` and z-scored inside the brain.

    ``brain``: the study's brain mask on that grid; without one the images are taken as
    skull-stripped (the reference's non-zero voxels).
    """
    missing = [m for m in modalities if m not in study.images]
    if missing:
        raise RANOInputError(f"{study.folder}: missing modality {', '.join(missing)} required by the segmentation model")
    first = study.images[modalities[0]]
    brain = brain_mask(first) if brain is None else sitk.Cast(brain, sitk.sitkUInt8)
    grid = brain_grid(brain, spacing)
    on_grid = sitk.GetArrayFromImage(resample(shrink_to(sitk.Cast(brain, sitk.sitkFloat32), spacing), grid)) > 0.5
    planes = []
    for m in modalities:
        img = resample(shrink_to(masked(study.images[m], brain), spacing), grid)
        planes.append(normalize(sitk.GetArrayFromImage(img), normalization, clip, on_grid))
    return PreparedTimepoint(np.stack(planes).astype(np.float32), grid, on_grid, tuple(modalities))


def labels_on_grid(labels: sitk.Image, grid: sitk.Image) -> np.ndarray:
    """A label map (e.g. a training mask on its timepoint's grid) on a prepared grid, (z, y, x) uint8.

    Each label's fraction is box-averaged and resampled like the images, then the largest wins
    (background included), so thin structures are kept where they cover most of a voxel."""
    arr = sitk.GetArrayViewFromImage(labels)
    values = [int(v) for v in np.unique(arr) if v != 0]
    spacing = grid.GetSpacing()
    fractions = [np.zeros(tuple(reversed(grid.GetSize())), np.float32)]
    for v in values:
        one = sitk.Cast(sitk.Equal(labels, v), sitk.sitkFloat32)
        fractions.append(sitk.GetArrayFromImage(resample(shrink_to(one, spacing), grid)))
    fractions[0] = 1.0 - np.sum(fractions[1:], axis=0) if values else fractions[0] + 1.0
    return np.asarray([0, *values], np.uint8)[np.argmax(np.stack(fractions), axis=0)]


def labels_to_reference(probabilities: np.ndarray, labels: Sequence[int], grid: sitk.Image,
                        reference: sitk.Image, brain: sitk.Image | None = None) -> sitk.Image:
    """Per-class probabilities ``(K, z, y, x)`` on a prepared grid -> a label map on the reference
    grid (uint8): each class's probability resampled linearly, then the most probable class
    (``labels[k]`` for class ``k``; class 0 is background), zero outside ``brain``.

    Only the reference's box that the grid covers (and that holds the brain) is resampled: the
    rest is background anyway, and a 1 mm reference is mostly outside the brain (3x faster).
    """
    out = np.zeros(tuple(reversed(reference.GetSize())), np.uint8)
    box = _reference_box(grid, reference, brain)
    if box is not None:
        lo, size = box
        sub = sitk.Image(size, sitk.sitkUInt8)
        sub.SetSpacing(reference.GetSpacing())
        sub.SetDirection(reference.GetDirection())
        sub.SetOrigin(reference.TransformIndexToPhysicalPoint(lo))
        stack = [sitk.GetArrayFromImage(to_reference(p, grid, sub, mask=False)) for p in probabilities]
        region = tuple(slice(start, start + n) for start, n in zip(reversed(lo), reversed(size)))
        out[region] = np.asarray(labels, np.uint8)[np.argmax(np.stack(stack), axis=0)]
    if brain is not None:
        out[sitk.GetArrayViewFromImage(brain) == 0] = 0
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(reference)
    return image


def _reference_box(grid: sitk.Image, reference: sitk.Image,
                   brain: sitk.Image | None) -> tuple[list[int], list[int]] | None:
    """``(start index, size)`` of the reference voxels inside ``grid`` (and inside ``brain``'s
    bounding box), or None when there are none."""
    corners = [grid.TransformContinuousIndexToPhysicalPoint([-0.5 if c == 0 else n - 0.5
                                                             for c, n in zip(bits, grid.GetSize())])
               for bits in np.ndindex(2, 2, 2)]
    index = np.array([reference.TransformPhysicalPointToContinuousIndex(p) for p in corners])
    lo = np.maximum(np.floor(index.min(0)).astype(int), 0)
    hi = np.minimum(np.ceil(index.max(0)).astype(int) + 1, reference.GetSize())
    if brain is not None:
        nz = np.nonzero(sitk.GetArrayViewFromImage(brain))
        if len(nz[0]) == 0:
            return None
        lo = np.maximum(lo, [nz[2].min(), nz[1].min(), nz[0].min()])
        hi = np.minimum(hi, [nz[2].max() + 1, nz[1].max() + 1, nz[0].max() + 1])
    if (hi <= lo).any():
        return None
    return [int(v) for v in lo], [int(v) for v in hi - lo]
