"""Tests of the RANO measurement assistant (RANOResponseLib.measurement) and its scene logic
(RANOResponseLib.measurement_scene) on the real MRML of slicer-core.

Lesions are drawn here with known sizes (ellipses, ellipsoids and rectangles, rotated in-plane, on
anisotropic and oblique grids), so every expected diameter comes from the drawing, not from the
code under test; the phantom's lesions are checked against the geometry its generator planned.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import slicer  # slicer-core: real MRML without the application (a main dependency: no skip)
from conftest import (
    DIAMETER_TOLERANCE_VOXELS,
    FineCohort,
    cohort_plan,
    planned_lesions,
    planned_spd,
    rano_classes,
)
from RANOResponseLib.cli import main as cli_main
from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.rano.measurement import (
    BINARY,
    DEEPBRATUMIA,
    HD_GLIO,
    MeasurableCriteria,
    PairMeasurement,
    axial_axis,
    find_pair_segmentations,
    find_segmentation,
    lesion_table,
    measure_pair,
    measure_segmentation,
    measure_timepoints,
    read_segmentation,
)

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def rot_z(deg: float) -> tuple[float, ...]:
    """Direction matrix (row-major) of index axes rotated about patient S by ``deg``."""
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)


def grid(size, spacing, direction=IDENTITY, centre=(0.0, 0.0, 0.0)) -> sitk.Image:
    """An empty UInt8 image whose centre voxel sits at ``centre`` (LPS mm)."""
    img = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection([float(v) for v in direction])
    d = np.array(direction, float).reshape(3, 3)
    mid = (np.array(size, float) - 1) / 2 * np.array(spacing, float)
    img.SetOrigin([float(v) for v in np.array(centre) - d @ mid])
    return img


def physical_points(img: sitk.Image) -> np.ndarray:
    """(z, y, x, 3) LPS coordinates of every voxel centre."""
    size = img.GetSize()
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
    idx = np.stack([xx, yy, zz], -1).astype(float) * np.array(img.GetSpacing())
    d = np.array(img.GetDirection()).reshape(3, 3)
    return idx @ d.T + np.array(img.GetOrigin())


def draw(img: sitk.Image, shapes: list[dict]) -> sitk.Image:
    """Label map with elliptic cylinders: each shape has centre, a, b (semi-axes, mm), theta
    (degrees, major axis from patient L towards P), half_h (half height along S, mm), label and an
    optional inner (necrotic) ellipse ``core`` = (a, b, label)."""
    pts = physical_points(img)
    arr = np.zeros(pts.shape[:3], np.uint8)
    for sh in shapes:
        p = pts - np.array(sh["centre"], float)
        t = math.radians(sh.get("theta", 0.0))
        u = math.cos(t) * p[..., 0] + math.sin(t) * p[..., 1]
        v = -math.sin(t) * p[..., 0] + math.cos(t) * p[..., 1]
        slab = np.abs(p[..., 2]) <= sh["half_h"]
        arr[slab & ((u / sh["a"]) ** 2 + (v / sh["b"]) ** 2 <= 1)] = sh.get("label", 1)
        if "core" in sh:
            ca, cb, cl = sh["core"]
            arr[slab & ((u / ca) ** 2 + (v / cb) ** 2 <= 1)] = cl
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    return out


def ellipse(size, spacing, direction=IDENTITY, a=15.0, b=8.0, theta=30.0, half_h=4.5, **kw) -> sitk.Image:
    return draw(grid(size, spacing, direction), [dict(centre=(0, 0, 0), a=a, b=b, theta=theta, half_h=half_h, **kw)])


# Grids: (size, spacing, direction, index axis that is axial). Sagittal storage: index axis 0 runs
# along S (3 mm), axes 1 and 2 along L and P; "oblique": rotated 20 degrees about S and flipped.
GRIDS = {
    "axial 0.5x0.5x3": ((100, 100, 7), (0.5, 0.5, 3.0), IDENTITY, 2),
    "rotated+flipped 0.5x0.5x3": ((100, 100, 7), (0.5, 0.5, 3.0),
                                  tuple(np.diag([-1.0, 1.0, 1.0]).dot(np.array(rot_z(20)).reshape(3, 3)).ravel()), 2),
    "sagittal storage 3x0.5x0.5": ((7, 100, 100), (3.0, 0.5, 0.5), (0, 1, 0, 0, 0, 1, 1, 0, 0), 0),
    "anisotropic in-plane 0.5x0.8x2": ((100, 64, 9), (0.5, 0.8, 2.0), rot_z(-35), 2),
}


# ------------------------------------------------------------------------------ diameters


@pytest.mark.parametrize("name", list(GRIDS))
def test_rotated_ellipse_diameters(name):
    size, spacing, direction, ax = GRIDS[name]
    a, b, theta = 15.0, 8.0, 30.0
    half_h = 4.5 if max(spacing) == 3.0 else 5.0  # between slice centres, so no voxel is on the edge
    seg = ellipse(size, spacing, direction, a, b, theta, half_h)
    m = measure_segmentation(seg, BINARY)
    assert m.axial_axis == ax == axial_axis(seg)
    assert len(m.lesions) == 1
    le = m.lesions[0]
    tol = max(s for i, s in enumerate(spacing) if i != ax)  # one in-plane pixel
    assert le.d1_mm == pytest.approx(2 * a, abs=tol)
    assert le.d2_mm == pytest.approx(2 * b, abs=tol)
    assert le.measurable
    thickness = spacing[ax]
    n_slices = 2 * int(half_h // thickness) + 1  # odd-sized grids: one slice centre at 0
    assert le.n_slices == n_slices
    assert le.slice_thickness_mm == thickness
    # volume of the voxelised elliptic cylinder: n slices of thickness x pi a b
    assert le.enhancing_ml == pytest.approx(math.pi * a * b * n_slices * thickness / 1000, rel=0.05)
    # endpoints: lengths, perpendicular, in one axial plane, d1 along the drawn major axis
    p = np.array(le.d1_points)
    q = np.array(le.d2_points)
    v1, v2 = p[1] - p[0], q[1] - q[0]
    assert np.linalg.norm(v1) == pytest.approx(le.d1_mm, abs=1e-6)
    assert np.linalg.norm(v2) == pytest.approx(le.d2_mm, abs=1e-6)
    assert abs(v1 @ v2) / (le.d1_mm * le.d2_mm) < 1e-6
    assert np.ptp(np.r_[p[:, 2], q[:, 2]]) < 1e-6
    major = np.array([math.cos(math.radians(theta)), math.sin(math.radians(theta)), 0.0])
    assert abs(v1 @ major) / le.d1_mm > math.cos(math.radians(4))
    assert np.allclose(le.centroid, 0.0, atol=0.3)


def test_two_lesions_sorted_and_sum():
    seg = draw(grid((120, 120, 8), (0.5, 0.5, 3.0), rot_z(10)), [
        dict(centre=(-14, 0, 0), a=6.0, b=6.0, half_h=4.5),
        dict(centre=(14, 5, 0), a=10.0, b=7.0, theta=-50, half_h=4.5),
    ])
    m = measure_segmentation(seg, BINARY)
    assert [le.id for le in m.lesions] == [1, 2]
    big, small = m.lesions
    assert big.d1_mm == pytest.approx(20, abs=0.5) and big.d2_mm == pytest.approx(14, abs=0.5)
    assert small.d1_mm == pytest.approx(12, abs=0.5) and small.d2_mm == pytest.approx(12, abs=0.5)
    assert big.centroid[0] > 0 > small.centroid[0]
    assert m.spd_mm2 == pytest.approx(big.product_mm2 + small.product_mm2)
    lm = sitk.GetArrayViewFromImage(m.lesion_map)
    assert set(np.unique(lm)) == {0, 1, 2}


def draw_solid(img: sitk.Image, inside) -> sitk.Image:
    """Label 1 where ``inside(u, v, z)`` holds; u, v, z are LPS mm from the image centre."""
    p = physical_points(img)
    arr = inside(p[..., 0], p[..., 1], p[..., 2]).astype(np.uint8)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    return out


def rotated(u: np.ndarray, v: np.ndarray, theta_deg: float) -> tuple[np.ndarray, np.ndarray]:
    t = math.radians(theta_deg)
    return math.cos(t) * u + math.sin(t) * v, -math.sin(t) * u + math.cos(t) * v


def test_ellipsoid_diameters_and_volume():
    """A rotated ellipsoid (semi-axes 14, 9, 7.5 mm): measured on its central slice, 28 x 18 mm."""
    a, b, c, theta = 14.0, 9.0, 7.5, -40.0
    seg = draw_solid(grid((80, 80, 21), (0.5, 0.5, 1.0), rot_z(15)),
                     lambda x, y, z: (rotated(x, y, theta)[0] / a) ** 2 + (rotated(x, y, theta)[1] / b) ** 2
                     + (z / c) ** 2 <= 1)
    le = measure_segmentation(seg, BINARY).lesions[0]
    assert le.d1_mm == pytest.approx(2 * a, abs=0.5) and le.d2_mm == pytest.approx(2 * b, abs=0.5)
    assert le.n_slices == 15  # the 1 mm slices whose centre lies inside, z = -7 ... 7
    assert le.enhancing_ml == pytest.approx(4 / 3 * math.pi * a * b * c / 1000, rel=0.05)
    assert le.measurable


@pytest.mark.parametrize("theta", [0.0, 25.0, 33.0, 61.0, 90.0])
def test_rectangle_diameters(theta):
    """A 24 x 10 mm rectangle: d1 is its diagonal (26 mm), d2 its width across the diagonal,
    2 * 24 * 10 / 26 mm, whatever its in-plane rotation. Within two pixels: at a right-angle
    corner the nearest pixel centre inside may lie up to a pixel diagonal from the corner."""
    w, h, pixel = 24.0, 10.0, 0.5
    seg = draw_solid(grid((80, 80, 5), (pixel, pixel, 3.0)),
                     lambda x, y, z: (np.abs(rotated(x, y, theta)[0]) <= w / 2)
                     & (np.abs(rotated(x, y, theta)[1]) <= h / 2) & (np.abs(z) <= 4.5))
    le = measure_segmentation(seg, BINARY).lesions[0]
    diagonal = math.hypot(w, h)
    assert le.d1_mm == pytest.approx(diagonal, abs=2 * pixel)
    assert le.d2_mm == pytest.approx(2 * w * h / diagonal, abs=2 * pixel)
    assert le.n_slices == 3 and le.measurable


def test_measurability_rules():
    img = grid((120, 120, 7), (0.5, 0.5, 3.0))
    seg = draw(img, [
        dict(centre=(-20, 0, 0), a=12.0, b=9.0, half_h=4.5),  # 24 x 18 on 3 slices: measurable
        dict(centre=(20, 0, 0), a=6.0, b=4.0, half_h=4.5),  # 12 x 8: d2 below 10 mm
        dict(centre=(0, 20, 0), a=8.0, b=8.0, half_h=1.0),  # 16 x 16 on one slice only
    ])
    m = measure_segmentation(seg, BINARY)
    by_x = {round(le.centroid[0]): le for le in m.lesions}
    assert by_x[-20].measurable and by_x[-20].why_not_measurable == ""
    assert not by_x[20].measurable and "below 10 mm" in by_x[20].why_not_measurable
    flat = [le for le in m.lesions if le.n_slices == 1]
    assert len(flat) == 1 and not flat[0].measurable and "1 axial slice" in flat[0].why_not_measurable
    assert m.spd_mm2 == pytest.approx(by_x[-20].product_mm2)
    # 6 mm slices: lesions must measure at least 2 x 6 = 12 mm
    thick = draw(grid((80, 80, 6), (0.5, 0.5, 6.0)), [dict(centre=(0, 0, 0), a=5.7, b=5.7, half_h=9.0)])
    le = measure_segmentation(thick, BINARY).lesions[0]
    assert 11.0 < le.d1_mm < 12.0 and not le.measurable and "below 12 mm" in le.why_not_measurable
    # the noise floor drops tiny components entirely
    assert len(measure_segmentation(seg, BINARY, MeasurableCriteria(min_volume_ml=1.0)).lesions) == 1


def test_label_schemes_ring_lesion_and_core_only():
    img = grid((100, 100, 8), (0.5, 0.5, 3.0))
    seg = draw(img, [
        dict(centre=(-10, 0, 0), a=9.0, b=9.0, half_h=4.5, label=1, core=(6.0, 6.0, 2)),  # ring + necrosis
        dict(centre=(14, 10, 0), a=6.0, b=6.0, half_h=4.5, label=2),  # necrosis only: not a lesion
        dict(centre=(14, -12, 0), a=5.5, b=5.5, half_h=4.5, label=3),  # edema only
    ])
    m = measure_segmentation(seg, DEEPBRATUMIA)
    assert len(m.lesions) == 1
    ring = m.lesions[0]
    assert ring.d1_mm == pytest.approx(18, abs=0.5)  # outer diameter, necrotic centre included
    assert ring.volume_ml > ring.enhancing_ml > 0
    assert ring.enhancing_ml == pytest.approx(math.pi * (81 - 36) * 12 / 1000, rel=0.06)
    # HD-GLIO: 2 is contrast-enhancing, 1 is non-enhancing abnormality
    hd = measure_segmentation(seg, HD_GLIO)
    assert len(hd.lesions) == 2  # the necrotic core of the ring (label 2) and the label-2 blob
    assert [le.d1_mm for le in hd.lesions] == pytest.approx([12.0, 12.0], abs=0.5)


def test_empty_segmentation_is_no_lesion():
    m = measure_segmentation(grid((20, 20, 5), (1, 1, 3)), DEEPBRATUMIA)
    assert m.lesions == [] and m.spd_mm2 == 0.0 and m.measurable_volume_ml == 0.0


# ------------------------------------------------------------------------------ matching


def known_motion() -> sitk.Euler3DTransform:
    """Baseline point -> follow-up point: 8 degrees about S, 4 about L, and a shift."""
    return sitk.Euler3DTransform((0, 0, 0), math.radians(4), 0.0, math.radians(8), (6.0, -4.0, 3.0))


def baseline_and_followup(new_lesion: bool = True) -> tuple[sitk.Image, sitk.Image, sitk.Euler3DTransform]:
    """A lesion A (grows from 20 to 26 mm) and, if asked, a new 14 mm lesion B far from it; the
    follow-up is drawn in baseline space, then moved by the known transform onto its own grid."""
    base = draw(grid((64, 64, 24), (1.0, 1.0, 2.0)), [dict(centre=(-10, 0, 0), a=10.0, b=8.0, half_h=5)])
    shapes = [dict(centre=(-10, 0, 0), a=13.0, b=10.0, half_h=6)]
    if new_lesion:
        shapes.append(dict(centre=(16, 18, 0), a=7.0, b=7.0, half_h=5))
    fu_in_base = draw(grid((64, 64, 24), (1.0, 1.0, 2.0)), shapes)
    T = known_motion()
    fu_grid = grid((60, 70, 26), (1.1, 0.9, 2.0), rot_z(5), centre=(5, -3, 2))
    fu = sitk.Resample(fu_in_base, fu_grid, T.GetInverse(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return base, fu, T


def test_match_and_new_lesion_through_registration(tmp_path):
    base, fu, T = baseline_and_followup()
    pair = measure_pair(base, fu, T, BINARY)
    assert len(pair.baseline.lesions) == 1 and len(pair.followup.lesions) == 2
    a = max(pair.followup.lesions, key=lambda le: le.product_mm2)
    b = min(pair.followup.lesions, key=lambda le: le.product_mm2)
    assert a.matched == (1,) and not a.new
    assert b.new and b.matched == () and b.measurable
    assert pair.baseline.lesions[0].matched == (a.id,)
    assert [le.id for le in pair.new_measurable] == [b.id]
    # centroids mapped back into baseline space land where they were drawn
    assert np.allclose(a.centroid_in_baseline, (-10, 0, 0), atol=1.0)
    assert np.allclose(b.centroid_in_baseline, (16, 18, 0), atol=1.0)
    # the same through predict's .tfm file
    tfm = tmp_path / "followup_to_baseline.tfm"
    sitk.WriteTransform(T, str(tfm))
    again = measure_pair(base, fu, tfm, BINARY)
    assert [le.new for le in again.followup.lesions] == [le.new for le in pair.followup.lesions]
    assert str(tfm) in again.transform
    # without the registration the grown lesion A no longer overlaps and looks new
    wrong = measure_pair(base, fu, sitk.Euler3DTransform((0, 0, 0), 0, 0, 0, (40.0, 40.0, 0.0)), BINARY)
    assert all(le.new for le in wrong.followup.lesions)


def test_no_new_lesion_and_resolved_lesion():
    base, fu, T = baseline_and_followup(new_lesion=False)
    pair = measure_pair(base, fu, T, BINARY)
    assert pair.new_lesions == []
    gone = measure_pair(base, sitk.Image(fu.GetSize(), sitk.sitkUInt8), T, BINARY)
    assert gone.followup.lesions == [] and gone.baseline.lesions[0].matched == ()
    rows = lesion_table(gone)
    assert rows[0]["status"] == "resolved"


def test_pair_json_round_trip():
    base, fu, T = baseline_and_followup()
    pair = measure_pair(base, fu, T, BINARY)
    back = PairMeasurement.from_dict(json.loads(json.dumps(pair.to_dict())))
    assert back.followup.spd_mm2 == pytest.approx(pair.followup.spd_mm2)
    assert [le.new for le in back.followup.lesions] == [le.new for le in pair.followup.lesions]
    assert np.allclose(back.followup.lesions[0].d1_points, pair.followup.lesions[0].d1_points)


# ------------------------------------------------------------------------------ files


def write_seg(path: Path, image: sitk.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)
    return path


def test_find_segmentation_layouts(tmp_path):
    seg = ellipse((40, 40, 6), (1, 1, 3))
    tp = tmp_path / "week-010"
    with pytest.raises(RANOInputError, match="no tumour segmentation found") as e:
        find_segmentation(tmp_path)
    assert str(tmp_path) in str(e.value) and "seg_mask.nii.gz" in str(e.value)
    hd = write_seg(tp / "HD-GLIO-AUTO-segmentation/registered/segmentation.nii.gz", seg)
    found = find_segmentation(tp)
    assert found.path == hd and found.scheme == HD_GLIO and found.source == "hd-glio"
    native = write_seg(tp / "DeepBraTumIA-segmentation/native/segmentation/ct1_seg_mask.nii.gz", seg)
    write_seg(tp / "DeepBraTumIA-segmentation/native/segmentation/FLAIR_seg_mask.nii.gz", seg)
    found = find_segmentation(tp)
    assert found.path == native and found.scheme == DEEPBRATUMIA and found.space == "native"
    assert find_segmentation(tp, "hd-glio").path == hd
    with pytest.raises(RANOInputError, match="atlas/segmentation/seg_mask.nii.gz"):
        find_segmentation(tp, "deepbratumia-atlas")
    with pytest.raises(RANOInputError, match="unknown segmentation source"):
        find_segmentation(tp, "nnunet")
    # a pair uses one source for both timepoints: the only one they share
    other = tmp_path / "week-020"
    write_seg(other / "DeepBraTumIA-segmentation/atlas/segmentation/seg_mask.nii.gz", seg)
    with pytest.raises(RANOInputError, match="no segmentation source common"):
        find_pair_segmentations(tp, other)
    write_seg(tp / "DeepBraTumIA-segmentation/atlas/segmentation/seg_mask.nii.gz", seg)
    fb, ff = find_pair_segmentations(tp, other)
    assert fb.source == ff.source == "deepbratumia-atlas"


def test_read_segmentation_refuses_bad_files(tmp_path):
    good = write_seg(tmp_path / "seg.nii.gz", ellipse((40, 40, 6), (1, 1, 3)))
    assert sitk.GetArrayViewFromImage(read_segmentation(good)).max() == 1
    with pytest.raises(RANOInputError, match="not found") as e:
        read_segmentation(tmp_path / "missing.nii.gz")
    assert "missing.nii.gz" in str(e.value)
    cut = tmp_path / "cut.nii.gz"
    data = gzip.compress(gzip.decompress(good.read_bytes()))
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(RANOInputError, match="cut.nii.gz"):
        read_segmentation(cut)
    frac = sitk.Cast(ellipse((40, 40, 6), (1, 1, 3)), sitk.sitkFloat32) * 0.5
    with pytest.raises(RANOInputError, match="non-integer"):
        read_segmentation(write_seg(tmp_path / "prob.nii.gz", frac))
    with pytest.raises(RANOInputError, match="not a 3D"):
        read_segmentation(write_seg(tmp_path / "flat.nii.gz", ellipse((40, 40, 6), (1, 1, 3))[:, :, 2]))


# ------------------------------------------------------------------------------ phantom


@pytest.fixture(scope="module")
def cohort_truth(case_pair) -> tuple[Path, pd.DataFrame]:
    root = case_pair.baseline.parents[2]
    return root, pd.read_csv(root / "phantom_truth.csv", dtype={"date": str})


def test_phantom_atlas_masks_match_planned_lesions(fine_cohort: FineCohort):
    """Each timepoint's atlas mask holds the enhancing lesions the generator planned, and each
    measures the planned lesion's diameters (its geometry, not the generator's measurement) within
    two voxels."""
    tol = DIAMETER_TOLERANCE_VOXELS * fine_cohort.config.spacing
    checked = 0
    for plan in fine_cohort.plans:
        for tp in plan.timepoints:
            seg = find_segmentation(fine_cohort.root / "Imaging" / plan.patient / tp.folder, "deepbratumia-atlas")
            m = measure_segmentation(seg.path, seg.scheme)
            planned = planned_lesions(plan, tp)
            assert len(m.lesions) == len(planned), (plan.patient, tp.folder)
            image = read_segmentation(seg.path)
            for shape, d1, d2 in planned:
                centre = image.TransformContinuousIndexToPhysicalPoint(
                    [float(v) for v in shape.centre_mm[::-1] / fine_cohort.config.spacing])
                le = min(m.lesions, key=lambda x: np.linalg.norm(np.subtract(x.centroid, centre)))
                assert np.linalg.norm(np.subtract(le.centroid, centre)) < d2 / 2  # the planned lesion
                assert abs(le.d1_mm - d1) <= tol and abs(le.d2_mm - d2) <= tol, (plan.patient, tp.folder)
                assert le.measurable
                checked += 1
    assert checked >= 16


def test_phantom_native_pair_registered_here(case_pair):
    """Native masks live in each timepoint's own (moved) space: registration relates them, and
    they measure like the atlas masks of the same timepoints and find the planned new lesion."""
    pair = measure_timepoints(case_pair.baseline, case_pair.followup, source="deepbratumia-native")
    atlas = measure_timepoints(case_pair.baseline, case_pair.followup, source="deepbratumia-atlas")
    assert "registered" in pair.transform and "identity" in atlas.transform
    assert pair.followup.spd_mm2 == pytest.approx(atlas.followup.spd_mm2, rel=0.15)  # 4 mm resampled masks
    assert pair.baseline.spd_mm2 == pytest.approx(atlas.baseline.spd_mm2, rel=0.15)
    plan = cohort_plan(case_pair.baseline.parents[2])[0]
    planned = next(tp for tp in plan.timepoints if tp.folder == case_pair.followup.name)
    assert bool(pair.new_measurable) == bool(atlas.new_measurable) == planned.new_lesion_intended


def test_cli_measure(case_pair, cohort_truth, tmp_path, capsys):
    """`measure` on the atlas masks gives a category the planned geometry allows (RANO written out
    in conftest), the same one the phantom labelled the pair with."""
    root, truth = cohort_truth
    out = tmp_path / "measurements.json"
    rc = cli_main(["measure", "--baseline", str(case_pair.baseline), "--followup", str(case_pair.followup),
                   "--source", "deepbratumia-atlas", "--out", str(out)])
    assert rc == 0
    d = json.loads(out.read_text())
    plan = cohort_plan(root)[0]
    tps = {tp.folder: tp for tp in plan.timepoints}
    before, after = tps[case_pair.baseline.name], tps[case_pair.followup.name]
    tol = DIAMETER_TOLERANCE_VOXELS * float(truth["spacing"].iloc[0])
    allowed = rano_classes(planned_spd(planned_lesions(plan, before), tol), planned_spd(planned_lesions(plan, after), tol),
                           enhancing_left=bool(planned_lesions(plan, after)), new_measurable=after.new_lesion_intended)
    category = d["rule"]["category"]
    assert category in allowed
    assert category == truth[truth["date"] == case_pair.followup.name].iloc[0]["rating_measured"]
    assert "rule-based category: " + category in capsys.readouterr().out
    rc = cli_main(["measure", "--baseline", str(case_pair.baseline), "--followup", str(tmp_path)])
    assert rc == 2
    assert str(tmp_path) in capsys.readouterr().err


# ------------------------------------------------------------------------------ scene (MRML)


@pytest.fixture
def scene():
    s = slicer.vtkMRMLScene()
    s.AddNode(slicer.vtkMRMLSelectionNode())  # what the markups' length measurement looks up
    return s


def test_volume_node_round_trip_keeps_geometry(scene):
    from RANOResponseLib.mrml.measurement_scene import volume_node_from_image
    from RANOResponseLib.mrml.scene import node_to_image

    size, spacing, direction, _ = GRIDS["rotated+flipped 0.5x0.5x3"]
    seg = ellipse(size, spacing, direction)
    node = volume_node_from_image(scene, seg, "seg")
    back = node_to_image(node)
    assert np.allclose(back.GetOrigin(), seg.GetOrigin()) and np.allclose(back.GetSpacing(), seg.GetSpacing())
    assert np.allclose(back.GetDirection(), seg.GetDirection())
    assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(seg))
    # RAS in Slicer: the first voxel's RAS position is the LPS origin with x and y negated
    ras = [0.0, 0.0, 0.0, 1.0]
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    p = m.MultiplyPoint(ras)
    assert np.allclose(p[:3], (-seg.GetOrigin()[0], -seg.GetOrigin()[1], seg.GetOrigin()[2]))


def test_segmentation_node_to_label_map(scene):
    from RANOResponseLib.mrml.measurement_scene import segmentation_image, volume_node_from_image

    img = grid((100, 100, 8), (0.5, 0.5, 3.0), rot_z(15))
    labels = draw(img, [dict(centre=(0, 0, 0), a=9.0, b=9.0, half_h=4.5, label=1, core=(6.0, 6.0, 2))])
    labelmap = volume_node_from_image(scene, labels, "labels")
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "tumour")
    assert slicer.vtkSlicerSegmentationsModuleLogic().ImportLabelmapToSegmentationNode(labelmap, seg_node)
    s = seg_node.GetSegmentation()
    s.GetNthSegment(0).SetName("Enhancing tumor")
    s.GetNthSegment(1).SetName("Necrosis")
    image, scheme = segmentation_image(seg_node, reference_node=labelmap)  # segments picked by name
    assert scheme == DEEPBRATUMIA
    assert np.array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(labels))
    assert measure_segmentation(image, scheme).lesions[0].d1_mm == pytest.approx(
        measure_segmentation(labels, DEEPBRATUMIA).lesions[0].d1_mm)
    # without the necrosis segment the ring is measured alone (same outer diameter, less volume)
    ring, _ = segmentation_image(seg_node, enhancing=["Enhancing tumor"], core=[], reference_node=labelmap)
    assert set(np.unique(sitk.GetArrayViewFromImage(ring))) == {0, 1}
    with pytest.raises(RANOInputError, match="no enhancing segment 'Edema'"):
        segmentation_image(seg_node, enhancing=["Edema"])
    # a labelmap node is taken as it is
    direct, sch = segmentation_image(labelmap)
    assert sch == DEEPBRATUMIA and np.array_equal(sitk.GetArrayViewFromImage(direct),
                                                  sitk.GetArrayViewFromImage(labels))


def test_diameter_lines_drive_the_category(scene):
    from RANOResponseLib.mrml import measurement_scene as ms
    from RANOResponseLib.rano.rules import decide

    img = grid((100, 100, 8), (0.5, 0.5, 3.0), rot_z(-25))
    base = draw(img, [dict(centre=(0, 0, 0), a=10.0, b=8.0, theta=30, half_h=4.5)])
    fu = draw(img, [dict(centre=(0, 0, 0), a=10.5, b=8.0, theta=30, half_h=4.5)])
    pair = measure_pair(base, fu, None, BINARY)
    assert decide(pair).category == "SD"
    lines_b = ms.add_diameter_lines(scene, pair.baseline, "baseline")
    lines_f = ms.add_diameter_lines(scene, pair.followup, "followup")
    assert len(lines_b) == len(lines_f) == 1
    ln = lines_f[0]
    le = pair.followup.lesions[0]
    assert ln.lengths() == pytest.approx((le.d1_mm, le.d2_mm))
    assert ln.angle_deg() == pytest.approx(90.0)
    # RAS endpoints are the LPS ones with x, y negated
    assert ms.line_points(ln.long)[0] == pytest.approx(ms.lps_to_ras(le.d1_points[0]))
    assert ln.long.GetAttribute(ms.ATTR) == "followup:1:long"
    assert len(ms.find_diameter_lines(scene)) == 2

    calls = []
    stop = ms.observe_lines(lines_f, lambda: calls.append(1))
    p = ms.line_points(ln.long)
    new_end = p[0] + (p[1] - p[0]) * 1.3  # the reader drags d1 30 % longer
    ln.long.SetNthControlPointPosition(1, *new_end)
    assert calls, "moving a line endpoint must call back"
    updated, rule = ms.recompute(scene, pair)
    f = updated.followup.lesions[0]
    assert f.d1_mm == pytest.approx(1.3 * le.d1_mm) and f.edited
    assert rule.category == "PD"
    assert any("edited" in r for r in rule.reasoning)
    # shrink d2 below 10 mm: the lesion is no longer measurable -> SPD drops to 0
    q = ms.line_points(ln.perpendicular)
    mid = q.mean(axis=0)
    ln.perpendicular.SetNthControlPointPosition(0, *(mid - (q[1] - q[0]) * 0.25))
    ln.perpendicular.SetNthControlPointPosition(1, *(mid + (q[1] - q[0]) * 0.25))
    updated, rule = ms.recompute(scene, pair)
    assert not updated.followup.lesions[0].measurable and rule.category == "PR"
    # a line turned away from perpendicular is pointed out
    ln.perpendicular.SetNthControlPointPosition(1, *(mid + (p[1] - p[0]) * 0.3))
    _, rule = ms.recompute(scene, pair)
    assert any("not perpendicular" in r for r in rule.reasoning)
    n = len(calls)
    stop()
    ln.long.SetNthControlPointPosition(1, *p[1])
    assert len(calls) == n
    ms.remove_diameter_lines(scene)
    assert ms.find_diameter_lines(scene) == []
