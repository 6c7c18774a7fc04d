"""DICOM study folders: list the series, assign them to CT1/T1/T2/FLAIR, read one as an image.

A study folder as it comes from PACS or a CD holds files with any names, in nested folders, and
several series (localizers, diffusion, reformats...). Facts this module is built on
(../shared/reference/CLINICAL-INPUT.md):

- Reading a folder without naming a series silently returns one of its series (which one depends
  on UID order), and reading every file as one volume gives a wrong spacing with only a warning.
  So series are always listed first (GDCM, per directory) and read by their explicit file lists.
- A missing slice, an irregular slice spacing or a gantry tilt is only a warning in ITK (15 degrees
  of tilt puts the last slice 39 mm off). The positions are checked here and such series refused.

Which series is which sequence is decided by *rules* (:data:`DEFAULT_RULES`, or a JSON file of the
same form given with ``--series-rules``) over the descriptive tags, and can be forced per modality
with ``--series MOD=<SeriesInstanceUID or SeriesDescription>``. Everything that cannot be resolved
is a one-line :class:`RANOInputError` naming the folder.

Tags are read with pydicom (headers only); pixels and geometry with SimpleITK/GDCM, which decode
compressed transfer syntaxes and apply each slice's rescale, exactly as Slicer's readers do.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.names import MODALITIES

# ------------------------------------------------------------------------------------ rules

# The default assignment rules. A rules file (--series-rules) has exactly this form; write these
# out with ``json.dumps(DEFAULT_RULES, indent=2)`` to start one.
#
# The rules are tried in order for each series and the first one that matches decides: "assign"
# names the modality, or null to ignore the series. A rule matches when all its conditions hold:
#   text, not_text           regular expression found / not found in the series' *text*: its
#                            SeriesDescription and ProtocolName, lower case, "_" and "-" as spaces
#   image_type, not_image_type, dicom_modality, not_dicom_modality, sequence, not_sequence
#                            regular expressions on ImageType, Modality, ScanningSequence
#                            (multiple values joined with "\")
#   contrast                 true / false: whether the series was acquired after contrast (below)
#   tr_min ... ti_max        RepetitionTime, EchoTime, InversionTime in ms (a missing tag fails)
#   why                      a comment
# A series counts as post-contrast when its text matches "contrast_words", unless it matches
# "precontrast_words"; otherwise when it has a ContrastBolusAgent (other than "none").
# All expressions are case-insensitive (Python ``re`` syntax).
_T1_WORDS = r"\bs?t1w?\b|mp ?rage|spgr|bravo|\btfe\b|vibe"
DEFAULT_RULES: dict[str, Any] = {
    "contrast_words": r"\b(post|gd|gad\w*|gado\w*|ce|contrast|km|kontrast|mdc)\b|\+ ?(c|gd)\b|\bc\+",
    "precontrast_words": r"\b(pre|native?|nativ|w ?o|without|non ?contrast|no ?contrast)\b",
    "rules": [
        {"assign": None, "why": "not an MR image", "not_dicom_modality": r"^MR$"},
        {"assign": None, "why": "scouts, reformats, secondary captures",
         "image_type": r"\b(LOCALIZER|DERIVED|SECONDARY)\b"},
        {"assign": None, "why": "scouts and sequences the model does not use",
         "text": r"locali[sz]er|scout|\bsurvey|\bcal\b|calibration|\bdwi\b|diffusion|\bdti\b|\btrace\b"
                 r"|\badc\b|\bfa\b|\bswi\b|\bswan\b|\bsusc|\bhemo|t2 ?\*|t2 ?star|\bt2 ?(gre|ffe|fl2d|medic)\b"
                 r"|perfusion|\bperf\b|\bdsc\b|\bdce\b|\basl\b|\bpcasl\b|\bmip\b|\bminip\b|angio|\btof\b"
                 r"|spectro|\bsvs\b|\bcsi\b|\bmpr\b|reformat|\bsub(traction)?\b|\bmoco\b"},
        {"assign": "CT1", "why": "T1 after contrast", "text": _T1_WORDS, "contrast": True},
        {"assign": "T1", "why": "T1 before contrast", "text": _T1_WORDS, "contrast": False},
        {"assign": "FLAIR", "why": "FLAIR / dark fluid", "text": r"flair|dark ?fluid|\btirm\b"},
        {"assign": "T2", "why": "T2; T2* and FLAIR are ruled out above", "text": r"\bs?t2w?\b"},
        {"assign": "FLAIR", "why": "long inversion time (text says nothing)", "ti_min": 1500, "tr_min": 4000},
        {"assign": "T2", "why": "long TR and TE, no inversion", "te_min": 60, "tr_min": 2000, "not_sequence": "IR"},
        {"assign": "CT1", "why": "short TR and TE, after contrast", "tr_max": 1000, "te_max": 30, "contrast": True},
        {"assign": "T1", "why": "short TR and TE, before contrast", "tr_max": 1000, "te_max": 30,
         "contrast": False},
    ],
}

_PATTERN_KEYS = ("text", "image_type", "dicom_modality", "sequence")
_RANGE_KEYS = tuple(f"{p}_{b}" for p in ("tr", "te", "ti") for b in ("min", "max"))
_RULE_KEYS = {"assign", "why", "contrast", *_PATTERN_KEYS, *(f"not_{k}" for k in _PATTERN_KEYS), *_RANGE_KEYS}
_TOP_KEYS = {"about", "contrast_words", "precontrast_words", "rules"}


@dataclass(frozen=True)
class Rule:
    """One rule of a rules file (see :data:`DEFAULT_RULES`)."""

    number: int  # 1-based position in the file, for messages
    assign: str | None
    patterns: tuple[tuple[str, re.Pattern, bool], ...]  # (series field, expression, must match)
    ranges: tuple[tuple[str, float, bool], ...]  # (tr/te/ti, bound, is a minimum)
    contrast: bool | None
    why: str = ""

    def matches(self, series: "Series", contrast: bool) -> bool:
        """Whether every condition holds for ``series`` (``contrast``: whether it is post-contrast)."""
        if self.contrast is not None and self.contrast != contrast:
            return False
        for name, pattern, wanted in self.patterns:
            if bool(pattern.search(getattr(series, name))) != wanted:
                return False
        for name, bound, is_min in self.ranges:
            value = getattr(series, name)
            if value is None or (value < bound if is_min else value > bound):
                return False
        return True


@dataclass(frozen=True)
class Rules:
    """Parsed assignment rules; ``source`` names where they came from (for messages)."""

    source: str
    rules: tuple[Rule, ...]
    contrast_words: re.Pattern
    precontrast_words: re.Pattern

    def is_contrast(self, series: "Series") -> bool:
        """Post-contrast: the text says so (and does not say "pre"), else ContrastBolusAgent."""
        if self.precontrast_words.search(series.text):
            return False
        if self.contrast_words.search(series.text):
            return True
        return series.contrast_agent.strip().lower() not in ("", "none", "no", "n/a", "0")

    def assign(self, series: "Series") -> tuple[str | None, Rule | None]:
        """(modality or None, the rule that decided; None if no rule matched)."""
        contrast = self.is_contrast(series)
        for rule in self.rules:
            if rule.matches(series, contrast):
                return rule.assign, rule
        return None, None


def parse_rules(data: Any, source: str = "rules") -> Rules:
    """Check and compile rules in the form of :data:`DEFAULT_RULES`; errors name ``source``."""
    if not isinstance(data, dict) or not isinstance(data.get("rules"), list):
        raise RANOInputError(f"{source}: series rules must be a JSON object with a list \"rules\"")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise RANOInputError(f"{source}: unknown key {sorted(unknown)[0]!r} (allowed: {', '.join(sorted(_TOP_KEYS))})")

    def compile_(text: Any, where: str) -> re.Pattern:
        if not isinstance(text, str):
            raise RANOInputError(f"{source}: {where} must be a regular expression string")
        try:
            return re.compile(text, re.IGNORECASE)
        except re.error as e:
            raise RANOInputError(f"{source}: {where}: bad regular expression ({e})") from None

    rules = []
    for number, raw in enumerate(data["rules"], start=1):
        where = f"rule {number}"
        if not isinstance(raw, dict) or "assign" not in raw:
            raise RANOInputError(f"{source}: {where} must be an object with \"assign\"")
        unknown = set(raw) - _RULE_KEYS
        if unknown:
            raise RANOInputError(f"{source}: {where}: unknown condition {sorted(unknown)[0]!r} "
                                 f"(allowed: {', '.join(sorted(_RULE_KEYS))})")
        if raw["assign"] is not None and raw["assign"] not in MODALITIES:
            raise RANOInputError(f"{source}: {where}: \"assign\" must be one of {', '.join(MODALITIES)} or null")
        if "contrast" in raw and not isinstance(raw["contrast"], bool):
            raise RANOInputError(f"{source}: {where}: \"contrast\" must be true or false")
        patterns = []
        for key in _PATTERN_KEYS:
            for negated in (False, True):
                name = f"not_{key}" if negated else key
                if name in raw:
                    patterns.append((key, compile_(raw[name], f"{where}: {name}"), not negated))
        ranges = []
        for key in _RANGE_KEYS:
            if key in raw:
                value = raw[key]
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise RANOInputError(f"{source}: {where}: {key} must be a number (ms)")
                ranges.append((key[:2], float(value), key.endswith("_min")))
        rules.append(Rule(number, raw["assign"], tuple(patterns), tuple(ranges), raw.get("contrast"),
                          str(raw.get("why", ""))))
    return Rules(source, tuple(rules),
                 compile_(data.get("contrast_words", DEFAULT_RULES["contrast_words"]), "contrast_words"),
                 compile_(data.get("precontrast_words", DEFAULT_RULES["precontrast_words"]), "precontrast_words"))


def load_rules(rules: Rules | Mapping[str, Any] | Path | str | None = None) -> Rules:
    """Rules from a JSON file, a mapping, or :data:`DEFAULT_RULES` (None)."""
    if rules is None:
        return parse_rules(DEFAULT_RULES, "default series rules")
    if isinstance(rules, Rules):
        return rules
    if isinstance(rules, Mapping):
        return parse_rules(dict(rules), "series rules")
    path = Path(rules)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RANOInputError(f"{path}: series rules file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RANOInputError(f"{path}: not a JSON rules file ({e})") from None
    return parse_rules(data, str(path))


# ----------------------------------------------------------------------------------- series


@dataclass(frozen=True)
class Series:
    """One DICOM series found in a study folder: its files and the tags that identify it."""

    uid: str
    files: tuple[Path, ...]
    description: str
    protocol: str
    dicom_modality: str
    image_type: str  # values joined with "\"
    sequence: str  # ScanningSequence, values joined with "\"
    tr: float | None  # ms
    te: float | None
    ti: float | None
    contrast_agent: str
    patient_id: str
    study_uid: str
    study_date: str
    series_number: int | None
    frames: int  # NumberOfFrames of a file (more than 1: enhanced multi-frame)

    @property
    def folder(self) -> Path:
        """The directory holding the series' (first) files."""
        return self.files[0].parent

    @property
    def text(self) -> str:
        """SeriesDescription and ProtocolName as the rules see them (lower case, _ and - as spaces)."""
        return re.sub(r"[_\-]+", " ", f"{self.description} | {self.protocol}".lower())

    def label(self) -> str:
        """How messages name the series: its description, number and UID."""
        number = f"#{self.series_number} " if self.series_number is not None else ""
        return f"'{self.description or self.protocol or '(no description)'}' ({number}{self.uid})"


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _number(ds: pydicom.Dataset, keyword: str) -> float | None:
    try:
        value = float(ds.get(keyword))
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _read_header(path: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as e:
        raise RANOInputError(f"{path}: unreadable DICOM file ({e})") from None


def _series_from_files(uid: str, files: Sequence[Path]) -> Series:
    ds = _read_header(files[0])
    return Series(
        uid=_text(ds, "SeriesInstanceUID") or uid, files=tuple(files),
        description=_text(ds, "SeriesDescription"), protocol=_text(ds, "ProtocolName"),
        dicom_modality=_text(ds, "Modality"), image_type=_text(ds, "ImageType"),
        sequence=_text(ds, "ScanningSequence"), tr=_number(ds, "RepetitionTime"), te=_number(ds, "EchoTime"),
        ti=_number(ds, "InversionTime"), contrast_agent=_text(ds, "ContrastBolusAgent"),
        patient_id=_text(ds, "PatientID"), study_uid=_text(ds, "StudyInstanceUID"),
        study_date=_text(ds, "StudyDate"),
        series_number=int(ds.SeriesNumber) if ds.get("SeriesNumber") not in (None, "") else None,
        frames=int(ds.get("NumberOfFrames") or 1),
    )


def _is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file ("DICM" after the 128-byte preamble) or a ``.dcm`` file; not a DICOMDIR
    (a CD's index: the images it lists are found by walking the folders)."""
    if path.name.upper() == "DICOMDIR":
        return False
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _directories(root: Path) -> Iterable[tuple[Path, list[str]]]:
    """(directory, file names) for every directory under ``root`` that holds files, in name order."""
    for directory, dirs, files in os.walk(root):
        dirs.sort()
        visible = sorted(f for f in files if not f.startswith("."))
        if visible:
            yield Path(directory), visible


def contains_dicom(root: Path | str) -> bool:
    """Whether any file under ``root`` (nested folders included) is a DICOM file."""
    return any(_is_dicom_file(d / f) for d, files in _directories(Path(root)) for f in files)


def list_series(root: Path | str) -> list[Series]:
    """Every DICOM image series under ``root`` (any file names, nested folders), in series-number order.

    GDCM lists the series of each directory by SeriesInstanceUID; a series spread over several
    directories (CD layouts with a file limit per folder) is joined by its UID.
    """
    root = Path(root)
    files_by_uid: dict[str, list[Path]] = {}
    warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    # ITK warns on stderr about folders without image series (reports, presentation states);
    # an empty listing is handled below, and stderr must keep to the one-line errors
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        for directory, names in _directories(root):
            if not any(_is_dicom_file(directory / n) for n in names):
                continue  # GDCM would parse every file of a folder that holds none
            for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(directory)):
                found = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(directory), uid)
                files_by_uid.setdefault(uid, []).extend(Path(f) for f in found)
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings)
    series = [_series_from_files(uid, files) for uid, files in files_by_uid.items() if files]
    return sorted(series, key=lambda s: (s.series_number is None, s.series_number or 0, s.description, s.uid))


