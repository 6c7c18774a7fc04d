"""``make demo``: a case pair as a scanner gives it, ``predict`` on it, where the outputs are.

    python -m RANOResponseLib.demo [--out demo-output] [--device auto] [--head HEAD.nii.gz]

With ``--head`` (``make demo`` fetches pydeface's mean head with pip and passes it; nothing here
downloads), the 1 mm phantom pair is turned into a clinical-style pair: the baseline a full-head
NIfTI study, the follow-up a full-head DICOM study (3D sagittal T1/CT1, 5 mm axial T2/FLAIR,
each sequence its own acquisition), so ``predict`` extracts the brains, registers the sequences
and reads DICOM, as on studies from PACS. Without it the demo uses the skull-stripped pair.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.review.opinions import opinion_lines

# The clinical-style versions of the demo pair: baseline, follow-up (RANOResponseLib.phantom.clinical).
CLINICAL_DEMO_VARIANTS = ("head", "dicom")


def demo_case(root: Path, seed: int = 7, spacing: float = 1.0) -> tuple[Path, Path, pd.Series]:
    """Generate (once) a one-patient phantom and return (baseline, follow-up, truth row)."""
    from RANOResponseLib.phantom.generator import PhantomConfig, generate_cohort

    truth_csv = root / "phantom_truth.csv"
    if truth_csv.is_file():
        truth = pd.read_csv(truth_csv, dtype={"date": str})
    else:
        print(f"generating a {spacing:g} mm phantom case in {root} ...", file=sys.stderr)
        truth = generate_cohort(root, PhantomConfig(patients=1, seed=seed, spacing=spacing,
                                                    min_followups=1, max_followups=1, quirks=False))
    rows = truth[truth["patient"] == "Patient-001"].reset_index(drop=True)
    i = int(rows.index[rows["role"] == "follow-up"][0])
    folder = root / "Imaging" / "Patient-001"
    return folder / rows.loc[i - 1, "date"], folder / rows.loc[i, "date"], rows.loc[i]


def clinical_case(root: Path, head: Path, variants: tuple[str, str] = CLINICAL_DEMO_VARIANTS, seed: int = 7,
                  spacing: float = 1.0) -> tuple[Path, Path, pd.Series]:
    """:func:`demo_case`'s pair in clinical-style ``variants`` (baseline, follow-up), built once
    under ``root/clinical``; returns (baseline, follow-up, truth row)."""
    from RANOResponseLib.phantom.clinical import make_clinical_timepoint

    baseline, followup, truth = demo_case(root, seed, spacing)
    out = []
    for study, variant in zip((baseline, followup), variants):
        target = root / "clinical" / variant / study.parent.name / study.name
        if not target.is_dir():  # written whole or not at all
            print(f"building the {variant} version of {study.name} ...", file=sys.stderr)
            make_clinical_timepoint(root, study.parent.name, study.name, head, variant, seed=seed, out=target)
        out.append(target)
    return out[0], out[1], truth


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m RANOResponseLib.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("demo-output"))
    p.add_argument("--device", default="auto")
    p.add_argument("--head", type=Path, default=None, metavar="HEAD.nii.gz",
                   help="a real full-head T1 (pydeface 2.1.0's mean_reg2mean.nii.gz) for a clinical-style pair")
    args = p.parse_args(argv)
    from RANOResponseLib.inference.pipeline import run_predict
    from RANOResponseLib.mrml.outputs import output_writers

    try:
        if args.head is not None:
            baseline, followup, truth = clinical_case(args.out / "phantom", args.head)
            kinds = ("full head, NIfTI", "full head, DICOM series")
        else:
            baseline, followup, truth = demo_case(args.out / "phantom")
            kinds = ("skull-stripped, NIfTI", "skull-stripped, NIfTI")
            print("(no --head: the skull-stripped pair; `make demo` runs the clinical-style one)", file=sys.stderr)
        print(f"baseline:  {baseline}  ({kinds[0]})\nfollow-up: {followup}  ({kinds[1]})", file=sys.stderr)
        result, files = run_predict(baseline, followup, args.out / "prediction", device=args.device, writers=output_writers(),
                                    progress=lambda stage, frac: print(f"  [{frac:4.0%}] {stage}", file=sys.stderr))
    except RANOInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(f"Predicted RANO response: {result.label}   (phantom ground truth: {truth['rating_written']})")
    for c, v in result.probabilities.items():
        print(f"  {c:3s} {v:6.3f}  {'#' * int(round(v * 40))}")
    for line in opinion_lines(result.summary()):  # network, measured, suggested
        print(line)
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items() if k != "total")
    print(f"model {result.bundle.id} on {result.device}; {stages}")
    for timepoint, brain in result.brains.items():
        print(f"brain {timepoint}: {brain.method}{' (came skull-stripped)' if brain.stripped else ''}, "
              f"{brain.volume_ml:.0f} ml")
    check = result.input_check
    if check:
        print(f"input check: {check.get('verdict')}" + "".join(f"\n  - {r}" for r in check.get("reasons", [])))
    print(f"\nOutputs in {(args.out / 'prediction').absolute()}:")
    for name, path in files.items():
        print(f"  {name:11s} {path}")
    scene = files.get("scene")
    print("Open overlay.png (or slice_axial/coronal/sagittal.png) to see the maps"
          + (f"; open {scene} in 3D Slicer for the arranged scene." if scene else "."))
    return 0


if __name__ == "__main__":
    sys.exit(main())
