"""Worklists: the case pairs a reviewer steps through, from a CSV or a LUMIERE folder.

A worklist is a CSV of case pairs (``baseline``, ``followup`` and optionally ``case_id``,
``patient``, ``label``, ``prediction``; relative paths are taken from the CSV's folder,
:func:`read_worklist_csv`) or a LUMIERE folder (its usable rated pairs, :func:`cases_from_lumiere`);
:func:`load_worklist` reads either. Each pair is a :class:`Case`; :func:`default_case_id` names
a pair the way the LUMIERE reader does. The verdicts on them are kept by :mod:`.store`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.names import CLASS_NAMES, MODALITIES


@dataclass(frozen=True)
class Case:
    """One case pair of a worklist."""

    case_id: str
    baseline: str  # study folder
    followup: str
    patient: str = ""
    label: str = ""  # reference label from the worklist (e.g. LUMIERE's expert rating), if any
    prediction: str = ""  # a `rano-response predict` output folder, if any

    @property
    def baseline_week(self) -> str:
        return Path(self.baseline).name

    @property
    def followup_week(self) -> str:
        return Path(self.followup).name


def default_case_id(patient: str, baseline: str, followup: str) -> str:
    """A case pair's id when the worklist gives none: the same form as the LUMIERE reader's pair ids."""
    return f"{patient or Path(followup).parent.name}_{Path(baseline).name}_{Path(followup).name}"


def read_worklist_csv(path: Path | str) -> list[Case]:
    """Cases from a CSV with columns ``baseline``, ``followup`` and optionally ``case_id``,
    ``patient``, ``label``, ``prediction``. Relative paths are relative to the CSV's folder."""
    path = Path(path)
    if not path.is_file():
        raise RANOInputError(f"{path}: worklist not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise RANOInputError(f"{path}: unreadable worklist CSV ({e})") from None
    if not rows:
        raise RANOInputError(f"{path}: worklist has no cases")
    cols = {c.strip().lower(): c for c in rows[0] if c is not None}
    missing = [c for c in ("baseline", "followup") if c not in cols]
    if missing:
        raise RANOInputError(f"{path}: worklist lacks column(s) {', '.join(missing)} (has {', '.join(cols) or 'none'})")

    def get(row: Mapping[str, str], name: str) -> str:
        return (row.get(cols[name]) or "").strip() if name in cols else ""

    def resolve(p: str) -> str:
        return str(p if not p or Path(p).is_absolute() else (path.parent / p).resolve())

    cases, seen = [], set()
    for n, row in enumerate(rows, start=2):
        base, fu = resolve(get(row, "baseline")), resolve(get(row, "followup"))
        if not base or not fu:
            raise RANOInputError(f"{path}: line {n} lacks a baseline or follow-up path")
        patient = get(row, "patient") or Path(fu).parent.name
        case_id = get(row, "case_id") or default_case_id(patient, base, fu)
        if case_id in seen:
            raise RANOInputError(f"{path}: line {n} repeats case_id {case_id!r}")
        seen.add(case_id)
        label = get(row, "label")
        if label and label not in CLASS_NAMES:
            raise RANOInputError(f"{path}: line {n}: label {label!r} is not one of {', '.join(CLASS_NAMES)}")
        cases.append(Case(case_id, base, fu, patient, label, resolve(get(row, "prediction"))))
    return cases


def cases_from_lumiere(root: Path | str, modalities: Sequence[str] = MODALITIES) -> list[Case]:
    """The usable rated pairs of a LUMIERE folder (``ResponseTrainingLib.lumiere.build_pairs``)."""
    from RANOResponseLib.datasets.lumiere import build_pairs  # (pandas: imported only for a LUMIERE folder)

    pairs, _ = build_pairs(root, modalities)
    return [Case(p.id, str(p.baseline), str(p.followup), p.patient, p.label) for p in pairs]


def load_worklist(source: Path | str, modalities: Sequence[str] = MODALITIES) -> list[Case]:
    """A worklist CSV, or a LUMIERE folder (one holding ``LUMIERE-ExpertRating-v202211.csv``)."""
    source = Path(source)
    if source.is_dir():
        return cases_from_lumiere(source, modalities)
    return read_worklist_csv(source)
