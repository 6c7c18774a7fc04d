"""RANO measurement assistant: enhancing lesions, their bidimensional products and volumes.

Input is a tumour label map per timepoint, found automatically in a LUMIERE timepoint folder
(:func:`find_segmentation`) or handed over as a SimpleITK image (e.g. exported from a Slicer
segmentation by :mod:`measurement_scene`). Label conventions are :class:`LabelScheme` objects:

* DeepBraTumIA (``DeepBraTumIA-segmentation/{native,atlas}/segmentation/``): 1 enhancing,
  2 necrotic / non-enhancing core, 3 edema;
* HD-GLIO-AUTO (``HD-GLIO-AUTO-segmentation/registered/segmentation.nii.gz``): 1 non-enhancing
  T2/FLAIR abnormality, 2 contrast-enhancing.

A *lesion* is a 26-connected component of enhancing and core voxels that holds at least one
enhancing voxel (a ring-enhancing lesion is measured with its necrotic centre, as readers do; the
phantom generator labels its cohort with the same definitions: :func:`bidimensional` and
:class:`MeasurableCriteria`).
Each lesion is measured on the *axial* slice where it is largest: the image slice plane closest to
the patient's axial plane (chosen from the direction matrix, so sagittally stored or oblique
volumes work), with in-plane distances in mm from the voxel spacing. ``d1`` is the longest
in-plane diameter, ``d2`` the longest extent perpendicular to it; both endpoints of both
diameters are kept in physical LPS coordinates, so they can be drawn (report) and edited as line
markups (Slicer, :mod:`measurement_scene`).

Lesions of two timepoints are matched after mapping the baseline map into the follow-up grid
through the registration transform (baseline point -> follow-up point, as
:func:`preprocessing.register_rigid` returns it and ``rano-response predict`` writes it to
``followup_to_baseline.tfm``, ITK's resampling convention); a follow-up lesion touching no
baseline tumour voxel (within ``margin_mm``) is *new*.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import SimpleITK as sitk
from scipy.spatial import ConvexHull
from scipy.spatial.distance import pdist, squareform

from RANOResponseLib.core.errors import RANOInputError

SEG_EXTENSIONS = (".nii.gz", ".nii", ".nrrd")


# ------------------------------------------------------------------------------ conventions


@dataclass(frozen=True)
class LabelScheme:
    """Which label values of a segmentation are enhancing tumour and which are core.

    ``core`` labels (necrosis, non-enhancing core, resection cavity) are joined to an enhancing
    lesion they touch; a component made only of core labels is not a lesion.
    """

    name: str
    enhancing: tuple[int, ...]
    core: tuple[int, ...] = ()


DEEPBRATUMIA = LabelScheme("DeepBraTumIA", enhancing=(1,), core=(2,))
HD_GLIO = LabelScheme("HD-GLIO-AUTO", enhancing=(2,))
BINARY = LabelScheme("binary", enhancing=(1,))


@dataclass(frozen=True)
class MeasurableCriteria:
    """RANO's definition of a measurable enhancing lesion.

    Both diameters must be at least ``min_diameter_mm``, or twice the slice thickness when the
    slices are thicker than ``thick_slice_mm``, and the lesion must be seen on at least
    ``min_slices`` axial slices. Components smaller than ``min_volume_ml`` are ignored as
    segmentation noise (0: keep all).
    """

    min_diameter_mm: float = 10.0
    min_slices: int = 2
    thick_slice_mm: float = 5.0
    min_volume_ml: float = 0.0

    def min_diameter_for(self, slice_thickness_mm: float) -> float:
        """The smallest diameter that counts on slices this thick."""
        if slice_thickness_mm > self.thick_slice_mm:
            return max(self.min_diameter_mm, 2.0 * slice_thickness_mm)
        return self.min_diameter_mm

    def why_not(self, d1_mm: float, d2_mm: float, n_slices: int, slice_thickness_mm: float) -> str:
        """Why a lesion with these diameters and slices is not measurable; ``""`` if it is."""
        need = self.min_diameter_for(slice_thickness_mm)
        reasons = []
        if min(d1_mm, d2_mm) < need:
            reasons.append(f"a diameter is below {need:g} mm")
        if n_slices < self.min_slices:
            reasons.append(f"seen on {n_slices} axial slice(s), fewer than {self.min_slices}")
        return "; ".join(reasons)


@dataclass(frozen=True)
class SegmentationFile:
    """A segmentation found in a timepoint folder."""

    path: Path
    source: str  # one of SOURCES
    scheme: LabelScheme
    space: str  # "native" (the timepoint's images), "hd-glio" (HD-GLIO's registered images) or "atlas" (MNI)


# source name -> (sub-folder, file names tried in order (case-insensitive), scheme, space)
_SOURCES: dict[str, tuple[str, tuple[str, ...], LabelScheme, str]] = {
    "deepbratumia-native": (
        "DeepBraTumIA-segmentation/native/segmentation",
        ("CT1_seg_mask", "seg_mask", "T1_seg_mask", "T2_seg_mask", "FLAIR_seg_mask"),
        DEEPBRATUMIA, "native"),
    "hd-glio": ("HD-GLIO-AUTO-segmentation/registered", ("segmentation",), HD_GLIO, "hd-glio"),
    "deepbratumia-atlas": ("DeepBraTumIA-segmentation/atlas/segmentation", ("seg_mask",), DEEPBRATUMIA, "atlas"),
}
SOURCES: tuple[str, ...] = tuple(_SOURCES)
AUTOMATIC = "automatic"  # predict's own segmentations (segmentation_*.nii.gz in its output folder)


# ------------------------------------------------------------------------------ results


@dataclass
class Lesion:
    """One enhancing lesion at one timepoint. Points are physical LPS mm (SimpleITK's space)."""

    id: int  # 1 = largest product at this timepoint
    d1_mm: float  # longest axial diameter
    d2_mm: float  # longest extent perpendicular to d1, same slice
    volume_ml: float  # whole lesion (enhancing + joined core)
    enhancing_ml: float  # enhancing voxels only (RANO 2.0 volumetric)
    n_slices: int  # axial slices the lesion appears on
    slice_thickness_mm: float
    slice_index: int  # index, along the image's axial axis, of the measured slice
    centroid: tuple[float, float, float]
    d1_points: tuple[tuple[float, float, float], tuple[float, float, float]]
    d2_points: tuple[tuple[float, float, float], tuple[float, float, float]]
    measurable: bool = False
    why_not_measurable: str = ""
    matched: tuple[int, ...] = ()  # ids of the overlapping lesions at the other timepoint
    new: bool = False  # follow-up only: touches no baseline tumour
    centroid_in_baseline: tuple[float, float, float] | None = None  # follow-up only
    edited: bool = False  # diameters changed by a reader (line markups)

    @property
    def product_mm2(self) -> float:
        return self.d1_mm * self.d2_mm

    @property
    def name(self) -> str:
        return f"L{self.id}"

    def describe(self) -> str:
        """``L1 24.0 x 18.5 mm (444 mm2)``."""
        return f"{self.name} {self.d1_mm:.1f} x {self.d2_mm:.1f} mm ({self.product_mm2:.0f} mm2)"


@dataclass
class TimepointMeasurement:
    """All enhancing lesions of one timepoint, largest product first."""

    source: str  # file or node the segmentation came from
    scheme: str
    lesions: list[Lesion]
    axial_axis: int  # image index axis (x=0, y=1, z=2) closest to patient superior-inferior
    spacing: tuple[float, float, float]
    criteria: MeasurableCriteria = field(default_factory=MeasurableCriteria)
    space: str = "native"  # as SegmentationFile.space; only "native" lies on the timepoint's images
    lesion_map: sitk.Image | None = field(default=None, repr=False, compare=False)  # lesion id per voxel
    tumour_mask: sitk.Image | None = field(default=None, repr=False, compare=False)  # enhancing or core

    @property
    def measurable(self) -> list[Lesion]:
        return [le for le in self.lesions if le.measurable]

    @property
    def non_measurable(self) -> list[Lesion]:
        return [le for le in self.lesions if not le.measurable]

    @property
    def spd_mm2(self) -> float:
        """Sum of the bidimensional products of the measurable lesions."""
        return float(sum(le.product_mm2 for le in self.measurable))

    @property
    def measurable_volume_ml(self) -> float:
        """Enhancing volume of the measurable lesions (RANO 2.0 volumetric)."""
        return float(sum(le.enhancing_ml for le in self.measurable))

    @property
    def enhancing_volume_ml(self) -> float:
        return float(sum(le.enhancing_ml for le in self.lesions))

    def lesion(self, lesion_id: int) -> Lesion:
        for le in self.lesions:
            if le.id == lesion_id:
                return le
        raise KeyError(f"no lesion L{lesion_id} in {self.source}")

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("lesion_map", "tumour_mask")}
        d["spd_mm2"] = self.spd_mm2
        d["measurable_volume_ml"] = self.measurable_volume_ml
        for le_d, le in zip(d["lesions"], self.lesions):
            le_d["product_mm2"] = le.product_mm2
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TimepointMeasurement":
        lesions = [_lesion_from_dict(x) for x in d["lesions"]]
        return cls(source=d["source"], scheme=d["scheme"], lesions=lesions, axial_axis=int(d["axial_axis"]),
                   spacing=tuple(d["spacing"]), criteria=MeasurableCriteria(**d.get("criteria", {})),
                   space=d.get("space", "native"))


