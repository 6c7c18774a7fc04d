"""Cross-validated training of response classifiers, exported as one ensemble bundle.

The plan of a run (``rano-response train``):

1. Read LUMIERE as distributed and pair follow-ups with baselines (:mod:`.lumiere`);
   ``pairs.csv`` lists every rating row, used or skipped and why.
2. Split the pairs by patient: stratified group k-fold (scikit-learn ``StratifiedGroupKFold``)
   or leave-one-patient-out (``LeaveOneGroupOut``). In each fold a validation split is carved
   from the training patients only; it picks the checkpoint and drives early stopping and the
   learning-rate plateau schedule; the test fold is touched once, at the end. ``folds.csv``
   records each pair's (hence patient's) test fold and the folds it validates.
3. Preprocess every pair once with the clinical path (:mod:`.data`), shared by all folds.
4. Train one network per fold (AdamW, class-weighted cross entropy and/or a class-weighted
   sampler, MONAI augmentation, CUDA autocast), checkpointing every epoch atomically; a killed
   run restarted with ``--resume`` skips finished folds and continues the current one from its
   last epoch, with the very numbers the uninterrupted run would have produced.
5. Deep hybrid classifiers on the fold models' probabilities plus clinical features
   (:mod:`.hybrid`), inside the same folds.
6. Metrics per fold and summarised (``metrics.csv``, ``summary.json``), PNG plots, and the k
   fold models exported as one ensemble bundle with its model card.

Distributed data parallel: under ``torchrun --nproc_per_node N`` each process takes 1/N of every
global batch (``DistributedSampler`` over the epoch's sample order), gradients are averaged, and
the loss is normalised by the *global* batch's class-weight sum, so N processes compute the
gradient of exactly the single-process loss. Batch norm sees each process's part of the batch
(statistics are not synchronised, and DDP keeps process 0's running statistics); a single
process reproduces that with ``--grad-shards N`` (gradient accumulation over the same N parts,
running statistics from the first part), which is how a DDP run can be checked on one device.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.files import atomic_file, write_text
from RANOResponseLib.core.names import CLASS_NAMES, MODALITIES
from RANOResponseLib.datasets.lumiere import (
    CLINICAL_FEATURES,
    build_pairs,
    clinical_features,
    print_pair_table,
    read_clinical,
)
from RANOResponseLib.imaging.preprocessing import InputSpec, default_channels, difference_channels
from RANOResponseLib.inference.attributions import autocast
from RANOResponseLib.model.bundle import write_bundle
from RANOResponseLib.model.device import resolve_device
from RANOResponseLib.model.networks import GRADCAM_LAYERS, architecture_args, build_network
from tqdm import tqdm

from ResponseTrainingLib.analysis.metrics import SCALAR_METRICS, classification_metrics, summarise
from ResponseTrainingLib.data.dataset import (
    EpochView,
    augmenter,
    cache_pairs,
    cached_dataset,
    item_seed,
    stacked,
)
from ResponseTrainingLib.data.labels import apply_review_labels
from ResponseTrainingLib.training.hybrid import CLASSIFIERS, HYBRID_FIT, fit_predict

WEIGHTINGS = ("equal", "1-prevalence", "1/prevalence")
WEIGHTING_ALIASES = {"one-minus": "1-prevalence", "inverse": "1/prevalence"}
CHANNEL_SETS = ("stack", "difference", "stack+difference")
ARCHS = ("compact", "densenet121", "densenet169", "densenet264", "timm25d")
# settings that change the numbers: a resumed run must have the same ones
_RESULT_KEYS = ("data", "arch", "modalities", "channels", "pairing", "folds", "loocv", "val_fraction", "epochs",
                "batch_size", "lr", "weight_decay", "patience", "plateau_patience", "loss_weighting",
                "sampler_weighting", "seed", "spacing", "size", "dropout", "augment", "backbone", "slices",
                "slice_step", "pretrained_weights", "grad_shards")


@dataclass
class TrainConfig:
    """Everything a training run depends on (recorded in ``summary.json`` and ``bundle.json``)."""

    data: Path
    out: Path
    arch: str = "compact"
    modalities: tuple[str, ...] = MODALITIES
    channels: str = "stack"  # stack: [follow-up, baseline] per modality; difference: follow-up - baseline
    pairing: str = "previous"
    labels: Path | None = None  # review export (rano-response review export): overrides/adds labels
    folds: int = 5
    loocv: bool = False
    val_fraction: float = 0.2
    epochs: int = 30
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.01
    patience: int = 10
    plateau_patience: int = 4
    loss_weighting: str = "1/prevalence"
    sampler_weighting: str = "equal"
    seed: int = 0
    device: str = "auto"
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)
    size: tuple[int, int, int] = (80, 96, 80)
    dropout: float = 0.1
    augment: bool = True
    clinical: bool = False
    hybrid: tuple[str, ...] = ()
    hybrid_fit: str = "val"
    backbone: str = "resnet18"  # timm25d only
    slices: int = 5  # timm25d only
    slice_step: int = 4  # timm25d only
    pretrained_weights: Path | None = None  # timm25d: local weights file for transfer learning
    grad_shards: int = 1
    only_fold: int | None = None
    preprocess_only: bool = False
    cache: Path | None = None  # default: <out>/cache
    bundle_id: str = "rano-response-model"
    resume: bool = False
    progress_json: bool = False
    command: str = field(default_factory=lambda: " ".join(shlex.quote(a) for a in sys.argv))

    def spec(self) -> InputSpec:
        mods = tuple(self.modalities)
        chans = {"stack": default_channels(mods), "difference": difference_channels(mods),
                 "stack+difference": default_channels(mods) + difference_channels(mods)}[self.channels]
        return InputSpec(mods, tuple(chans), tuple(float(s) for s in self.spacing),
                         tuple(int(s) for s in self.size))

    def check(self) -> None:
        """Normalise aliases and refuse impossible settings with a one-line reason."""
        self.loss_weighting = WEIGHTING_ALIASES.get(self.loss_weighting, self.loss_weighting)
        self.sampler_weighting = WEIGHTING_ALIASES.get(self.sampler_weighting, self.sampler_weighting)
        for flag, v in (("--loss-weighting", self.loss_weighting), ("--sampler-weighting", self.sampler_weighting)):
            if v not in WEIGHTINGS:
                raise RANOInputError(f"{flag} {v}: use one of {', '.join(WEIGHTINGS)}")
        if self.arch not in ARCHS:
            raise RANOInputError(f"--arch {self.arch}: use one of {', '.join(ARCHS)}")
        if self.channels not in CHANNEL_SETS:
            raise RANOInputError(f"--channels {self.channels}: use one of {', '.join(CHANNEL_SETS)}")
        bad = [m for m in self.modalities if m not in MODALITIES]
        if bad or not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise RANOInputError(f"--modalities {','.join(self.modalities)}: use distinct names from "
                                 f"{', '.join(MODALITIES)}")
        if not self.loocv and self.folds < 2:
            raise RANOInputError(f"--folds {self.folds}: need at least 2 (or --loocv)")
        if self.epochs < 1 or self.batch_size < 1 or self.grad_shards < 1:
            raise RANOInputError("--epochs, --batch-size and --grad-shards must be at least 1")
        if self.batch_size % self.grad_shards:
            raise RANOInputError(f"--batch-size {self.batch_size} is not divisible by --grad-shards {self.grad_shards}")
        if not 0 < self.val_fraction < 0.5:
            raise RANOInputError(f"--val-fraction {self.val_fraction}: use a value between 0 and 0.5")
        unknown = [h for h in self.hybrid if h not in CLASSIFIERS]
        if unknown:
            raise RANOInputError(f"--hybrid {','.join(unknown)}: unknown (use {', '.join(CLASSIFIERS)})")
        if self.hybrid_fit not in HYBRID_FIT:
            raise RANOInputError(f"--hybrid-fit {self.hybrid_fit}: use one of {', '.join(HYBRID_FIT)}")
        if self.pretrained_weights is not None and not Path(self.pretrained_weights).is_file():
            raise RANOInputError(f"{self.pretrained_weights}: pretrained weights file not found")

    def result_key(self) -> str:
        """Hash of the settings that change the numbers (a resumed run must match it)."""
        d = asdict(self)
        blob = json.dumps({k: (str(d[k]) if isinstance(d[k], Path) else d[k]) for k in _RESULT_KEYS},
                          sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------ class weights


def class_weights(labels: np.ndarray, mode: str, n_classes: int = len(CLASS_NAMES)) -> np.ndarray:
    """Per-class weights from training prevalence: ``equal``, ``1-prevalence`` or ``1/prevalence``
    (the reference study's grid), scaled to mean 1 over the classes present; absent classes get 0."""
    mode = WEIGHTING_ALIASES.get(mode, mode)
    if mode not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}")
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=n_classes).astype(float)
    prev = counts / max(counts.sum(), 1)
    if mode == "equal":
        w = np.ones(n_classes)
    elif mode == "1-prevalence":
        w = 1 - prev
    else:
        w = np.where(prev > 0, 1 / np.maximum(prev, 1e-12), 0.0)
    w[counts == 0] = 0.0
    return w / w[w > 0].mean()


