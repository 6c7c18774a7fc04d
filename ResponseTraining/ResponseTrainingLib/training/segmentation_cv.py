"""A whole ``train-seg`` run: cases, folds, the fold loop, native-resolution test Dice, the
bundle and its model card, and the command line (:func:`main`).

Run folder: ``cache/`` (prepared timepoints), ``folds.csv``, ``fold-<k>/`` (checkpoint, best
weights, history, validation threshold table, ``fold.json``), ``metrics.csv`` (one row per test
timepoint: Dice per region at native resolution), ``unseen.csv`` (``--unseen`` cohorts),
``summary.json``, ``plots/`` and ``bundle/`` (the exported segmentation bundle).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch
from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.files import write_text
from RANOResponseLib.core.names import LABEL_NAMES, MODALITIES
from RANOResponseLib.imaging.io import read_image, read_study
from RANOResponseLib.inference.inputs import find_brain
from RANOResponseLib.model.device import resolve_device
from RANOResponseLib.model.segmentation import SegBundle, build_seg_network, write_seg_bundle
from tqdm import tqdm

from ResponseTrainingLib.analysis.segmentation_metrics import (
    REGIONS,
    dice_summary,
    missed_cases,
    plot_dice_per_fold,
    plot_seg_curves,
    region_dice,
)
from ResponseTrainingLib.data.segmentation_data import BRAIN_REFERENCE, SegCase, cache_cases, find_seg_cases, load_case
from ResponseTrainingLib.training.card import data_source, fmt, json_default, portable_path
from ResponseTrainingLib.training.folds import make_folds
from ResponseTrainingLib.training.segmentation import (
    ARCH_PRESETS,
    EXPORTS,
    SEG_LABELS,
    SegTrainConfig,
    architecture,
    forward_seconds,
    load_fold_model,
    train_fold,
)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _bundle(cfg: SegTrainConfig, path: Path, min_lesion_ml: float) -> SegBundle:
    """An in-memory bundle of the run's settings (for segmenting with models not yet exported)."""
    s = float(cfg.spacing)
    return SegBundle(path=path, id=cfg.bundle_id, kind="rano", architecture=architecture(cfg.architecture,
                     len(cfg.modalities)), modalities=tuple(cfg.modalities), spacing=(s, s, s), labels=SEG_LABELS,
                     label_names=dict(LABEL_NAMES), weights=[], meta={"min_lesion_ml": min_lesion_ml})


def segment_case(case: SegCase, bundle: SegBundle, models: list, device: Any) -> tuple[dict[str, float], float]:
    """Dice per region of one timepoint segmented at its native resolution as predict does
    (:func:`~RANOResponseLib.inference.segmentation.segment_study`), against its own mask; and
    the seconds segmentation took."""
    from RANOResponseLib.inference.segmentation import segment_study

    study = read_study(case.folder, bundle.modalities)
    brain = find_brain(study, BRAIN_REFERENCE, "auto", device).image
    seg = segment_study(study, brain, bundle, device=device, models=models)
    truth = read_image(case.mask)
    voxel_ml = float(np.prod(truth.GetSpacing())) / 1000.0
    pred = sitk.GetArrayFromImage(seg.image)
    return region_dice(pred, sitk.GetArrayFromImage(truth).astype(np.uint8), voxel_ml), float(seg.seconds)


def score_cases(cases: Sequence[SegCase], bundle: SegBundle, models: list, device: Any, desc: str,
                progress: bool = True, **extra: Any) -> pd.DataFrame:
    """One row per case: its id, patient, ``extra`` columns, Dice per region and volumes."""
    rows = []
    for c in tqdm(cases, desc=desc, unit="timepoint", disable=not progress):
        dice, seconds = segment_case(c, bundle, models, device)
        rows.append({**extra, "case": c.id, "patient": c.group, "timepoint": c.folder.name, **dice,
                     "seconds": round(seconds, 2)})
    return pd.DataFrame(rows)


def _evenly(items: list, n: int) -> list:
    """At most ``n`` items spread evenly over ``items`` (all when ``n`` is 0)."""
    if n <= 0 or len(items) <= n:
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


def _dice_table(summary: dict[str, dict[str, float]]) -> str:
    head = "| region | mean | median | SD | n |\n|---|---|---|---|---|\n"
    return head + "".join(f"| {r} | {fmt(s['mean'])} | {fmt(s['median'])} | {fmt(s['sd'])} | {s['n']} |\n"
                          for r, s in summary.items())


