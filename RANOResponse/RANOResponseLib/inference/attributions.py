"""Class probabilities, saliency and Grad-CAM from one forward and one backward pass.

Captum's ``Saliency`` and ``LayerGradCam`` each run their own forward and backward pass, which
triples the cost of the maps (the reference study's separate passes cost 7.8x a prediction).
Both maps need only the gradient of the same class score, with respect to the input (saliency)
and to the target layer's activations (Grad-CAM), so we take both from a single
``torch.autograd.grad`` call. The formulas are Captum's: saliency is ``|d score / d input|``
(reduced over channels by max); Grad-CAM is ``ReLU(sum_k mean(dS/dA_k) * A_k)`` upsampled
trilinearly (not nearest, Captum's default) to the input size.

The forward hook that captures the activations is registered for one call and always removed
(MONAI's GradCAM never removes its hooks, which leaks in a long Slicer session).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Prediction:
    """Ensemble-averaged probabilities; maps on the model grid, (z, y, x), scaled to [0, 1]."""

    probabilities: np.ndarray  # (n_classes,)
    spread: np.ndarray  # (n_classes,) std over ensemble members (0 for a single model)
    target: int  # the class the maps explain (the predicted one)
    saliency: np.ndarray | None = None
    gradcam: np.ndarray | None = None
    raw_max: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    # each member's probabilities (n_models, n_classes), for per-member calibration
    members: np.ndarray | None = None
    # set by inference.calibration.apply_calibration: the network's own mean probabilities (when
    # ``probabilities`` were calibrated) and whether the prediction is uncertain
    uncalibrated: np.ndarray | None = None
    uncertain: dict | None = None


@contextlib.contextmanager
def capture_activation(model: torch.nn.Module, layer: str) -> Iterator[list[torch.Tensor]]:
    """Record ``layer``'s output during the block; the hook is removed on exit, always."""
    module = dict(model.named_modules()).get(layer)
    if module is None:
        raise KeyError(f"layer {layer!r} not found in {type(model).__name__}")
    store: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: store.append(out))
    try:
        yield store
    finally:
        handle.remove()


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """float16 autocast on CUDA, nothing elsewhere (the one place that policy is set)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def predict(models: Sequence[torch.nn.Module], x: torch.Tensor) -> Prediction:
    """Probabilities only (no gradients): the cheap path."""
    device = x.device
    t0 = time.perf_counter()
    with torch.inference_mode(), autocast(device):
        probs = torch.stack([F.softmax(m(x).float(), dim=1)[0] for m in models])
    _sync(device)
    mean = probs.mean(0).cpu().numpy()
    spread = probs.std(0, unbiased=False).cpu().numpy()
    return Prediction(mean, spread, int(mean.argmax()),
                      timings={"inference": time.perf_counter() - t0}, members=probs.cpu().numpy())


def predict_with_maps(
    models: Sequence[torch.nn.Module], x: torch.Tensor, layer: str, target: int | None = None
) -> Prediction:
    """Probabilities plus saliency and Grad-CAM for ``target`` (default: the predicted class).

    One forward pass per ensemble member builds the graph; one backward pass through all of
    them gives the gradients for both maps. Maps are averaged over members.
    """
    device = x.device
    x = x.detach().clone().requires_grad_(True)
    t0 = time.perf_counter()
    logits, acts = [], []
    with torch.enable_grad(), autocast(device):
        for m in models:
            with capture_activation(m, layer) as store:
                logits.append(m(x).float()[0])
            acts.append(store[-1])
    probs = torch.stack([F.softmax(lg, dim=0) for lg in logits]).detach()
    mean = probs.mean(0)
    tgt = int(mean.argmax()) if target is None else int(target)
    _sync(device)
    t1 = time.perf_counter()
    score = torch.stack([lg[tgt] for lg in logits]).sum()
    grads = torch.autograd.grad(score, [x, *acts])
    grad_x, grad_acts = grads[0], grads[1:]
    with torch.no_grad():
        saliency = grad_x[0].abs().amax(dim=0) / len(models)
        cams = []
        for a, g in zip(acts, grad_acts):
            a, g = a.float(), g.float()
            weights = g.mean(dim=tuple(range(2, g.ndim)), keepdim=True)
            cams.append(F.relu((weights * a).sum(dim=1, keepdim=True)))
        cam = torch.stack(cams).mean(0)
        cam = F.interpolate(cam, size=x.shape[2:], mode="trilinear", align_corners=False)[0, 0]
        sal_np, cam_np = saliency.cpu().numpy(), cam.cpu().numpy()
    _sync(device)
    t2 = time.perf_counter()
    raw = {"saliency": float(sal_np.max()), "gradcam": float(cam_np.max())}
    return Prediction(
        probabilities=mean.cpu().numpy(),
        spread=probs.std(0, unbiased=False).cpu().numpy(),
        target=tgt,
        saliency=_unit(sal_np),
        gradcam=_unit(cam_np),
        raw_max=raw,
        timings={"inference": t1 - t0, "attributions": t2 - t1},
        members=probs.cpu().numpy(),
    )


def _unit(a: np.ndarray) -> np.ndarray:
    """Scale a non-negative map to [0, 1] for display (an all-zero map stays zero)."""
    a = np.asarray(a, dtype=np.float32)
    peak = float(a.max())
    return a / peak if peak > 0 else a
