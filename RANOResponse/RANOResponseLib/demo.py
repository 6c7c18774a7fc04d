"""``make demo``: make a 1 mm phantom case pair, run ``predict`` on it, say where the outputs are.

    python -m RANOResponseLib.demo [--out demo-output] [--device auto]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from RANOResponseLib.core.errors import RANOInputError


def demo_case(root: Path, seed: int = 7, spacing: float = 1.0) -> tuple[Path, Path, pd.Series]:
    """Generate (once) a one-patient phantom and return (baseline, follow-up, truth row)."""
    from RANOResponseLib.phantom.generator import PhantomConfig, generate_cohort

    truth_csv = root / "phantom_truth.csv"
    if truth_csv.is_file():
        truth = pd.read_csv(truth_csv, dtype={"date": str})
    else:
        print(f"generating a 1 mm phantom case in {root} ...", file=sys.stderr)
        truth = generate_cohort(root, PhantomConfig(patients=1, seed=seed, spacing=spacing,
                                                    min_followups=1, max_followups=1, quirks=False))
    rows = truth[truth["patient"] == "Patient-001"].reset_index(drop=True)
    i = int(rows.index[rows["role"] == "follow-up"][0])
    folder = root / "Imaging" / "Patient-001"
    return folder / rows.loc[i - 1, "date"], folder / rows.loc[i, "date"], rows.loc[i]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m RANOResponseLib.demo", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("demo-output"))
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    from RANOResponseLib.inference.pipeline import run_predict
    from RANOResponseLib.mrml.outputs import output_writers

    try:
        baseline, followup, truth = demo_case(args.out / "phantom")
        print(f"baseline:  {baseline}\nfollow-up: {followup}", file=sys.stderr)
        result, files = run_predict(baseline, followup, args.out / "prediction", device=args.device, writers=output_writers(),
                                    progress=lambda stage, frac: print(f"  [{frac:4.0%}] {stage}", file=sys.stderr))
    except RANOInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(f"Predicted RANO response: {result.label}   (phantom ground truth: {truth['rating_written']})")
    for c, v in result.probabilities.items():
        print(f"  {c:3s} {v:6.3f}  {'#' * int(round(v * 40))}")
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items() if k != "total")
    print(f"model {result.bundle.id} on {result.device}; {stages}")
    print(f"\nOutputs in {(args.out / 'prediction').absolute()}:")
    for name, path in files.items():
        print(f"  {name:11s} {path}")
    scene = files.get("scene")
    print("Open overlay.png (or slice_axial/coronal/sagittal.png) to see the maps"
          + (f"; open {scene} in 3D Slicer for the arranged scene." if scene else "."))
    return 0


if __name__ == "__main__":
    sys.exit(main())
