"""Registration, the model grid, normalisation and the way back onto the baseline grid.

Guards RANOResponseLib.preprocessing: register_rigid recovers a known rigid motion to sub-mm
accuracy; prepare_pair builds a (C, z, y, x) array in the bundle's channel order on a grid centred
on the baseline brain; to_reference puts maps back on exactly the baseline reference grid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.imaging.geometry import grid_center, lps_to_ras, model_grid, ras_to_lps
from RANOResponseLib.imaging.io import Study
from RANOResponseLib.imaging.preprocessing import (
    Channel,
    InputSpec,
    default_channels,
    normalize,
    prepare_pair,
    to_reference,
)
from RANOResponseLib.imaging.registration import RegistrationResult, align_study, brain_mask, register_rigid

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _mean_error_mm(points: np.ndarray, recovered: sitk.Transform, truth: sitk.Transform) -> np.ndarray:
    """|truth(recovered(p)) - p| for each baseline point p: 0 for a perfect registration."""
    return np.array([np.linalg.norm(np.array(truth.TransformPoint(recovered.TransformPoint(p.tolist()))) - p)
                     for p in points])


# ------------------------------------------------------------------------------ registration


def test_registration_recovers_known_rigid_motion(known_motion):
    """Rotations of 3-5 degrees and translations of 5-8 mm are recovered to < 1 mm mean error."""
    before = _mean_error_mm(known_motion.brain_points, sitk.Euler3DTransform(), known_motion.transform)
    assert before.mean() > 5.0  # the motion is real: without registration the error is large

    result = register_rigid(known_motion.baseline, known_motion.followup)
    assert isinstance(result, RegistrationResult)
    assert isinstance(result.transform, sitk.Euler3DTransform)
    err = _mean_error_mm(known_motion.brain_points, result.transform, known_motion.transform)
    assert err.mean() < 1.0, f"mean displacement error {err.mean():.2f} mm"
    assert np.percentile(err, 95) < 1.5
    # the recovered angles are those of the inverse of the known motion (about 4, -3, 5 degrees)
    d = result.as_dict()
    assert d["modality"] == "T1"
    inverse = known_motion.transform.GetInverse()
    expected = sitk.Euler3DTransform()
    expected.SetMatrix(inverse.GetMatrix())
    np.testing.assert_allclose(
        d["rotation_deg"], np.degrees([expected.GetAngleX(), expected.GetAngleY(), expected.GetAngleZ()]), atol=0.5)


def test_registration_recovers_a_large_head_turn(icbm_hires, tmp_path):
    """A follow-up whose head is turned by about 20 degrees (12, -10, 15 about x, y, z) and moved
    15 mm: from the centres of mass alone Mattes MI stops in a wrong optimum; starting from the
    brains' principal axes the motion is recovered to < 1 mm mean error."""
    from conftest import icbm_grid, icbm_study

    base_grid = icbm_grid(icbm_hires["T1"], 3.0)
    fu_grid = icbm_grid(icbm_hires["T1"], 3.0, shift=(-9.0, 6.0, -5.0), pad=6)
    centre = base_grid.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in base_grid.GetSize()])
    turn = sitk.Euler3DTransform(centre, np.radians(12.0), np.radians(-10.0), np.radians(15.0), (9.0, -8.0, 9.0))
    baseline = icbm_study(icbm_hires, base_grid, None, tmp_path / "b")
    followup = icbm_study(icbm_hires, fu_grid, turn, tmp_path / "f")
    t1 = sitk.GetArrayViewFromImage(baseline.images["T1"])
    points = np.array([base_grid.TransformIndexToPhysicalPoint([int(i) for i in p[::-1]])
                       for p in np.argwhere(t1 > 0.2 * t1.max())[::7]])
    before = _mean_error_mm(points, sitk.Euler3DTransform(), turn)
    assert before.mean() > 15.0
    err = _mean_error_mm(points, register_rigid(baseline, followup).transform, turn)
    assert err.mean() < 1.0, err.mean()


def test_registration_of_identical_studies_is_identity(known_motion):
    """Registering a study to itself gives (nearly) the identity: no drift is introduced."""
    result = register_rigid(known_motion.baseline, known_motion.baseline)
    err = _mean_error_mm(known_motion.brain_points, result.transform, sitk.Euler3DTransform())
    assert err.mean() < 0.5