@dataclass
class PairMeasurement:
    """Baseline and follow-up lesions, matched through the registration."""

    baseline: TimepointMeasurement
    followup: TimepointMeasurement
    transform: str = "identity"  # how the follow-up was related to the baseline
    margin_mm: float = 2.0

    @property
    def new_lesions(self) -> list[Lesion]:
        return [le for le in self.followup.lesions if le.new]

    @property
    def new_measurable(self) -> list[Lesion]:
        return [le for le in self.followup.lesions if le.new and le.measurable]

    def to_dict(self) -> dict:
        return {"baseline": self.baseline.to_dict(), "followup": self.followup.to_dict(),
                "transform": self.transform, "margin_mm": self.margin_mm}

    @classmethod
    def from_dict(cls, d: dict) -> "PairMeasurement":
        return cls(TimepointMeasurement.from_dict(d["baseline"]), TimepointMeasurement.from_dict(d["followup"]),
                   transform=d.get("transform", ""), margin_mm=float(d.get("margin_mm", 2.0)))


def _tuple3(v) -> tuple[float, float, float]:
    return tuple(float(x) for x in v)  # type: ignore[return-value]


def _lesion_from_dict(d: dict) -> Lesion:
    known = {f for f in Lesion.__dataclass_fields__}
    d = {k: v for k, v in d.items() if k in known}
    d["centroid"] = _tuple3(d["centroid"])
    d["d1_points"] = tuple(_tuple3(p) for p in d["d1_points"])
    d["d2_points"] = tuple(_tuple3(p) for p in d["d2_points"])
    d["matched"] = tuple(int(i) for i in d.get("matched", ()))
    if d.get("centroid_in_baseline") is not None:
        d["centroid_in_baseline"] = _tuple3(d["centroid_in_baseline"])
    return Lesion(**d)