# ------------------------------------------------------------------------------------ splits


@dataclass
class FoldPlan:
    """Per pair: the fold whose test set holds it; per fold: the validation pairs' indices."""

    test_fold: np.ndarray  # (n_pairs,) int
    val: list[np.ndarray]
    scheme: str

    @property
    def n_folds(self) -> int:
        return len(self.val)

    def indices(self, fold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(train, val, test) pair indices of ``fold``."""
        test = np.flatnonzero(self.test_fold == fold)
        val = self.val[fold]
        train = np.setdiff1d(np.flatnonzero(self.test_fold != fold), val)
        return train, val, test


def _grouped_splits(n_splits: int, labels: np.ndarray, groups: np.ndarray, seed: int) -> list:
    """``StratifiedGroupKFold``; on cohorts too small to stratify (every class has fewer pairs
    than splits) plain ``GroupKFold`` with shuffling: still grouped by patient."""
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    with warnings.catch_warnings():  # rare classes with fewer members than folds: expected
        warnings.filterwarnings("ignore", message="The least populated class")
        if np.bincount(labels).max() >= n_splits:
            return list(StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed).split(labels, labels, groups))
        return list(GroupKFold(n_splits, shuffle=True, random_state=seed).split(labels, labels, groups))


def make_folds(labels: np.ndarray, groups: np.ndarray, folds: int = 5, loocv: bool = False,
               val_fraction: float = 0.2, seed: int = 0) -> FoldPlan:
    """Patient-grouped splits: stratified group k-fold or leave-one-patient-out for the test
    folds; in each fold, a stratified group split of the *training* patients for validation."""
    from sklearn.model_selection import LeaveOneGroupOut

    labels, groups = np.asarray(labels), np.asarray(groups)
    n_groups = len(set(groups.tolist()))
    if loocv:
        splits = list(LeaveOneGroupOut().split(labels, labels, groups))
        scheme = f"leave-one-patient-out ({len(splits)} folds)"
    else:
        if folds > n_groups:
            raise RANOInputError(f"--folds {folds}: only {n_groups} patients with usable pairs")
        splits = _grouped_splits(folds, labels, groups, seed)
        scheme = f"{folds}-fold stratified group k-fold (patients)"
    test_fold = np.full(len(labels), -1, dtype=int)
    vals = []
    for f, (rest, test) in enumerate(splits):
        test_fold[test] = f
        rest_groups = groups[rest]
        k_val = min(max(2, round(1 / val_fraction)), len(set(rest_groups.tolist())))
        if k_val < 2:
            raise RANOInputError(f"fold {f}: fewer than 2 training patients; cannot carve a validation split")
        _, val_rel = _grouped_splits(k_val, labels[rest], rest_groups, seed + 1 + f)[0]
        vals.append(np.sort(rest[val_rel]))
    return FoldPlan(test_fold, vals, scheme)


def folds_table(plan: FoldPlan, pair_ids: list[str], groups: np.ndarray, labels: list[str]) -> pd.DataFrame:
    """``folds.csv``: each pair's patient, label, test fold and the folds it validates."""
    val_for = [[] for _ in pair_ids]
    for f, v in enumerate(plan.val):
        for i in v:
            val_for[i].append(str(f))
    return pd.DataFrame({"patient": groups, "pair": pair_ids, "label": labels, "fold": plan.test_fold,
                         "val_for_folds": [";".join(v) for v in val_for]})


# ------------------------------------------------------------------------ distributed helpers


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def init_distributed(device_spec: str) -> tuple[DistContext, torch.device]:
    """Single process, or (under ``torchrun``) one process of a DDP group: gloo on the CPU,
    nccl on CUDA (device ``cuda:LOCAL_RANK``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(), resolve_device(device_spec)
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    spec = (device_spec or "auto").lower()
    use_cuda = spec.startswith("cuda") or (spec == "auto" and torch.cuda.is_available())
    if use_cuda:
        device = resolve_device(f"cuda:{local}")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistContext(rank, world, local), device


@contextlib.contextmanager
def _frozen_bn_stats(model: torch.nn.Module, frozen: bool) -> Iterator[None]:
    """Batch norm still normalises with the batch's statistics but leaves the running ones
    alone (momentum 0): later gradient shards, like DDP's non-zero ranks, do not update them."""
    if not frozen:
        yield
        return
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom


# --------------------------------------------------------------------------------- training


def _atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


def epoch_order(train_idx: np.ndarray, sample_weights: np.ndarray, equal: bool, batch: int,
                generator: torch.Generator) -> np.ndarray:
    """The epoch's sample order, padded to whole batches: a permutation (``equal``) or a
    class-weighted draw with replacement (like ``WeightedRandomSampler``)."""
    n = len(train_idx)
    total = math.ceil(n / batch) * batch
    if equal:
        pos = torch.randperm(n, generator=generator).numpy()
        extra = torch.randperm(n, generator=generator).numpy()
        pos = np.concatenate([pos, np.resize(extra, total - n)])
    else:
        pos = torch.multinomial(torch.as_tensor(sample_weights, dtype=torch.float64), total, replacement=True,
                                generator=generator).numpy()
    return train_idx[pos]


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


def _weighted_nll(proba: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """Class-weighted cross entropy of probabilities (PyTorch's 'mean' reduction)."""
    if len(y) == 0:
        return float("nan")
    return float(F.nll_loss(torch.log(torch.from_numpy(proba).double() + 1e-8), torch.from_numpy(y).long(),
                            weight=torch.from_numpy(w).double()))


def network_args(cfg: TrainConfig, in_channels: int) -> dict[str, Any]:
    """The architecture arguments recorded in ``bundle.json``."""
    if cfg.arch == "timm25d":
        return architecture_args("timm25d", in_channels, len(CLASS_NAMES), backbone=cfg.backbone,
                                 slices=cfg.slices, slice_step=cfg.slice_step, drop_rate=cfg.dropout)
    return architecture_args(cfg.arch, in_channels, len(CLASS_NAMES), dropout_prob=cfg.dropout)


def _build(cfg: TrainConfig, args: dict[str, Any]) -> torch.nn.Module:
    if cfg.arch == "timm25d" and cfg.pretrained_weights:
        return build_network("timm25d", **args, pretrained_file=str(cfg.pretrained_weights))
    return build_network(cfg.arch, **args)


Emit = Callable[[dict[str, Any]], None]


@dataclass
class FoldData:
    fold: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def train_fold(cfg: TrainConfig, fd: FoldData, dataset, labels: np.ndarray, pair_ids: list[str],
               device: torch.device, dctx: DistContext, fold_dir: Path, emit: Emit,
               frac: Callable[[int, float], float]) -> dict[str, Any]:
    """Train fold ``fd.fold`` (resuming from its checkpoint with ``cfg.resume``), write its best
    weights, predictions and ``fold.json``; return the fold record."""
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if dctx.main else (lambda m: None)
    fold_dir.mkdir(parents=True, exist_ok=True)
    k = fd.fold
    in_channels = len(cfg.spec().channels)
    args = network_args(cfg, in_channels)
    torch.manual_seed(item_seed(cfg.seed, k, 7919))  # same initial weights on every rank
    core = _build(cfg, args).to(device)
    model: torch.nn.Module = core
    if dctx.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(core, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(core.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.1, patience=cfg.plateau_patience)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    y_tr = labels[fd.train]
    loss_w_np = class_weights(y_tr, cfg.loss_weighting)
    loss_w = torch.tensor(loss_w_np, dtype=torch.float32, device=device)
    samp_w = class_weights(y_tr, cfg.sampler_weighting)[y_tr]
    shards = dctx.world if dctx.world > 1 else cfg.grad_shards
    if cfg.batch_size % shards:
        raise RANOInputError(f"--batch-size {cfg.batch_size} is not divisible by {shards} processes/shards")

    ckpt_path = fold_dir / "checkpoint.pt"
    if not cfg.resume:  # a fresh run: an earlier run's results in this folder are void
        for stale in ("fold.json", "best.pt", "predictions.csv", "history.csv", "checkpoint.pt"):
            (fold_dir / stale).unlink(missing_ok=True)
    state: dict[str, Any] = {"epoch": 0, "best_score": -1e9, "best_epoch": 0, "bad_epochs": 0, "history": [],
                             "result_key": cfg.result_key()}
    best_state = {k2: v.detach().cpu().clone() for k2, v in core.state_dict().items()}
    if cfg.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        saved = json.loads(ckpt["state"])
        if saved.get("result_key") != state["result_key"]:
            raise RANOInputError(f"{ckpt_path}: made with different settings; --resume needs the same "
                                 "data and options (or start a new --out)")
        core.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        state, best_state = saved, ckpt["best_model"]
        say(f"fold {k}: resumed after epoch {state['epoch']} from {ckpt_path}")

    aug = augmenter() if cfg.augment else None
    x_val = stacked(dataset, fd.val)
    y_val = labels[fd.val]
    t0 = time.perf_counter()
    for epoch in range(state["epoch"], cfg.epochs):
        if state["bad_epochs"] >= cfg.patience:
            break
        gen = torch.Generator().manual_seed(item_seed(cfg.seed, k, epoch, 1))
        order = epoch_order(fd.train, samp_w, cfg.sampler_weighting == "equal", cfg.batch_size, gen)
        view = EpochView(dataset, order, seed=item_seed(cfg.seed, k, epoch, 2), augment=aug)
        batch_w = loss_w_np[labels[order]].reshape(-1, cfg.batch_size).sum(1)  # per global batch
        if dctx.world > 1:
            from torch.utils.data.distributed import DistributedSampler

            # the view is already in epoch order: rank r takes positions r, r+N, ... of each batch
            sampler = DistributedSampler(view, num_replicas=dctx.world, rank=dctx.rank, shuffle=False)
            loader = torch.utils.data.DataLoader(view, batch_size=cfg.batch_size // dctx.world, sampler=sampler)
        else:
            loader = torch.utils.data.DataLoader(view, batch_size=cfg.batch_size, shuffle=False)
        model.train()
        losses: list[float] = []
        bar = tqdm(loader, desc=f"fold {k} epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False,
                   file=sys.stderr, disable=not dctx.main)
        for j, (xb, yb) in enumerate(bar):
            xb, yb = xb.to(device), yb.to(device)
            parts = ([(xb, yb, dctx.rank)] if dctx.world > 1
                     else [(xb[s::shards], yb[s::shards], s) for s in range(shards)])
            opt.zero_grad(set_to_none=True)
            total = torch.zeros((), device=device)
            for xs, ys, s in parts:
                torch.manual_seed(item_seed(cfg.seed, k, epoch, 3, j, s))  # dropout: same masks per part
                with _frozen_bn_stats(core, dctx.world == 1 and s > 0), autocast(device):
                    ce = F.cross_entropy(model(xs).float(), ys, weight=loss_w, reduction="sum")
                part_loss = ce / float(batch_w[j])  # this part's share of the global batch's mean loss
                scaler.scale(part_loss * dctx.world).backward()  # DDP averages over the N processes
                total += part_loss.detach()
            if dctx.world > 1:
                torch.distributed.all_reduce(total)
            scaler.step(opt)
            scaler.update()
            losses.append(float(total))
            live = {"loss": f"{np.mean(losses):.3f}"}
            if state["history"]:  # the last epoch's validation figures stay in view
                live["val_bal_acc"] = f"{state['history'][-1]['val_balanced_accuracy']:.3f}"
            bar.set_postfix(live)
        bar.close()
        if dctx.world > 1:  # everyone validates with process 0's batch-norm statistics
            for b in core.buffers():
                torch.distributed.broadcast(b, 0)
        pv = predict_arrays(core, x_val, device)
        val_loss = _weighted_nll(pv, y_val, loss_w_np)
        val = classification_metrics(y_val, pv)
        sched.step(val_loss)
        score = val["balanced_accuracy"] - 1e-3 * val_loss  # ties go to the lower loss
        improved = score > state["best_score"]
        if improved:
            state.update(best_score=score, best_epoch=epoch + 1, bad_epochs=0)
            best_state = {k2: v.detach().cpu().clone() for k2, v in core.state_dict().items()}
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_loss": val_loss,
               "val_balanced_accuracy": val["balanced_accuracy"], "val_f1_macro": val["f1_macro"],
               "lr": opt.param_groups[0]["lr"]}
        state["history"].append(row)
        say(f"fold {k} epoch {epoch + 1:3d}  train loss {row['train_loss']:.3f}  val loss {val_loss:.3f}  "
            f"val bal.acc {val['balanced_accuracy']:.3f}{'  *best' if improved else ''}")
        if dctx.main:
            _atomic_torch_save({"model": core.state_dict(), "optimizer": opt.state_dict(),
                                "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                                "state": json.dumps(state), "best_model": best_state}, ckpt_path)
            write_text(pd.DataFrame(state["history"]).to_csv(index=False), fold_dir / "history.csv")
        dctx.barrier()
        done = epoch + 1 if state["bad_epochs"] < cfg.patience else cfg.epochs
        emit({"event": "epoch", "fold": k, "epoch": epoch + 1, "epochs": cfg.epochs,
              "loss": row["train_loss"], "val_loss": val_loss, "val_bal_acc": val["balanced_accuracy"],
              "best": bool(improved), "frac": frac(k, done / cfg.epochs)})

    core.load_state_dict(best_state)
    roles = {"val": fd.val, "test": fd.test}
    if cfg.hybrid_fit == "trainval" and cfg.hybrid:
        roles = {"train": np.unique(fd.train), **roles}
    rows = []
    probs: dict[str, np.ndarray] = {}
    for role, idx in roles.items():
        p = predict_arrays(core, stacked(dataset, idx), device) if len(idx) else np.zeros((0, len(CLASS_NAMES)))
        probs[role] = p
        for i, pi in zip(idx, p):
            rows.append({"pair": pair_ids[i], "role": role, "label": int(labels[i]), "predicted": int(pi.argmax()),
                         **{f"p_{c}": float(v) for c, v in zip(CLASS_NAMES, pi)}})
    test = classification_metrics(labels[fd.test], probs["test"])
    record = {"fold": k, "best_epoch": state["best_epoch"], "epochs_run": state["epoch"],
              "n_pairs": {"train": int(len(np.unique(fd.train))), "val": int(len(fd.val)), "test": int(len(fd.test))},
              "test": test, "val_best_score": state["best_score"], "result_key": state["result_key"],
              "train_seconds_this_session": round(time.perf_counter() - t0, 1)}
    if dctx.main:
        _atomic_torch_save(best_state, fold_dir / "best.pt")
        write_text(pd.DataFrame(rows).to_csv(index=False), fold_dir / "predictions.csv")
        write_text(json.dumps(record, indent=2, default=float) + "\n", fold_dir / "fold.json")  # done marker
    dctx.barrier()
    say(f"fold {k}: best epoch {state['best_epoch']}, test balanced accuracy {test['balanced_accuracy']:.3f} "
        f"({len(fd.test)} pairs)")
    emit({"event": "fold", "fold": k, "best_epoch": state["best_epoch"], "test_bal_acc": test["balanced_accuracy"],
          "frac": frac(k, 1.0)})
    return record


def _finished(fold_dir: Path, key: str) -> dict[str, Any] | None:
    """The fold record if this fold finished with the same settings, else None."""
    f = fold_dir / "fold.json"
    if not (f.is_file() and (fold_dir / "best.pt").is_file() and (fold_dir / "predictions.csv").is_file()):
        return None
    rec = json.loads(f.read_text(encoding="utf-8"))
    return rec if rec.get("result_key") == key else None


# ------------------------------------------------------------------------------- the whole run


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run the whole job; returns the summary also written to ``out/summary.json`` (an empty
    dict for ``--only-fold`` / ``--preprocess-only`` runs, which leave aggregation to a final
    ``--resume`` run)."""
    cfg.check()
    dctx, device = init_distributed(cfg.device)
    try:
        return _run(cfg, dctx, device)
    finally:
        if dctx.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run(cfg: TrainConfig, dctx: DistContext, device: torch.device) -> dict[str, Any]:
    t_start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if dctx.main else (lambda m: None)

    def emit(event: dict[str, Any]) -> None:
        if dctx.main and cfg.progress_json:
            print(json.dumps(event, default=float), flush=True)

    spec = cfg.spec()
    pairs, table = build_pairs(cfg.data, cfg.modalities, cfg.pairing)
    if cfg.labels:
        pairs, table = apply_review_labels(pairs, table, cfg.labels, cfg.data, cfg.modalities)
    if dctx.main:
        write_text(table.to_csv(index=False), out / "pairs.csv")
        print_pair_table(table)
    labels = np.array([CLASS_NAMES.index(p.label) for p in pairs], dtype=int)
    groups = np.array([p.patient for p in pairs])
    pair_ids = [p.id for p in pairs]
    n_patients = len(set(groups.tolist()))
    if len(pairs) < 4 or n_patients < 3:
        raise RANOInputError(f"{cfg.data}: only {len(pairs)} usable pairs from {n_patients} patients; "
                             "need at least 4 pairs from 3 patients")
    clinical = None
    if cfg.clinical or cfg.hybrid:
        clinical = clinical_features(pairs, read_clinical(cfg.data))
        if dctx.main:
            write_text(clinical.rename_axis("pair").to_csv(), out / "clinical.csv")

    plan = make_folds(labels, groups, cfg.folds, cfg.loocv, cfg.val_fraction, cfg.seed)
    if dctx.main:
        write_text(folds_table(plan, pair_ids, groups, [p.label for p in pairs]).to_csv(index=False),
                   out / "folds.csv")
    say(f"{plan.scheme}: {len(pairs)} pairs from {n_patients} patients; folds.csv written")
    fold_ids = list(range(plan.n_folds)) if cfg.only_fold is None else [cfg.only_fold]
    if cfg.only_fold is not None and not 0 <= cfg.only_fold < plan.n_folds:
        raise RANOInputError(f"--only-fold {cfg.only_fold}: folds are 0..{plan.n_folds - 1}")
    emit({"event": "start", "pairs": len(pairs), "patients": n_patients, "folds": plan.n_folds,
          "run_folds": fold_ids, "epochs": cfg.epochs, "frac": 0.0})

    # preprocessing: once per cohort and input spec, shared by the folds (process 0 writes it)
    cache = Path(cfg.cache) if cfg.cache else out / "cache"
    if dctx.main:
        paths = cache_pairs(pairs, spec, cache, progress=True,
                            on_pair=lambda i, n: emit({"event": "preprocess", "done": i, "total": n,
                                                       "frac": 0.1 * i / n}))
    dctx.barrier()
    if not dctx.main:
        paths = cache_pairs(pairs, spec, cache, progress=False)
    if cfg.preprocess_only:
        say(f"preprocessed {len(paths)} pairs into {cache}")
        return {}
    dataset = cached_dataset(paths, labels)

    def frac(fold: int, within: float) -> float:
        pos = fold_ids.index(fold)
        return 0.1 + 0.9 * (pos + within) / len(fold_ids)

    key = cfg.result_key()
    records: dict[int, dict[str, Any]] = {}
    for k in fold_ids:
        fold_dir = out / "folds" / f"fold-{k}"
        rec = _finished(fold_dir, key) if cfg.resume else None
        if rec is not None:
            say(f"fold {k}: finished earlier (best epoch {rec['best_epoch']}); skipped")
            emit({"event": "fold", "fold": k, "skipped": True, "frac": frac(k, 1.0)})
        else:
            train_idx, val_idx, test_idx = plan.indices(k)
            rec = train_fold(cfg, FoldData(k, train_idx, val_idx, test_idx), dataset, labels, pair_ids, device,
                             dctx, fold_dir, emit, frac)
        records[k] = rec

    if cfg.only_fold is not None:
        say(f"fold {cfg.only_fold} done; run again with --resume (without --only-fold) to aggregate")
        return {}
    if not dctx.main:
        return {}
    summary = aggregate(cfg, out, plan, records, pairs, labels, clinical, device, dctx,
                        time.perf_counter() - t_start)
    emit({"event": "done", "summary": str(out / "summary.json"), "bundle": str(out / "bundle"), "frac": 1.0})
    return summary


# ------------------------------------------------------------------------------ aggregation


def _fold_predictions(out: Path, k: int) -> pd.DataFrame:
    return pd.read_csv(out / "folds" / f"fold-{k}" / "predictions.csv")


def _proba(df: pd.DataFrame) -> np.ndarray:
    return df[[f"p_{c}" for c in CLASS_NAMES]].to_numpy(dtype=float)


def run_hybrid(cfg: TrainConfig, out: Path, n_folds: int, clinical: pd.DataFrame) -> dict[str, Any]:
    """Per fold and classifier: fit on the fold's validation (or training + validation) pairs'
    CNN probabilities + clinical features, score the test fold. Returns per-fold metrics and
    pooled test predictions per classifier."""
    results: dict[str, dict[str, Any]] = {}
    fit_roles = ("val",) if cfg.hybrid_fit == "val" else ("train", "val")
    for name in cfg.hybrid:
        per_fold, pooled = [], []
        for k in range(n_folds):
            pred = _fold_predictions(out, k)
            feats = clinical.loc[pred["pair"], list(CLINICAL_FEATURES)].to_numpy(dtype=float)
            x = np.hstack([_proba(pred), feats])
            fit = pred["role"].isin(fit_roles).to_numpy()
            test = (pred["role"] == "test").to_numpy()
            y = pred["label"].to_numpy(dtype=int)
            try:
                p = fit_predict(name, x[fit], y[fit], x[test], len(CLASS_NAMES), seed=cfg.seed + k)
                m = classification_metrics(y[test], p)
            except ValueError as e:  # e.g. one class only among the fitting pairs
                m = {**classification_metrics(np.zeros(0, int), np.zeros((0, len(CLASS_NAMES)))), "note": str(e)}
                p = np.full((int(test.sum()), len(CLASS_NAMES)), np.nan)
            m["fold"] = k
            per_fold.append(m)
            pooled.append(pd.DataFrame({"pair": pred["pair"][test].values, "fold": k, "label": y[test],
                                        **{f"p_{c}": p[:, i] for i, c in enumerate(CLASS_NAMES)}}))
        results[f"hybrid-{name}"] = {"per_fold": per_fold, "pooled": pd.concat(pooled, ignore_index=True)}
    return results


def _metrics_rows(model: str, per_fold: list[dict[str, Any]], summ: dict[str, Any],
                  pooled: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for m in per_fold:
        rows.append({"model": model, "fold": str(m["fold"]), "n": m["n"], **{s: m[s] for s in SCALAR_METRICS},
                     "confusion_matrix": json.dumps(m["confusion_matrix"])})
    for stat in ("median", "mean", "sd"):
        rows.append({"model": model, "fold": stat, "n": "", **summ[stat], "confusion_matrix": ""})
    rows.append({"model": model, "fold": "pooled", "n": pooled["n"], **{s: pooled[s] for s in SCALAR_METRICS},
                 "confusion_matrix": json.dumps(pooled["confusion_matrix"])})
    return rows


def aggregate(cfg: TrainConfig, out: Path, plan: FoldPlan, records: dict[int, dict[str, Any]], pairs: list,
              labels: np.ndarray, clinical: pd.DataFrame | None, device: torch.device, dctx: DistContext,
              seconds: float) -> dict[str, Any]:
    """metrics.csv, summary.json, plots and the ensemble bundle from the finished folds."""
    from ResponseTrainingLib.analysis.plots import plot_confusion, plot_learning_curves, plot_roc

    K = plan.n_folds
    models: dict[str, dict[str, Any]] = {}
    cnn_fold = []
    pooled_cnn = []
    for k in range(K):
        m = dict(records[k]["test"])
        m["fold"] = k
        cnn_fold.append(m)
        pred = _fold_predictions(out, k)
        pooled_cnn.append(pred[pred["role"] == "test"].assign(fold=k))
    pooled_cnn_df = pd.concat(pooled_cnn, ignore_index=True)
    write_text(pooled_cnn_df.to_csv(index=False), out / "test_predictions.csv")
    models["cnn"] = {"per_fold": cnn_fold, "pooled": pooled_cnn_df}
    if cfg.hybrid and clinical is not None:
        models.update(run_hybrid(cfg, out, K, clinical))
        hyb = pd.concat([v["pooled"].assign(model=n) for n, v in models.items() if n != "cnn"], ignore_index=True)
        write_text(hyb.to_csv(index=False), out / "hybrid_predictions.csv")

    rows, cv = [], {}
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    for name, res in models.items():
        pooled_df = res["pooled"].dropna(subset=[f"p_{c}" for c in CLASS_NAMES])
        pooled = classification_metrics(pooled_df["label"].to_numpy(dtype=int), _proba(pooled_df))
        summ = summarise(res["per_fold"])
        cv[name] = {**summ, "pooled": pooled, "per_fold": res["per_fold"]}
        rows += _metrics_rows(name, res["per_fold"], summ, pooled)
        plot_confusion(pooled["confusion_matrix"], CLASS_NAMES, plots / f"confusion_{name}.png",
                       f"{name}: pooled test folds (n={pooled['n']})")
        plot_roc(pooled_df["label"].to_numpy(dtype=int), _proba(pooled_df), CLASS_NAMES, plots / f"roc_{name}.png",
                 f"{name}: one-vs-rest ROC, pooled test folds")
    write_text(pd.DataFrame(rows).to_csv(index=False), out / "metrics.csv")
    histories = {k: pd.read_csv(out / "folds" / f"fold-{k}" / "history.csv") for k in range(K)
                 if (out / "folds" / f"fold-{k}" / "history.csv").is_file()}
    plot_learning_curves(histories, plots / "learning_curves.png")

    groups = np.array([p.patient for p in pairs])
    dev = str(device) if device.type == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})"
    provenance = {
        "command": cfg.command,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "command"},
        "data": str(Path(cfg.data).absolute()),
        "data_source": _data_source(Path(cfg.data)),
        "cv_scheme": plan.scheme,
        "pairs": int(len(pairs)),
        "patients": int(len(set(groups.tolist()))),
        "class_counts": {c: int((labels == i).sum()) for i, c in enumerate(CLASS_NAMES)},
        "folds": [{k2: records[k][k2] for k2 in ("fold", "best_epoch", "epochs_run", "n_pairs")} for k in range(K)],
        "device": dev,
        "processes": dctx.world,
        "torch_threads": torch.get_num_threads(),
        "grad_shards": dctx.world if dctx.world > 1 else cfg.grad_shards,
        "wall_seconds_this_session": round(seconds, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    summary = {"cv": cv, "provenance": provenance}
    write_text(json.dumps(summary, indent=2, default=_json_default) + "\n", out / "summary.json")

    spec = cfg.spec()
    args = network_args(cfg, len(spec.channels))
    states = [torch.load(out / "folds" / f"fold-{k}" / "best.pt", map_location="cpu", weights_only=True)
              for k in range(K)]
    short_cv = {name: {s: v[s] for s in ("median", "mean", "sd", "pooled", "folds")} for name, v in cv.items()}
    write_bundle(out / "bundle", bundle_id=cfg.bundle_id, architecture={"name": cfg.arch, "args": args},
                 spec=spec, state_dicts=states, gradcam_layer=GRADCAM_LAYERS[cfg.arch],
                 extra=json.loads(json.dumps({"training": provenance,
                                              "metrics": {"cv": short_cv, "holdout_test": cv["cnn"]["pooled"]}},
                                             default=_json_default)),
                 model_card=model_card(cfg, provenance, cv))
    c = cv["cnn"]
    say_line = (f"CV ({plan.scheme}): balanced accuracy median {c['median']['balanced_accuracy']:.3f}, "
                f"mean {c['mean']['balanced_accuracy']:.3f} ± {_fmt(c['sd']['balanced_accuracy'])}; "
                f"macro F1 median {c['median']['f1_macro']:.3f}\nbundle: {out / 'bundle'} ({K} models)")
    print(say_line, file=sys.stderr, flush=True)
    return summary


def _json_default(v: Any) -> Any:
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, pd.DataFrame):
        return None
    return str(v)


def _data_source(root: Path) -> dict[str, Any] | None:
    """The phantom recipe (``phantom.json``) when the cohort is synthetic, else None."""
    recipe = root / "phantom.json"
    return json.loads(recipe.read_text(encoding="utf-8")) if recipe.is_file() else None


def _fmt(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"


def cv_table(cv: dict[str, Any]) -> str:
    """Markdown table: per model, median and mean ± sd over folds, and the pooled value."""
    head = "| model | metric | median | mean ± sd | pooled |\n|---|---|---|---|---|\n"
    lines = []
    for name, v in cv.items():
        for s in SCALAR_METRICS:
            lines.append(f"| {name} | {s.replace('_', ' ')} | {_fmt(v['median'][s])} | "
                         f"{_fmt(v['mean'][s])} ± {_fmt(v['sd'][s])} | {_fmt(v['pooled'][s])} |")
    return head + "\n".join(lines)


def model_card(cfg: TrainConfig, prov: dict[str, Any], cv: dict[str, Any]) -> str:
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
- Ensemble of the {len(prov['folds'])} fold models of a {prov['cv_scheme']}; predict averages their
  probabilities and reports their spread.
- Input: follow-up registered rigidly to baseline, resampled to {tuple(cfg.size)} voxels of {tuple(cfg.spacing)} mm
  around the brain, z-scored per channel inside the brain.
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

## Limits
Phantom lesions are simple; performance on real MRI is unknown. Labels come from the rating CSV
(for phantoms: the measured change in the enhancing lesions' sum of bidimensional products
against the previous scan).
"""


def _source_line(prov: dict[str, Any]) -> str:
    src = prov.get("data_source")
    return f", generated with `{src['command']}`" if src else ""