def test_registration_needs_a_common_modality(known_motion):
    """Two studies with no modality in common cannot be registered: an error naming the folders."""
    a = Study(Path("a-study"), {"T1": known_motion.baseline.images["T1"]})
    b = Study(Path("b-study"), {"FLAIR": known_motion.followup.images["FLAIR"]})
    with pytest.raises(RANOInputError, match="a-study"):
        register_rigid(a, b)


def test_registration_on_phantom_pair_is_sane(registration):
    """The phantom pair registers with a bounded rigid motion (LUMIERE-like poses), not a runaway."""
    d = registration.as_dict()
    assert max(abs(a) for a in d["rotation_deg"]) < 30
    assert np.linalg.norm(d["translation_mm"]) < 60
    assert np.isfinite(d["metric"]) and d["metric"] < 0  # Mattes MI is negative when images match


# ------------------------------------------------------------------------------ model grid


SHUFFLED = tuple(Channel.parse(c) for c in (
    "T2:baseline", "CT1:followup", "FLAIR:followup", "T1:baseline",
    "CT1:baseline", "T1:followup", "T2:followup", "FLAIR:baseline"))


def _zscore(arr: np.ndarray, clip: float = 5.0) -> np.ndarray:
    m = arr != 0
    out = np.zeros_like(arr, dtype=np.float32)
    v = arr[m]
    out[m] = np.clip((v - v.mean()) / v.std(), -clip, clip)
    return out


def test_prepare_pair_shape_order_and_transform(known_motion):
    """(C, z, y, x) with C in the spec's (shuffled) order, follow-up channels through the transform.

    Each channel is recomputed independently (plain SimpleITK resampling + z-score) and must match
    its own channel, and no other, on a non-cubic grid (so a swapped axis would show).
    """
    size = (36, 44, 40)  # x, y, z
    spec = InputSpec(("CT1", "T1", "T2", "FLAIR"), SHUFFLED, spacing=(3.0, 3.0, 3.0), size=size)
    # deliberately not the true transform: follow-up channels must visibly differ from baseline ones
    transform = sitk.Euler3DTransform(known_motion.transform.GetCenter(), 0.05, 0.0, -0.04, (9.0, 0.0, -6.0))
    pp = prepare_pair(known_motion.baseline, known_motion.followup, transform, spec)

    assert pp.array.shape == (8, size[2], size[1], size[0])
    assert pp.array.dtype == np.float32
    assert pp.channels == SHUFFLED
    assert pp.grid.GetSize() == size
    assert pp.grid.GetSpacing() == (3.0, 3.0, 3.0)
    assert pp.grid.GetDirection() == IDENTITY

    expected = []
    for ch in SHUFFLED:
        study = known_motion.followup if ch.timepoint == "followup" else known_motion.baseline
        tf = transform if ch.timepoint == "followup" else sitk.Transform()
        img = sitk.Resample(study.images[ch.modality], pp.grid, tf, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        expected.append(_zscore(sitk.GetArrayFromImage(img)))
    for i in range(len(SHUFFLED)):
        diffs = [np.abs(pp.array[i] - e).max() for e in expected]
        assert diffs[i] < 1e-3, f"channel {i} ({SHUFFLED[i]}) differs from its own recomputation"
        assert all(d > 0.5 for j, d in enumerate(diffs) if j != i), f"channel {i} also matches another: {diffs}"


def test_model_grid_is_centred_on_the_brain(known_motion):
    """The grid has the spec's size/spacing, LPS axes (identity direction), and is centred on the brain."""
    ref = known_motion.baseline.images["CT1"]
    grid = model_grid(ref, (6.0, 5.0, 4.0), (16, 20, 24))
    assert grid.GetSize() == (16, 20, 24)
    assert grid.GetSpacing() == (6.0, 5.0, 4.0)
    assert grid.GetDirection() == IDENTITY
    arr = sitk.GetArrayViewFromImage(ref)
    nz = np.nonzero(arr)
    lo = ref.TransformIndexToPhysicalPoint([int(nz[2].min()), int(nz[1].min()), int(nz[0].min())])
    hi = ref.TransformIndexToPhysicalPoint([int(nz[2].max()), int(nz[1].max()), int(nz[0].max())])
    brain_centre = (np.array(lo) + np.array(hi)) / 2
    grid_centre = grid.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in grid.GetSize()])
    np.testing.assert_allclose(grid_centre, brain_centre, atol=1e-6)