def check_one_study(folder: Path | str, series: Sequence[Series]) -> None:
    """All series of a study folder must belong to one patient and one study."""
    for attr, what in (("patient_id", "PatientID"), ("study_uid", "StudyInstanceUID")):
        values = sorted({getattr(s, attr) for s in series})
        if len(values) > 1:
            shown = ", ".join(repr(v) for v in values[:3]) + (", ..." if len(values) > 3 else "")
            kind = "patients" if attr == "patient_id" else "studies"
            raise RANOInputError(f"{folder}: series of {len(values)} {kind} in one study folder "
                                 f"({what} {shown}); give each study its own folder")


# ------------------------------------------------------------------------------- assignment


def parse_series_overrides(items: Iterable[str] | Mapping[str, Any] | None) -> dict[str, tuple[str, ...]]:
    """``["CT1=<UID or description>", ...]`` (``--series``, repeatable) -> modality -> values.

    A modality may be given several values (e.g. the baseline's and the follow-up's UID): each
    study uses the one that names one of its series.
    """
    if not items:
        return {}
    if isinstance(items, Mapping):
        pairs = [(m, v) for m, vs in items.items() for v in ([vs] if isinstance(vs, str) else vs)]
    else:
        pairs = []
        for item in items:
            modality, sep, value = item.partition("=")
            if not sep or not value.strip():
                raise RANOInputError(f"--series {item}: expected MODALITY=<SeriesInstanceUID or description>")
            pairs.append((modality.strip(), value))
    out: dict[str, tuple[str, ...]] = {}
    for modality, value in pairs:
        canonical = next((m for m in MODALITIES if m.lower() == modality.lower()), None)
        if canonical is None:
            raise RANOInputError(f"--series {modality}={value}: unknown modality {modality!r} "
                                 f"(one of {', '.join(MODALITIES)})")
        out[canonical] = (*out.get(canonical, ()), value.strip())
    return out


