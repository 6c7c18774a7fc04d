"""Probabilities, saliency and Grad-CAM from one forward and one backward pass.

Guards RANOResponseLib.attributions: predict_with_maps gives the same probabilities as predict,
maps of the model-grid shape scaled to [0, 1], the formulas of Captum's Saliency and LayerGradCam
(trilinear), exactly one forward and one backward pass per ensemble member, no hooks left
behind (also after an error), ensemble averaging, and maps that follow the evidence.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from captum import attr as captum_attr
from RANOResponseLib.inference.attributions import Prediction, capture_activation, predict, predict_with_maps
from torch import nn


def _all_forward_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def x(prepared) -> torch.Tensor:
    """The phantom pair on the tiny model grid, batch of one: (1, 8, 32, 32, 32)."""
    return torch.from_numpy(prepared.array[None]).float()


# ---------------------------------------------------------------------------- basic contract


def test_probabilities_match_predict(tiny_models, x):
    """Same probabilities as the cheap path (to 1e-5), summing to 1, target = argmax, no spread."""
    bundle, models = tiny_models
    cheap = predict(models, x)
    full = predict_with_maps(models, x, bundle.gradcam_layer)
    assert isinstance(full, Prediction)
    assert full.probabilities.shape == (len(bundle.class_names),)
    assert full.probabilities.sum() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(full.probabilities, cheap.probabilities, rtol=0, atol=1e-5)
    assert full.target == cheap.target == int(np.argmax(full.probabilities))
    np.testing.assert_array_equal(full.spread, np.zeros(4, np.float32))
    assert set(full.timings) >= {"inference", "attributions"}
    assert all(v >= 0 for v in full.timings.values())


def test_maps_shape_range_and_content(tiny_models, x):
    """Both maps: model-grid (z, y, x) shape, finite, within [0, 1], peak exactly 1 (not all zero)."""
    bundle, models = tiny_models
    pred = predict_with_maps(models, x, bundle.gradcam_layer)
    for name in ("saliency", "gradcam"):
        m = getattr(pred, name)
        assert m.shape == tuple(reversed(bundle.spec.size)) == tuple(x.shape[2:]), name
        assert np.isfinite(m).all(), name
        assert m.min() >= 0 and m.max() == pytest.approx(1.0), name
        assert (m > 0).mean() > 0.01, f"{name} is almost empty"
        assert pred.raw_max[name] > 0
    # the input has a zero background: saliency there comes only through the convolutions,
    # but it must not be uniform
    assert pred.saliency.std() > 0 and pred.gradcam.std() > 0


def test_models_left_untouched(tiny_models, x):
    """No parameter gradients accumulated, eval mode kept, weights unchanged, repeatable output."""
    bundle, models = tiny_models
    before = {k: v.clone() for k, v in models[0].state_dict().items()}
    a = predict_with_maps(models, x, bundle.gradcam_layer)
    b = predict_with_maps(models, x, bundle.gradcam_layer)
    assert all(p.grad is None for p in models[0].parameters())
    assert not models[0].training
    for k, v in models[0].state_dict().items():
        assert torch.equal(v, before[k]), k
    np.testing.assert_array_equal(a.probabilities, b.probabilities)
    np.testing.assert_allclose(a.gradcam, b.gradcam, atol=1e-6)
    assert not x.requires_grad  # the caller's tensor is not turned into a leaf needing grad


def test_explicit_target(tiny_models, x):
    """target= explains the requested class: same probabilities, other maps."""
    bundle, models = tiny_models
    default = predict_with_maps(models, x, bundle.gradcam_layer)
    other = (default.target + 1) % 4
    pred = predict_with_maps(models, x, bundle.gradcam_layer, target=other)
    assert pred.target == other
    np.testing.assert_allclose(pred.probabilities, default.probabilities, atol=1e-6)
    assert not np.allclose(pred.saliency, default.saliency)


def test_same_maps_as_captum(tiny_models, x):
    """Saliency = Captum Saliency(abs) reduced by max over channels; Grad-CAM = Captum LayerGradCam
    (relu_attributions) upsampled trilinearly; both compared after scaling to [0, 1]."""
    bundle, models = tiny_models
    model = models[0]
    pred = predict_with_maps(models, x, bundle.gradcam_layer)
    t = pred.target

    sal = captum_attr.Saliency(model).attribute(x.clone(), target=t, abs=True)[0].amax(0).detach().numpy()
    layer = dict(model.named_modules())[bundle.gradcam_layer]
    cam = captum_attr.LayerGradCam(model, layer).attribute(x.clone(), target=t, relu_attributions=True)
    cam = captum_attr.LayerAttribution.interpolate(cam, tuple(x.shape[2:]), interpolate_mode="trilinear")
    cam = cam[0, 0].detach().numpy()
    np.testing.assert_allclose(pred.saliency, sal / sal.max(), atol=1e-4)
    np.testing.assert_allclose(pred.gradcam, cam / cam.max(), atol=1e-4)
    assert _all_forward_hooks(model) == 0


# ------------------------------------------------------------------------------- pass counting


def test_one_forward_and_one_backward_per_member(ensemble_models, x, monkeypatch):
    """Exactly one forward per ensemble member and one backward (a single autograd.grad call,
    reaching each member's first convolution once); Captum-style extra passes would show here."""
    bundle, models = ensemble_models
    forwards = [0] * len(models)
    backwards = [0] * len(models)
    handles = []
    for i, m in enumerate(models):
        handles.append(m.register_forward_hook(lambda *_a, i=i: forwards.__setitem__(i, forwards[i] + 1)))
        handles.append(m.features.conv0.register_full_backward_hook(
            lambda *_a, i=i: backwards.__setitem__(i, backwards[i] + 1)))
    grad_calls, backward_calls = [], []
    real_grad, real_backward = torch.autograd.grad, torch.autograd.backward

    def counting_grad(*a, **k):
        grad_calls.append(1)
        return real_grad(*a, **k)

    def counting_backward(*a, **k):
        backward_calls.append(1)
        return real_backward(*a, **k)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    monkeypatch.setattr(torch.autograd, "backward", counting_backward)
    try:
        pred = predict_with_maps(models, x, bundle.gradcam_layer)
    finally:
        for h in handles:
            h.remove()
    assert forwards == [1, 1]
    assert backwards == [1, 1]
    assert len(grad_calls) == 1
    assert backward_calls == []
    assert pred.saliency is not None and pred.gradcam is not None


# ------------------------------------------------------------------------------------- hooks


def test_no_hooks_left_after_call(tiny_models, x):
    """The activation hook lives for one call only (MONAI's GradCAM leaks them)."""
    bundle, models = tiny_models
    layer = dict(models[0].named_modules())[bundle.gradcam_layer]
    before = _all_forward_hooks(models[0])
    for _ in range(2):
        predict_with_maps(models, x, bundle.gradcam_layer)
    assert len(layer._forward_hooks) == 0
    assert _all_forward_hooks(models[0]) == before == 0


def test_no_hooks_left_after_error(tiny_models, x):
    """A forward pass that fails inside the hooked block still removes the hook."""
    bundle, models = tiny_models
    layer = dict(models[0].named_modules())[bundle.gradcam_layer]
    wrong = torch.zeros(1, 3, 32, 32, 32)  # 3 channels instead of 8
    with pytest.raises(RuntimeError):
        predict_with_maps(models, wrong, bundle.gradcam_layer)
    assert len(layer._forward_hooks) == 0
    with pytest.raises(ZeroDivisionError):
        with capture_activation(models[0], bundle.gradcam_layer) as store:
            models[0](x)
            assert len(store) == 1 and len(layer._forward_hooks) == 1
            raise ZeroDivisionError
    assert len(layer._forward_hooks) == 0
    with pytest.raises(KeyError):
        with capture_activation(models[0], "features.nope"):
            pass


# ---------------------------------------------------------------------------------- ensemble


def test_ensemble_mean_and_spread(ensemble_models, x):
    """Ensemble probabilities are the mean of the members', the spread their (population) std > 0."""
    bundle, models = ensemble_models
    members = np.stack([predict([m], x).probabilities for m in models])
    assert not np.allclose(members[0], members[1], atol=1e-4)  # different weights, different opinions
    for pred in (predict(models, x), predict_with_maps(models, x, bundle.gradcam_layer)):
        np.testing.assert_allclose(pred.probabilities, members.mean(0), atol=1e-5)
        np.testing.assert_allclose(pred.spread, members.std(0), atol=1e-5)
        assert pred.spread.max() > 0
        assert pred.probabilities.sum() == pytest.approx(1.0, abs=1e-5)
        assert pred.target == int(np.argmax(members.mean(0)))


def test_ensemble_maps_combine_members(ensemble_models, x):
    """Ensemble Grad-CAM is the average of the members' (before scaling): not just member 0's."""
    bundle, models = ensemble_models
    both = predict_with_maps(models, x, bundle.gradcam_layer)
    t = both.target
    singles = [predict_with_maps([m], x, bundle.gradcam_layer, target=t) for m in models]
    raw = [s.gradcam * s.raw_max["gradcam"] for s in singles]
    mean = (raw[0] + raw[1]) / 2
    np.testing.assert_allclose(both.gradcam, mean / mean.max(), atol=1e-4)
    assert both.gradcam.shape == tuple(x.shape[2:])


# --------------------------------------------------------------------- maps follow the evidence


class EvidenceNet(nn.Module):
    """A hand-made network whose class scores depend on known voxels.

    features.conv0: 3x3x3 box filter, input channel i -> feature i; features.act: ReLU;
    features.pool: 2x average pooling (the Grad-CAM layer, half resolution).
    Head: features times a fixed spatial ``mask`` (half resolution), averaged, then a linear layer
    with class 0 = +feature 0, class 1 = +feature 1, classes 2, 3 = their negatives.
    """

    def __init__(self, size: int = 32, mask: torch.Tensor | None = None) -> None:
        super().__init__()
        conv = nn.Conv3d(2, 2, 3, padding=1, bias=False)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[0, 0] = 1 / 27
            conv.weight[1, 1] = 1 / 27
        self.features = nn.Sequential(OrderedDict([("conv0", conv), ("act", nn.ReLU()),
                                                   ("pool", nn.AvgPool3d(2))]))
        half = size // 2
        self.register_buffer("mask", torch.ones(1, 1, half, half, half) if mask is None else mask)
        self.out = nn.Linear(2, 4, bias=False)
        with torch.no_grad():
            self.out.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]) * 50)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.features(x) * self.mask
        return self.out(a.mean(dim=(2, 3, 4)))


