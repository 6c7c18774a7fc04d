"""Training a response classifier and exporting it as a bundle the clinical module loads.

This is the minimal trainer: one patient-grouped, stratified hold-out split (test patients,
validation patients carved from the rest, training patients), with the checkpoint chosen on the
validation patients only. It checkpoints every epoch atomically and resumes after a kill.
"""

from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from RANOResponseLib import CLASS_NAMES
from RANOResponseLib.attributions import autocast
from RANOResponseLib.bundle import write_bundle
from RANOResponseLib.io import atomic_file, write_text
from RANOResponseLib.model import GRADCAM_LAYERS, architecture_args, build_network, resolve_device
from RANOResponseLib.preprocessing import InputSpec, default_channels

from .data import cache_pairs, load_cached
from .lumiere import build_pairs
from .metrics import classification_metrics

WEIGHTINGS = ("equal", "one-minus", "inverse")


@dataclass
class TrainConfig:
    data: Path
    out: Path
    arch: str = "compact"
    modalities: tuple[str, ...] = ("CT1", "T1", "T2", "FLAIR")
    pairing: str = "previous"
    epochs: int = 30
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.01
    patience: int = 10
    plateau_patience: int = 4
    loss_weighting: str = "inverse"
    sampler_weighting: str = "equal"
    test_fraction: float = 0.2
    val_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)
    size: tuple[int, int, int] = (80, 96, 80)
    dropout: float = 0.1
    augment: bool = True
    bundle_id: str = "rano-response-model"
    resume: bool = False
    command: str = field(default_factory=lambda: " ".join(shlex.quote(a) for a in sys.argv))

    def spec(self) -> InputSpec:
        return InputSpec(tuple(self.modalities), tuple(default_channels(self.modalities)),
                         tuple(self.spacing), tuple(self.size))


def class_weights(labels: np.ndarray, mode: str, n_classes: int = len(CLASS_NAMES)) -> np.ndarray:
    """Per-class weights from training prevalence: equal, 1 - prevalence, or 1 / prevalence."""
    if mode not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}")
    counts = np.bincount(labels, minlength=n_classes).astype(float)
    prev = counts / max(counts.sum(), 1)
    if mode == "equal":
        w = np.ones(n_classes)
    elif mode == "one-minus":
        w = 1 - prev
    else:
        w = np.where(prev > 0, 1 / np.maximum(prev, 1e-12), 0.0)
    w[counts == 0] = 0.0
    return w / w[w > 0].mean()


def holdout_split(labels: np.ndarray, groups: np.ndarray, test_fraction: float, val_fraction: float,
                  seed: int) -> np.ndarray:
    """Patient-grouped stratified split: 'train' / 'val' / 'test' per pair; no patient in two."""
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    # small cohorts have rare classes with fewer members than folds: expected, not news
    warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)

    split = np.array(["train"] * len(labels), dtype=object)
    k_test = max(2, round(1 / test_fraction))
    _, test_idx = next(StratifiedGroupKFold(k_test, shuffle=True, random_state=seed).split(labels, labels, groups))
    split[test_idx] = "test"
    rest = np.flatnonzero(split == "train")
    k_val = max(2, round((1 - test_fraction) / val_fraction))
    _, val_rel = next(StratifiedGroupKFold(k_val, shuffle=True, random_state=seed + 1)
                      .split(rest, labels[rest], groups[rest]))
    split[rest[val_rel]] = "val"
    return split


def _augmenter(seed: int):
    """MONAI transforms on (C, z, y, x) arrays: one spatial draw for all channels."""
    from monai.transforms import Compose, RandAffine, RandFlip, RandGaussianNoise, RandScaleIntensity

    t = Compose([
        RandFlip(prob=0.5, spatial_axis=2),  # left-right
        RandAffine(prob=0.7, rotate_range=(0.12, 0.12, 0.12), translate_range=(4, 4, 4),
                   scale_range=(0.05, 0.05, 0.05), padding_mode="zeros"),
        RandScaleIntensity(factors=0.1, prob=0.3),
        RandGaussianNoise(prob=0.3, std=0.05),
    ])
    t.set_random_state(seed)
    return t


def _atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