def test_network_input_does_not_depend_on_storage_orientation(known_motion):
    """The same studies stored RPI-ordered (another direction matrix and voxel order, same
    anatomy) give the same network input: the model grid is defined in physical LPS space."""
    spec = InputSpec(("CT1", "T1", "T2", "FLAIR"), SHUFFLED, spacing=(3.0, 3.0, 3.0), size=(36, 44, 40))

    def reoriented(study: Study) -> Study:
        return Study(study.folder, {m: sitk.DICOMOrient(img, "RPI") for m, img in study.images.items()})

    base_ras, fu_ras = reoriented(known_motion.baseline), reoriented(known_motion.followup)
    assert base_ras.images["CT1"].GetDirection() != known_motion.baseline.images["CT1"].GetDirection()
    a = prepare_pair(known_motion.baseline, known_motion.followup, known_motion.transform, spec).array
    b = prepare_pair(base_ras, fu_ras, known_motion.transform, spec).array
    np.testing.assert_allclose(a, b, atol=1e-3)


def test_model_grid_refuses_empty_reference(known_motion):
    """A reference without brain voxels cannot define a grid."""
    empty = sitk.Image(known_motion.baseline.images["CT1"]) * 0
    with pytest.raises(RANOInputError):
        model_grid(empty, (6, 6, 6), (16, 16, 16))


def test_ras_lps_conversion():
    """RAS and LPS differ by the sign of x and y; the conversion is its own inverse."""
    assert ras_to_lps((10.0, -20.0, 30.0)) == (-10.0, 20.0, 30.0)
    assert lps_to_ras(ras_to_lps((1.5, 2.5, -3.5))) == (1.5, 2.5, -3.5)


def test_model_grid_at_a_given_centre(known_motion):
    """With ``center`` (LPS) the grid is centred there, not on the brain; size/spacing/axes kept."""
    ref = known_motion.baseline.images["CT1"]
    default = model_grid(ref, (6.0, 5.0, 4.0), (16, 20, 24))
    centre = np.array(grid_center(default)) + (12.0, -7.5, 20.0)
    moved = model_grid(ref, (6.0, 5.0, 4.0), (16, 20, 24), center=centre)
    np.testing.assert_allclose(grid_center(moved), centre, atol=1e-9)
    np.testing.assert_allclose(np.array(moved.GetOrigin()) - default.GetOrigin(), (12.0, -7.5, 20.0), atol=1e-9)
    assert moved.GetSize() == default.GetSize() and moved.GetDirection() == IDENTITY
    with pytest.raises(RANOInputError, match="not a finite 3D point"):
        model_grid(ref, (6, 6, 6), (8, 8, 8), center=(0.0, float("nan"), 0.0))


def test_crop_centre_moves_the_network_input(known_motion):
    """Moving the crop centre by whole voxels shifts every channel by that many voxels (same
    anatomy, other grid cells); a crop beside the head is refused with an error naming the study."""
    spec = InputSpec(("CT1", "T1", "T2", "FLAIR"), SHUFFLED, spacing=(4.0, 4.0, 4.0), size=(24, 28, 20))
    base = prepare_pair(known_motion.baseline, known_motion.followup, known_motion.transform, spec)
    centre = np.array(grid_center(base.grid))
    shift_ras = (12.0, 0.0, -8.0)  # 3 voxels to patient right, 2 voxels inferior
    moved_centre = ras_to_lps(np.array(lps_to_ras(centre)) + shift_ras)
    moved = prepare_pair(known_motion.baseline, known_motion.followup, known_motion.transform, spec,
                         center=moved_centre)
    np.testing.assert_allclose(np.array(moved.grid.GetOrigin()) - base.grid.GetOrigin(), (-12.0, 0.0, -8.0))
    for key in ("CT1:baseline", "FLAIR:followup"):
        a = sitk.GetArrayFromImage(base.resampled[key])  # (z, y, x)
        b = sitk.GetArrayFromImage(moved.resampled[key])
        # LPS x fell by 3 voxels and z by 2: moved[z, y, x] == base[z - 2, y, x - 3]
        np.testing.assert_allclose(b[2:, :, 3:], a[:-2, :, :-3], atol=1e-4)
        assert np.abs(b - a).max() > 1.0  # the crop really moved
    with pytest.raises(RANOInputError, match="icbm-baseline.*holds no brain"):
        prepare_pair(known_motion.baseline, known_motion.followup, known_motion.transform, spec,
                     center=(centre[0] + 400.0, centre[1], centre[2]))