# ------------------------------------------------------------------------------ finding files


def find_segmentation(timepoint: Path | str, source: str = "auto") -> SegmentationFile:
    """The tumour segmentation of a LUMIERE timepoint folder.

    ``source`` is one of :data:`SOURCES` or ``auto`` (the first of them that exists: DeepBraTumIA
    native, HD-GLIO-AUTO, DeepBraTumIA atlas). Raises :class:`RANOInputError` naming the folder
    and every file looked for when nothing is found.
    """
    folder = Path(timepoint)
    if not folder.is_dir():
        raise RANOInputError(f"{folder}: timepoint folder not found")
    names = _source_names(source)
    for name in names:
        hit = _find_source(folder, name)
        if hit is not None:
            return hit
    raise RANOInputError(f"{folder}: no tumour segmentation found (looked for {_expected(names)})")


def find_pair_segmentations(
    baseline: Path | str, followup: Path | str, source: str = "auto"
) -> tuple[SegmentationFile, SegmentationFile]:
    """Segmentations of both timepoints from the same source (so that they can be compared)."""
    names = _source_names(source)
    b, f = Path(baseline), Path(followup)
    for folder in (b, f):
        if not folder.is_dir():
            raise RANOInputError(f"{folder}: timepoint folder not found")
    for name in names:
        hb, hf = _find_source(b, name), _find_source(f, name)
        if hb is not None and hf is not None:
            return hb, hf
    found_b = [n for n in names if _find_source(b, n)]
    found_f = [n for n in names if _find_source(f, n)]
    raise RANOInputError(
        f"{f}: no segmentation source common to both timepoints (looked for {_expected(names)}; "
        f"baseline {b} has {found_b or 'none'}, follow-up has {found_f or 'none'})"
    )


def _source_names(source: str) -> tuple[str, ...]:
    if source == "auto":
        return SOURCES
    if source not in _SOURCES:
        raise RANOInputError(f"--source {source}: unknown segmentation source (choose auto, {', '.join(SOURCES)})")
    return (source,)


def _expected(names: Iterable[str]) -> str:
    def one(n: str) -> str:
        sub, stems = _SOURCES[n][:2]
        return f"{sub}/{stems[0]}.nii.gz" if len(stems) == 1 else f"{sub}/{{{','.join(stems)}}}.nii.gz"

    return "; ".join(one(n) for n in names)


def _find_source(folder: Path, name: str) -> SegmentationFile | None:
    sub, stems, scheme, space = _SOURCES[name]
    d = folder / sub
    if not d.is_dir():
        return None
    files = {p.name.lower(): p for p in d.iterdir() if p.is_file()}
    for stem in stems:
        for ext in SEG_EXTENSIONS:
            p = files.get(f"{stem}{ext}".lower())
            if p is not None:
                return SegmentationFile(p, name, scheme, space)
    return None


# ------------------------------------------------------------------------------ reading


