"""Loading a study as the user gives it: a folder of NIfTI/NRRD files or a folder of DICOM files.

:func:`load_study` is the one entry point (``predict``, the Slicer module, the web station): a
folder holding ``<modality>.nii.gz`` (``.nii``, ``.nrrd``) files is read by
:func:`~RANOResponseLib.imaging.io.read_study`; any other folder that contains DICOM files (any
names, nested folders, several series) goes through :mod:`~RANOResponseLib.imaging.dicom`. Either
way the :class:`~RANOResponseLib.imaging.io.Study` says where each image came from
(``sources``) and, for DICOM, whose study it is (``patient``); :func:`describe_sources` puts that
into words for the user and :func:`check_pair` refuses a pair that cannot be one patient's two
timepoints. Each image keeps its own acquisition geometry: nothing is resampled here.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import SimpleITK as sitk

from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.names import MODALITIES
from RANOResponseLib.imaging import dicom
from RANOResponseLib.imaging.io import Study, find_modality_file, read_study

SeriesOverrides = Iterable[str] | Mapping[str, str | Sequence[str]]


def _spacing(image: sitk.Image) -> list[float]:
    return [round(float(v), 6) for v in image.GetSpacing()]


def _file_source(path: Path, image: sitk.Image) -> dict[str, Any]:
    kind = "nrrd" if path.name.lower().endswith(".nrrd") else "nifti"
    # a file has no slice thickness tag: its coarsest voxel axis is what the image resolves
    return {"kind": kind, "path": str(path), "series_uid": "", "description": "",
            "spacing": _spacing(image), "slice_thickness": max(_spacing(image))}


def is_file_study(folder: Path | str, modalities: Sequence[str] = MODALITIES) -> bool:
    """Whether ``folder`` holds at least one ``<modality>.nii.gz``/``.nii``/``.nrrd`` file."""
    return any(find_modality_file(Path(folder), m) is not None for m in modalities)


def load_study(
    path: Path | str,
    modalities: Sequence[str] = MODALITIES,
    *,
    series: SeriesOverrides | None = None,
    rules: dicom.Rules | Mapping[str, Any] | Path | str | None = None,
    required_by: str = "",
    missing_ok: bool = False,
) -> Study:
    """Read one study folder: NIfTI/NRRD modality files, else the DICOM series found in it.

    ``series``: ``--series`` overrides (``["CT1=<UID or description>", ...]`` or a mapping);
    ``rules``: a rules file, a mapping or :class:`dicom.Rules` (default :data:`dicom.DEFAULT_RULES`).
    Both apply to DICOM folders only. ``required_by`` names what needs the modalities (the bundle)
    in the message for a missing one; with ``missing_ok`` a missing modality is left out instead
    (the Slicer panel shows what there is). Every problem is a one-line :class:`RANOInputError`
    naming the folder.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise RANOInputError(f"{folder}: study folder not found")
    if is_file_study(folder, modalities) or not dicom.contains_dicom(folder):
        if missing_ok:
            modalities = [m for m in modalities if find_modality_file(folder, m) is not None]
            if not modalities:
                return Study(folder=folder, images={})
        study = read_study(folder, modalities, required_by=required_by)
        study.sources = {m: _file_source(study.files[m], image) for m, image in study.images.items()}
        return study
    found, choices = _choose_dicom_series(folder, modalities, series, rules, required_by, missing_ok)
    return _read_dicom_study(folder, found, choices)