def test_prepared_phantom_channels_are_normalised(prepared, tiny_models):
    """On the real phantom pair: spec order, shape = size reversed, brain z-scored, background 0."""
    bundle, _ = tiny_models
    spec = bundle.spec
    assert prepared.array.shape == (len(spec.channels), *reversed(spec.size))
    assert prepared.channels == spec.channels
    assert list(prepared.resampled) == [str(c) for c in spec.channels]
    assert np.isfinite(prepared.array).all()
    for i, ch in enumerate(spec.channels):
        plane = prepared.array[i]
        raw = sitk.GetArrayFromImage(prepared.resampled[str(ch)])
        inside = raw != 0
        assert inside.sum() > 500, f"{ch}: brain barely on the model grid"
        assert abs(plane[inside].mean()) < 0.05, ch
        assert abs(plane[inside].std() - 1.0) < 0.05, ch
        assert np.all(plane[~inside] == 0), ch
        assert np.abs(plane).max() <= spec.clip


def test_normalize():
    """z-score over the non-zero voxels only, background kept at 0, clipped, unknown method refused."""
    rng = np.random.default_rng(0)
    arr = np.zeros((10, 10, 10), np.float32)
    arr[2:8, 2:8, 2:8] = rng.normal(100, 20, (6, 6, 6))
    arr[5, 5, 5] = 10000  # an outlier is clipped
    out = normalize(arr, "zscore", clip=3.0)
    assert np.all(out[arr == 0] == 0)
    assert out.max() == pytest.approx(3.0)
    inside = out[arr != 0]
    assert abs(np.median(inside)) < 0.3
    assert np.all(normalize(np.zeros((4, 4, 4), np.float32)) == 0)
    with pytest.raises(ValueError):
        normalize(arr, "minmax")


def test_normalize_inside_a_mask():
    """With a mask the z-score runs over the mask (zeros inside it included), 0 outside it,
    whatever the values there: a noisy background does not change the brain's values."""
    rng = np.random.default_rng(1)
    arr = rng.normal(5, 1, (12, 12, 12)).astype(np.float32)  # noise everywhere
    mask = np.zeros(arr.shape, bool)
    mask[3:9, 3:9, 3:9] = True
    arr[mask] = rng.normal(100, 20, int(mask.sum()))
    out = normalize(arr, "zscore", clip=5.0, mask=mask)
    assert np.all(out[~mask] == 0)
    v = arr[mask]
    np.testing.assert_allclose(out[mask], np.clip((v - v.mean()) / v.std(), -5, 5), atol=1e-5)
    other = arr.copy()
    other[~mask] = 1000.0
    np.testing.assert_array_equal(normalize(other, mask=mask), out)


def test_channel_parsing_and_default_order():
    """Channels are '<modality>:followup|baseline'; the default order is follow-up then baseline."""
    assert [str(c) for c in default_channels(("CT1", "T1"))] == ["CT1:followup", "CT1:baseline",
                                                                "T1:followup", "T1:baseline"]
    assert Channel.parse("FLAIR:baseline") == Channel("FLAIR", "baseline")
    for bad in ("FLAIR", "FLAIR:later", ":baseline", ""):
        with pytest.raises(ValueError):
            Channel.parse(bad)


# --------------------------------------------------------------------------- back to reference


def _oblique_reference() -> sitk.Image:
    """A reference image with an oblique direction, anisotropic spacing and a brain mask blob."""
    z, y, x = np.mgrid[0:30, 0:36, 0:40]
    arr = (np.exp(-(((x - 20) / 12.0) ** 2 + ((y - 18) / 11.0) ** 2 + ((z - 15) / 9.0) ** 2)) > 0.2).astype(np.float32)
    img = sitk.GetImageFromArray(arr * 100)
    img.SetSpacing((1.2, 1.1, 2.5))
    img.SetOrigin((12.5, -40.0, 7.0))
    img.SetDirection(sitk.VersorTransform((0.2, 0.5, -0.8), np.radians(25)).GetMatrix())
    return img


