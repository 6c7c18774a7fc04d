"""One fold's training: the epoch loop, its sample order, distributed data parallel, checkpoints.

Each fold trains one network (AdamW, class-weighted cross entropy and/or a class-weighted
sampler, MONAI augmentation, CUDA autocast), checkpointing every epoch atomically; a killed run
restarted with ``--resume`` continues the current fold from its last epoch, with the very numbers
the uninterrupted run would have produced (every random draw is seeded from seed, fold, epoch and
position, never from the order things happened in).

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
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.files import atomic_file, write_text
from RANOResponseLib.core.names import CLASS_NAMES
from RANOResponseLib.inference.attributions import autocast
from RANOResponseLib.model.device import resolve_device
from RANOResponseLib.model.networks import architecture_args, build_network
from tqdm import tqdm

from ResponseTrainingLib.analysis.metrics import classification_metrics
from ResponseTrainingLib.data.dataset import EpochView, augmenter, item_seed, stacked
from ResponseTrainingLib.training.config import TrainConfig
from ResponseTrainingLib.training.folds import class_weights

# ------------------------------------------------------------------------ distributed helpers


@dataclass
class DistContext:
    """This process's place in a DDP group (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Process 0: the one that writes files and prints."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every process of the group (nothing to wait for when alone)."""
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
    """A freshly initialised network (timm25d: from the local pretrained file when given)."""
    if cfg.arch == "timm25d" and cfg.pretrained_weights:
        return build_network("timm25d", **args, pretrained_file=str(cfg.pretrained_weights))
    return build_network(cfg.arch, **args)


Emit = Callable[[dict[str, Any]], None]  # one progress event (a --progress-json line)


@dataclass
class FoldData:
    """A fold's number and its training, validation and test pair indices."""

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

    aug = augmenter(cfg.spec()) if cfg.augment else None
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
              "val_balanced_accuracy": _best_val_balanced_accuracy(state),
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


def _best_val_balanced_accuracy(state: dict[str, Any]) -> float:
    """The validation balanced accuracy of the chosen (best) epoch."""
    rows = [r for r in state["history"] if int(r["epoch"]) == int(state["best_epoch"])]
    return float(rows[-1]["val_balanced_accuracy"]) if rows else 0.0


def finished_fold(fold_dir: Path, key: str) -> dict[str, Any] | None:
    """The fold record if this fold finished with the same settings, else None."""
    f = fold_dir / "fold.json"
    if not (f.is_file() and (fold_dir / "best.pt").is_file() and (fold_dir / "predictions.csv").is_file()):
        return None
    rec = json.loads(f.read_text(encoding="utf-8"))
    return rec if rec.get("result_key") == key else None

