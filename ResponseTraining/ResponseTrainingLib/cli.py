"""``rano-response train``: the same arguments work from the console script, from
``python ResponseTraining/ResponseTraining.py train ...``, from
``Slicer --no-main-window --python-script ResponseTraining/ResponseTraining.py -- train ...``
and, for data-parallel training, from ``torchrun --nproc_per_node N -m RANOResponseCLI train ...``.

Folds on separate devices: ``--only-fold i --device cuda:i`` per process (after one
``--preprocess-only`` run fills the shared cache), then one ``--resume`` run aggregates.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Sequence

from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.names import PAIRINGS

from ResponseTrainingLib.training.config import (
    ARCHS,
    CHANNEL_SETS,
    WEIGHTING_ALIASES,
    WEIGHTINGS,
    TrainConfig,
    default,
    parse_modalities,
)
from ResponseTrainingLib.training.cv import train
from ResponseTrainingLib.training.hybrid import CLASSIFIERS, HYBRID_FIT


def _triple(cast):
    def parse(text: str):
        parts = [cast(v) for v in text.replace("x", ",").split(",")]
        if len(parts) not in (1, 3):
            raise argparse.ArgumentTypeError(f"{text!r}: give one value or three (x,y,z)")
        return tuple(parts * 3 if len(parts) == 1 else parts)
    return parse


def _weightings(text: str) -> list[str]:
    values = list(WEIGHTINGS) if text.strip() == "all" else [v.strip() for v in text.split(",") if v.strip()]
    values = [WEIGHTING_ALIASES.get(v, v) for v in values]
    bad = [v for v in values if v not in WEIGHTINGS]
    if bad or not values:
        raise RANOInputError(f"weighting {text!r}: use {', '.join(WEIGHTINGS)} (comma list) or 'all'")
    return values


def run_weighting_grid(cfg: TrainConfig, losses: list[str], samplers: list[str]) -> list[dict]:
    """The reference study's class-weighting grid: one full cross-validation per (loss, sampler)
    pair under ``OUT/grid/loss=<w>_sampler=<w>`` (one shared preprocessing cache), and
    ``OUT/grid.csv`` with each run's CV summary. Choosing a pair by these test-fold figures is
    itself selection on the test folds; report the grid, or nest it, rather than the best cell."""
    import itertools
    from dataclasses import replace

    import pandas as pd
    from RANOResponseLib.core.files import write_text

    rows = []
    for loss, sampler in itertools.product(losses, samplers):
        name = f"loss={loss}_sampler={sampler}".replace("/", "over")
        sub = replace(cfg, out=Path(cfg.out) / "grid" / name, loss_weighting=loss, sampler_weighting=sampler,
                      cache=cfg.cache or Path(cfg.out) / "cache", bundle_id=f"{cfg.bundle_id}-{name}")
        print(f"weighting grid: {name}", file=sys.stderr, flush=True)
        summary = train(sub)
        if summary:
            c = summary["cv"]["cnn"]
            rows.append({"loss_weighting": loss, "sampler_weighting": sampler, "run": str(sub.out),
                         **{f"median_{k}": v for k, v in c["median"].items()},
                         **{f"mean_{k}": v for k, v in c["mean"].items()},
                         **{f"sd_{k}": v for k, v in c["sd"].items()}})
    if rows:
        write_text(pd.DataFrame(rows).to_csv(index=False), Path(cfg.out) / "grid.csv")
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rano-response train", description="Cross-validate a response classifier on "
                                "a LUMIERE-layout cohort (patient-grouped folds) and export the fold models as "
                                "one ensemble bundle.")
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, type=Path, help="cohort root (Imaging/ and the rating CSV)")
    g.add_argument("--out", required=True, type=Path, help="run folder (folds, tables, plots, bundle)")
    g.add_argument("--modalities", default=",".join(default("modalities")), help="comma list of CT1,T1,T2,FLAIR")
    g.add_argument("--channels", default=default("channels"), choices=CHANNEL_SETS,
                   help="stack: [follow-up, baseline] per modality; difference: follow-up minus baseline; "
                        "+segmentation: also the timepoints' automatic tumour labels (enhancing, core, edema)")
    g.add_argument("--seg-bundle", type=Path, default=None, help="segmentation bundle behind +segmentation "
                   "channels (default: the shipped one)")
    g.add_argument("--pairing", default=default("pairing"), choices=PAIRINGS,
                   help="baseline = scan right before, or latest Post-Op/PR/CR reference (BraTPRO)")
    g.add_argument("--labels", type=Path, default=None,
                   help="radiologists' verdicts (`rano-response review export`): they replace the rating CSV's "
                        "label of the same pair and add reviewed pairs; several reviewers are combined by majority")
    g.add_argument("--spacing", type=_triple(float), default=default("spacing"), help="model grid mm, e.g. 2 or 2,2,2")
    g.add_argument("--size", type=_triple(int), default=default("size"), help="model grid voxels x,y,z")
    g.add_argument("--cache", type=Path, default=None, help="preprocessing cache (default OUT/cache); share it "
                   "between runs on the same cohort")
    g.add_argument("--clinical", action="store_true", help="join age, sex, IDH, MGMT and weeks between scans "
                   "(clinical.csv; used by --hybrid)")
    s = p.add_argument_group("splits")
    s.add_argument("--folds", type=int, default=default("folds"),
                   help="patient-grouped stratified k-fold (default %(default)s)")
    s.add_argument("--loocv", action="store_true", help="leave-one-patient-out instead of k-fold")
    s.add_argument("--val-fraction", type=float, default=default("val_fraction"),
                   help="validation patients carved from each fold's training patients")
    s.add_argument("--seed", type=int, default=default("seed"))
    m = p.add_argument_group("model and optimisation")
    m.add_argument("--arch", default=default("arch"), choices=ARCHS)
    m.add_argument("--backbone", default=default("backbone"), help="timm25d: timm 2D model name")
    m.add_argument("--slices", type=int, default=default("slices"),
                   help="timm25d: axial slices through the grid centre")
    m.add_argument("--slice-step", type=int, default=default("slice_step"), help="timm25d: voxels between slices")
    m.add_argument("--pretrained-weights", type=Path, default=None,
                   help="timm25d: local weights file for transfer learning (nothing is downloaded)")
    m.add_argument("--epochs", type=int, default=default("epochs"), help="at most (default %(default)s)")
    m.add_argument("--batch-size", type=int, default=default("batch_size"))
    m.add_argument("--lr", type=float, default=default("lr"))
    m.add_argument("--weight-decay", type=float, default=default("weight_decay"))
    m.add_argument("--patience", type=int, default=default("patience"), help="early stopping patience (epochs)")
    m.add_argument("--plateau-patience", type=int, default=default("plateau_patience"),
                   help="epochs without improvement before lr/10")
    names = ", ".join(WEIGHTINGS)
    m.add_argument("--loss-weighting", default=default("loss_weighting"),
                   help=f"class weights in the loss: {names}; a comma list or 'all' runs the grid")
    m.add_argument("--sampler-weighting", default=default("sampler_weighting"),
                   help=f"class weights when sampling: {names}; a comma list or 'all' runs the grid")
    m.add_argument("--dropout", type=float, default=default("dropout"))
    m.add_argument("--no-augment", action="store_true")
    m.add_argument("--grad-shards", type=int, default=default("grad_shards"),
                   help="split each batch into K parts with gradient accumulation; equals a torchrun run with "
                        "K processes")
    h = p.add_argument_group("deep hybrid learning")
    h.add_argument("--hybrid", default="", help=f"comma list of {','.join(CLASSIFIERS)} or 'all': classifiers on "
                   "the fold model's probabilities + clinical features; 'suggested': the calibrated probabilities + "
                   "the RANO category measured on the cohort's masks (+ clinical with --clinical), exported into the "
                   "bundle as predict's suggested category")
    h.add_argument("--hybrid-fit", default=default("hybrid_fit"), choices=HYBRID_FIT,
                   help="fit them on the fold's validation pairs (default) or training + validation pairs")
    r = p.add_argument_group("running")
    r.add_argument("--device", default=default("device"), help="auto | cpu | cuda | cuda:N")
    r.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice); "
                   "1 is fastest on oversubscribed cores, and CPU numbers reproduce exactly with the same value")
    r.add_argument("--resume", action="store_true", help="skip finished folds, continue the current one")
    r.add_argument("--only-fold", type=int, default=None, help="train only this fold (run folds in parallel)")
    r.add_argument("--preprocess-only", action="store_true", help="fill the preprocessing cache and stop")
    r.add_argument("--progress-json", action="store_true",
                   help="one JSON line per event on stdout (start, preprocess, epoch, fold, done) with 'frac'")
    r.add_argument("--bundle-id", default=default("bundle_id"))
    return p


def config_from_args(args: argparse.Namespace, command: str = "") -> TrainConfig:
    """The :class:`TrainConfig` of parsed ``rano-response train`` arguments (``--loss-weighting``
    and ``--sampler-weighting`` as given: a comma list there is a grid, see :func:`main`)."""
    hybrid = tuple(CLASSIFIERS) if args.hybrid.strip() == "all" else tuple(
        h.strip() for h in args.hybrid.split(",") if h.strip())
    return TrainConfig(
        data=args.data, out=args.out, arch=args.arch, modalities=parse_modalities(args.modalities),
        channels=args.channels, pairing=args.pairing, labels=args.labels, folds=args.folds, loocv=args.loocv,
        val_fraction=args.val_fraction, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, patience=args.patience, plateau_patience=args.plateau_patience,
        loss_weighting=args.loss_weighting, sampler_weighting=args.sampler_weighting, seed=args.seed,
        device=args.device, spacing=args.spacing, size=args.size, dropout=args.dropout, augment=not args.no_augment,
        clinical=args.clinical, hybrid=hybrid, hybrid_fit=args.hybrid_fit, backbone=args.backbone,
        slices=args.slices, slice_step=args.slice_step, pretrained_weights=args.pretrained_weights,
        grad_shards=args.grad_shards, only_fold=args.only_fold, preprocess_only=args.preprocess_only,
        cache=args.cache, seg_bundle=args.seg_bundle, bundle_id=args.bundle_id, resume=args.resume, progress_json=args.progress_json,
        command=command)


def main(argv: Sequence[str] | None = None) -> int:
    """``rano-response train ARGS``: one cross-validated run, or a weighting grid of runs."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args, command="rano-response train " + shlex.join(argv))
        if args.threads > 0:
            import torch

            torch.set_num_threads(args.threads)
        losses, samplers = _weightings(args.loss_weighting), _weightings(args.sampler_weighting)
        if len(losses) * len(samplers) == 1:
            cfg.loss_weighting, cfg.sampler_weighting = losses[0], samplers[0]
            train(cfg)
        else:
            run_weighting_grid(cfg, losses, samplers)
    except RANOInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0



