"""Reading studies and writing results safely.

A *study* is one timepoint: a folder holding ``CT1``, ``T1``, ``T2`` and ``FLAIR`` images
(``.nii.gz``, ``.nii`` or ``.nrrd``). Images come back as SimpleITK images, so their geometry
(origin, spacing, direction, LPS) travels with the voxels through the whole pipeline.

Every image is checked before it is trusted (see ../shared/reference/IMAGING-IO.md): SimpleITK
silently reads a truncated ``.nii.gz`` and silently turns NaNs into zeros, so NIfTI voxels are
decoded with nibabel, which raises on a cut-off gzip stream and keeps NaNs, while the geometry is
taken from SimpleITK's header reader so that it is exactly what ITK (and Slicer) would use.
"""

from __future__ import annotations

import gzip
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel.filebasedimages import ImageFileError

from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.files import atomic_file
from RANOResponseLib.core.names import MODALITIES, REFERENCE_ORDER

EXTENSIONS = (".nii.gz", ".nii", ".nrrd")


@dataclass
class Study:
    """One timepoint: modality name -> SimpleITK image (float32), plus where it came from.

    ``files``: the image file of each modality read from one file (none for a DICOM series).
    ``sources`` (filled by :func:`RANOResponseLib.imaging.studies.load_study`): per modality, what
    the image was read from (kind, path, series UID and description, spacing, slice thickness).
    ``patient``: PatientID, StudyInstanceUID and StudyDate of a DICOM study; empty for files.
    """

    folder: Path
    images: dict[str, sitk.Image]
    files: dict[str, Path] = field(default_factory=dict)
    sources: dict[str, dict] = field(default_factory=dict)
    patient: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.folder.name

    def reference_modality(self, order: Sequence[str] = REFERENCE_ORDER) -> str:
        """The first modality of ``order`` that this study has (CT1, else T1, ...)."""
        for m in order:
            if m in self.images:
                return m
        raise RANOInputError(f"{self.folder}: none of {', '.join(order)} found")


def find_modality_file(folder: Path, modality: str) -> Path | None:
    """``folder/<modality>.<ext>`` for a supported extension, case-insensitive; None if absent."""
    if not folder.is_dir():
        return None
    wanted = {f"{modality}{ext}".lower() for ext in EXTENSIONS}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name.lower() in wanted:
            return p
    return None


def _read_nifti_voxels(path: Path) -> np.ndarray:
    """Decode every voxel with nibabel (x, y, z order). Raises on truncated or corrupt files.

    A ``.nii.gz`` is decompressed here in full, so that gzip checks its CRC and length trailer
    (nibabel alone stops once it has the voxel bytes and never reads the trailer, so flipped
    bytes or a lost trailer would pass). One decompression serves both the check and the decode.
    """
    if path.name.lower().endswith(".gz"):
        with gzip.open(path, "rb") as fh:
            data = fh.read()
        try:
            img = nib.Nifti1Image.from_bytes(data)
        except Exception:  # noqa: BLE001 - not NIfTI-1: try NIfTI-2, else report the first error
            img = nib.Nifti2Image.from_bytes(data)
    else:
        img = nib.load(str(path))
    # np.asarray forces the decode: a short uncompressed file raises from the memory map.
    return np.asarray(img.dataobj)


