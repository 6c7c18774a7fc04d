"""Reading studies: every image is checked before a prediction may be built on it.

Guards RANOResponseLib.io: read_image / read_study refuse bad files with a RANOInputError that
names the file, read the three supported formats identically, and check_distinct_studies refuses
a follow-up that is the baseline folder. Also the atomic writers used for the outputs.
"""

from __future__ import annotations

import gzip
import os
import shutil
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import copy_study, modality_file, nib_affine_and_array, write_nib
from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.files import atomic_output_dir, write_text
from RANOResponseLib.core.names import MODALITIES
from RANOResponseLib.imaging.io import (
    Study,
    check_distinct_studies,
    find_modality_file,
    read_image,
    read_study,
    write_image,
)


@pytest.fixture
def ct1(case_pair) -> Path:
    return modality_file(case_pair.baseline, "CT1")


@pytest.fixture
def ct1_array(ct1) -> np.ndarray:
    """The CT1 voxels in nibabel (x, y, z) order."""
    return np.asarray(nib.load(str(ct1)).dataobj)


def _oblique_image() -> sitk.Image:
    """A small int16 image with anisotropic spacing, an oblique direction and a brain-like blob."""
    z, y, x = np.mgrid[0:18, 0:22, 0:26]
    arr = (1000 * np.exp(-(((x - 13) / 7.0) ** 2 + ((y - 11) / 6.0) ** 2 + ((z - 9) / 5.0) ** 2))).astype(np.int16)
    arr[arr < 30] = 0
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.5, 2.0, 3.0))
    img.SetOrigin((-20.25, 31.5, -12.0))
    rot = sitk.VersorTransform((0.3, -0.2, 0.9), np.radians(17.0))
    img.SetDirection(rot.GetMatrix())
    return img


# --------------------------------------------------------------------------- bad single images