@dataclass(frozen=True)
class Choice:
    """The series chosen for one modality, and why."""

    series: Series
    reason: str  # "--series" or "rule N (why)"


def _names(series: Iterable[Series]) -> str:
    return ", ".join(s.label() for s in series)


def choose_series(folder: Path | str, series: Sequence[Series], modalities: Sequence[str],
                  rules: Rules | None = None, overrides: Mapping[str, Sequence[str]] | None = None,
                  required_by: str = "", missing_ok: bool = False) -> dict[str, Choice]:
    """One series per modality: ``--series`` overrides first, the rules for the rest.

    Refused (one line naming ``folder``): no series for a modality (unless ``missing_ok``: then it
    is left out), more than one, an override that names no series here (or several), one series
    named for two modalities. A series taken by an override is not offered to the rules.
    """
    rules = rules or load_rules()
    overrides = overrides or {}
    chosen: dict[str, Choice] = {}
    for m in modalities:
        values = overrides.get(m)
        if not values:
            continue
        wanted = {v.lower() for v in values}
        hits = [s for s in series if s.uid in values or s.description.strip().lower() in wanted]
        given = " or ".join(f"--series {m}={v}" for v in values)
        if not hits:
            raise RANOInputError(f"{folder}: {given}: no series here has this SeriesInstanceUID or "
                                 f"SeriesDescription (series: {_names(series) or 'none'})")
        if len(hits) > 1:
            raise RANOInputError(f"{folder}: {given} matches {len(hits)} series ({_names(hits)}); "
                                 "name one by its SeriesInstanceUID")
        twice = next((other for other, c in chosen.items() if c.series.uid == hits[0].uid), None)
        if twice is not None:
            raise RANOInputError(f"{folder}: the same series {hits[0].label()} is chosen for {twice} and {m}")
        chosen[m] = Choice(hits[0], "--series")
    taken = {c.series.uid for c in chosen.values()}
    by_modality: dict[str, list[tuple[Series, Rule]]] = {}
    for s in series:
        if s.uid in taken:
            continue
        modality, rule = rules.assign(s)
        if modality is not None and rule is not None:
            by_modality.setdefault(modality, []).append((s, rule))
    for m in modalities:
        if m in chosen:
            continue
        candidates = by_modality.get(m, [])
        if not candidates and missing_ok:
            continue
        if not candidates:
            needed = f", needed by {required_by}" if required_by else ""
            raise RANOInputError(f"{folder}: no series for {m}{needed} (series: {_names(series) or 'none'}); "
                                 f"name one with --series {m}=<SeriesInstanceUID or description>, or adjust "
                                 f"the rules ({rules.source})")
        if len(candidates) > 1:
            raise RANOInputError(f"{folder}: ambiguous {m}: {len(candidates)} series match "
                                 f"({_names(s for s, _ in candidates)}); choose one with "
                                 f"--series {m}=<SeriesInstanceUID or description>")
        s, rule = candidates[0]
        chosen[m] = Choice(s, f"rule {rule.number}" + (f" ({rule.why})" if rule.why else ""))
    return {m: chosen[m] for m in modalities if m in chosen}


