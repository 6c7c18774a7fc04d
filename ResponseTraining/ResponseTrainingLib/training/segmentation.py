"""``rano-response train-seg``: cross-validated tumour segmentation training and its bundle.

Cases are the masked timepoints of one or more LUMIERE-layout cohorts
(:mod:`ResponseTrainingLib.data.segmentation_data`, prepared once and cached). Patients are
split into test folds (:func:`~ResponseTrainingLib.training.folds.make_folds`, grouped by
cohort/patient), and a validation split is carved from each fold's training patients: it picks
the best epoch and the small-lesion threshold ``min_lesion_ml``, so the test patients are touched
once, at the end, at native resolution through the same path predict uses
(:func:`RANOResponseLib.inference.segmentation.segment_study`).

Training samples patches that over-sample tumour (``RandCropByPosNegLabeld``, 2 tumour-centred
for 1 anywhere), with augmentation for clinical input (intensity scale/shift, bias field, noise,
smoothing along one axis as thick slices do, small rotations, left-right flips), MONAI's DiceCE
loss and AdamW with a cosine schedule. Every epoch writes an atomic checkpoint; ``--resume``
continues from it, and random draws depend only on (seed, fold, epoch), so a resumed run sees
what an uninterrupted run sees (a resumed run given more ``--epochs`` continues too, on a cosine
schedule stretched to the new length). The fold models (``--export best``: the one with the best
validation Dice; ``all``: the ensemble) become a segmentation bundle
(:func:`RANOResponseLib.model.segmentation.write_seg_bundle`) with its model card.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.files import atomic_file, write_text
from RANOResponseLib.core.names import LABEL_NAMES, MODALITIES
from RANOResponseLib.model.segmentation import DEFAULT_SEG_BUNDLE_ID, build_seg_network
from tqdm import tqdm

from ResponseTrainingLib.analysis.segmentation_metrics import choose_min_lesion_ml, dice_summary, region_dice

# Small configurations: one forward of a ~96x112x96 grid at 2 mm must take a few seconds on two
# CPU cores (predict segments two timepoints within 10 s). Grids are multiples of 16 voxels.
ARCH_PRESETS: dict[str, dict[str, Any]] = {
    "UNet": {"channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 1, "norm": "instance"},
    "DynUNet": {"kernel_size": [3, 3, 3, 3, 3], "strides": [1, 2, 2, 2, 2], "upsample_kernel_size": [2, 2, 2, 2],
                "filters": [8, 16, 32, 64, 128], "norm_name": "instance", "res_block": True},
    "SegResNet": {"init_filters": 8, "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1]},
}
SEG_LABELS = (0, *sorted(LABEL_NAMES))
EXPORTS = ("best", "all")


def architecture(name: str, in_channels: int, out_channels: int = len(SEG_LABELS)) -> dict[str, Any]:
    """The bundle's ``{"name", "args"}`` of a preset of :data:`ARCH_PRESETS`."""
    if name not in ARCH_PRESETS:
        raise RANOInputError(f"--architecture {name}: use one of {', '.join(ARCH_PRESETS)}")
    return {"name": name, "args": {"spatial_dims": 3, "in_channels": in_channels, "out_channels": out_channels,
                                   **ARCH_PRESETS[name]}}


@dataclass
class SegTrainConfig:
    """Every setting of a ``train-seg`` run (the CLI's arguments)."""

    data: list[Path]
    out: Path
    architecture: str = "UNet"
    modalities: tuple[str, ...] = tuple(MODALITIES)
    spacing: float = 2.0
    folds: int = 3
    only_fold: int | None = None
    epochs: int = 20
    steps: int = 0  # optimiser steps per epoch; 0: one patch batch per training timepoint pair
    patch: int = 64
    batch_size: int = 2
    lr: float = 2e-3
    weight_decay: float = 1e-5
    val_cases: int = 8  # validation timepoints scored each epoch (at most)
    test_limit: int = 0  # test timepoints per fold scored at native resolution (0: all)
    export: str = "best"
    unseen: list[Path] = field(default_factory=list)
    comparison: Path | None = None  # an architecture comparison (markdown) for the model card
    seed: int = 0
    device: str = "cpu"
    threads: int = 2
    cache: Path | None = None
    resume: bool = False
    bundle_id: str = DEFAULT_SEG_BUNDLE_ID
    progress: bool = True
    command: str = ""

    def key(self) -> dict[str, Any]:
        """Settings a checkpoint must share to be resumed."""
        keep = ("architecture", "modalities", "spacing", "folds", "steps", "patch", "batch_size", "lr",
                "weight_decay", "seed")
        return {k: v for k, v in asdict(self).items() if k in keep} | {"data": [p.name for p in self.data]}


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


