"""What a run records about itself: its provenance, the cross-validation table and the model card.

The provenance goes into ``summary.json`` and, with the metrics, into the bundle's
``bundle.json``; the model card is the bundle's ``MODEL_CARD.md``. A bundle travels to other
machines, so nothing here names a path of the machine that trained it: paths are recorded as
typed when relative and by their name when absolute (:func:`portable_path`), the data set by its
folder's name, plus the recipe that regenerates it when it is a phantom cohort (``phantom.json``).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from RANOResponseLib.core.names import CLASS_NAMES
from RANOResponseLib.phantom.generator import RECIPE_JSON

from ResponseTrainingLib.analysis.metrics import SCALAR_METRICS
from ResponseTrainingLib.training.config import PATH_FIELDS, TrainConfig
from ResponseTrainingLib.training.folds import FoldPlan
from ResponseTrainingLib.training.loop import DistContext


def portable_path(path: Path | str) -> str:
    """How a bundle names a path: as typed when relative, by its last component when absolute
    (an absolute path of the training machine means nothing elsewhere and may name its user)."""
    p = Path(path)
    return p.name if p.is_absolute() else p.as_posix()


def _portable_token(token: str) -> str:
    flag, eq, value = token.partition("=")
    if eq and flag.startswith("--"):
        return f"{flag}={_portable_token(value)}"
    return portable_path(token) if os.path.isabs(token) else token


def portable_command(cfg: TrainConfig) -> str:
    """The command of the run with its absolute paths shortened (:func:`portable_path`): as typed
    when it came from the command line, else the ``rano-response train`` command of ``cfg``."""
    if cfg.command:
        return shlex.join(_portable_token(t) for t in shlex.split(cfg.command))
    return "rano-response train " + shlex.join(cfg.argv(path=portable_path))


def data_name(root: Path | str) -> str:
    """The data set's symbolic name: its folder's name."""
    return Path(root).resolve().name


def data_source(root: Path | str) -> dict[str, Any] | None:
    """The phantom recipe (``phantom.json``: generator settings and the command that regenerates
    the cohort) when the cohort is synthetic, else None."""
    recipe = Path(root) / RECIPE_JSON
    return json.loads(recipe.read_text(encoding="utf-8")) if recipe.is_file() else None


def provenance(cfg: TrainConfig, plan: FoldPlan, records: dict[int, dict[str, Any]], pairs: list,
               labels: np.ndarray, device: torch.device, dctx: DistContext, seconds: float) -> dict[str, Any]:
    """Command, settings, data, folds, machine and software of a finished run."""
    groups = np.array([p.patient for p in pairs])
    dev = str(device) if device.type == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})"
    return {
        "command": portable_command(cfg),
        "config": {k: (portable_path(v) if k in PATH_FIELDS and v is not None else v)
                   for k, v in asdict(cfg).items() if k != "command"},
        "data": data_name(cfg.data),
        "data_source": data_source(cfg.data),
        "cv_scheme": plan.scheme,
        "pairs": int(len(pairs)),
        "patients": int(len(set(groups.tolist()))),
        "class_counts": {c: int((labels == i).sum()) for i, c in enumerate(CLASS_NAMES)},
        "folds": [{k2: records[k][k2] for k2 in ("fold", "best_epoch", "epochs_run", "n_pairs")}
                  for k in range(plan.n_folds)],
        "device": dev,
        "processes": dctx.world,
        "torch_threads": torch.get_num_threads(),
        "grad_shards": dctx.world if dctx.world > 1 else cfg.grad_shards,
        "wall_seconds_this_session": round(seconds, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def json_default(v: Any) -> Any:
    """``json.dumps`` fallback for numpy scalars (and data frames, which are left out)."""
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, pd.DataFrame):
        return None
    return str(v)


def fmt(v: Any) -> str:
    """A metric with three decimals, or ``n/a``."""
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"


def cv_table(cv: dict[str, Any]) -> str:
    """Markdown table: per model, median and mean ± sd over folds, and the pooled value."""
    head = "| model | metric | median | mean ± sd | pooled |\n|---|---|---|---|---|\n"
    lines = []
    for name, v in cv.items():
        for s in SCALAR_METRICS:
            lines.append(f"| {name} | {s.replace('_', ' ')} | {fmt(v['median'][s])} | "
                         f"{fmt(v['mean'][s])} ± {fmt(v['sd'][s])} | {fmt(v['pooled'][s])} |")
    return head + "\n".join(lines)


def calibration_section(cal: dict[str, Any] | None) -> str:
    """The card's calibration section: per-fold temperatures and test ECE, the pooled ECE and the
    rule that flags a prediction "uncertain"."""
    if not cal:
        return ""
    rows = "\n".join(f"| {f['fold']} | {f['temperature']:.3f} | {f['validation_pairs']} | "
                     f"{fmt(f['ece_test_uncalibrated'])} | {fmt(f['ece_test_calibrated'])} |" for f in cal["per_fold"])
    unc = cal["uncertain"]
    spread = ("not used (too few validation pairs validated by two or more folds)" if unc["spread_above"] is None
              else f"above {unc['spread_above']:.3f}")
    pooled = cal["ece_test_pooled"]
    return f"""
## Calibration (temperature scaling per fold model, fitted on its validation patients)

| fold | temperature | validation pairs | test ECE before | test ECE after |
|---|---|---|---|---|
{rows}

