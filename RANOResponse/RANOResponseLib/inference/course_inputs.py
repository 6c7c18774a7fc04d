"""The studies of one patient's course, as the user gives them, what identifies their contents,
and what segments them.

Two forms (:func:`list_course`):

* a LUMIERE patient folder ``.../Imaging/Patient-XXX`` whose ``week-*`` sub-folders are the
  timepoints (weeks from the folder names; the expert ratings of the cohort's rating CSV, two
  levels up, when it is there);
* a CSV file, one row per study: ``study`` (a folder of NIfTI/NRRD files or DICOM; relative to
  the CSV's folder), ``date`` (``YYYY-MM-DD``), optionally ``timepoint`` (a name; default the
  folder's name), ``rating`` (``Pre-Op``, ``Post-Op``, ... as LUMIERE writes them) and
  ``patient``. Weeks count from the first date.

:func:`folder_fingerprint` says what a study folder holds (file names, sizes and modification
times) without reading an image: the timeline's cache keys are made of it. A *segmenter* gives a
timepoint's tumour labels: :class:`ModelSegmenter` (a segmentation bundle, the default) or
:class:`CohortMasks` (the masks that come with a research cohort).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import SimpleITK as sitk

from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.names import MODALITIES, reference_modality
from RANOResponseLib.datasets.lumiere import RATING_CSV, WEEK_RE, read_ratings, week_key
from RANOResponseLib.imaging.geometry import same_space
from RANOResponseLib.imaging.io import Study, find_modality_file
from RANOResponseLib.imaging.studies import is_file_study, missing_modalities
from RANOResponseLib.rano.measurement import find_segmentation, read_segmentation

CSV_COLUMNS = ("study", "date", "timepoint", "rating", "patient")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class CourseStudy:
    """One timepoint of a course, before anything is read."""

    name: str  # the timepoint's name (LUMIERE: the week folder); also its folder name in the output
    folder: Path
    weeks: float
    date: str | None = None  # ISO date (CSV input); LUMIERE has weeks only
    rating: str = ""  # expert rating as written, where known


@dataclass
class CourseListing:
    """A patient's studies, oldest first."""

    patient: str
    source: Path  # the patient folder or the CSV
    studies: list[CourseStudy]
    ratings_source: str = ""  # the rating CSV used, if any
    notes: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.studies]

    @property
    def ratings(self) -> dict[str, str]:
        return {s.name: s.rating for s in self.studies if s.rating}


def list_course(patient: Path | str) -> CourseListing:
    """The studies of a LUMIERE patient folder or of a CSV (see the module docstring).

    Raises :class:`RANOInputError` naming the folder or file for anything that cannot be a course.
    """
    p = Path(patient)
    if p.is_dir():
        return _lumiere_patient(p)
    if p.is_file():
        return _csv_course(p)
    raise RANOInputError(f"{p}: patient folder or course CSV not found")


def _lumiere_patient(folder: Path) -> CourseListing:
    weeks = sorted((d for d in folder.iterdir() if d.is_dir() and WEEK_RE.match(d.name)), key=lambda d: week_key(d.name))
    if not weeks:
        raise RANOInputError(f"{folder}: no week-* timepoint folders (a LUMIERE patient folder, or a course CSV)")
    ratings: dict[str, str] = {}
    root = folder.parent.parent
    source = ""
    if (root / RATING_CSV).is_file():
        table = read_ratings(root)
        rows = table[table["patient"] == folder.name]
        ratings = dict(zip(rows["week"], rows["raw_rating"]))
        source = str(root / RATING_CSV)
    studies = [CourseStudy(d.name, d.absolute(), float(week_key(d.name)[0]), None, ratings.get(d.name, ""))
               for d in weeks]
    return CourseListing(folder.name, folder.absolute(), studies, source)