def _box(shape, lo, hi) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return m


def test_gradcam_follows_class_evidence():
    """Evidence for class 0 is a blob in channel 0 (region A), for class 1 a blob in channel 1
    (region B): Grad-CAM for class 0 peaks in A, for class 1 in B, and is small in the other."""
    rng = np.random.default_rng(0)
    shape = (32, 32, 32)
    a = _box(shape, (4, 18, 6), (12, 26, 14))
    b = _box(shape, (20, 4, 20), (28, 12, 28))
    x = 0.05 * rng.random((1, 2, *shape)).astype(np.float32)
    x[0, 0][a] += 1.0
    x[0, 1][b] += 1.0
    x = torch.from_numpy(x)
    net = EvidenceNet()
    for target, inside, outside in ((0, a, b), (1, b, a)):
        pred = predict_with_maps([net], x, "features.pool", target=target)
        cam = pred.gradcam
        peak = np.unravel_index(int(np.argmax(cam)), shape)
        assert inside[peak], f"class {target}: Grad-CAM peak {peak} outside its evidence"
        assert cam[outside].mean() < 0.2 * cam[inside].mean()
        sal = pred.saliency
        assert sal[inside].mean() > 0


def test_saliency_follows_the_only_region_the_score_reads():
    """The class score reads only region R (a spatial mask in the head); a much brighter blob
    elsewhere is ignored: saliency is exactly 0 away from R, and peaks inside R."""
    rng = np.random.default_rng(1)
    shape = (32, 32, 32)
    mask = torch.zeros(1, 1, 16, 16, 16)
    mask[..., 3:7, 9:13, 4:8] = 1.0  # half-resolution region R
    r_full = _box(shape, (6, 18, 8), (14, 26, 16))
    r_near = _box(shape, (5, 17, 7), (15, 27, 17))  # R plus the box filter's reach
    distractor = _box(shape, (20, 2, 20), (28, 10, 28))
    x = 0.2 + 0.3 * rng.random((1, 2, *shape)).astype(np.float32)
    x[0, :, distractor] += 5.0
    net = EvidenceNet(mask=mask)
    pred = predict_with_maps([net], torch.from_numpy(x), "features.pool", target=0)
    sal = pred.saliency
    peak = np.unravel_index(int(np.argmax(sal)), shape)
    assert r_near[peak]
    assert np.all(sal[~r_near] == 0)
    assert np.all(sal[distractor] == 0)
    assert sal[r_full].min() > 0