@pytest.mark.parametrize("which", ["phantom", "oblique"])
def test_to_reference_has_exact_reference_geometry(which, case_studies, tiny_models):
    """Maps come back with exactly the reference's size, spacing, origin and direction."""
    bundle, _ = tiny_models
    ref = case_studies[0].images["CT1"] if which == "phantom" else _oblique_reference()
    grid = model_grid(ref, bundle.spec.spacing, bundle.spec.size)
    arr = np.random.default_rng(1).random(tuple(reversed(bundle.spec.size))).astype(np.float32)
    out = to_reference(arr, grid, ref)
    assert out.GetSize() == ref.GetSize()
    assert out.GetSpacing() == ref.GetSpacing()
    assert out.GetOrigin() == ref.GetOrigin()
    assert out.GetDirection() == ref.GetDirection()
    assert out.GetPixelID() == sitk.sitkFloat32


def test_to_reference_keeps_positions_and_masks(known_motion):
    """A blob at a known physical point on a non-cubic model grid lands at that point on the
    reference (no swapped or flipped axes); outside the reference brain the map is 0."""
    ref = known_motion.baseline.images["CT1"]
    grid = model_grid(ref, (4.0, 5.0, 6.0), (30, 26, 22))
    target_idx = (20, 8, 15)  # x, y, z on the grid: off-centre in every axis
    target = np.array(grid.TransformIndexToPhysicalPoint(target_idx))
    arr = np.zeros((22, 26, 30), np.float32)
    arr[target_idx[2], target_idx[1], target_idx[0]] = 1.0
    from scipy import ndimage

    arr = ndimage.gaussian_filter(arr, 1.0)
    out = to_reference(arr, grid, ref, mask=False)
    peak = np.unravel_index(int(np.argmax(sitk.GetArrayViewFromImage(out))), tuple(reversed(ref.GetSize())))
    peak_point = np.array(ref.TransformIndexToPhysicalPoint([int(peak[2]), int(peak[1]), int(peak[0])]))
    assert np.linalg.norm(peak_point - target) < 3.0  # within a reference voxel of the model-grid point

    ones = to_reference(np.ones((22, 26, 30), np.float32), grid, ref, mask=True)
    o = sitk.GetArrayViewFromImage(ones)
    brain = sitk.GetArrayViewFromImage(ref) != 0
    assert np.all(o[~brain] == 0)
    assert o[brain].max() == pytest.approx(1.0)


# ------------------------------------------------------------------------- brains and sequences


def _noisy_background(study: Study, seed: int) -> tuple[Study, sitk.Image]:
    """The study with noise outside its brain (CT1's non-zero voxels), and that brain mask."""
    rng = np.random.default_rng(seed)
    background = sitk.GetArrayViewFromImage(study.images["CT1"]) == 0
    images = {}
    for m, img in study.images.items():
        arr = sitk.GetArrayFromImage(img)
        arr[background] = rng.uniform(1.0, 50.0, int(background.sum()))
        out = sitk.GetImageFromArray(arr)
        out.CopyInformation(img)
        images[m] = out
    return Study(study.folder, images), brain_mask(study.images["CT1"])


def test_prepare_pair_with_brain_masks_ignores_the_background(known_motion):
    """Given the brain masks, a study with a noisy background gives exactly the skull-stripped
    study's network input (crop, values inside the brain, zeros outside); without the masks the
    noise wrecks it (the failure the masks exist for)."""
    spec = InputSpec(("CT1", "T1", "T2", "FLAIR"), SHUFFLED, spacing=(4.0, 4.0, 4.0), size=(40, 48, 40))
    base, bmask = _noisy_background(known_motion.baseline, 1)
    fu, fmask = _noisy_background(known_motion.followup, 2)
    # the stripped studies with their (T1-defined, non-zero) masks applied
    clean = prepare_pair(known_motion.baseline, known_motion.followup, known_motion.transform.GetInverse(), spec,
                         masks=(bmask, fmask))
    noisy = prepare_pair(base, fu, known_motion.transform.GetInverse(), spec, masks=(bmask, fmask))
    np.testing.assert_allclose(noisy.array, clean.array, atol=1e-5)
    assert noisy.grid.GetOrigin() == clean.grid.GetOrigin()
    for tp in ("baseline", "followup"):
        np.testing.assert_array_equal(noisy.brains[tp], clean.brains[tp])
        assert 0.05 < noisy.brains[tp].mean() < 0.9
    for i, ch in enumerate(SHUFFLED):
        assert np.all(noisy.array[i][~noisy.brains[ch.timepoint]] == 0), ch
    unmasked = prepare_pair(base, fu, known_motion.transform.GetInverse(), spec)
    assert np.abs(unmasked.array - clean.array).mean() > 0.3