def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ResponseTrainingLib.analysis.evaluate import evaluate

    m = evaluate(args.bundle, args.data, args.out, args.device, workers=args.workers, threads=args.threads,
                 resume=args.resume, fast=args.fast, maps=not args.no_maps, segmentation=not args.no_segmentation,
                 seg_bundle=args.seg_bundle, cache=args.cache, bootstrap=args.bootstrap)
    lo, hi = m["balanced_accuracy_ci95"]
    print(f"{m['n']} pairs  balanced accuracy {m['balanced_accuracy']:.3f} (95% CI {lo:.3f}-{hi:.3f})  "
          f"macro F1 {m['f1_macro']:.3f}  AUC {m['auc_ovr']:.3f}  ECE {m['ece']:.3f}")
    print(f"confusion matrix (rows true, cols predicted): {m['confusion_matrix']}")
    for name in ("measured", "suggested"):
        if name in m:
            print(f"{name}: balanced accuracy {m[name]['balanced_accuracy']:.3f} on {m[name]['n']} pairs")
    for name, e in m.get("explanations", {}).items():
        if isinstance(e, dict):
            print(f"{name}: {e['mean_energy_inside']:.1%} of the energy inside tumour + edema (mean), "
                  f"peak inside in {e['pointing_game']:.0%} of {e['pairs']} pairs")
    print(f"written: {Path(args.out).absolute()}/metrics.json, predictions.csv, confusion.csv/.png, reliability.png")
    return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    from ResponseTrainingLib.training.experiment import GRIDS, run_grid

    if args.list:
        for g in GRIDS.values():
            print(f"{g.name}: {g.description}; {len(g.rows)} configurations")
        return 0
    if not (args.grid and args.data and args.out):
        raise RANOInputError("experiment: --grid, --data and --out are required (or --list)")
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in (("epochs", args.epochs), ("folds", args.folds), ("device", args.device),
                                   ("seed", args.seed), ("size", args.size), ("spacing", args.spacing),
                                   ("batch_size", args.batch_size), ("cache", args.cache),
                                   ("pretrained_weights", args.pretrained_weights)) if v is not None}
    table = run_grid(args.grid, args.data, args.out, resume=args.resume, overrides=overrides)
    print((Path(args.out) / "results.md").read_text(encoding="utf-8"))
    print(f"written: {Path(args.out).absolute()}/results.csv, results.md, results.png ({len(table)} rows)")
    return 0