def read_segmentation(path: Path | str) -> sitk.Image:
    """Read a label map, refusing what cannot be one; the error names the file.

    Unlike :func:`io.read_image` an all-zero map is fine (no tumour is a valid finding). A
    truncated ``.nii.gz`` is caught the same way (voxels decoded by nibabel, gzip CRC checked).
    """
    from RANOResponseLib.imaging.io import image_from_voxels, read_voxels

    arr, reader = read_voxels(path, "segmentation")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.isfinite(arr).all() or not np.array_equal(arr, np.round(arr)):
            raise RANOInputError(f"{path}: not a label map (non-integer voxel values)")
    if arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise RANOInputError(f"{path}: not a label map (values {arr.min()}..{arr.max()})")
    image = image_from_voxels(arr, reader, np.uint16)
    return image


def load_transform(path: Path | str) -> sitk.Transform:
    """Read an ITK transform file (``.tfm``/``.h5``), e.g. predict's ``followup_to_baseline.tfm``."""
    path = Path(path)
    if not path.is_file():
        raise RANOInputError(f"{path}: transform file not found")
    try:
        return sitk.ReadTransform(str(path))
    except RuntimeError:
        raise RANOInputError(f"{path}: unreadable transform file (not an ITK .tfm/.h5 transform)") from None


# ------------------------------------------------------------------------------ geometry


def axial_axis(image: sitk.Image) -> int:
    """The image index axis (0=x, 1=y, 2=z) whose direction is closest to patient S-I.

    Slices perpendicular to it are the ones closest to the axial plane.
    """
    d = np.array(image.GetDirection(), dtype=float).reshape(3, 3)  # columns: index axes in LPS
    return int(np.argmax(np.abs(d[2, :])))


@dataclass(frozen=True)
class Bidimensional:
    """The two RANO diameters of a 2D pixel set, with their endpoints in the slice's mm frame."""

    d1: float
    d2: float
    d1_points: tuple[np.ndarray, np.ndarray]
    d2_points: tuple[np.ndarray, np.ndarray]


def bidimensional(points: np.ndarray, su: float, sv: float) -> Bidimensional:
    """Longest diameter of a set of pixel centres ``(u, v)`` in mm and the longest extent
    perpendicular to it, with endpoints.

    The longest diameter joins two convex-hull vertices of the pixel centres, and each extent
    gets one pixel footprint (``hypot(du*su, dv*sv)`` along unit direction ``(du, dv)``) so a
    voxelised disk of diameter D measures D within a pixel. The phantom's training labels are
    measured with it too. Hand-written because scikit-image (not a dependency) gives
    the Feret diameter but neither the perpendicular one nor endpoints. The perpendicular line is
    placed through the pixels' centroid.
    """
    points = np.asarray(points, dtype=float)
    if len(points) == 1:
        p = points[0]
        a, b = np.array([su / 2, 0.0]), np.array([0.0, sv / 2])
        return Bidimensional(max(su, sv), min(su, sv), (p - a, p + a), (p - b, p + b))
    hull = points
    if len(points) >= 3:
        try:
            hull = points[ConvexHull(points).vertices]
        except Exception:  # noqa: BLE001 - scipy's QhullError for collinear points: use them all
            hull = points
    dist = squareform(pdist(hull))
    i, j = np.unravel_index(int(np.argmax(dist)), dist.shape)
    axis = hull[j] - hull[i]
    axis = axis / np.linalg.norm(axis)
    perp = np.array([-axis[1], axis[0]])

    def footprint(direction: np.ndarray) -> float:
        return math.hypot(direction[0] * su, direction[1] * sv)

    f1, f2 = footprint(axis), footprint(perp)
    proj = points @ axis
    lo, hi = proj.min(), proj.max()
    origin = hull[i] - axis * (hull[i] @ axis)  # the d1 line passes through hull[i]
    a1 = origin + axis * (lo - f1 / 2)
    b1 = origin + axis * (hi + f1 / 2)
    q = points @ perp
    centre_t = float(points.mean(axis=0) @ axis)
    a2 = axis * centre_t + perp * (q.min() - f2 / 2)
    b2 = axis * centre_t + perp * (q.max() + f2 / 2)
    return Bidimensional(float(hi - lo + f1), float(q.max() - q.min() + f2), (a1, b1), (a2, b2))


# ------------------------------------------------------------------------------ measuring


def lesion_components(seg: sitk.Image, scheme: LabelScheme = DEEPBRATUMIA) -> tuple[sitk.Image, sitk.Image, sitk.Image]:
    """``(components, enhancing, tumour)``: 26-connected components of enhancing or core voxels
    (SimpleITK ConnectedComponent, ids 1..n), and the enhancing and tumour masks (UInt8)."""
    seg = sitk.Cast(seg, sitk.sitkUInt16) if seg.GetPixelID() != sitk.sitkUInt16 else seg
    arr = sitk.GetArrayViewFromImage(seg)
    enh = np.isin(arr, scheme.enhancing)
    tum = enh | np.isin(arr, scheme.core) if scheme.core else enh
    enhancing = sitk.GetImageFromArray(enh.astype(np.uint8))
    tumour = sitk.GetImageFromArray(tum.astype(np.uint8))
    enhancing.CopyInformation(seg)
    tumour.CopyInformation(seg)
    components = sitk.ConnectedComponent(tumour, True)
    return components, enhancing, tumour


