"""Reading LUMIERE exactly as distributed, and building the case pairs to train on.

The expert-rating CSV keeps its long column names and its dirty values (``Post-Op `` with a
trailing space, ``Post-Op/PD``); rows flagged ``LessThan3Months`` or whose rationale says they
are not a RANO timepoint are skipped, as are timepoints without a folder or a modality. Every
follow-up row ends up in the pair table as used or skipped, with the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

from RANOResponseLib import CLASS_NAMES
from RANOResponseLib.errors import RANOInputError
from RANOResponseLib.io import find_modality_file

RATING_CSV = "LUMIERE-ExpertRating-v202211.csv"
DEMOGRAPHICS_CSV = "LUMIERE-Demographics_Pathology.csv"
WEEK_RE = re.compile(r"^week-(\d+)(?:-(\d+))?$")
NOT_RANO_RE = re.compile(r"not\s+(a\s+)?rano", re.IGNORECASE)


def _column(df: pd.DataFrame, prefix: str, csv: Path) -> str:
    """The column whose (stripped) name starts with ``prefix``; long names are matched by prefix."""
    for c in df.columns:
        if str(c).strip().lower().startswith(prefix.lower()):
            return c
    raise RANOInputError(f"{csv}: no column starting with {prefix!r} (columns: {list(df.columns)[:6]})")


def week_key(name: str) -> tuple[int, int]:
    """``week-044`` -> (44, 0); ``week-000-2`` -> (0, 2): chronological sort key."""
    m = WEEK_RE.match(str(name).strip())
    if not m:
        raise ValueError(f"not a week folder name: {name!r}")
    return int(m.group(1)), int(m.group(2) or 0)


def read_ratings(root: Path | str) -> pd.DataFrame:
    """The expert ratings, one row per timepoint, with cleaned columns.

    Columns: ``patient``, ``week``, ``rating`` (stripped), ``raw_rating`` (as written),
    ``less_than_3_months`` (bool), ``rationale``.
    """
    root = Path(root)
    csv = root / RATING_CSV
    if not csv.is_file():
        raise RANOInputError(f"{csv}: expert rating CSV not found")
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    rating = _column(df, "Rating (according to RANO", csv)
    rationale = _column(df, "Rating rationale", csv)
    out = pd.DataFrame({
        "patient": df[_column(df, "Patient", csv)].str.strip(),
        "week": df[_column(df, "Date", csv)].str.strip(),
        "raw_rating": df[rating],
        "rating": df[rating].str.strip(),
        "less_than_3_months": df[_column(df, "LessThan3Months", csv)].str.strip().str.lower().eq("x"),
        "rationale": df[rationale].str.strip(),
    })
    return out


@dataclass(frozen=True)
class Pair:
    patient: str
    baseline: Path
    followup: Path
    label: str

    @property
    def id(self) -> str:
        return f"{self.patient}_{self.baseline.name}_{self.followup.name}"


def build_pairs(
    root: Path | str, modalities: Sequence[str], pairing: str = "previous"
) -> tuple[list[Pair], pd.DataFrame]:
    """Pair each rated follow-up with the timepoint immediately before it (``previous``).

    Returns the usable pairs and a table of every rated row (used or skipped, with the reason).
    """
    if pairing != "previous":
        raise RANOInputError(f"--pairing {pairing}: only 'previous' is implemented")
    root = Path(root)
    ratings = read_ratings(root)
    imaging = root / "Imaging"
    rows, pairs = [], []
    for patient, group in ratings.groupby("patient", sort=True):
        group = group.assign(_key=group["week"].map(_safe_key)).sort_values("_key")
        previous = None
        for _, r in group.iterrows():
            folder = imaging / patient / r["week"]
            reason = _skip_reason(r, folder, previous, modalities)
            rows.append({"patient": patient, "followup": r["week"],
                         "baseline": previous["week"] if previous is not None else "",
                         "rating": r["raw_rating"], "status": "skipped" if reason else "used",
                         "reason": reason})
            if not reason:
                pairs.append(Pair(patient, imaging / patient / previous["week"], folder, r["rating"]))
            previous = r
    table = pd.DataFrame(rows, columns=["patient", "baseline", "followup", "rating", "status", "reason"])
    return pairs, table


def _safe_key(week: str) -> tuple[int, int]:
    try:
        return week_key(week)
    except ValueError:
        return (10**6, 0)


def _missing(folder: Path, modalities: Sequence[str]) -> list[str]:
    return [m for m in modalities if find_modality_file(folder, m) is None]


def _skip_reason(row: pd.Series, folder: Path, previous: pd.Series | None, modalities: Sequence[str]) -> str:
    if row["rating"] not in CLASS_NAMES:
        return f"rating {row['raw_rating']!r} is not a response class"
    if row["less_than_3_months"]:
        return "flagged LessThan3Months"
    if NOT_RANO_RE.search(row["rationale"]):
        return "rationale says not a RANO timepoint"
    if not folder.is_dir():
        return f"folder {folder.name} missing"
    if missing := _missing(folder, modalities):
        return f"follow-up lacks {', '.join(missing)}"
    if previous is None:
        return "no earlier timepoint"
    prev_folder = folder.parent / previous["week"]
    if not prev_folder.is_dir():
        return f"previous timepoint folder {previous['week']} missing"
    if missing := _missing(prev_folder, modalities):
        return f"previous timepoint {previous['week']} lacks {', '.join(missing)}"
    return ""
