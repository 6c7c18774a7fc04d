"""Write a SimpleITK image as a DICOM MR series, one file per slice (tests and the clinical phantom).

The files are what a scanner's PACS export holds for a classic (not enhanced) MR series: MR Image
Storage, explicit VR little endian, int16 pixels with RescaleSlope/RescaleIntercept, and the
geometry in ImagePositionPatient / ImageOrientationPatient / PixelSpacing / SliceThickness (LPS,
as in SimpleITK). The descriptive tags that tell the sequences apart (SeriesDescription,
ProtocolName, RepetitionTime, EchoTime, InversionTime, ContrastBolusAgent) are set from the
arguments, so a test decides what the series looks like to the classification rules.

Faults a reader must catch can be built in on purpose: a dropped slice, a gantry tilt (a sheared
slice stack), shuffled file names.

pydicom writes the files: SimpleITK can write DICOM slices too, but it sets only a few of the MR
tags above and gives no control over the per-slice positions needed to build the faults.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pydicom.valuerep import format_number_as_ds

INT16_MAX = 32767


def rescale_to_int16(arr: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Stored int16 values and (slope, intercept) so that ``stored * slope + intercept ~ arr``.

    Integer images that fit int16 are stored as they are (slope 1, intercept 0), so they come back
    exactly; anything else is spread over 0..32767 (error at most half a slope).
    """
    lo, hi = float(arr.min()), float(arr.max())
    if np.array_equal(arr, np.round(arr)) and -32768 <= lo and hi <= INT16_MAX:
        return arr.astype(np.int16), 1.0, 0.0
    slope = (hi - lo) / INT16_MAX if hi > lo else 1.0
    # DICOM decimal strings hold 16 characters: round the slope so the file holds it exactly.
    slope = float(_ds_number(slope))
    intercept = float(_ds_number(lo))
    stored = np.clip(np.round((arr - intercept) / slope), -32768, INT16_MAX)
    return stored.astype(np.int16), slope, intercept


def _ds_number(value: float) -> str:
    """``value`` as a DICOM decimal string: as many digits as its 16 characters hold."""
    return format_number_as_ds(float(value))


def write_series(
    image: sitk.Image,
    folder: Path | str,
    *,
    description: str,
    protocol: str,
    tr: float,
    te: float,
    ti: float | None = None,
    contrast: str | None = None,
    patient_id: str,
    study_uid: str,
    series_uid: str | None = None,
    shuffle_names: bool = False,
    tilt_deg: float = 0.0,
    drop_slice: int | None = None,
    series_number: int = 1,
    study_date: str = "20240101",
    sequence: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write ``image`` (3D, any orientation) as one DICOM file per slice in ``folder``.

    ``tr``/``te``/``ti`` in ms; ``contrast``: ContrastBolusAgent (None: no contrast tag).
    ``series_uid``: default, a UID derived from the study UID, the description and the series number.
    ``shuffle_names``: random file names, so the name order says nothing about the slice order.
    ``tilt_deg``: shear the slice stack along the column direction as a tilted CT gantry does
    (GantryDetectorTilt is set too). ``drop_slice``: leave this slice index out (a missing slice).
    ``sequence``: ScanningSequence (default: IR when ``ti`` is given, else SE).
    ``extra``: more tags by pydicom keyword (e.g. ``{"ImageType": [...], "PatientName": ...}``).
    Returns the files written, in slice order.
    """
    if image.GetDimension() != 3:
        raise ValueError("write_series needs a 3D image")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid(entropy_srcs=[study_uid, description, str(series_number)])
    frame_uid = generate_uid(entropy_srcs=[study_uid, "frame of reference"])
    arr = sitk.GetArrayFromImage(image).astype(np.float64)  # (z, y, x)
    stored, slope, intercept = rescale_to_int16(arr)

    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing = np.array(image.GetSpacing())
    origin = np.array(image.GetOrigin())
    row_dir, col_dir, slice_dir = direction[:, 0], direction[:, 1], direction[:, 2]
    shear = np.tan(np.radians(tilt_deg)) * spacing[2]  # in-plane offset per slice (mm)

    indices = [k for k in range(stored.shape[0]) if k != drop_slice]
    names = [f"IM{k + 1:05d}.dcm" for k in indices]
    if shuffle_names:
        rng = random.Random(series_uid)
        names = [f"{rng.getrandbits(48):012x}" for _ in indices]  # no extension, no order

    common = _series_dataset(
        description=description, protocol=protocol, tr=tr, te=te, ti=ti, contrast=contrast,
        patient_id=patient_id, study_uid=study_uid, series_uid=series_uid, frame_uid=frame_uid,
        series_number=series_number, study_date=study_date, sequence=sequence or ("IR" if ti else "SE"),
    )
    common.ImageOrientationPatient = [_ds_number(v) for v in (*row_dir, *col_dir)]
    common.PixelSpacing = [_ds_number(spacing[1]), _ds_number(spacing[0])]  # row spacing, column spacing
    common.SliceThickness = _ds_number(spacing[2])
    common.SpacingBetweenSlices = _ds_number(spacing[2])
    common.Rows, common.Columns = stored.shape[1], stored.shape[2]
    common.RescaleSlope, common.RescaleIntercept = _ds_number(slope), _ds_number(intercept)
    common.WindowCenter = _ds_number((arr.max() + arr.min()) / 2)
    common.WindowWidth = _ds_number(max(arr.max() - arr.min(), 1.0))
    if tilt_deg:
        common.GantryDetectorTilt = _ds_number(tilt_deg)
    for keyword, value in (extra or {}).items():
        setattr(common, keyword, value)

    written = []
    for number, (k, name) in enumerate(zip(indices, names), start=1):
        ds = copy.deepcopy(common)  # small: the pixels are added below
        sop_uid = generate_uid(entropy_srcs=[series_uid, str(k)])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        position = origin + slice_dir * spacing[2] * k + col_dir * shear * k
        ds.ImagePositionPatient = [_ds_number(v) for v in position]
        ds.SliceLocation = _ds_number(float(position @ slice_dir))
        ds.InstanceNumber = number
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


def _series_dataset(*, description: str, protocol: str, tr: float, te: float, ti: float | None,
                    contrast: str | None, patient_id: str, study_uid: str, series_uid: str,
                    frame_uid: str, series_number: int, study_date: str, sequence: str) -> pydicom.Dataset:
    """The tags every slice of the series shares (patient, study, series, sequence, pixel format)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.Modality = "MR"
    ds.PatientID = patient_id
    ds.PatientName = f"Phantom^{patient_id}"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = study_date
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.FrameOfReferenceUID = frame_uid
    ds.SeriesDescription = description
    ds.ProtocolName = protocol
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.ScanningSequence = sequence
    ds.SequenceVariant = "SK"
    ds.MRAcquisitionType = "3D"
    ds.RepetitionTime = _ds_number(tr)
    ds.EchoTime = _ds_number(te)
    if ti is not None:
        ds.InversionTime = _ds_number(ti)
    if contrast:
        ds.ContrastBolusAgent = contrast
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1  # signed
    return ds