# ------------------------------------------------------------------------------ augmentation


def train_transforms(patch: int, samples: int):
    """Patch sampling that over-samples tumour, then augmentation covering clinical input.

    Noise is Gaussian, not Rician: the inputs are z-scores (negative values), where Rician noise
    (a magnitude) would flip their sign."""
    from monai.transforms import (
        Compose, RandBiasFieldd, RandCropByPosNegLabeld, RandFlipd, RandGaussianNoised,
        RandGaussianSmoothd, RandRotated, RandScaleIntensityd, RandShiftIntensityd, SpatialPadd,
    )

    size = (patch, patch, patch)
    return Compose([
        SpatialPadd(keys=("image", "label"), spatial_size=size),
        RandCropByPosNegLabeld(keys=("image", "label"), label_key="label", spatial_size=size, pos=2, neg=1,
                               num_samples=samples),
        RandRotated(keys=("image", "label"), range_x=0.15, range_y=0.15, range_z=0.15, prob=0.3,
                    mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandFlipd(keys=("image", "label"), spatial_axis=2, prob=0.5),  # array x: left-right
        RandScaleIntensityd(keys="image", factors=0.15, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=0.2, prob=0.5),
        RandBiasFieldd(keys="image", coeff_range=(0.0, 0.2), prob=0.2),
        RandGaussianNoised(keys="image", std=0.1, prob=0.3),
        # thick slices: smoothing along the slice axis only (array axis z)
        RandGaussianSmoothd(keys="image", sigma_x=(0.5, 1.5), sigma_y=(0.0, 0.0), sigma_z=(0.0, 0.0), prob=0.2),
    ])


# ------------------------------------------------------------------------------ one fold


def _forward(models: Sequence[torch.nn.Module], image: np.ndarray, device: torch.device) -> np.ndarray:
    """Softmax probabilities (K, z, y, x) of a whole prepared grid, averaged over ``models``."""
    x = torch.from_numpy(np.asarray(image, np.float32))[None].to(device)
    with torch.inference_mode():
        p = sum(torch.softmax(m(x), 1) for m in models) / len(models)
    return p[0].float().cpu().numpy()


def _grid_labels(models, case: dict[str, np.ndarray], device) -> np.ndarray:
    pred = np.asarray(SEG_LABELS, np.uint8)[_forward(models, case["image"], device).argmax(0)]
    pred[~case["brain"]] = 0
    return pred


def _validate(model, cases: list[dict[str, np.ndarray]], device, voxel_ml: float) -> dict[str, float]:
    model.eval()
    rows = [region_dice(_grid_labels([model], c, device), c["label"], voxel_ml) for c in cases]
    model.train()
    s = dice_summary(pd.DataFrame(rows))
    return {f"val_dice_{k}": v["mean"] for k, v in s.items()}


def _score(row: dict[str, float]) -> float:
    vals = [row[f"val_dice_{k}"] for k in ("enhancing", "core", "whole")]
    return float(np.nanmean(vals)) if not all(np.isnan(vals)) else 0.0


def _atomic_save(obj: Any, path: Path) -> None:
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


def train_fold(cfg: SegTrainConfig, fold: int, train: list[dict], val: list[dict], val_all: list[dict],
               fold_dir: Path, device: torch.device) -> dict[str, Any]:
    """Train one fold (resuming from ``fold_dir/checkpoint.pt`` with ``cfg.resume``); write its
    best weights (``best.pt``, by the mean validation Dice of enhancing, core and whole tumour on
    ``val``) and ``history.csv``; choose ``min_lesion_ml`` on ``val_all``. Returns the fold's
    record with its best model under ``"model"``."""
    from monai.losses import DiceCELoss

    fold_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = fold_dir / "checkpoint.pt"
    key = json.dumps(cfg.key(), sort_keys=True, default=str)
    torch.manual_seed(_seed(cfg.seed, fold, 1))
    arch = architecture(cfg.architecture, len(cfg.modalities))
    model = build_seg_network(arch).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs, 1), eta_min=cfg.lr * 0.05)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    state: dict[str, Any] = {"epoch": 0, "best_score": -1.0, "best_epoch": 0, "history": [], "key": key}
    if cfg.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        saved = json.loads(ckpt["state"])
        if saved.get("key") != key:
            raise RANOInputError(f"{ckpt_path}: made with different settings; --resume needs the same ones")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        state = saved
        _say(f"fold {fold}: resuming after epoch {state['epoch']}")
    elif not cfg.resume:
        for stale in ("checkpoint.pt", "best.pt", "history.csv", "fold.json"):
            (fold_dir / stale).unlink(missing_ok=True)
    voxel_ml = cfg.spacing ** 3 / 1000.0
    steps = cfg.steps or max(1, len(train) // cfg.batch_size)
    transforms = train_transforms(cfg.patch, samples=1)
    model.train()
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        started = time.perf_counter()
        rng = np.random.default_rng(_seed(cfg.seed, fold, epoch))
        transforms.set_random_state(seed=_seed(cfg.seed, fold, epoch, 2) % (2**32))
        order = rng.permutation(np.resize(rng.permutation(len(train)), steps * cfg.batch_size))
        losses = []
        bar = tqdm(range(steps), desc=f"fold {fold} epoch {epoch}/{cfg.epochs}", unit="step",
                   disable=not cfg.progress, leave=False)
        for s in bar:
            items = []
            for i in order[s * cfg.batch_size:(s + 1) * cfg.batch_size]:
                c = train[i]
                items += transforms({"image": c["image"].astype(np.float32), "label": c["label"][None]})
            x = torch.stack([torch.as_tensor(it["image"]) for it in items]).float().to(device)
            y = torch.stack([torch.as_tensor(it["label"]) for it in items]).long().to(device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses):.3f}")
        sched.step()
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)), "lr": opt.param_groups[0]["lr"],
               **_validate(model, val, device, voxel_ml)}
        state["history"].append(row)
        if _score(row) > state["best_score"]:
            state["best_score"], state["best_epoch"] = _score(row), epoch
            _atomic_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, fold_dir / "best.pt")
        state["epoch"] = epoch
        state["train_seconds"] = state.get("train_seconds", 0.0) + time.perf_counter() - started
        _atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                      "state": json.dumps(state)}, ckpt_path)
        write_text(pd.DataFrame(state["history"]).to_csv(index=False), fold_dir / "history.csv")
        _say(f"fold {fold} epoch {epoch}: loss {row['train_loss']:.3f}  val Dice enhancing "
             f"{row['val_dice_enhancing']:.3f} core {row['val_dice_core']:.3f} whole {row['val_dice_whole']:.3f}")
    best = torch.load(fold_dir / "best.pt", map_location=device, weights_only=True)
    model.load_state_dict(best)
    model.eval()
    preds = [_grid_labels([model], c, device) for c in val_all]
    min_ml, table = choose_min_lesion_ml(preds, [c["label"] for c in val_all], voxel_ml)
    write_text(table.to_csv(index=False), fold_dir / "min_lesion_ml.csv")
    return {"fold": fold, "best_epoch": state["best_epoch"], "epochs_run": state["epoch"],
            "best_val_score": state["best_score"], "train_seconds": round(state.get("train_seconds", 0.0), 1),
            "min_lesion_ml": min_ml, "n_train": len(train),
            "n_val": len(val_all), "model": model}


def forward_seconds(names: Sequence[str], in_channels: int, shape: Sequence[int] = (96, 112, 96),
                    repeats: int = 5) -> dict[str, float]:
    """Median seconds of one forward of each preset of ``names`` on a ``shape`` grid on the CPU
    (current thread count), after a warm-up pass; the presets take turns, so a shared machine's
    changing load falls on all of them alike."""
    models = {n: build_seg_network(architecture(n, in_channels)).eval() for n in names}
    x = torch.zeros(1, in_channels, *shape)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for _ in range(repeats + 1):
            for n, model in models.items():
                t = time.perf_counter()
                model(x)
                times[n].append(time.perf_counter() - t)
    return {n: float(np.median(t[1:])) for n, t in times.items()}


def load_fold_model(cfg: SegTrainConfig, fold_dir: Path, device: torch.device) -> torch.nn.Module:
    """A finished fold's best model (``best.pt``), in eval mode."""
    model = build_seg_network(architecture(cfg.architecture, len(cfg.modalities))).to(device)
    model.load_state_dict(torch.load(fold_dir / "best.pt", map_location=device, weights_only=True))
    return model.eval()