def _cmd_input_stats(args: argparse.Namespace) -> int:
    from ResponseTrainingLib.data.dataset import add_input_statistics

    stats = add_input_statistics(args.bundle, args.data, args.cache, every=args.every, device=args.device)
    vol, thick = stats["brain_volume_ml"], stats["slice_thickness_mm"]
    print(f"input_statistics from {stats['pairs']} pairs (of {stats['data']['pairs_available']}): brain "
          f"{vol['min']:.0f}-{vol['max']:.0f} ml, slices up to {thick['max']:.2f} mm, registration Dice >= "
          f"{stats['registration_brain_dice']['min']:.3f}")
    print(f"written: {Path(args.bundle).absolute() if args.bundle else 'the default bundle'} (bundle.json)")
    return 0


def _train_seg(argv: list[str]) -> int:
    from ResponseTrainingLib.training.segmentation_cv import main as train_seg_main

    return train_seg_main(argv)


def add_commands(sub: argparse._SubParsersAction) -> dict:
    """The training commands as a plugin of :func:`RANOResponseLib.cli.main`: ``evaluate`` is
    parsed there; ``train`` parses its own arguments (:func:`main`)."""
    ev = sub.add_parser("evaluate", help="score a bundle on a labelled LUMIERE-layout cohort (parallel, resumable)")
    ev.add_argument("--bundle", type=Path, default=None)
    ev.add_argument("--data", required=True, type=Path)
    ev.add_argument("--out", required=True, type=Path)
    ev.add_argument("--device", default="auto", help="auto | cpu | cuda:N, or a comma list shared round robin by "
                    "the workers (cuda:0,cuda:1)")
    ev.add_argument("--workers", type=int, default=1, help="pairs in parallel processes (default %(default)s)")
    ev.add_argument("--threads", type=int, default=0, help="torch threads per worker (default: torch's choice)")
    ev.add_argument("--resume", action="store_true", help="skip pairs finished earlier with the same bundle "
                    "and options (OUT/pairs/*.json)")
    ev.add_argument("--fast", action="store_true", help="probabilities only, from the preprocessing cache (no maps, "
                    "no segmentation)")
    ev.add_argument("--cache", type=Path, default=None, help="--fast: preprocessing cache (default OUT/cache; "
                    "share it with train --cache)")
    ev.add_argument("--no-maps", action="store_true", help="no saliency / Grad-CAM (and no explanation measures)")
    ev.add_argument("--no-segmentation", action="store_true", help="no automatic segmentation (no measured or "
                    "suggested category, no explanation measures)")
    ev.add_argument("--seg-bundle", type=Path, default=None, help="segmentation bundle (default: the shipped one)")
    ev.add_argument("--bootstrap", type=int, default=2000, help="resamples for the 95%% interval")
    ev.set_defaults(func=_cmd_evaluate)
    ex = sub.add_parser("experiment", help="the reference study's experiments: a named grid of cross-validated "
                        "runs, one row per configuration (resumable)")
    ex.add_argument("--grid", default=None, help="grid name (see --list): paper, cpu-small")
    ex.add_argument("--list", action="store_true", help="list the grids and stop")
    ex.add_argument("--data", type=Path, default=None, help="cohort root (Imaging/ and the rating CSV)")
    ex.add_argument("--out", type=Path, default=None, help="grid folder: runs/, results.csv, results.md, results.png")
    ex.add_argument("--resume", action="store_true", help="skip finished configurations, continue the current one")
    ex.add_argument("--epochs", type=int, default=None, help="override the grid's epochs")
    ex.add_argument("--folds", type=int, default=None, help="override the grid's folds")
    ex.add_argument("--batch-size", type=int, default=None)
    ex.add_argument("--seed", type=int, default=None)
    ex.add_argument("--size", type=_triple(int), default=None, help="override the model grid voxels x,y,z")
    ex.add_argument("--spacing", type=_triple(float), default=None, help="override the model grid mm")
    ex.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N")
    ex.add_argument("--threads", type=int, default=0, help="CPU threads for torch")
    ex.add_argument("--cache", type=Path, default=None, help="preprocessing cache (default OUT/cache)")
    ex.add_argument("--pretrained-weights", type=Path, default=None,
                    help="local timm weights for the pretraining rows (skipped without; nothing is downloaded)")
    ex.set_defaults(func=_cmd_experiment)
    st = sub.add_parser("input-stats", help="record a bundle's input_statistics (what predict's input guard "
                        "compares with) from the LUMIERE-layout cohort it was trained on")
    st.add_argument("--bundle", type=Path, default=None, help="bundle folder (default: the shipped bundle)")
    st.add_argument("--data", required=True, type=Path)
    st.add_argument("--cache", required=True, type=Path, help="preprocessing cache (shared with train --cache)")
    st.add_argument("--every", type=int, default=1, help="use every n-th pair only (a faster, documented subset)")
    st.add_argument("--device", default="cpu", help="where brain extraction runs for studies not skull-stripped")
    st.set_defaults(func=_cmd_input_stats)
    sub.add_parser("train", help="train and export a bundle (see `rano-response train --help`)", add_help=False)
    sub.add_parser("train-seg", help="train and export a tumour segmentation bundle (see `rano-response train-seg "
                   "--help`)", add_help=False)
    return {"train": main, "train-seg": _train_seg}


if __name__ == "__main__":
    sys.exit(main())