@torch.no_grad()
def predict_arrays(model: torch.nn.Module, x: np.ndarray, device: torch.device, batch: int = 4) -> np.ndarray:
    """Softmax probabilities for cached arrays (N, C, z, y, x)."""
    model.eval()
    out = []
    for i in range(0, len(x), batch):
        xb = torch.from_numpy(x[i:i + batch].astype(np.float32)).to(device)
        with autocast(device):
            out.append(F.softmax(model(xb).float(), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(CLASS_NAMES)))


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run the whole job; returns the summary also written to ``out/summary.json``."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)

    spec = cfg.spec()
    pairs, table = build_pairs(cfg.data, cfg.modalities, cfg.pairing)
    write_text(table.to_csv(index=False), out / "pairs.csv")
    used = table["status"].eq("used").sum()
    print(f"pairs: {used} used, {len(table) - used} skipped (see {out / 'pairs.csv'})", file=sys.stderr)
    for reason, n in table.loc[table["status"] == "skipped", "reason"].value_counts().items():
        print(f"  skipped {n:3d}: {reason}", file=sys.stderr)
    if len(pairs) < 10:
        from RANOResponseLib.errors import RANOInputError

        raise RANOInputError(f"{cfg.data}: only {len(pairs)} usable pairs; need at least 10 to train")

    labels = np.array([CLASS_NAMES.index(p.label) for p in pairs])
    groups = np.array([p.patient for p in pairs])
    split = holdout_split(labels, groups, cfg.test_fraction, cfg.val_fraction, cfg.seed)
    folds = pd.DataFrame({"pair": [p.id for p in pairs], "patient": groups, "label": [p.label for p in pairs],
                          "split": split})
    write_text(folds.to_csv(index=False), out / "folds.csv")

    x = load_cached(cache_pairs(pairs, spec, out / "cache"))
    idx = {s: np.flatnonzero(split == s) for s in ("train", "val", "test")}
    print("split (pairs): " + ", ".join(f"{s} {len(i)}" for s, i in idx.items()), file=sys.stderr)

    args = architecture_args(cfg.arch, len(spec.channels), len(CLASS_NAMES), dropout_prob=cfg.dropout)
    model = build_network(cfg.arch, **args).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.1,
                                                       patience=cfg.plateau_patience)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    loss_w = torch.tensor(class_weights(labels[idx["train"]], cfg.loss_weighting), dtype=torch.float32,
                          device=device)
    samp_w = class_weights(labels[idx["train"]], cfg.sampler_weighting)[labels[idx["train"]]]

    ckpt_path = out / "checkpoint.pt"
    state = {"epoch": 0, "best_score": -np.inf, "best_epoch": -1, "bad_epochs": 0, "history": []}
    best_state = None
    if cfg.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        state = json.loads(ckpt["state"])
        best_state = ckpt["best_model"]
        print(f"resumed after epoch {state['epoch']} from {ckpt_path}", file=sys.stderr)

    gen = torch.Generator().manual_seed(cfg.seed)
    t_train = time.perf_counter()
    for epoch in range(state["epoch"], cfg.epochs):
        if state["bad_epochs"] >= cfg.patience:
            break
        # per-epoch streams (order, augmentation, dropout): a resumed run draws what the
        # uninterrupted run would have drawn
        gen.manual_seed(cfg.seed * 1000 + epoch)
        torch.manual_seed(cfg.seed * 1000 + epoch)
        aug = _augmenter(cfg.seed * 1000 + epoch) if cfg.augment else None
        order = idx["train"][torch.multinomial(torch.tensor(samp_w), len(samp_w), replacement=cfg.sampler_weighting != "equal",
                                               generator=gen).numpy()]
        model.train()
        losses = []
        bar = tqdm(range(0, len(order), cfg.batch_size), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                   leave=False, file=sys.stderr)
        for b in bar:
            sel = order[b:b + cfg.batch_size]
            xb = np.stack([np.asarray(aug(x[i].astype(np.float32))) if aug else x[i].astype(np.float32) for i in sel])
            xb = torch.from_numpy(xb).to(device)
            yb = torch.from_numpy(labels[sel]).to(device)
            opt.zero_grad(set_to_none=True)
            with autocast(device):
                loss = F.cross_entropy(model(xb).float(), yb, weight=loss_w)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{np.mean(losses):.3f}")
        bar.close()
        pv = predict_arrays(model, x[idx["val"]], device)
        val_loss = float(F.cross_entropy(torch.from_numpy(np.log(pv + 1e-8)), torch.from_numpy(labels[idx["val"]]),
                                         weight=loss_w.cpu()))
        val = classification_metrics(labels[idx["val"]], pv)
        sched.step(val_loss)
        score = val["balanced_accuracy"] - 1e-3 * val_loss  # ties go to the lower loss
        improved = score > state["best_score"]
        if improved:
            state.update(best_score=score, best_epoch=epoch + 1, bad_epochs=0)
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        state["history"].append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_loss": val_loss,
                                 "val_balanced_accuracy": val["balanced_accuracy"], "val_f1_macro": val["f1_macro"],
                                 "lr": opt.param_groups[0]["lr"]})
        print(f"epoch {epoch + 1:3d}  train loss {np.mean(losses):.3f}  val loss {val_loss:.3f}  "
              f"val bal.acc {val['balanced_accuracy']:.3f}{'  *best' if improved else ''}", file=sys.stderr)
        _atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "state": json.dumps(state),
                            "best_model": best_state}, ckpt_path)
        write_text(pd.DataFrame(state["history"]).to_csv(index=False), out / "history.csv")

    model.load_state_dict(best_state)
    pt = predict_arrays(model, x[idx["test"]], device)
    test = classification_metrics(labels[idx["test"]], pt)
    preds = pd.DataFrame({"pair": folds["pair"].values[idx["test"]], "label": labels[idx["test"]],
                          "predicted": pt.argmax(1), **{f"p_{c}": pt[:, i] for i, c in enumerate(CLASS_NAMES)}})
    write_text(preds.to_csv(index=False), out / "test_predictions.csv")

    provenance = {
        "command": cfg.command,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "command"},
        "data": str(Path(cfg.data).absolute()),
        "data_source": _data_source(Path(cfg.data)),
        "pairs": {s: int(len(i)) for s, i in idx.items()},
        "patients": {s: int(len(set(groups[i]))) for s, i in idx.items()},
        "best_epoch": state["best_epoch"],
        "epochs_run": state["epoch"],
        "device": str(device) if device.type == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})",
        "train_seconds_this_session": round(time.perf_counter() - t_train, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    summary = {"holdout_test": test, "validation_best": state["best_score"], "provenance": provenance}
    write_text(json.dumps(summary, indent=2, default=float) + "\n", out / "summary.json")
    write_bundle(out / "bundle", bundle_id=cfg.bundle_id, architecture={"name": cfg.arch, "args": args},
                 spec=spec, state_dicts=[best_state], gradcam_layer=GRADCAM_LAYERS[cfg.arch],
                 extra={"training": provenance, "metrics": {"holdout_test": test}},
                 model_card=model_card(cfg, provenance, test))
    print(f"hold-out test: balanced accuracy {test['balanced_accuracy']:.3f}, macro F1 {test['f1_macro']:.3f} "
          f"({len(idx['test'])} pairs)\nbundle: {out / 'bundle'}", file=sys.stderr)
    return summary


def _data_source(root: Path) -> dict[str, Any] | None:
    """The phantom recipe (``phantom.json``) when the cohort is synthetic, else None."""
    recipe = root / "phantom.json"
    return json.loads(recipe.read_text(encoding="utf-8")) if recipe.is_file() else None


def model_card(cfg: TrainConfig, prov: dict[str, Any], test: dict[str, Any]) -> str:
    cm = "\n".join("| " + " | ".join([CLASS_NAMES[i]] + [str(v) for v in row]) + " |"
                   for i, row in enumerate(test["confusion_matrix"]))
    return f"""# Model card: {cfg.bundle_id}

**Research software. Not for clinical use.** Trained on synthetic phantoms, not on patients.

- Architecture: `{cfg.arch}` 3D DenseNet (MONAI layout), {len(cfg.modalities) * 2} input channels
  ({', '.join(cfg.modalities)}; follow-up and baseline each), classes {', '.join(CLASS_NAMES)}.
- Input: follow-up registered rigidly to baseline, resampled to {cfg.size} voxels of {cfg.spacing} mm
  around the brain, z-scored per channel inside the brain.
- Training data: `{prov['data']}`{_source_line(prov)}; pairs train/val/test = {prov['pairs']['train']}/{prov['pairs']['val']}/{prov['pairs']['test']}
  from {prov['patients']['train']}/{prov['patients']['val']}/{prov['patients']['test']} patients (grouped by patient,
  stratified by class). Checkpoint chosen on the validation patients (epoch {prov['best_epoch']} of {prov['epochs_run']}).
- Trained on: {prov['device']}, torch {prov['torch']}, {prov['date']}.
- Command: `{prov['command']}`

## Hold-out test metrics ({prov['pairs']['test']} pairs, patients never seen in training or selection)

| metric | value |
|---|---|
| balanced accuracy | {test['balanced_accuracy']:.3f} |
| macro F1 | {test['f1_macro']:.3f} |
| weighted precision | {test['precision_weighted']:.3f} |
| weighted recall | {test['recall_weighted']:.3f} |
| one-vs-rest AUC (macro) | {_fmt(test.get('auc_ovr'))} |

Confusion matrix (rows true, columns predicted: {', '.join(CLASS_NAMES)}):

| true | {' | '.join(CLASS_NAMES)} |
|---|{'---|' * len(CLASS_NAMES)}
{cm}

## Limits
Phantom lesions are simple; performance on real MRI is unknown. Labels are computed from the
measured change in the enhancing lesions' sum of bidimensional products against the previous scan.
"""


def _source_line(prov: dict[str, Any]) -> str:
    src = prov.get("data_source")
    return f", generated with `{src['command']}`" if src else ""


def _fmt(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"
