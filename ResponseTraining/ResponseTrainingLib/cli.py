"""``rano-response train``: the same arguments work from the console script, from
``python ResponseTraining/ResponseTraining.py train ...`` and from
``Slicer --no-main-window --python-script ResponseTraining/ResponseTraining.py -- train ...``."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Sequence

from RANOResponseLib import MODALITIES
from RANOResponseLib.errors import RANOInputError

from .training import WEIGHTINGS, TrainConfig, train


def _triple(cast):
    def parse(text: str):
        parts = [cast(v) for v in text.replace("x", ",").split(",")]
        return tuple(parts * 3 if len(parts) == 1 else parts)
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rano-response train", description="Train a response classifier on a "
                                "LUMIERE-layout cohort and export a model bundle.")
    p.add_argument("--data", required=True, type=Path, help="cohort root (Imaging/ and the rating CSV)")
    p.add_argument("--out", required=True, type=Path, help="run folder (checkpoints, tables, bundle)")
    p.add_argument("--arch", default="compact", choices=["compact", "densenet121", "densenet169", "densenet264"])
    p.add_argument("--modalities", default=",".join(MODALITIES), help="comma list of CT1,T1,T2,FLAIR")
    p.add_argument("--pairing", default="previous", choices=["previous"])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--patience", type=int, default=10, help="early stopping patience (epochs)")
    p.add_argument("--loss-weighting", default="inverse", choices=WEIGHTINGS)
    p.add_argument("--sampler-weighting", default="equal", choices=WEIGHTINGS)
    p.add_argument("--spacing", type=_triple(float), default=(2.0, 2.0, 2.0), help="model grid mm, e.g. 2 or 2,2,2")
    p.add_argument("--size", type=_triple(int), default=(80, 96, 80), help="model grid voxels x,y,z")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--bundle-id", default="rano-response-model")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    mods = tuple(m.strip() for m in args.modalities.split(",") if m.strip())
    bad = [m for m in mods if m not in MODALITIES]
    try:
        if bad:
            raise RANOInputError(f"--modalities: unknown {', '.join(bad)} (use {', '.join(MODALITIES)})")
        cfg = TrainConfig(data=args.data, out=args.out, arch=args.arch, modalities=mods, pairing=args.pairing,
                          epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                          weight_decay=args.weight_decay, patience=args.patience,
                          loss_weighting=args.loss_weighting, sampler_weighting=args.sampler_weighting,
                          spacing=args.spacing, size=args.size, seed=args.seed, device=args.device,
                          bundle_id=args.bundle_id, augment=not args.no_augment, resume=args.resume,
                          command="rano-response train " + shlex.join(argv))
        train(cfg)
    except RANOInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