Pooled test folds: ECE {fmt(pooled['uncalibrated'])} before, {fmt(pooled['calibrated'])} after (15 bins).
predict reports the calibrated ensemble and flags a prediction "uncertain" when its top probability
is below {unc['top_probability_below']:.3f} or the members' spread of the top class is {spread}
(thresholds chosen on {unc['validation_pairs']} validation predictions for a target accuracy of
{unc['target_accuracy']:.2f}).
"""


def _members_line(members: dict[str, Any] | None) -> str:
    if not members:
        return ""
    val = ", ".join(f"{k}: {v:.3f}" for k, v in members["val_balanced_accuracy"].items())
    left = f"; left out: folds {members['left_out']}" if members["left_out"] else "; none left out"
    return (f" (kept: folds {members['kept']}{left}; rule, on validation patients only: {members['rule']}; "
            f"validation balanced accuracy per fold {val})")


def _segmentation_line(cfg: TrainConfig) -> str:
    if not cfg.spec().reads_segmentation:
        return ""
    seg = "the shipped segmentation bundle" if cfg.seg_bundle is None else f"`{portable_path(cfg.seg_bundle)}`"
    return (f"\n- Segmentation channels: each timepoint is segmented by {seg} (as predict does, before the"
            "\n  network runs); each label is a channel holding the fraction of a model-grid voxel it covers.")


def model_card(cfg: TrainConfig, prov: dict[str, Any], cv: dict[str, Any],
               calibration: dict[str, Any] | None = None, members: dict[str, Any] | None = None) -> str:
    """``MODEL_CARD.md`` of the fold-ensemble bundle: what it is, how it was trained, how good it
    is, and (when given) how its probabilities were calibrated."""
    cm = cv["cnn"]["pooled"]["confusion_matrix"]
    cm_rows = "\n".join("| " + " | ".join([CLASS_NAMES[i]] + [str(v) for v in row]) + " |" for i, row in enumerate(cm))
    arch = (f"`timm25d` 2.5D ({cfg.slices} axial slices, {cfg.slice_step} voxels apart, timm `{cfg.backbone}`)"
            if cfg.arch == "timm25d" else f"`{cfg.arch}` 3D DenseNet (MONAI layout)")
    spec = cfg.spec()
    folds = ", ".join(f"{f['fold']}: epoch {f['best_epoch']}/{f['epochs_run']}" for f in prov["folds"])
    return f"""# Model card: {cfg.bundle_id}

**Research software. Not for clinical use.**{' Trained on synthetic phantoms, not on patients.' if prov.get('data_source') else ''}

- Architecture: {arch}, {len(spec.channels)} input channels
  ({', '.join(str(c) for c in spec.channels)}), classes {', '.join(CLASS_NAMES)}.
- Ensemble of the fold models of a {prov['cv_scheme']}{_members_line(members)}; predict averages
  their probabilities and reports their spread.{_segmentation_line(cfg)}
- Input: each study's brain mask (skull-stripped studies: their non-zero region; others: HD-BET), its
  sequences aligned to its reference image, follow-up registered rigidly to baseline, cut to the brain,
  resampled to {tuple(cfg.size)} voxels of {tuple(cfg.spacing)} mm around the brain, z-scored per channel
  inside the brain; what these inputs looked like is in bundle.json's `input_statistics` (predict warns
  about inputs outside them).
- Pairing: `{cfg.pairing}`; {prov['pairs']} pairs from {prov['patients']} patients
  (classes {prov['class_counts']}); data `{prov['data']}`{_source_line(prov)}.
- Splits grouped by patient and stratified by class; in each fold the checkpoint was chosen on
  validation patients carved from the training patients (best epoch per fold: {folds}).
- Loss weights `{cfg.loss_weighting}`, sampler weights `{cfg.sampler_weighting}`, AdamW lr {cfg.lr},
  weight decay {cfg.weight_decay}, batch {cfg.batch_size}, up to {cfg.epochs} epochs, patience {cfg.patience}.
- Trained on: {prov['device']} ({prov['processes']} process(es)), torch {prov['torch']}, {prov['date']},
  {prov['wall_seconds_this_session'] / 60:.1f} min wall.
- Command: `{prov['command']}`

## Cross-validation (test folds: patients never seen in training or checkpoint selection)

{cv_table(cv)}

"pooled" scores all out-of-fold test predictions together (each pair predicted by the fold model
that never saw its patient); the ensemble bundle itself has no held-out estimate beyond these.

Confusion matrix of the CNN, pooled test folds (rows true, columns predicted):

| true | {' | '.join(CLASS_NAMES)} |
|---|{'---|' * len(CLASS_NAMES)}
{cm_rows}
{calibration_section(calibration)}{_suggestion_note(cv)}
## Limits
Phantom lesions are simple; performance on real MRI is unknown. Labels come from the rating CSV
(for phantoms: the measured change in the enhancing lesions' sum of bidimensional products
against the previous scan).
"""


def _suggestion_note(cv: dict[str, Any]) -> str:
    if "hybrid-suggested" not in cv:
        return ""
    if "measured-automatic" in cv:
        return """
`hybrid-suggested` is the suggested category predict reports next to the network's: a multinomial
logistic regression on the calibrated probabilities and the measured RANO category, fitted inside
the folds. The measured category came from the automatic segmentation of each training pair
(`measured-automatic` above), as predict will give it.
"""
    return """
`hybrid-suggested` is the suggested category predict reports next to the network's: a multinomial
logistic regression on the calibrated probabilities and the measured RANO category. In training
the measured category came from the cohort's own masks (`measured-cohort-masks` above); at predict
time it comes from the automatic segmentation, so these figures are optimistic for it.
"""


def _source_line(prov: dict[str, Any]) -> str:
    src = prov.get("data_source")
    return f", generated with `{src['command']}`" if src else ""