def _missed_line(metrics: dict[str, Any]) -> str:
    parts = [f"{m['n']} of {m['of']} {name} timepoints (largest {m['max_true_ml']:.2f} ml)"
             for name, m in (("test", metrics.get("test_missed")), ("unseen", metrics.get("unseen_missed")))
             if m and m["n"]]
    if not parts:
        return ""
    return ("Whole tumour missed entirely (Dice 0) on " + " and ".join(parts) + ": small residues, such as "
            "what remains after a complete response, can be lost at the model's grid spacing; they pull the "
            "core and whole-tumour means down.\n")


def _train_time(metrics: dict[str, Any]) -> str:
    seconds = [r.get("train_seconds") for r in metrics["folds"]]
    if any(s is None for s in seconds):
        return "time not recorded"
    return ", ".join(f"fold {r['fold']} {r['train_seconds'] / 60:.0f} min" for r in metrics["folds"])


def model_card(cfg: SegTrainConfig, prov: dict[str, Any], metrics: dict[str, Any]) -> str:
    """The bundle's MODEL_CARD.md."""
    arch = architecture(cfg.architecture, len(cfg.modalities))
    parts = [
        f"# {cfg.bundle_id}: tumour segmentation ({cfg.architecture})\n",
        "Segments one timepoint (the four sequences after brain extraction, on one grid) into the "
        "LUMIERE/DeepBraTumIA labels 1 enhancing, 2 necrotic / non-enhancing (including a resection "
        "cavity), 3 edema. Used by `rano-response predict` to measure RANO beside the network's class.\n",
        "## Architecture\n",
        f"MONAI `{cfg.architecture}` `{json.dumps(arch['args'])}`, inputs {', '.join(cfg.modalities)} z-scored "
        f"inside the brain on a {cfg.spacing:g} mm grid over the brain's box "
        "(`imaging.preprocessing.prepare_timepoint`), softmax over 4 classes, probabilities resampled "
        f"to the study's own grid. Ensemble members: {metrics['members']}. Enhancing components smaller "
        f"than {metrics['min_lesion_ml']:g} ml are removed (chosen on validation patients only).\n",
        "## Data\n",
        f"{prov['cases']} masked timepoints of {prov['patients']} patients from {', '.join(prov['data'])} "
        "(synthetic phantom cohorts; recipes in `provenance.data_source`), "
        f"{prov['cv_scheme']}.\n",
        "## Training\n",
        f"`{prov['command']}`\n\nDiceCE loss, AdamW (lr {cfg.lr:g}, cosine), {cfg.epochs} epochs of "
        f"{prov['steps_per_epoch']} steps, batch {cfg.batch_size} patches of {cfg.patch}^3 voxels "
        "(2 tumour-centred : 1 anywhere), augmentation: intensity scale/shift, bias field, Gaussian noise, "
        "smoothing along the slice axis, rotations up to 8.6 degrees, left-right flips. "
        f"{prov['device']}, {prov['torch_threads']} threads; training {_train_time(metrics)}; {prov['date']}.\n",
        f"## Test Dice per region (native resolution, test patients of fold(s) "
        f"{', '.join(str(r['fold']) for r in metrics['folds'])})\n",
        ("" if not cfg.test_limit else f"At most {cfg.test_limit} test timepoints per fold, spread evenly over "
         "its test patients' timepoints (`--test-limit`).\n"),
        _dice_table(metrics["test"]),
        f"Exported: fold model(s) {metrics['members']} (`--export {cfg.export}`"
        + ("; the fold with the best validation Dice: one forward per timepoint keeps predict within its CPU "
           "time budget" if cfg.export == "best" else "; the fold ensemble, probabilities averaged") + ").\n",
    ]
    if metrics.get("unseen"):
        parts += [f"## Dice on unseen cohorts ({', '.join(metrics['unseen_data'])}, not used for training "
                  "or selection)\n", _dice_table(metrics["unseen"])]
    if metrics.get("comparison"):
        parts += ["## Architecture comparison\n", metrics["comparison"].strip() + "\n"]
    parts += [
        "## Limitations\n",
        _missed_line(metrics),
        "Not for clinical use. Trained on synthetic phantoms only: not validated on patients' scans. "
        "Regions are defined as the phantom generator draws them; real enhancing rims, blood products, "
        "post-radiation change and scanner artefacts are not represented. A mean Dice hides per-case "
        "failures: see `metrics.csv` of the run. Dice is undefined where neither mask holds a region "
        "(such cases are left out of the means).\n",
    ]
    return "\n".join(parts)