# ---------------------------------------------------------------------------------- reading

POSITION_TOLERANCE_MM = 0.01  # on top of 1 % of the slice spacing: IPP is written with ~1e-5 mm
TILT_TOLERANCE_DEG = 0.1  # a slice stack sheared more than this is a gantry tilt


@dataclass(frozen=True)
class SliceGeometry:
    """Where the slices of a series lie, from ImagePositionPatient / ImageOrientationPatient."""

    files: tuple[Path, ...]  # in slice order (along the normal)
    normal: np.ndarray  # row x column direction (LPS)
    positions: np.ndarray  # (n, 3) ImagePositionPatient of each file, in slice order
    spacing: float  # median distance between neighbouring slices along the normal (mm)
    thickness: float | None  # SliceThickness (mm)


def _slice_geometry(where: str, series: Series) -> SliceGeometry:
    """Read every slice's position and refuse what ITK would read wrongly or only warn about."""
    if series.frames > 1:
        raise RANOInputError(f"{where}: enhanced (multi-frame) DICOM is not supported; export the "
                             "series as classic single-frame images")
    headers = [(p, _read_header(p)) for p in series.files]
    if len(headers) < 2:
        raise RANOInputError(f"{where}: only {len(headers)} slice; a 3D image needs several")
    shapes = {(int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)) for _, ds in headers}
    if len(shapes) > 1:
        raise RANOInputError(f"{where}: slices of different sizes {sorted(shapes)}")
    tilt = _number(headers[0][1], "GantryDetectorTilt")
    if tilt is not None and abs(tilt) > TILT_TOLERANCE_DEG:
        raise RANOInputError(f"{where}: gantry tilt of {tilt:g} degrees (not corrected here; "
                             "reconstruct or resample the series without tilt)")
    try:
        orientations = np.array([[float(v) for v in ds.ImageOrientationPatient] for _, ds in headers])
        positions = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in headers])
        pixel_spacings = np.array([[float(v) for v in ds.PixelSpacing] for _, ds in headers])
    except (AttributeError, TypeError, ValueError):
        raise RANOInputError(f"{where}: slices without ImagePositionPatient, ImageOrientationPatient "
                             "or PixelSpacing (no 3D geometry)") from None
    if np.abs(orientations - orientations[0]).max() > 1e-4:
        raise RANOInputError(f"{where}: the slice orientation changes within the series")
    if np.abs(pixel_spacings - pixel_spacings[0]).max() > 1e-4:
        raise RANOInputError(f"{where}: the pixel spacing changes within the series")
    row, col = orientations[0, :3], orientations[0, 3:]
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    files = tuple(headers[i][0] for i in order)
    gaps = np.diff(along)
    if gaps.min() < POSITION_TOLERANCE_MM:
        same = int((gaps < POSITION_TOLERANCE_MM).sum())
        raise RANOInputError(f"{where}: {same + 1} slices at the same position (several echoes, phases "
                             "or repetitions in one series)")
    spacing = float(np.median(gaps))
    tolerance = POSITION_TOLERANCE_MM + 0.01 * spacing
    stack = positions[-1] - positions[0]
    shear = np.linalg.norm(stack - (stack @ normal) * normal)
    angle = math.degrees(math.atan2(shear, abs(stack @ normal)))
    if angle > TILT_TOLERANCE_DEG:
        raise RANOInputError(f"{where}: gantry tilt, the slice stack is sheared by {angle:.1f} degrees "
                             "(not corrected here; reconstruct or resample the series without tilt)")
    wide = np.flatnonzero(gaps > 1.5 * spacing)
    if wide.size:
        i = int(wide[0])
        missing = int(round(gaps[i] / spacing)) - 1
        raise RANOInputError(f"{where}: missing slice{'s' if missing != 1 else ''}: a gap of "
                             f"{gaps[i]:.2f} mm after slice {i + 1} of {len(files)} where slices are "
                             f"{spacing:.2f} mm apart")
    if np.abs(gaps - spacing).max() > tolerance:
        raise RANOInputError(f"{where}: irregular slice spacing ({gaps.min():.3f} to {gaps.max():.3f} mm)")
    return SliceGeometry(files, normal, positions, spacing, _number(headers[0][1], "SliceThickness"))


