"""``rano-response``: the command-line face of the core.

    rano-response phantom  --out DIR --patients N --seed S [--spacing MM]
    rano-response predict  --baseline DIR --followup DIR --out OUT [--bundle B] [--device D]
    rano-response train    --data DIR --out RUN [...]          (ResponseTrainingLib)
    rano-response evaluate --bundle B --data DIR --out OUT
    rano-response bench    [--runs 3] [--spacing 1]

Bad input is reported as one line ``error: <file>: <problem>`` on stderr, with exit status 2
and nothing left in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from .errors import RANOInputError


def _cmd_phantom(args: argparse.Namespace) -> int:
    from .phantom import PhantomConfig, generate_cohort

    cfg = PhantomConfig(patients=args.patients, seed=args.seed, spacing=args.spacing,
                        min_followups=args.min_followups, max_followups=args.max_followups,
                        quirks=not args.no_quirks)
    truth = generate_cohort(Path(args.out), cfg, progress=lambda m: print(m, file=sys.stderr))
    follow = truth[truth["role"] == "follow-up"]
    print(f"wrote {args.patients} patients to {Path(args.out).absolute()}")
    print("follow-up ratings:", json.dumps(follow["rating_written"].value_counts().to_dict()))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from .pipeline import run_predict

    def progress(stage: str, frac: float) -> None:
        if not args.quiet:
            print(f"[{frac * 100:5.1f}%] {stage}", file=sys.stderr)

    result, files = run_predict(args.baseline, args.followup, args.out, bundle=args.bundle,
                                device=args.device, attributions=not args.no_maps,
                                progress=progress)
    probs = "  ".join(f"{c}={p:.3f}" for c, p in result.probabilities.items())
    print(f"label: {result.label}")
    print(f"probabilities: {probs}")
    print(f"device: {result.device}   total {sum(v for k, v in result.timings.items() if k != 'total'):.1f} s")
    print(f"outputs in {Path(args.out).absolute()}:")
    for name, path in files.items():
        print(f"  {name:12s} {path}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    return run_bench(runs=args.runs, spacing=args.spacing, device=args.device, workdir=args.workdir)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ResponseTrainingLib.evaluate import evaluate

    m = evaluate(args.bundle, args.data, args.out, args.device)
    print(f"{m['n']} pairs  balanced accuracy {m['balanced_accuracy']:.3f}  macro F1 {m['f1_macro']:.3f}  "
          f"AUC {m['auc_ovr']:.3f}")
    print(f"confusion matrix (rows true, cols predicted): {m['confusion_matrix']}")
    print(f"written: {Path(args.out).absolute()}/metrics.json, predictions.csv, pairs.csv")
    return 0


def _cmd_train(argv: Sequence[str]) -> int:
    from ResponseTrainingLib.cli import main as train_main

    return train_main(list(argv))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rano-response", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    ph = sub.add_parser("phantom", help="write a synthetic longitudinal cohort in LUMIERE's layout")
    ph.add_argument("--out", required=True, type=Path)
    ph.add_argument("--patients", type=int, default=6)
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--spacing", type=float, default=1.0, help="isotropic voxel size in mm (default 1)")
    ph.add_argument("--min-followups", type=int, default=2)
    ph.add_argument("--max-followups", type=int, default=4)
    ph.add_argument("--no-quirks", action="store_true", help="leave out LUMIERE's CSV/layout quirks")
    ph.set_defaults(func=_cmd_phantom)

    pr = sub.add_parser("predict", help="classify the response between two studies, with maps")
    pr.add_argument("--baseline", required=True, type=Path, help="baseline study folder")
    pr.add_argument("--followup", required=True, type=Path, help="follow-up study folder")
    pr.add_argument("--out", required=True, type=Path, help="output folder")
    pr.add_argument("--bundle", type=Path, default=None, help="model bundle folder (default: shipped)")
    pr.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    pr.add_argument("--no-maps", action="store_true", help="skip saliency, Grad-CAM and the overlay")
    pr.add_argument("--quiet", action="store_true")
    pr.set_defaults(func=_cmd_predict)

    be = sub.add_parser("bench", help="time each stage of predict on a 1 mm phantom case pair")
    be.add_argument("--runs", type=int, default=3)
    be.add_argument("--spacing", type=float, default=1.0)
    be.add_argument("--device", default="auto")
    be.add_argument("--workdir", type=Path, default=None)
    be.set_defaults(func=_cmd_bench)

    ev = sub.add_parser("evaluate", help="score a bundle on a labelled LUMIERE-layout cohort")
    ev.add_argument("--bundle", type=Path, default=None)
    ev.add_argument("--data", required=True, type=Path)
    ev.add_argument("--out", required=True, type=Path)
    ev.add_argument("--device", default="auto")
    ev.set_defaults(func=_cmd_evaluate)

    sub.add_parser("train", help="train and export a bundle (see `rano-response train --help`)",
                   add_help=False)
    return p


def _stop_cleanly_on_sigterm() -> None:
    """SIGTERM (Cancel in Slicer, a job scheduler) unwinds like Ctrl-C, so staging folders and
    temporary files are removed by their ``finally`` blocks instead of being left behind."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _stop_cleanly_on_sigterm()
    try:
        if argv and argv[0] == "train":
            return _cmd_train(argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except RANOInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed: not an error of ours
        sys.stdout = open(os.devnull, "w")
        return 0


if __name__ == "__main__":
    sys.exit(main())