def read_voxels(path: Path | str, what: str = "image") -> tuple[np.ndarray, sitk.ImageFileReader]:
    """The voxels of one single-component 3D file (z, y, x, its own dtype) and the reader that
    holds its geometry; errors name the file and say what is wrong (``what``: image, label map...).

    NIfTI voxels are decoded by nibabel after a full gzip CRC check (a truncated ``.nii.gz`` is an
    error, not zeros); geometry always comes from SimpleITK's header reader.
    """
    path = Path(path)
    if not path.is_file():
        raise RANOInputError(f"{path}: file not found")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise RANOInputError(f"{path}: unreadable {what} ({_first_line(e)})") from None
    size = [s for s in reader.GetSize()]
    if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
        shape = "x".join(str(s) for s in size)
        comps = reader.GetNumberOfComponents()
        extra = f" with {comps} components" if comps != 1 else ""
        raise RANOInputError(
            f"{path}: not a 3D {what} ({reader.GetDimension()}D, size {shape}{extra})"
        )
    try:
        if path.name.lower().endswith((".nii", ".nii.gz")):
            vox = _read_nifti_voxels(path)
            if vox.ndim != 3:
                raise RANOInputError(f"{path}: not a 3D {what} (data shape {vox.shape})")
            arr = np.asarray(vox).transpose(2, 1, 0)
        else:
            arr = sitk.GetArrayFromImage(reader.Execute())
    except RANOInputError:
        raise
    except (EOFError, OSError, ValueError, RuntimeError, ImageFileError) as e:
        raise RANOInputError(f"{path}: truncated or corrupt {what} data ({_first_line(e)})") from None
    if min(arr.shape) < 2:
        raise RANOInputError(f"{path}: not a 3D {what} (size {'x'.join(map(str, size))})")
    return arr, reader


def image_from_voxels(arr: np.ndarray, reader: sitk.ImageFileReader, dtype=np.float32) -> sitk.Image:
    """A SimpleITK image of ``arr`` with the geometry ``reader`` read from the file's header."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(arr, dtype=dtype))
    image.SetOrigin(reader.GetOrigin())
    image.SetSpacing(reader.GetSpacing())
    image.SetDirection(reader.GetDirection())
    return image


def read_image(path: Path | str) -> sitk.Image:
    """Read one 3D image as float32, refusing anything a prediction must not be built on.

    Raises :class:`RANOInputError` naming the file for: unreadable/corrupt or truncated files,
    images that are not 3D, NaN or infinite voxels, and empty (all-zero or constant) images.
    """
    arr, reader = read_voxels(path, "image")
    image = image_from_voxels(arr, reader)
    arr = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(arr).all():
        n = int((~np.isfinite(arr)).sum())
        raise RANOInputError(f"{path}: contains {n} NaN or infinite voxels")
    lo, hi = float(arr.min()), float(arr.max())
    if lo == hi:
        raise RANOInputError(f"{path}: empty image (every voxel is {lo:g})")
    return image


def read_study(folder: Path | str, modalities: Sequence[str] = MODALITIES, required_by: str = "") -> Study:
    """Read the given modalities of one study folder; a missing one is an error naming it
    (and ``required_by``, e.g. the bundle that needs it)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RANOInputError(f"{folder}: study folder not found")
    files: dict[str, Path] = {}
    missing = []
    for m in modalities:
        p = find_modality_file(folder, m)
        if p is None:
            missing.append(m)
        else:
            files[m] = p
    if missing:
        exts = "/".join(EXTENSIONS)
        needed = f", needed by {required_by}" if required_by else ""
        raise RANOInputError(
            f"{folder}: missing modality {', '.join(missing)} (expected {missing[0]}{{{exts}}}{needed})"
        )
    # gzip and nibabel release the GIL while decompressing: read the files side by side
    with ThreadPoolExecutor(max_workers=min(len(files), os.cpu_count() or 1, 4)) as pool:
        images = dict(zip(files, pool.map(read_image, files.values())))
    return Study(folder=folder, images=images, files=files)


def check_distinct_studies(baseline: Path | str, followup: Path | str) -> None:
    """Baseline and follow-up must be two different folders (and not the same files)."""
    b, f = Path(baseline), Path(followup)
    if b.exists() and f.exists() and os.path.samefile(b, f):
        raise RANOInputError(f"{f}: follow-up is the same folder as the baseline ({b})")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    # ITK errors start with a source location; the last line says what is wrong.
    return (text[-1] if text else type(e).__name__).strip()[:200]


# ----------------------------------------------------------------------------------- writing


def write_image(image: sitk.Image, path: Path | str) -> Path:
    """Write a (compressed) image atomically."""
    with atomic_file(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
    return Path(path)