def measure_segmentation(
    seg: sitk.Image | Path | str,
    scheme: LabelScheme = DEEPBRATUMIA,
    criteria: MeasurableCriteria | None = None,
    source: str = "",
) -> TimepointMeasurement:
    """Find and measure every enhancing lesion of one timepoint's label map.

    Args:
        seg: label image (or a file, read with :func:`read_segmentation`).
        scheme: which labels are enhancing and core.
        criteria: what makes a lesion measurable (RANO defaults).
        source: shown in reports (defaults to the file name).
    """
    criteria = criteria or MeasurableCriteria()
    if not isinstance(seg, sitk.Image):
        source = source or str(seg)
        seg = read_segmentation(seg)
    if seg.GetDimension() != 3:
        raise RANOInputError(f"{source or 'segmentation'}: not a 3D label map")
    components, enhancing, tumour = lesion_components(seg, scheme)
    comp = sitk.GetArrayViewFromImage(components)
    enh = sitk.GetArrayViewFromImage(enhancing).astype(bool)
    spacing = tuple(float(s) for s in seg.GetSpacing())
    ax = axial_axis(seg)
    np_ax = 2 - ax  # numpy array axis of the axial index axis
    in_plane = [a for a in (0, 1, 2) if a != np_ax]  # numpy axes (rows, cols) of a slice
    s_rows, s_cols = spacing[2 - in_plane[0]], spacing[2 - in_plane[1]]
    voxel_ml = float(np.prod(spacing)) / 1000.0

    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(components)
    n_enh = np.bincount(comp[enh].ravel(), minlength=int(comp.max()) + 1) if comp.size else np.zeros(1)
    found: list[Lesion] = []
    labels: list[int] = []  # component label of each found lesion
    for label in stats.GetLabels():
        if n_enh[label] == 0:
            continue  # core only: not an enhancing lesion
        volume = stats.GetPhysicalSize(label) / 1000.0
        if volume < criteria.min_volume_ml:
            continue
        bx = stats.GetBoundingBox(label)  # x, y, z start, then sizes
        start, size = bx[:3], bx[3:]
        box = tuple(slice(start[2 - a], start[2 - a] + size[2 - a]) for a in range(3))
        mask = comp[box] == label
        m = np.moveaxis(mask, np_ax, 0)  # (slice, rows, cols)
        areas = m.sum(axis=(1, 2))
        k = int(np.argmax(areas))
        rc = np.argwhere(m[k])
        pts = np.column_stack([rc[:, 1] * s_cols, rc[:, 0] * s_rows])  # (u, v) mm: u along cols
        bd = bidimensional(pts, s_cols, s_rows)
        offset = np.array([b.start for b in box], dtype=float)

        def to_physical(uv: np.ndarray, k: int = k, offset: np.ndarray = offset) -> tuple[float, float, float]:
            idx_np = np.zeros(3)
            idx_np[np_ax] = k
            idx_np[in_plane[0]] = uv[1] / s_rows
            idx_np[in_plane[1]] = uv[0] / s_cols
            idx_np += offset
            return _tuple3(seg.TransformContinuousIndexToPhysicalPoint([float(v) for v in idx_np[::-1]]))

        found.append(Lesion(
            id=0, d1_mm=bd.d1, d2_mm=bd.d2, volume_ml=volume, enhancing_ml=float(n_enh[label]) * voxel_ml,
            n_slices=int((areas > 0).sum()), slice_thickness_mm=spacing[ax],
            slice_index=int(k + box[np_ax].start), centroid=_tuple3(stats.GetCentroid(label)),
            d1_points=(to_physical(bd.d1_points[0]), to_physical(bd.d1_points[1])),
            d2_points=(to_physical(bd.d2_points[0]), to_physical(bd.d2_points[1])),
        ))
        labels.append(int(label))
    order = sorted(range(len(found)), key=lambda n: (-found[n].product_mm2, -found[n].volume_ml))
    relabel = np.zeros(int(comp.max()) + 1 if comp.size else 1, dtype=np.uint16)
    for i, n in enumerate(order, start=1):
        found[n].id = i
        relabel[labels[n]] = i
        set_measurable(found[n], criteria)
    found = [found[n] for n in order]
    lesion_map = sitk.GetImageFromArray(relabel[comp])
    lesion_map.CopyInformation(seg)
    return TimepointMeasurement(source=source, scheme=scheme.name, lesions=found, axial_axis=ax,
                                spacing=spacing, criteria=criteria, lesion_map=lesion_map, tumour_mask=tumour)