def read_series(series: Series, where: str | Path | None = None) -> tuple[sitk.Image, SliceGeometry]:
    """The series as a float32 image (LPS geometry, rescaled values), after the geometry checks.

    ``where`` names the series in messages (default: its folder and label).
    """
    where = str(where) if where is not None else f"{series.folder}: series {series.label()}"
    geometry = _slice_geometry(where, series)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in geometry.files])
    # float32 output: each slice's own RescaleSlope/Intercept is applied before the slices are stacked
    reader.SetOutputPixelType(sitk.sitkFloat32)
    # the spacing was checked above with our tolerance; ITK would only warn (on stderr) at 1e-4
    reader.SetSpacingWarningRelThreshold(0.01 + POSITION_TOLERANCE_MM / geometry.spacing)
    try:
        image = reader.Execute()
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        raise RANOInputError(f"{where}: unreadable DICOM series ({lines[-1].strip() if lines else e})") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise RANOInputError(f"{where}: not a 3D scalar series")
    # The geometry ITK derives must be the one the positions state (a last guard: a wrong origin or
    # slice direction would put every map in the wrong place without any error).
    direction = np.array(image.GetDirection()).reshape(3, 3)
    if (np.abs(np.array(image.GetOrigin()) - geometry.positions[0]).max() > 1e-3
            or abs(image.GetSpacing()[2] - geometry.spacing) > 1e-3
            or np.abs(direction[:, 2] - geometry.normal).max() > 1e-4):
        raise RANOInputError(f"{where}: the image ITK reads disagrees with the slice positions")
    arr = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(arr).all():
        raise RANOInputError(f"{where}: contains NaN or infinite voxels")
    if arr.min() == arr.max():
        raise RANOInputError(f"{where}: empty image (every voxel is {float(arr.min()):g})")
    return image, geometry
