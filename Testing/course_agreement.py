"""The issue's check of ``rano-response timeline``: does each follow-up's RANO category in
``timeline.csv`` agree with the category computed against the nadir and the baseline from the
cohort's own masks?

The reference here is independent of :mod:`RANOResponseLib.rano.course` and of the timeline: each
timepoint's DeepBraTumIA native mask is measured (:func:`RANOResponseLib.rano.measurement.measure_timepoints`
against the scan before it, which also says whether a new measurable lesion appeared), and RANO's
course rules are written out below (Wen et al. 2010), from the timeline's baseline: PD for a
new measurable lesion, or measurable disease where the nadir had none, or a sum of products
>= 1.25 x the nadir (the smallest since the baseline, baseline included); else CR when no enhancing
lesion is left; else PR when <= 0.5 x the baseline; else SD.

Run on held-out patients (timelines made with the automatic segmentation)::

    python Testing/course_agreement.py COHORT OUTROOT [--patients Patient-003,Patient-004]
        [--segmentation auto|cohort] [--seg-bundle S] [--bundle B] [--no-network]

It runs ``rano-response timeline`` for each patient into ``OUTROOT/<patient>`` (cached: a second
run only compares), prints one line per follow-up and the agreement, and exits 1 below 90 %.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

PD_RATIO, PR_RATIO = 1.25, 0.50


def reference_categories(patient_dir: Path, baseline: str) -> dict[str, str]:
    """Timepoint -> the RANO category from the cohort's masks (see the module docstring)."""
    from RANOResponseLib.datasets.lumiere import WEEK_RE, week_key
    from RANOResponseLib.rano.measurement import find_segmentation, measure_segmentation, measure_timepoints

    weeks = sorted((d for d in patient_dir.iterdir() if d.is_dir() and WEEK_RE.match(d.name)),
                   key=lambda d: week_key(d.name))
    names = [d.name for d in weeks]
    b = names.index(baseline)
    spd, enhancing, new = {}, {}, {}
    for i, d in enumerate(weeks):
        m = measure_segmentation(find_segmentation(d, "deepbratumia-native").path)
        spd[d.name], enhancing[d.name] = m.spd_mm2, len(m.lesions)
        if i > b:
            pair = measure_timepoints(weeks[i - 1], d, source="deepbratumia-native")
            new[d.name] = bool(pair.new_measurable)
    out = {}
    for i in range(b + 1, len(names)):
        n = names[i]
        nadir = min(spd[x] for x in names[b:i])
        if new[n] or (nadir == 0 and spd[n] > 0) or (nadir > 0 and spd[n] >= PD_RATIO * nadir):
            out[n] = "PD"
        elif enhancing[n] == 0:
            out[n] = "CR"
        elif spd[names[b]] > 0 and spd[n] <= PR_RATIO * spd[names[b]]:
            out[n] = "PR"
        else:
            out[n] = "SD"
    return out


def agreement(timeline_dir: Path, patient_dir: Path) -> pd.DataFrame:
    """One row per follow-up: the timeline's category, the reference's, and whether they agree."""
    table = pd.read_csv(timeline_dir / "timeline.csv", dtype={"timepoint": str}, keep_default_na=False)
    baseline = table.loc[table["role"] == "baseline", "timepoint"].iloc[0]
    ref = reference_categories(patient_dir, baseline)
    rows = table[table["role"] == "follow-up"]
    return pd.DataFrame({"patient": patient_dir.name, "timepoint": rows["timepoint"].to_numpy(),
                         "timeline": rows["category"].to_numpy(),
                         "reference": [ref[t] for t in rows["timepoint"]],
                         "spd_mm2": rows["spd_mm2"].to_numpy()}).assign(
        agree=lambda d: d["timeline"] == d["reference"])


def main(argv: list[str] | None = None) -> int:
    from RANOResponseLib.inference.timeline import run_timeline
    from RANOResponseLib.review.course_report import course_writers

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cohort", type=Path, help="LUMIERE-layout cohort root (with Imaging/)")
    p.add_argument("outroot", type=Path, help="one timeline output folder per patient goes here")
    p.add_argument("--patients", default="", help="comma-separated (default: every patient)")
    p.add_argument("--segmentation", default="auto", choices=("auto", "cohort"))
    p.add_argument("--seg-bundle", type=Path, default=None)
    p.add_argument("--bundle", type=Path, default=None)
    p.add_argument("--no-network", action="store_true")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    imaging = args.cohort / "Imaging"
    patients = [x for x in args.patients.split(",") if x] or sorted(d.name for d in imaging.iterdir() if d.is_dir())
    tables = []
    for patient in patients:
        out = args.outroot / patient
        run_timeline(imaging / patient, out, bundle=args.bundle, seg_bundle=args.seg_bundle, device=args.device,
                     network=not args.no_network, segmentation=args.segmentation, writers=course_writers())
        tables.append(agreement(out, imaging / patient))
    table = pd.concat(tables, ignore_index=True)
    print(table.to_string(index=False))
    share = float(table["agree"].mean()) if len(table) else float("nan")
    print(f"agreement: {int(table['agree'].sum())}/{len(table)} follow-ups = {share:.1%} "
          f"(segmentation {args.segmentation})")
    return 0 if share >= 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