def set_measurable(lesion: Lesion, criteria: MeasurableCriteria) -> Lesion:
    """Set ``measurable`` and ``why_not_measurable`` from the lesion's current diameters."""
    lesion.why_not_measurable = criteria.why_not(lesion.d1_mm, lesion.d2_mm, lesion.n_slices,
                                                 lesion.slice_thickness_mm)
    lesion.measurable = not lesion.why_not_measurable
    return lesion


# ------------------------------------------------------------------------------ matching


def _radius(image: sitk.Image, margin_mm: float) -> list[int]:
    return [int(math.ceil(margin_mm / s - 1e-6)) if margin_mm > 0 else 0 for s in image.GetSpacing()]


def _crop_to(image: sitk.Image, mask: sitk.Image, pad: Sequence[int]) -> sitk.Image | None:
    """``image`` cut to the bounding box of ``mask`` grown by ``pad`` voxels (None if empty).

    The crop keeps its physical position, so resampling it is the same as resampling the whole
    image; dilating a crop is what keeps matching fast on 1 mm volumes.
    """
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(mask > 0, sitk.sitkUInt8))
    if 1 not in stats.GetLabels():
        return None
    box = stats.GetBoundingBox(1)
    size = image.GetSize()
    lo = [max(0, box[i] - pad[i] - 1) for i in range(3)]
    hi = [min(size[i], box[i] + box[i + 3] + pad[i] + 1) for i in range(3)]
    return sitk.RegionOfInterest(image, [h - lo_ for lo_, h in zip(lo, hi)], lo)


def _inverse(transform: sitk.Transform) -> sitk.Transform:
    try:
        return transform.GetInverse()
    except RuntimeError:
        raise RANOInputError(f"registration transform ({transform.GetName()}) is not invertible") from None


def match_lesions(
    baseline: TimepointMeasurement,
    followup: TimepointMeasurement,
    transform: sitk.Transform | None = None,
    margin_mm: float = 2.0,
) -> None:
    """Match follow-up lesions to baseline lesions and flag new ones (in place).

    A follow-up lesion is *new* if none of its voxels falls on baseline tumour (enhancing or
    core, dilated by ``margin_mm``), checked both ways (baseline mapped onto the follow-up grid,
    and the follow-up lesion mapped onto the baseline grid, so a lesion thinner than the other
    grid's voxels is not missed). It is matched to the baseline lesions it overlaps.

    Args:
        transform: maps baseline physical points to follow-up points (``register_rigid``'s
            result, predict's ``followup_to_baseline.tfm``); ``None`` when both maps share one
            physical space (e.g. DeepBraTumIA's atlas segmentations).
        margin_mm: tolerance for registration error.
    """
    if baseline.lesion_map is None or followup.lesion_map is None or baseline.tumour_mask is None:
        raise ValueError("match_lesions needs measurements made from images (lesion maps), not from JSON")
    to_base = _inverse(transform) if transform is not None else sitk.Transform()
    fwd = transform if transform is not None else sitk.Transform()
    radius = _radius(baseline.tumour_mask, margin_mm)
    b_tum = _crop_to(baseline.tumour_mask, baseline.tumour_mask, radius)
    pairs: set[tuple[int, int]] = set()
    fu_ids = sitk.GetArrayViewFromImage(followup.lesion_map)
    if b_tum is not None:
        b_lab = _crop_to(baseline.lesion_map, baseline.tumour_mask, radius)
        if margin_mm > 0:
            b_tum = sitk.BinaryDilate(b_tum, radius, sitk.sitkBall, 0.0, 1.0)
            b_lab = sitk.GrayscaleDilate(b_lab, radius, sitk.sitkBall)
        ref = followup.lesion_map
        # value at follow-up point p is baseline(T^-1(p))
        t_fu = sitk.GetArrayFromImage(sitk.Resample(b_tum, ref, to_base, sitk.sitkNearestNeighbor, 0,
                                                    sitk.sitkUInt8)).astype(bool)
        ids_fu = sitk.GetArrayFromImage(sitk.Resample(b_lab, ref, to_base, sitk.sitkNearestNeighbor, 0,
                                                      sitk.sitkUInt16))
        fu_b = sitk.GetArrayFromImage(sitk.Resample(followup.lesion_map, b_tum, fwd, sitk.sitkNearestNeighbor, 0,
                                                    sitk.sitkUInt16))
        b_tumour = sitk.GetArrayViewFromImage(b_tum).astype(bool)
        b_map = sitk.GetArrayViewFromImage(b_lab)
    for le in followup.lesions:
        le.centroid_in_baseline = _tuple3(to_base.TransformPoint(le.centroid))
        if b_tum is None:
            le.matched, le.new = (), True
            continue
        here, there = fu_ids == le.id, fu_b == le.id
        le.new = not bool(t_fu[here].any() or b_tumour[there].any())
        ids = set(np.unique(ids_fu[here]).tolist()) | set(np.unique(b_map[there]).tolist())
        ids.discard(0)
        le.matched = tuple(sorted(int(i) for i in ids))
        pairs.update((b, le.id) for b in le.matched)
    for le in baseline.lesions:
        le.matched = tuple(sorted(f for b, f in pairs if b == le.id))


