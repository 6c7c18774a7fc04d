"""Reviewers' verdicts as training labels: a review export replaces or extends LUMIERE's labels."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.names import CLASS_NAMES
from RANOResponseLib.datasets.lumiere import Pair, missing_modalities, week_key

REVIEW_LABEL_COLUMNS = ("patient", "baseline_week", "followup_week", "label")


def read_review_labels(path: Path | str) -> pd.DataFrame:
    """Radiologists' verdicts as exported by ``rano-response review export``, one row per case.

    Several reviewers of one case are combined by majority; a tie is left out (``label`` empty,
    ``votes`` says why). Columns: patient, baseline_week, followup_week, label, votes.
    """
    path = Path(path)
    if not path.is_file():
        raise RANOInputError(f"{path}: review label CSV not found")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in REVIEW_LABEL_COLUMNS if c not in df.columns]
    if missing:
        raise RANOInputError(f"{path}: not a review export (missing columns {', '.join(missing)})")
    bad = sorted(set(df["label"].str.strip()) - set(CLASS_NAMES))
    if bad:
        raise RANOInputError(f"{path}: labels {bad} are not RANO classes ({', '.join(CLASS_NAMES)})")
    rows = []
    for (patient, base, fu), g in df.groupby(["patient", "baseline_week", "followup_week"], sort=True):
        counts = g["label"].str.strip().value_counts()
        top = counts[counts == counts.max()]
        votes = ", ".join(f"{k} x{v}" for k, v in counts.items())
        rows.append({"patient": patient, "baseline_week": base, "followup_week": fu,
                     "label": top.index[0] if len(top) == 1 else "", "votes": votes})
    return pd.DataFrame(rows, columns=[*REVIEW_LABEL_COLUMNS, "votes"])


def apply_review_labels(
    pairs: Sequence[Pair], table: pd.DataFrame, labels: Path | str, root: Path | str, modalities: Sequence[str]
) -> tuple[list[Pair], pd.DataFrame]:
    """Let review verdicts decide the labels: they replace the expert CSV's label of the same pair
    (patient, baseline week, follow-up week) and add reviewed pairs the CSV did not yield.

    The pair table gains a ``label_source`` column (``expert CSV`` or ``review (votes)``).
    """
    reviewed = read_review_labels(labels)
    imaging = Path(root) / "Imaging"
    table = table.copy()
    table["label_source"] = np.where(table["status"].eq("used"), "expert CSV", "")
    by_key = {(p.patient, p.baseline.name, p.followup.name): i for i, p in enumerate(pairs)}
    out = list(pairs)
    extra = []
    for r in reviewed.itertuples(index=False):
        key = (r.patient, r.baseline_week, r.followup_week)
        source = f"review ({r.votes})"
        hit = (table["patient"].eq(r.patient) & table["baseline"].eq(r.baseline_week)
               & table["followup"].eq(r.followup_week))
        if not r.label:
            if key in by_key:  # reviewers disagree: do not train on this pair
                out[by_key[key]] = None
            table.loc[hit, ["status", "reason", "label_source"]] = ["skipped", "reviewers disagree (tie)", source]
            continue
        base, fu = imaging / r.patient / r.baseline_week, imaging / r.patient / r.followup_week
        missing = [str(f) for f in (base, fu) if not f.is_dir()] or [
            f"{f.name} {m}" for f in (base, fu) for m in missing_modalities(f, modalities)]
        if missing:
            raise RANOInputError(f"{labels}: reviewed case {'_'.join(key)}: missing {', '.join(missing)}")
        pair = Pair(r.patient, base, fu, r.label)
        if key in by_key:
            out[by_key[key]] = pair
        else:
            out.append(pair)
        if hit.any():
            table.loc[hit, ["label", "status", "reason", "label_source"]] = [r.label, "used", "", source]
        else:
            extra.append({"patient": r.patient, "followup": r.followup_week, "baseline": r.baseline_week,
                          "pairing": "review", "rating": "", "label": r.label,
                          "interval_weeks": week_key(r.followup_week)[0] - week_key(r.baseline_week)[0],
                          "status": "used", "reason": "", "label_source": source})
    if extra:
        table = pd.concat([table, pd.DataFrame(extra)], ignore_index=True)
    return [p for p in out if p is not None], table