def missing_modalities(folder: Path | str, modalities: Sequence[str], *, series: SeriesOverrides | None = None,
                       rules: dicom.Rules | Mapping[str, Any] | Path | str | None = None) -> list[str]:
    """The ``modalities`` that :func:`load_study` would not find in ``folder``, without reading any
    image (DICOM: series listed and assigned; an ambiguous or mixed folder is still an error)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RANOInputError(f"{folder}: study folder not found")
    if is_file_study(folder, modalities) or not dicom.contains_dicom(folder):
        return [m for m in modalities if find_modality_file(folder, m) is None]
    _, choices = _choose_dicom_series(folder, modalities, series, rules, "", missing_ok=True)
    return [m for m in modalities if m not in choices]


def _choose_dicom_series(folder: Path, modalities: Sequence[str], series: SeriesOverrides | None, rules: Any,
                         required_by: str, missing_ok: bool) -> tuple[list[dicom.Series], dict[str, dicom.Choice]]:
    found = dicom.list_series(folder)
    if not found:
        raise RANOInputError(f"{folder}: DICOM files but no image series in them")
    dicom.check_one_study(folder, found)
    choices = dicom.choose_series(folder, found, modalities, dicom.load_rules(rules),
                                  dicom.parse_series_overrides(series), required_by, missing_ok)
    return found, choices


def _dicom_source(folder: Path, choice: dicom.Choice, image: sitk.Image,
                  geometry: dicom.SliceGeometry) -> dict[str, Any]:
    """``path`` is the study folder: ``load_study(path, [m], series={m: series_uid})`` reads the
    same image again (its files may lie in several sub-folders; ``series_folder`` holds the first)."""
    s = choice.series
    return {"kind": "dicom", "path": str(folder), "series_uid": s.uid, "description": s.description,
            "spacing": _spacing(image), "slice_thickness": round(geometry.thickness or geometry.spacing, 6),
            "protocol": s.protocol, "series_number": s.series_number, "files": len(s.files),
            "series_folder": str(s.folder), "chosen_by": choice.reason}


def _read_dicom_study(folder: Path, found: Sequence[dicom.Series], choices: Mapping[str, dicom.Choice]) -> Study:
    def read(m: str) -> tuple[sitk.Image, dicom.SliceGeometry]:
        return dicom.read_series(choices[m].series, f"{folder}: {m} series {choices[m].series.label()}")

    # SimpleITK releases the GIL while it reads: the series are read side by side, as read_study does
    with ThreadPoolExecutor(max_workers=max(1, min(len(choices), os.cpu_count() or 1, 4))) as pool:
        read_back = dict(zip(choices, pool.map(read, choices)))
    first = found[0]
    return Study(folder=folder, images={m: image for m, (image, _) in read_back.items()}, files={},
                 sources={m: _dicom_source(folder, choices[m], *read_back[m]) for m in choices},
                 patient={"PatientID": first.patient_id, "StudyInstanceUID": first.study_uid,
                          "StudyDate": first.study_date})


def check_pair(baseline: Study, followup: Study, allow_different: bool = False) -> None:
    """Refuse a pair that is not one patient's two different studies (DICOM tags; files carry none).

    The same StudyInstanceUID twice is always an error; different PatientIDs are one unless
    ``allow_different`` (``--allow-different``).
    """
    b, f = baseline.patient, followup.patient
    b_study, f_study = b.get("StudyInstanceUID"), f.get("StudyInstanceUID")
    if b_study and b_study == f_study:
        raise RANOInputError(f"{followup.folder}: the same study as the baseline {baseline.folder} "
                             f"(StudyInstanceUID {f_study})")
    if not (b and f) or allow_different:
        return
    if b.get("PatientID") != f.get("PatientID"):
        raise RANOInputError(f"{followup.folder}: PatientID {f.get('PatientID')!r} differs from the "
                             f"baseline's {b.get('PatientID')!r} ({baseline.folder}); give "
                             "--allow-different if the two studies are one patient's")


def describe_sources(study: Study, title: str | None = None) -> str:
    """What each modality was read from, one line each (printed by ``predict`` on stderr)."""
    p = study.patient
    head = title or str(study.folder)
    if p:
        head += f" (DICOM: PatientID {p.get('PatientID') or '-'}, StudyDate {p.get('StudyDate') or '-'}, " \
                f"StudyInstanceUID {p.get('StudyInstanceUID') or '-'})"
    lines = [f"{head}:"]
    for m, image in study.images.items():
        src = study.sources.get(m, {})
        spacing = " x ".join(f"{v:.2f}" for v in src.get("spacing", image.GetSpacing()))
        if src.get("kind") == "dicom":
            number = f"#{src['series_number']}, " if src.get("series_number") is not None else ""
            what = f"'{src['description']}' ({number}{src['series_uid']}), {src['files']} files"
            how = f"  [{src['chosen_by']}]"
        else:
            what, how = Path(src.get("path") or study.files.get(m, m)).name, ""
        thickness = src.get("slice_thickness")
        slices = f", slices {thickness:.2f} mm" if thickness is not None else ""
        lines.append(f"  {m:<5} <- {what}; {spacing} mm{slices}{how}")
    return "\n".join(lines)