def measure_pair(
    baseline_seg: sitk.Image | Path | str,
    followup_seg: sitk.Image | Path | str,
    transform: sitk.Transform | Path | str | None = None,
    scheme: LabelScheme = DEEPBRATUMIA,
    followup_scheme: LabelScheme | None = None,
    criteria: MeasurableCriteria | None = None,
    margin_mm: float = 2.0,
    transform_note: str = "",
    space: str = "native",
) -> PairMeasurement:
    """Measure both timepoints and match their lesions.

    ``transform`` maps baseline points to follow-up points (an sitk transform or a ``.tfm``
    file); ``None`` means both segmentations share one physical space. ``space`` says whether
    that is the images' own space ("native") or not ("atlas"), for drawing.
    """
    note = transform_note
    if isinstance(transform, (str, Path)):
        note = note or f"file {transform}"
        transform = load_transform(transform)
    note = note or ("identity (same space)" if transform is None else f"{transform.GetName()}")
    b = measure_segmentation(baseline_seg, scheme, criteria)
    f = measure_segmentation(followup_seg, followup_scheme or scheme, criteria)
    b.space = f.space = space
    match_lesions(b, f, transform, margin_mm)
    return PairMeasurement(b, f, transform=note, margin_mm=margin_mm)


def measure_timepoints(
    baseline: Path | str,
    followup: Path | str,
    transform: sitk.Transform | Path | str | None = None,
    source: str = "auto",
    criteria: MeasurableCriteria | None = None,
    margin_mm: float = 2.0,
) -> PairMeasurement:
    """Measure two LUMIERE timepoint folders: find their segmentations (same source for both),
    relate them and measure.

    Without ``transform``: atlas segmentations share MNI space (identity); native and HD-GLIO
    ones are related by registering the images that live in the segmentations' space with the
    core's :func:`preprocessing.register_rigid` (the timepoint's own images for native masks,
    HD-GLIO's ``*_r2s_bet_reg`` images for HD-GLIO masks). Predict's transform (``--transform``)
    relates the *native* images; it is right for HD-GLIO masks only if HD-GLIO's registered space
    is the timepoint's T1 space.
    """
    fb, ff = find_pair_segmentations(baseline, followup, source)
    note = ""
    if transform is None and fb.space != "atlas":
        transform, note = _register_for(fb, ff)
    elif transform is None:
        note = "identity (atlas space)"
    return measure_pair(fb.path, ff.path, transform, fb.scheme, ff.scheme, criteria, margin_mm, note, fb.space)


def _register_for(fb: SegmentationFile, ff: SegmentationFile) -> tuple[sitk.Transform, str]:
    from RANOResponseLib.core.names import MODALITIES
    from RANOResponseLib.imaging.io import Study, find_modality_file, read_image, read_study
    from RANOResponseLib.imaging.registration import register_rigid

    if fb.source == "hd-glio":
        studies = []
        for f in (fb, ff):
            images = {}
            for m in MODALITIES:
                p = find_modality_file(f.path.parent, f"{m}_r2s_bet_reg")
                if p is not None:
                    images[m] = read_image(p)
            if not images:
                raise RANOInputError(f"{f.path.parent}: no *_r2s_bet_reg images to register the HD-GLIO "
                                     "segmentations with (pass --transform)")
            studies.append(Study(f.path.parent, images))
        b, f = studies
    else:
        tb, tf = _timepoint_of(fb.path), _timepoint_of(ff.path)
        mods_b = [m for m in MODALITIES if find_modality_file(tb, m)]
        mods_f = [m for m in MODALITIES if find_modality_file(tf, m)]
        common = [m for m in ("T1", "CT1", "T2", "FLAIR") if m in mods_b and m in mods_f][:1]
        if not common:
            raise RANOInputError(f"{tf}: no image in common with {tb} to register the segmentations with "
                                 "(pass --transform)")
        b, f = read_study(tb, common), read_study(tf, common)
    reg = register_rigid(b, f)
    return reg.transform, f"registered rigidly here ({reg.modality}, metric {reg.metric:.3f})"