def _bad_file(kind: str, tmp_path: Path, ct1: Path, ct1_array: np.ndarray) -> tuple[Path, str]:
    """Write a bad image of the given kind; return its path and a word its error must contain."""
    if kind == "2d":
        p = tmp_path / "slice.nii.gz"
        img = sitk.ReadImage(str(ct1))
        sitk.WriteImage(img[:, :, img.GetSize()[2] // 2], str(p))
        return p, "3D"
    if kind == "single_slice":  # 3D header but only one slice: still not a volume
        p = tmp_path / "slab.nii.gz"
        write_nib(ct1_array[:, :, 10:11], ct1, p)
        return p, "3D"
    if kind == "4d":
        p = tmp_path / "series.nii.gz"
        write_nib(np.stack([ct1_array, ct1_array], axis=-1), ct1, p)
        return p, "3D"
    if kind == "4d_singleton":  # x, y, z, 1: one volume, but a 4D file
        p = tmp_path / "series1.nii.gz"
        write_nib(ct1_array[..., None], ct1, p)
        return p, "3D"
    if kind == "vector":
        p = tmp_path / "rgb.nii.gz"
        img = sitk.Cast(sitk.ReadImage(str(ct1)), sitk.sitkFloat32)
        sitk.WriteImage(sitk.Compose([img, img, img]), str(p))
        return p, "3D"
    if kind == "nan":
        p = tmp_path / "nan.nii.gz"
        arr = ct1_array.astype(np.float32)
        arr[tuple(np.argwhere(arr != 0)[len(np.argwhere(arr != 0)) // 2])] = np.nan
        write_nib(arr, ct1, p)
        assert np.isnan(np.asarray(nib.load(str(p)).dataobj)).sum() == 1  # the trap is really there
        return p, "NaN"
    if kind == "inf":
        p = tmp_path / "inf.nii.gz"
        arr = ct1_array.astype(np.float32)
        arr[5, 6, 7] = np.inf
        write_nib(arr, ct1, p)
        return p, "infinite"
    if kind == "all_zero":
        p = tmp_path / "zero.nii.gz"
        write_nib(np.zeros(ct1_array.shape, np.float32), ct1, p)
        return p, "empty"
    if kind == "constant":
        p = tmp_path / "constant.nii.gz"
        write_nib(np.full(ct1_array.shape, 7.0, np.float32), ct1, p)
        return p, "empty"
    if kind == "truncated_nii_gz":
        p = tmp_path / "cut.nii.gz"
        data = ct1.read_bytes()
        p.write_bytes(data[: len(data) // 2])
        return p, "truncated"
    if kind in ("truncated_nii", "truncated_nrrd"):
        ext = ".nii" if kind == "truncated_nii" else ".nrrd"
        p, full = tmp_path / f"cut{ext}", tmp_path / f"full{ext}"
        sitk.WriteImage(sitk.ReadImage(str(ct1)), str(full), useCompression=ext == ".nrrd")
        data = full.read_bytes()
        p.write_bytes(data[: len(data) // 2])
        return p, "truncated"
    if kind == "header_only":
        p = tmp_path / "header.nii.gz"
        p.write_bytes(ct1.read_bytes()[:60])
        return p, "unreadable"
    if kind == "garbage":
        p = tmp_path / "garbage.nii.gz"
        p.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
        return p, "unreadable"
    if kind == "text":
        p = tmp_path / "notes.nrrd"
        p.write_text("this is not an image\n")
        return p, "unreadable"
    if kind == "empty_file":
        p = tmp_path / "empty.nii"
        p.write_bytes(b"")
        return p, "unreadable"
    if kind == "missing":
        return tmp_path / "nope.nii.gz", "not found"
    raise ValueError(kind)


BAD_IMAGES = ["2d", "single_slice", "4d", "4d_singleton", "vector", "nan", "inf", "all_zero", "constant",
              "truncated_nii_gz", "truncated_nii", "truncated_nrrd", "header_only", "garbage", "text",
              "empty_file", "missing"]


@pytest.mark.parametrize("kind", BAD_IMAGES)
def test_read_image_refuses_bad_file_naming_it(kind, tmp_path, ct1, ct1_array):
    """Each kind of bad image is a RANOInputError whose one-line message names the file and the problem."""
    path, word = _bad_file(kind, tmp_path, ct1, ct1_array)
    with pytest.raises(RANOInputError) as info:
        read_image(path)
    msg = str(info.value)
    assert str(path) in msg
    assert word.lower() in msg.lower()
    assert "\n" not in msg


def test_truncation_trap_is_real_and_caught(tmp_path, ct1, ct1_array):
    """A .nii.gz cut in half: refused by read_image even though its header is intact."""
    path, _ = _bad_file("truncated_nii_gz", tmp_path, ct1, ct1_array)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()  # the header alone looks fine
    assert reader.GetSize() == sitk.ReadImage(str(ct1)).GetSize()
    with pytest.raises(RANOInputError, match="truncated"):
        read_image(path)


def _silently_corruptible(data: bytes) -> bytes:
    """Flip 16 bytes inside the deflate stream at a place where it still decodes (to other voxels).

    Found by decoding each candidate with zlib without the gzip trailer (so no CRC check): the
    result has the full length but different bytes. Only the gzip CRC32 can tell.
    """
    original = zlib.decompressobj(31).decompress(data[:-8])
    for pos in range(len(data) // 4, len(data) - 200, 97):
        bad = bytearray(data)
        for i in range(pos, pos + 16):
            bad[i] ^= 0xA5
        try:
            decoded = zlib.decompressobj(31).decompress(bytes(bad[:-8]))
        except zlib.error:
            continue
        if len(decoded) == len(original) and decoded != original:
            return bytes(bad)
    pytest.skip("no silently decodable corruption found in this file")


def test_corrupted_gzip_voxels_are_refused(tmp_path, ct1):
    """Bit rot inside a .nii.gz (bytes changed, length intact) must be refused, not turned into voxels."""
    bad = _silently_corruptible(ct1.read_bytes())
    with pytest.raises(OSError):  # what any complete gzip reader says about it
        gzip.decompress(bad)
    path = tmp_path / "rotten.nii.gz"
    path.write_bytes(bad)
    with pytest.raises(RANOInputError) as info:
        read_image(path)
    assert str(path) in str(info.value)


# ------------------------------------------------------------------------------- good images


def test_formats_read_identically(tmp_path):
    """.nii.gz, .nii and .nrrd of one oblique, anisotropic image give the same voxels and geometry."""
    img = _oblique_image()
    paths = {}
    for ext in (".nii.gz", ".nii", ".nrrd"):
        paths[ext] = tmp_path / f"image{ext}"
        sitk.WriteImage(img, str(paths[ext]))
    read = {ext: read_image(p) for ext, p in paths.items()}
    expected = sitk.GetArrayFromImage(img).astype(np.float32)
    for ext, r in read.items():
        assert r.GetPixelID() == sitk.sitkFloat32, ext
        np.testing.assert_array_equal(sitk.GetArrayFromImage(r), expected, err_msg=ext)
        assert r.GetSize() == img.GetSize(), ext
        np.testing.assert_allclose(r.GetSpacing(), img.GetSpacing(), atol=1e-6, err_msg=ext)
        np.testing.assert_allclose(r.GetOrigin(), img.GetOrigin(), atol=1e-4, err_msg=ext)
        np.testing.assert_allclose(r.GetDirection(), img.GetDirection(), atol=1e-5, err_msg=ext)
    # and exactly what ITK (Slicer) itself reads from each file
    for ext, p in paths.items():
        itk = sitk.ReadImage(str(p))
        assert read[ext].GetOrigin() == itk.GetOrigin()
        assert read[ext].GetSpacing() == itk.GetSpacing()
        assert read[ext].GetDirection() == itk.GetDirection()


def test_nifti_scaling_and_axis_order_match_itk(tmp_path, ct1_array, ct1):
    """nibabel-decoded voxels (x,y,z, with scl_slope/inter) land in the same places as ITK's voxels."""
    affine, _, _ = nib_affine_and_array(ct1)
    arr = ct1_array.astype(np.int16)
    arr[3, 5, 7] = 1234  # asymmetric marker: a transposed axis would move it
    img = nib.Nifti1Image(arr, affine)
    img.header.set_slope_inter(0.5, 10.0)
    path = tmp_path / "scaled.nii.gz"
    nib.save(img, str(path))
    ours = sitk.GetArrayFromImage(read_image(path))
    itk = sitk.GetArrayFromImage(sitk.ReadImage(str(path), sitk.sitkFloat32))
    np.testing.assert_allclose(ours, itk, rtol=0, atol=1e-4)
    assert ours[7, 5, 3] == pytest.approx(1234 * 0.5 + 10.0)


def test_read_study_reads_all_modalities(case_pair):
    """A complete study folder gives four float32 images with the files they came from."""
    study = read_study(case_pair.baseline)
    assert isinstance(study, Study)
    assert set(study.images) == set(MODALITIES) == set(study.files)
    for m, img in study.images.items():
        assert img.GetPixelID() == sitk.sitkFloat32
        assert study.files[m].parent == case_pair.baseline
        assert img.GetSize() == sitk.ReadImage(str(study.files[m])).GetSize()
    assert study.reference_modality() == "CT1"
    assert study.name == case_pair.baseline.name


@pytest.mark.parametrize("missing", [("T2",), ("CT1", "FLAIR")])
def test_read_study_missing_modality_names_folder_and_modality(tmp_path, case_pair, missing):
    """A study without a modality is refused; the message names the folder and every missing modality."""
    folder = copy_study(case_pair.followup, tmp_path / "study")
    for m in missing:
        modality_file(folder, m).unlink()
    with pytest.raises(RANOInputError) as info:
        read_study(folder)
    msg = str(info.value)
    assert str(folder) in msg
    for m in missing:
        assert m in msg


def test_read_study_only_requested_modalities(tmp_path, case_pair):
    """A study needs only the modalities asked for (a bundle may use fewer than four)."""
    folder = copy_study(case_pair.followup, tmp_path / "study")
    modality_file(folder, "T2").unlink()
    study = read_study(folder, ("T1", "FLAIR"))
    assert set(study.images) == {"T1", "FLAIR"}
    assert study.reference_modality() == "T1"


def test_read_study_case_insensitive_and_mixed_formats(tmp_path, case_pair):
    """File names match case-insensitively, and a study may mix .nii.gz, .nii and .nrrd."""
    folder = tmp_path / "study"
    folder.mkdir()
    src = {m: modality_file(case_pair.baseline, m) for m in MODALITIES}
    shutil.copy(src["CT1"], folder / "ct1.NII.GZ")  # ITK will not write that name, but reads it
    sitk.WriteImage(sitk.ReadImage(str(src["T1"])), str(folder / "T1.nii"))
    sitk.WriteImage(sitk.ReadImage(str(src["T2"])), str(folder / "T2.nrrd"))
    sitk.WriteImage(sitk.ReadImage(str(src["FLAIR"])), str(folder / "Flair.nii.gz"))
    study = read_study(folder)
    for m in MODALITIES:
        np.testing.assert_array_equal(sitk.GetArrayFromImage(study.images[m]),
                                      sitk.GetArrayFromImage(sitk.ReadImage(str(src[m]), sitk.sitkFloat32)))
    assert find_modality_file(folder, "PD") is None


def test_read_study_missing_folder(tmp_path):
    """A study folder that does not exist is a RANOInputError naming it."""
    with pytest.raises(RANOInputError, match="not found") as info:
        read_study(tmp_path / "week-999")
    assert str(tmp_path / "week-999") in str(info.value)


def test_read_study_reports_bad_file_inside(tmp_path, case_pair):
    """A broken image inside a study is reported with its own path (not just the folder)."""
    folder = copy_study(case_pair.followup, tmp_path / "study")
    t2 = modality_file(folder, "T2")
    data = t2.read_bytes()
    t2.write_bytes(data[: len(data) // 2])
    with pytest.raises(RANOInputError) as info:
        read_study(folder)
    assert str(t2) in str(info.value)


# ---------------------------------------------------------------------------- distinct studies


def test_check_distinct_studies_refuses_same_folder(case_pair):
    """The same folder as baseline and follow-up is refused, naming it."""
    with pytest.raises(RANOInputError, match="same folder") as info:
        check_distinct_studies(case_pair.baseline, case_pair.baseline)
    assert str(case_pair.baseline) in str(info.value)


def test_check_distinct_studies_refuses_symlink_and_dotdot(tmp_path, case_pair):
    """A symlink to the baseline folder, or a path with '..', is still the same study."""
    link = tmp_path / "alias"
    link.symlink_to(case_pair.baseline, target_is_directory=True)
    with pytest.raises(RANOInputError) as info:
        check_distinct_studies(case_pair.baseline, link)
    assert str(link) in str(info.value)
    dotdot = case_pair.baseline / ".." / case_pair.baseline.name
    with pytest.raises(RANOInputError):
        check_distinct_studies(dotdot, case_pair.baseline)


def test_check_distinct_studies_accepts_two_studies(case_pair, tmp_path):
    """Two different folders pass, also when one is a copy with identical files."""
    check_distinct_studies(case_pair.baseline, case_pair.followup)
    copy = copy_study(case_pair.baseline, tmp_path / "copy")
    check_distinct_studies(case_pair.baseline, copy)


# ----------------------------------------------------------------------------------- writing


def test_atomic_output_dir_success_and_failure(tmp_path):
    """Outputs appear together on success; on an error nothing (no folder, no staging) is left."""
    out = tmp_path / "results" / "case"
    with atomic_output_dir(out) as stage:
        assert stage != out and not out.exists()
        write_text("{}", stage / "prediction.json")
        write_image(_oblique_image(), stage / "map.nii.gz")
    assert sorted(p.name for p in out.iterdir()) == ["map.nii.gz", "prediction.json"]
    assert sitk.ReadImage(str(out / "map.nii.gz")).GetSize() == _oblique_image().GetSize()

    failed = tmp_path / "results" / "other"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(failed) as stage:
            write_text("partial", stage / "prediction.json")
            raise RuntimeError("boom")
    assert not failed.exists()
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["case"]


def test_atomic_output_dir_replaces_files_in_existing_folder(tmp_path):
    """Writing into an existing folder replaces same-named files and keeps no temporary files."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "prediction.json").write_text("old")
    with atomic_output_dir(out) as stage:
        write_text("new", stage / "prediction.json")
    assert (out / "prediction.json").read_text() == "new"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "out"] + \
                [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_atomic_output_dir_refuses_a_file(tmp_path):
    """An --out that is an existing file is an error naming it; the file is left untouched."""
    out = tmp_path / "out"
    out.write_text("keep me")
    with pytest.raises(RANOInputError) as info:
        with atomic_output_dir(out) as stage:
            write_text("x", stage / "prediction.json")
    assert str(out) in str(info.value)
    assert out.read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert not any(".partial" in n for n in os.listdir(tmp_path))