def test_align_study_leaves_a_shared_grid_alone(known_motion):
    """Sequences on the reference's grid are taken as they are: no registration, same images."""
    study = known_motion.baseline
    aligned, records = align_study(study, brain_mask(study.images["CT1"]), "CT1")
    assert all(aligned.images[m] is study.images[m] for m in study.images)
    assert records == {m: {"method": "same grid"} for m in ("T1", "T2", "FLAIR")}


def test_align_study_registers_a_thick_moved_sequence(known_motion, icbm_hires):
    """A T2 acquired on its own thick-slice grid (1.5 x 1.5 x 6 mm, other field of view) after a
    known small head motion is registered onto CT1's grid to < 1 mm mean error; a FLAIR whose
    field of view misses part of the brain reports that coverage."""
    base = known_motion.baseline
    ref = base.images["CT1"]
    centre = ref.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in ref.GetSize()])
    motion = sitk.Euler3DTransform(centre, np.radians(3.0), np.radians(-2.0), np.radians(4.0), (4.0, -3.0, 5.0))
    thick = sitk.Image([140, 160, 30], sitk.sitkFloat32)
    thick.SetSpacing((1.5, 1.5, 6.0))
    thick.SetDirection(ref.GetDirection())
    thick.SetOrigin([o - d for o, d in zip(ref.GetOrigin(), (8.0, 10.0, 6.0))])
    smooth = sitk.SmoothingRecursiveGaussian(icbm_hires["T2"], (0.5, 0.5, 2.5))
    t2 = sitk.Resample(smooth, thick, motion, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    half = sitk.Image(thick)
    half.SetOrigin([o + d for o, d in zip(thick.GetOrigin(), (0.0, 0.0, 95.0))])  # starts near the brain's middle
    flair = sitk.Resample(icbm_hires["FLAIR"], half, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    study = Study(Path("thick"), {"CT1": ref, "T1": base.images["T1"], "T2": t2, "FLAIR": flair})
    mask = brain_mask(ref)
    aligned, records = align_study(study, mask, "CT1")
    assert records["T1"] == {"method": "same grid"}
    assert records["T2"]["method"] == "registered" and records["T2"]["coverage"] > 0.99
    assert 0.2 < records["FLAIR"]["coverage"] < 0.8
    for m in ("T2", "FLAIR"):
        img = aligned.images[m]
        assert (img.GetSize(), img.GetOrigin(), img.GetSpacing(), img.GetDirection()) == \
            (ref.GetSize(), ref.GetOrigin(), ref.GetSpacing(), ref.GetDirection())
    recovered = sitk.Euler3DTransform()
    recovered.SetCenter(records["T2"]["center_mm"])
    recovered.SetRotation(*np.radians(records["T2"]["rotation_deg"]))
    recovered.SetTranslation(records["T2"]["translation_mm"])
    # the thick T2 at point q shows the anatomy at motion(q): a perfect result R has motion(R(p)) == p
    err = _mean_error_mm(known_motion.brain_points, recovered, motion)
    assert err.mean() < 1.0, err.mean()
    before = _mean_error_mm(known_motion.brain_points, sitk.Euler3DTransform(), motion)
    assert before.mean() > 5.0


def test_to_reference_masks_by_the_brain_mask(known_motion):
    """With a brain mask the map is 0 outside that mask (and kept inside it)."""
    ref = known_motion.baseline.images["CT1"]
    grid = model_grid(ref, (6.0, 6.0, 6.0), (32, 32, 32))
    box = np.zeros(tuple(reversed(ref.GetSize())), np.uint8)
    box[10:20, 15:30, 20:40] = 1
    brain = sitk.GetImageFromArray(box)
    brain.CopyInformation(ref)
    out = sitk.GetArrayFromImage(to_reference(np.ones((32, 32, 32), np.float32), grid, ref, brain=brain))
    assert np.all(out[box == 0] == 0) and np.all(out[box == 1] == pytest.approx(1.0))