def _timepoint_of(seg_path: Path) -> Path:
    """``<week>/DeepBraTumIA-segmentation/native/segmentation/x.nii.gz`` -> ``<week>``."""
    return seg_path.parents[3]


def measure_prediction(outdir: Path | str, source: str = "auto", criteria: MeasurableCriteria | None = None,
                       margin_mm: float = 2.0) -> PairMeasurement:
    """Measure the case of a ``rano-response predict`` output folder, matched through its
    ``followup_to_baseline.tfm``.

    A manual mask next to the studies named in its ``prediction.json`` comes first (``source``:
    ``auto`` or one of :data:`SOURCES`); without one (``auto``), or with ``source="automatic"``,
    predict's own ``segmentation_baseline.nii.gz`` / ``segmentation_followup.nii.gz``. DICOM
    studies (series folders) are found as their study folders.
    """
    # imported here: the pipeline imports torch, which measuring does not otherwise need
    from RANOResponseLib.core.outputs import (
        PREDICTION_JSON,
        SEGMENTATION_FILES,
        TRANSFORM_FILE,
        prediction_studies,
        read_prediction,
    )

    outdir = Path(outdir)
    pred = read_prediction(outdir)
    outdir = outdir if outdir.is_dir() else outdir.parent
    tfm = outdir / TRANSFORM_FILE
    automatic = [outdir / SEGMENTATION_FILES[tp] for tp in ("baseline", "followup")]
    if source != AUTOMATIC:
        studies = prediction_studies(pred)
        if len(studies) < 2:
            raise RANOInputError(f"{outdir / PREDICTION_JSON}: no 'inputs' naming the two studies")
        base, fu = studies["baseline"], studies["followup"]
        try:
            fb, _ = find_pair_segmentations(base, fu, source)
        except RANOInputError as e:
            if source != "auto":
                raise
            missing = [p.name for p in automatic if not p.is_file()]
            if missing:
                raise RANOInputError(f"{e}; nor are predict's own segmentations in {outdir} "
                                     f"({', '.join(missing)} missing: predict ran with --no-segmentation?)") from None
        else:
            transform = tfm if (fb.space == "native" and tfm.is_file()) else None  # it relates the native images
            return measure_timepoints(base, fu, transform, fb.source, criteria, margin_mm)
    for p in automatic:
        if not p.is_file():
            raise RANOInputError(f"{p}: not found (predict ran with --no-segmentation, or before segmentation existed)")
    if not tfm.is_file():
        raise RANOInputError(f"{tfm}: not found (the registration that relates the two segmentations)")
    return measure_pair(automatic[0], automatic[1], tfm, criteria=criteria, margin_mm=margin_mm,
                        transform_note=f"predict's registration ({tfm})")


def with_diameters(m: TimepointMeasurement, diameters: dict[int, tuple[float, float]],
                   points: dict[int, tuple[tuple, tuple]] | None = None) -> TimepointMeasurement:
    """A copy of ``m`` whose lesions ``id -> (d1, d2)`` carry reader-edited diameters (and, if
    given, endpoints ``id -> (d1_points, d2_points)``); measurability is re-evaluated."""
    points = points or {}
    lesions = []
    for le in m.lesions:
        le = replace(le)
        if le.id in diameters:
            d1, d2 = diameters[le.id]
            if (abs(d1 - le.d1_mm) > 1e-6) or (abs(d2 - le.d2_mm) > 1e-6):
                le.edited = True
            # RANO: d1 is the longer one; a reader may have swapped the lines
            le.d1_mm, le.d2_mm = (d1, d2) if d1 >= d2 else (d2, d1)
            if le.id in points:
                p1, p2 = points[le.id]
                le.d1_points, le.d2_points = (p1, p2) if d1 >= d2 else (p2, p1)
            set_measurable(le, m.criteria)
        lesions.append(le)
    return replace(m, lesions=lesions)


def lesion_table(pair: PairMeasurement) -> list[dict]:
    """One row per lesion and timepoint, for reports and the Slicer table."""
    rows = []
    for tp, m in (("baseline", pair.baseline), ("follow-up", pair.followup)):
        for le in m.lesions:
            names = ", ".join(f"L{i}" for i in le.matched)
            if tp == "baseline":
                status = f"now follow-up {names}" if le.matched else "resolved"
            elif le.new:
                status = "NEW lesion"
            else:
                status = f"was baseline {names}" if names else "at baseline non-enhancing tumour"
            rows.append({
                "timepoint": tp, "lesion": le.name, "d1_mm": le.d1_mm, "d2_mm": le.d2_mm,
                "product_mm2": le.product_mm2, "enhancing_ml": le.enhancing_ml,
                "volume_ml": le.volume_ml, "slices": le.n_slices,
                "measurable": "yes" if le.measurable else f"no ({le.why_not_measurable})",
                "status": status, "edited": le.edited,
            })
    return rows