def _csv_course(csv: Path) -> CourseListing:
    try:
        df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise RANOInputError(f"{csv}: not a readable course CSV ({str(e).splitlines()[0]})") from None
    df.columns = [str(c).strip().lower() for c in df.columns]
    missing = [c for c in ("study", "date") if c not in df.columns]
    if missing:
        raise RANOInputError(f"{csv}: a course CSV needs the columns study and date (missing {', '.join(missing)}; "
                             f"optional: {', '.join(CSV_COLUMNS[2:])})")
    if df.empty:
        raise RANOInputError(f"{csv}: no studies listed")
    dates = pd.to_datetime(df["date"].str.strip(), format="%Y-%m-%d", errors="coerce")
    if dates.isna().any():
        row = int(dates.isna().to_numpy().nonzero()[0][0])
        raise RANOInputError(f"{csv}: row {row + 2}: date {df['date'].iloc[row]!r} is not YYYY-MM-DD")
    order = sorted(range(len(df)), key=lambda i: (dates.iloc[i], i))
    first = dates.iloc[order[0]]
    studies, seen = [], set()
    for i in order:
        row = df.iloc[i]
        folder = Path(row["study"].strip())
        folder = (folder if folder.is_absolute() else csv.parent / folder).absolute()
        name = (row.get("timepoint") or "").strip() or folder.name
        safe = _SAFE.sub("_", name).strip("._") or f"timepoint-{i + 1}"
        if safe in seen:
            raise RANOInputError(f"{csv}: row {i + 2}: timepoint name {safe!r} is used twice (add a timepoint column)")
        seen.add(safe)
        studies.append(CourseStudy(safe, folder, round((dates.iloc[i] - first).days / 7.0, 2),
                                   dates.iloc[i].date().isoformat(), (row.get("rating") or "")))
    patient = (df["patient"].iloc[0].strip() if "patient" in df.columns else "") or csv.stem
    return CourseListing(patient, csv.absolute(), studies)


def folder_fingerprint(folder: Path | str) -> list[list]:
    """``[name, size, mtime_ns]`` of what a study folder's images are read from: its modality
    files (a folder of files), or every file under it (DICOM). Cheap; reads no image."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RANOInputError(f"{folder}: study folder not found")
    if is_file_study(folder):
        files = [f for m in MODALITIES if (f := find_modality_file(folder, m)) is not None]
    else:
        files = sorted(Path(d) / f for d, _, names in os.walk(folder) for f in names)
    out = []
    for f in files:
        st = f.stat()
        out.append([f.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns])
    return out


def file_fingerprint(path: Path | str) -> list:
    """``[path, size, mtime_ns]`` of one file."""
    st = Path(path).stat()
    return [str(Path(path).absolute()), st.st_size, st.st_mtime_ns]


def cache_key(*parts) -> str:
    """A short stable hash of JSON-able parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


# ------------------------------------------------------------------------------ segmenters


class CohortMasks:
    """The cohort's own tumour masks: each timepoint's DeepBraTumIA native segmentation (LUMIERE's
    layout). A research mode (``--segmentation cohort``): the masks come with the data set."""

    mode = "cohort"

    def key(self, cs: CourseStudy) -> list:
        return ["cohort", file_fingerprint(find_segmentation(cs.folder, "deepbratumia-native").path)]

    def describe(self) -> dict:
        return {"mode": self.mode, "source": "the cohort's DeepBraTumIA native masks"}

    def missing(self, cs: CourseStudy) -> str:
        """Why this timepoint cannot be segmented ('' if it can): its mask is not there."""
        try:
            find_segmentation(cs.folder, "deepbratumia-native")
        except RANOInputError as e:
            return str(e)
        return ""

    def __call__(self, cs: CourseStudy, study: Study, brain: sitk.Image) -> sitk.Image:
        seg = read_segmentation(find_segmentation(cs.folder, "deepbratumia-native").path)
        reference = study.images[reference_modality(study.images)]
        if not same_space(seg, reference):
            seg = sitk.Resample(seg, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        else:
            seg.CopyInformation(reference)
        return sitk.Cast(seg, sitk.sitkUInt8)


class ModelSegmenter:
    """A segmentation bundle (:func:`~.segmentation.segment_study`), its models loaded once."""

    mode = "auto"

    def __init__(self, bundle: Any, device: Any) -> None:
        self.bundle, self.device = bundle, device

    def key(self, cs: CourseStudy) -> list:
        return ["model", self.bundle.id, self.bundle.sha256]

    def describe(self) -> dict:
        return {"mode": self.mode, "source": "automatic", "bundle": {"id": self.bundle.id, "path": str(self.bundle.path),
                                                                    "sha256": self.bundle.sha256}}

    def missing(self, cs: CourseStudy) -> str:
        """Why this timepoint cannot be segmented ('' if it can): a sequence the bundle needs is missing."""
        lacking = missing_modalities(cs.folder, self.bundle.modalities)
        return (f"{cs.folder}: lacks {', '.join(lacking)}, which segmentation bundle '{self.bundle.id}' needs"
                if lacking else "")

    def __call__(self, cs: CourseStudy, study: Study, brain: sitk.Image) -> sitk.Image:
        from RANOResponseLib.inference.segmentation import bundle_segmenter

        return bundle_segmenter(self.bundle, self.device)(study, brain).image
