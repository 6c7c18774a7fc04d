"""Reading LUMIERE exactly as distributed, and building the case pairs to train on.

The expert-rating CSV keeps its long column names and its dirty values (``Post-Op `` with a
trailing space, ``Post-Op/PD``); rows flagged ``LessThan3Months`` or whose rationale says they
are not a RANO timepoint are skipped, as are timepoints without a folder or a modality. Every
follow-up row ends up in the pair table as used or skipped, with the reason.

Two pairings:

* ``previous``: each rated follow-up against the timepoint right before it in the rating CSV
  (the reference study, Matoso et al. 2025);
* ``reference``: against the latest earlier reference visit, a Post-Op scan or a PR / CR nadir
  (BraTPRO, MICCAI 2024), as :func:`RANOResponseLib.rano.course.latest_reference` picks it.

Optional clinical features come from ``LUMIERE-Demographics_Pathology.csv`` (age, sex, IDH,
MGMT) plus the weeks between the two scans of a pair.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, TextIO

import numpy as np
import pandas as pd

from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.names import CLASS_NAMES, PAIRINGS
from RANOResponseLib.imaging.io import find_modality_file
from RANOResponseLib.rano.course import latest_reference

RATING_CSV = "LUMIERE-ExpertRating-v202211.csv"
DEMOGRAPHICS_CSV = "LUMIERE-Demographics_Pathology.csv"
WEEK_RE = re.compile(r"^week-(\d+)(?:-(\d+))?$")
NOT_RANO_RE = re.compile(r"not\s+(a\s+)?rano", re.IGNORECASE)
CLINICAL_FEATURES = ("age", "sex_male", "idh_mutant", "mgmt_methylated", "interval_weeks")
PAIR_TABLE_COLUMNS = ("patient", "baseline", "followup", "pairing", "rating", "label", "interval_weeks",
                      "status", "reason")


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
    """One training example: a baseline and a follow-up study folder of one patient."""

    patient: str
    baseline: Path
    followup: Path
    label: str

    @property
    def id(self) -> str:
        return f"{self.patient}_{self.baseline.name}_{self.followup.name}"

    @property
    def interval_weeks(self) -> int:
        """Weeks between the two scans (from the week folder names)."""
        return week_key(self.followup.name)[0] - week_key(self.baseline.name)[0]


def build_pairs(
    root: Path | str, modalities: Sequence[str], pairing: str = "previous"
) -> tuple[list[Pair], pd.DataFrame]:
    """Pair each rated follow-up with its baseline by ``pairing`` (see :data:`PAIRINGS`).

    ``previous`` takes the row right before the follow-up in the (chronologically sorted) rating
    CSV; ``reference`` the latest earlier row rated Post-Op, PR or CR. If that baseline has no
    folder or lacks a modality the pair is skipped (never silently replaced by another scan).

    Returns the usable pairs and a table of every rating row (used or skipped, with the reason;
    columns :data:`PAIR_TABLE_COLUMNS`).
    """
    if pairing not in PAIRINGS:
        raise RANOInputError(f"--pairing {pairing}: unknown (use {' or '.join(PAIRINGS)})")
    root = Path(root)
    ratings = read_ratings(root)
    imaging = root / "Imaging"
    if not imaging.is_dir():
        raise RANOInputError(f"{imaging}: imaging folder not found")
    rows, pairs = [], []
    for patient, group in ratings.groupby("patient", sort=True):
        group = group.assign(_key=group["week"].map(_safe_key)).sort_values("_key", kind="stable")
        earlier: list[pd.Series] = []
        for _, r in group.iterrows():
            base = _choose_baseline(earlier, pairing)
            folder = imaging / patient / r["week"]
            reason = _skip_reason(r, folder, base, modalities, pairing)
            interval = ""
            if base is not None and r["_key"][0] < 10**6 and base["_key"][0] < 10**6:
                interval = r["_key"][0] - base["_key"][0]
            rows.append({"patient": patient, "followup": r["week"],
                         "baseline": base["week"] if base is not None else "", "pairing": pairing,
                         "rating": r["raw_rating"], "label": r["rating"] if r["rating"] in CLASS_NAMES else "",
                         "interval_weeks": interval, "status": "skipped" if reason else "used",
                         "reason": reason})
            if not reason:
                pairs.append(Pair(patient, imaging / patient / base["week"], folder, r["rating"]))
            earlier.append(r)
    table = pd.DataFrame(rows, columns=list(PAIR_TABLE_COLUMNS))
    return pairs, table


def print_pair_table(table: pd.DataFrame, stream: TextIO = sys.stderr) -> None:
    """Every rating row, used or skipped and why, then the counts per reason."""
    used = int(table["status"].eq("used").sum())
    with pd.option_context("display.max_rows", None, "display.width", 200, "display.max_colwidth", 60):
        print(table.drop(columns=["pairing"]).to_string(index=False), file=stream)
    print(f"pairs ({table['pairing'].iloc[0] if len(table) else '-'}): {used} used, {len(table) - used} skipped",
          file=stream)
    for reason, n in table.loc[table["status"] == "skipped", "reason"].value_counts().items():
        print(f"  skipped {n:3d}: {reason}", file=stream)


def _choose_baseline(earlier: list[pd.Series], pairing: str) -> pd.Series | None:
    if pairing == "previous":
        return earlier[-1] if earlier else None
    i = latest_reference([r["rating"] for r in earlier])  # the course rules' reference visit
    return None if i is None else earlier[i]


def _safe_key(week: str) -> tuple[int, int]:
    try:
        return week_key(week)
    except ValueError:
        return (10**6, 0)


def missing_modalities(folder: Path, modalities: Sequence[str]) -> list[str]:
    return [m for m in modalities if find_modality_file(folder, m) is None]


def _skip_reason(row: pd.Series, folder: Path, base: pd.Series | None, modalities: Sequence[str],
                 pairing: str) -> str:
    if row["rating"] not in CLASS_NAMES:
        return f"rating {row['raw_rating']!r} is not a response class"
    if row["less_than_3_months"]:
        return "flagged LessThan3Months"
    if NOT_RANO_RE.search(row["rationale"]):
        return "rationale says not a RANO timepoint"
    if not folder.is_dir():
        return f"folder {folder.name} missing"
    if missing := missing_modalities(folder, modalities):
        return f"follow-up lacks {', '.join(missing)}"
    if base is None:
        return ("no earlier timepoint" if pairing == "previous"
                else "no earlier reference timepoint (Post-Op, PR or CR)")
    what = "previous timepoint" if pairing == "previous" else "reference timepoint"
    base_folder = folder.parent / base["week"]
    if not base_folder.is_dir():
        return f"{what} folder {base['week']} missing"
    if missing := missing_modalities(base_folder, modalities):
        return f"{what} {base['week']} lacks {', '.join(missing)}"
    return ""


# ---------------------------------------------------------------------------- clinical data


def _yes_no(series: pd.Series, yes: Sequence[str], no: Sequence[str]) -> pd.Series:
    """Map free-text categories to 1.0 / 0.0, anything else (NA, unknown, '') to NaN."""
    def one(v: str) -> float:
        t = str(v).strip().lower()
        if t in no:
            return 0.0
        if t in yes:
            return 1.0
        return float("nan")
    return series.map(one).astype(float)


def read_clinical(root: Path | str) -> pd.DataFrame:
    """``LUMIERE-Demographics_Pathology.csv`` as numbers, indexed by patient.

    Columns ``age`` (years at surgery), ``sex_male``, ``idh_mutant``, ``mgmt_methylated``
    (1/0, NaN where unknown). Columns are found by their prefix, values are case-insensitive.
    """
    csv = Path(root) / DEMOGRAPHICS_CSV
    if not csv.is_file():
        raise RANOInputError(f"{csv}: demographics CSV not found (needed for --clinical)")
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    out = pd.DataFrame({
        "patient": df[_column(df, "Patient", csv)].str.strip(),
        "age": pd.to_numeric(df[_column(df, "Age at surgery", csv)].str.strip(), errors="coerce"),
        "sex_male": _yes_no(df[_column(df, "Sex", csv)], ("male", "m"), ("female", "f")),
        "idh_mutant": _yes_no(df[_column(df, "IDH (WT", csv)], ("mutated", "mutant", "mut", "idh-mutant"),
                              ("wt", "wild type", "wildtype", "wild-type")),
        "mgmt_methylated": _yes_no(df[_column(df, "MGMT qualitative", csv)], ("methylated", "yes"),
                                   ("not methylated", "unmethylated", "no")),
    })
    return out.drop_duplicates("patient").set_index("patient")


def clinical_features(pairs: Sequence[Pair], clinical: pd.DataFrame | None) -> pd.DataFrame:
    """One row per pair: :data:`CLINICAL_FEATURES` (NaN where unknown; imputed inside each fold)."""
    rows = []
    for p in pairs:
        row = {name: np.nan for name in CLINICAL_FEATURES}
        if clinical is not None and p.patient in clinical.index:
            row.update(clinical.loc[p.patient].to_dict())
        row["interval_weeks"] = float(p.interval_weeks)
        rows.append(row)
    return pd.DataFrame(rows, columns=list(CLINICAL_FEATURES), index=[p.id for p in pairs])


# ------------------------------------------------------------------ labels from review sessions