def _provenance(cfg: SegTrainConfig, cases: list[SegCase], scheme: str, steps: int, device: torch.device,
                seconds: float) -> dict[str, Any]:
    command = cfg.command or "rano-response train-seg"
    return {
        "command": shlex.join(portable_path(t) if t.startswith("/") else t for t in shlex.split(command)),
        "config": {k: ([portable_path(p) for p in v] if k in ("data", "unseen") else
                       portable_path(v) if k in ("out", "cache", "comparison") and v is not None else v)
                   for k, v in asdict(cfg).items() if k != "command"},
        "data": [Path(d).resolve().name for d in cfg.data],
        "data_source": [data_source(d) for d in cfg.data],
        "cases": len(cases), "patients": len({c.group for c in cases}),
        "cv_scheme": scheme, "steps_per_epoch": steps,
        "device": str(device), "torch_threads": torch.get_num_threads(),
        "wall_seconds_this_session": round(seconds, 1), "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def train_segmentation(cfg: SegTrainConfig) -> dict[str, Any]:
    """Run ``cfg`` (see the module docstring); return the summary written to ``summary.json``.
    torch's CPU thread count is restored afterwards (``--threads`` must not outlive the run in a
    long-lived process such as Slicer or a test session)."""
    threads = torch.get_num_threads()
    try:
        return _train_segmentation(cfg)
    finally:
        torch.set_num_threads(threads)


def _train_segmentation(cfg: SegTrainConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    cases = find_seg_cases(cfg.data, cfg.modalities)
    unseen = find_seg_cases(cfg.unseen, cfg.modalities) if cfg.unseen else []
    groups = np.array([c.group for c in cases])
    plan = make_folds(np.zeros(len(cases), int), groups, folds=cfg.folds, seed=cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    folds_csv = pd.DataFrame({"case": [c.id for c in cases], "patient": groups, "fold": plan.test_fold,
                              "val_for_folds": [";".join(str(f) for f, v in enumerate(plan.val) if i in v)
                                                for i in range(len(cases))]})
    write_text(folds_csv.to_csv(index=False), out / "folds.csv")
    paths = cache_cases(cases, cfg.modalities, (cfg.spacing,) * 3, cfg.cache or out / "cache", cfg.progress, device)
    if cfg.only_fold is not None and not 0 <= cfg.only_fold < plan.n_folds:
        raise RANOInputError(f"--only-fold {cfg.only_fold}: the run has folds 0..{plan.n_folds - 1}")
    run_folds = range(plan.n_folds) if cfg.only_fold is None else [cfg.only_fold]
    records, tables, histories, models = [], [], {}, {}
    steps = 0
    for k in run_folds:
        tr, va, te = plan.indices(k)
        fold_dir = out / f"fold-{k}"
        steps = cfg.steps or max(1, len(tr) // cfg.batch_size)
        done = json.loads((fold_dir / "fold.json").read_text(encoding="utf-8")) if cfg.resume and (
            fold_dir / "fold.json").is_file() else None
        if done is not None and done["epochs_run"] >= cfg.epochs:  # finished earlier: reuse it
            rec = done
            model, table = load_fold_model(cfg, fold_dir, device), pd.read_csv(fold_dir / "test.csv")
            _say(f"fold {k}: finished earlier, reused")
        else:
            _say(f"fold {k}: {len(tr)} training, {len(va)} validation, {len(te)} test timepoints")
            val_all = [load_case(paths[i]) for i in va]
            rec = train_fold(cfg, k, [load_case(paths[i]) for i in tr], _evenly(val_all, cfg.val_cases), val_all,
                             fold_dir, device)
            model = rec.pop("model")
            test_cases = _evenly([cases[i] for i in te], cfg.test_limit)
            table = score_cases(test_cases, _bundle(cfg, fold_dir, rec["min_lesion_ml"]), [model], device,
                                f"fold {k} test", cfg.progress, fold=k)
            write_text(table.to_csv(index=False), fold_dir / "test.csv")
            rec["test"] = dice_summary(table)
            rec["n_test"] = len(test_cases)
            write_text(json.dumps(rec, indent=2, default=json_default) + "\n", fold_dir / "fold.json")
        records.append(rec)
        tables.append(table)
        histories[k] = pd.read_csv(fold_dir / "history.csv")
        models[k] = model
        _say(f"fold {k}: test Dice " + ", ".join(f"{r} {rec['test'][r]['mean']:.3f}" for r in REGIONS))
    metrics_table = pd.concat(tables, ignore_index=True)
    write_text(metrics_table.to_csv(index=False), out / "metrics.csv")
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    plot_seg_curves(histories, plots / "curves.png")
    plot_dice_per_fold(metrics_table, plots / "dice_per_fold.png")

    members = [r["fold"] for r in records]
    if cfg.export == "best":
        members = [max(records, key=lambda r: r["best_val_score"])["fold"]]
    min_ml = float(np.median([r["min_lesion_ml"] for r in records if r["fold"] in members]))
    metrics: dict[str, Any] = {"test": dice_summary(metrics_table), "test_missed": missed_cases(metrics_table),
                               "folds": records, "members": members,
                               "min_lesion_ml": min_ml, "export": cfg.export}
    if unseen:
        ensemble = [models[k] for k in members]
        u = score_cases(unseen, _bundle(cfg, out, min_ml), ensemble, device, "unseen", cfg.progress)
        write_text(u.to_csv(index=False), out / "unseen.csv")
        metrics["unseen"] = dice_summary(u)
        metrics["unseen_missed"] = missed_cases(u)
        metrics["unseen_data"] = [Path(d).resolve().name for d in cfg.unseen]
        metrics["unseen_seconds_mean"] = float(u["seconds"].mean())
    if cfg.comparison:
        metrics["comparison"] = Path(cfg.comparison).read_text(encoding="utf-8")
    prov = _provenance(cfg, cases, plan.scheme, steps, device, time.perf_counter() - t0)
    write_seg_bundle(out / "bundle", [{k2: v.cpu() for k2, v in models[k].state_dict().items()} for k in members],
                     architecture(cfg.architecture, len(cfg.modalities)), cfg.modalities, (cfg.spacing,) * 3,
                     LABEL_NAMES, prov, {k: v for k, v in metrics.items() if k != "comparison"},
                     model_card(cfg, prov, metrics), meta={"id": cfg.bundle_id, "min_lesion_ml": min_ml})
    summary = {"provenance": prov, "metrics": metrics, "bundle": str(out / "bundle")}
    write_text(json.dumps(summary, indent=2, default=json_default) + "\n", out / "summary.json")
    _say("test Dice (native): " + ", ".join(f"{r} {metrics['test'][r]['mean']:.3f}" for r in REGIONS))
    if unseen:
        _say("unseen Dice (native): " + ", ".join(f"{r} {metrics['unseen'][r]['mean']:.3f}" for r in REGIONS))
    _say(f"written: {out.absolute()}/bundle (members {members}, min_lesion_ml {min_ml:g})")
    return summary


def compare_architectures(cfg: SegTrainConfig, names: Sequence[str]) -> pd.DataFrame:
    """Train each architecture of ``names`` with the same data, folds, epochs and seed (runs in
    ``OUT/compare/<name>``, one shared cache); write ``OUT/comparison.csv`` and
    ``OUT/comparison.md`` with test Dice per region and the CPU forward seconds of a 96x112x96
    grid at ``cfg.threads`` threads. The markdown goes into a model card with ``--comparison``."""
    rows = []
    for name in names:
        sub = replace(cfg, architecture=name, out=Path(cfg.out) / "compare" / name, unseen=[], comparison=None,
                      cache=cfg.cache or Path(cfg.out) / "cache", bundle_id=f"{cfg.bundle_id}-{name}")
        t = time.perf_counter()
        summary = train_segmentation(sub)
        seconds = time.perf_counter() - t
        test = summary["metrics"]["test"]
        rows.append({"architecture": name, **{f"dice_{r}": test[r]["mean"] for r in REGIONS},
                     "test_timepoints": test["whole"]["n"], "parameters": sum(
                         p.numel() for p in build_seg_network(architecture(name, len(cfg.modalities))).parameters()),
                     "run_seconds": round(seconds, 1)})
    speed = forward_seconds(names, len(cfg.modalities))
    for row in rows:
        row["cpu_forward_s"] = speed[row["architecture"]]
    table = pd.DataFrame(rows)
    out = Path(cfg.out)
    write_text(table.to_csv(index=False), out / "comparison.csv")
    lines = [f"Same data ({', '.join(Path(d).resolve().name for d in cfg.data)}), folds, {cfg.epochs} epochs x "
             f"{cfg.steps or 'one pass'} steps of {cfg.batch_size} patches of {cfg.patch}^3, seed {cfg.seed}; "
             f"test Dice at native resolution; CPU forward of a 96x112x96 grid with {torch.get_num_threads()} "
             "threads (median of 5, the architectures taking turns on a shared machine).\n",
             "| architecture | parameters | enhancing | necrotic | edema | core | whole | CPU forward s |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['architecture']} | {r['parameters']:,} | " + " | ".join(fmt(r[f'dice_{k}']) for k in REGIONS)
              + f" | {r['cpu_forward_s']:.2f} |" for r in rows]
    score = table[["dice_enhancing", "dice_core", "dice_whole"]].mean(axis=1)
    lines += ["", f"Best test Dice (mean of enhancing, core and whole tumour): "
              f"{table['architecture'][score.idxmax()]}; fastest forward: "
              f"{table['architecture'][table['cpu_forward_s'].idxmin()]}."]
    write_text("\n".join(lines) + "\n", out / "comparison.md")
    _say("\n".join(lines))
    return table


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``rano-response train-seg``."""
    d = SegTrainConfig(data=[], out=Path("."))
    p = argparse.ArgumentParser(prog="rano-response train-seg", description="Cross-validate a tumour segmentation "
                                "network on the masked timepoints of LUMIERE-layout cohorts (patient-grouped folds) "
                                "and export a segmentation bundle.")
    p.add_argument("--data", required=True, type=Path, action="append", help="cohort root (repeat for several)")
    p.add_argument("--out", required=True, type=Path, help="run folder")
    p.add_argument("--architecture", default=d.architecture, choices=list(ARCH_PRESETS))
    p.add_argument("--modalities", default=",".join(d.modalities), help="comma list of CT1,T1,T2,FLAIR")
    p.add_argument("--spacing", type=float, default=d.spacing, help="model grid mm (isotropic)")
    p.add_argument("--folds", type=int, default=d.folds, help="patient-grouped test folds")
    p.add_argument("--only-fold", type=int, default=None, help="train and export this fold only")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--steps", type=int, default=d.steps, help="steps per epoch (0: training timepoints / batch)")
    p.add_argument("--patch", type=int, default=d.patch, help="patch edge in voxels")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--val-cases", type=int, default=d.val_cases, help="validation timepoints scored per epoch")
    p.add_argument("--test-limit", type=int, default=d.test_limit,
                   help="test timepoints per fold scored at native resolution, spread evenly (0: all)")
    p.add_argument("--export", default=d.export, choices=EXPORTS,
                   help="best: the fold model with the best validation Dice; all: the fold ensemble")
    p.add_argument("--unseen", type=Path, action="append", default=[], help="cohort scored after export (repeat)")
    p.add_argument("--compare", default="", help="comma list of architectures (or 'all'): train each the same "
                   "way and write OUT/comparison.md instead of one run")
    p.add_argument("--comparison", type=Path, default=None, help="a comparison.md to put into the model card")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="cpu | cuda | cuda:N | auto")
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (0: torch's choice)")
    p.add_argument("--cache", type=Path, default=None, help="prepared timepoints (default OUT/cache)")
    p.add_argument("--resume", action="store_true", help="continue each fold from its checkpoint")
    p.add_argument("--bundle-id", default=d.bundle_id)
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``rano-response train-seg ARGS``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    mods = tuple(m.strip() for m in args.modalities.split(",") if m.strip())
    try:
        bad = [m for m in mods if m not in MODALITIES]
        if bad or not mods:
            raise RANOInputError(f"--modalities {args.modalities}: use names from {', '.join(MODALITIES)}")
        cfg = SegTrainConfig(
            data=list(args.data), out=args.out, architecture=args.architecture, modalities=mods,
            spacing=args.spacing, folds=args.folds, only_fold=args.only_fold, epochs=args.epochs, steps=args.steps,
            patch=args.patch, batch_size=args.batch_size, lr=args.lr, val_cases=args.val_cases,
            test_limit=args.test_limit, export=args.export, unseen=list(args.unseen), seed=args.seed,
            device=args.device, threads=args.threads, cache=args.cache, resume=args.resume,
            bundle_id=args.bundle_id, progress=not args.no_progress, comparison=args.comparison,
            command="rano-response train-seg " + shlex.join(argv))
        if args.comparison is not None and not args.comparison.is_file():
            raise RANOInputError(f"{args.comparison}: comparison file not found")
        if args.compare:
            names = list(ARCH_PRESETS) if args.compare == "all" else [n.strip() for n in args.compare.split(",")]
            for n in names:
                architecture(n, len(mods))  # unknown names fail before any training
            compare_architectures(cfg, names)
        else:
            train_segmentation(cfg)
    except RANOInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
