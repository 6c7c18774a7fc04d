"""Networks and device selection.

Guards RANOResponseLib.model: the native DenseNet3D (kept to avoid importing MONAI at inference)
is interchangeable with monai.networks.nets.DenseNet (same state_dict, identical outputs, weights
load both ways), and resolve_device turns --device strings into devices or clear DeviceErrors.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_state_dicts
from monai.networks.nets import DenseNet
from RANOResponseLib.core.errors import DeviceError, RANOInputError
from RANOResponseLib.model.device import choose_device, gpu_choices, resolve_device
from RANOResponseLib.model.networks import (
    ARCHITECTURES,
    GRADCAM_LAYERS,
    DenseNet3D,
    architecture_args,
    build_network,
)

CUDA = torch.cuda.is_available()


def _randomise_bn(net: torch.nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm statistics, so eval-mode outputs exercise every normalisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)


# ------------------------------------------------------------------------ DenseNet3D == MONAI


@pytest.mark.parametrize("preset", ["compact", "densenet121"])
def test_same_state_dict_layout_as_monai(preset):
    """Same parameter and buffer names, in the same order, with the same shapes."""
    args = architecture_args(preset, 6, 4)
    native = build_network(preset, **args)
    monai = build_network(preset, backend="monai", **args)
    assert isinstance(native, DenseNet3D)
    assert isinstance(monai, DenseNet)
    ns, ms = native.state_dict(), monai.state_dict()
    assert list(ns) == list(ms)
    assert {k: tuple(v.shape) for k, v in ns.items()} == {k: tuple(v.shape) for k, v in ms.items()}
    assert GRADCAM_LAYERS[preset] in dict(native.named_modules())
    assert GRADCAM_LAYERS[preset] in dict(monai.named_modules())


def test_identical_outputs_both_directions():
    """Eval-mode outputs are identical for the same weights, whichever way the weights travel."""
    args = architecture_args("compact", 8, 4)
    x = torch.randn(2, 8, 32, 32, 32, generator=torch.Generator().manual_seed(0))

    native = build_network("compact", **args)
    _randomise_bn(native, 1)
    monai = DenseNet(**{**args, "block_config": tuple(args["block_config"])})
    monai.load_state_dict(native.state_dict(), strict=True)  # native -> MONAI
    native.eval(), monai.eval()
    with torch.no_grad():
        a, b = native(x), monai(x)
    assert a.shape == (2, 4)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)

    monai2 = build_network("compact", backend="monai", **args)
    _randomise_bn(monai2, 2)
    native2 = DenseNet3D(**args)
    native2.load_state_dict(monai2.state_dict(), strict=True)  # MONAI -> native
    native2.eval(), monai2.eval()
    with torch.no_grad():
        c, d = native2(x), monai2(x)
    torch.testing.assert_close(c, d, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(a, c)  # two different networks really were compared


def test_bundle_weights_run_in_monai(tiny_models):
    """A bundle's recorded architecture args rebuild it in MONAI (bundle.json promise)."""
    bundle, models = tiny_models
    args = dict(bundle.architecture["args"])
    args["block_config"] = tuple(args["block_config"])
    monai = DenseNet(**args)
    monai.load_state_dict(models[0].state_dict(), strict=True)
    monai.eval()
    x = torch.randn(1, bundle.in_channels, *reversed(bundle.spec.size), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(models[0](x), monai(x), rtol=1e-6, atol=1e-6)


def test_architecture_args_and_errors():
    """Presets expand to full constructor args; unknown names and backends are ValueErrors."""
    args = architecture_args("compact", 8, 4, dropout_prob=0.1)
    assert args["in_channels"] == 8 and args["out_channels"] == 4 and args["spatial_dims"] == 3
    assert args["block_config"] == ARCHITECTURES["compact"]["block_config"]
    assert args["dropout_prob"] == 0.1
    with pytest.raises(ValueError):
        architecture_args("resnet18", 8, 4)
    with pytest.raises(ValueError):
        build_network("resnet18", in_channels=8, out_channels=4)
    with pytest.raises(ValueError):
        build_network("compact", backend="onnx", **architecture_args("compact", 8, 4))


def test_random_state_dicts_differ():
    """Sanity for the test helper: different ensemble members really have different weights."""
    a, b = random_state_dicts(2, 8, seed=0)
    assert not torch.equal(a["features.conv0.weight"], b["features.conv0.weight"])


# ----------------------------------------------------------------------------- resolve_device


@pytest.fixture
def no_cuda(monkeypatch):
    """Pretend there is no CUDA device, whatever the machine has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def one_cuda(monkeypatch):
    """Pretend there is exactly one CUDA device (index logic only; nothing is allocated)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (6 * 2**30, 8 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Fake GPU")


@pytest.mark.parametrize("spec", ["cpu", "CPU", " cpu "])
def test_cpu(spec):
    """'cpu' (any case, surrounding spaces) is the CPU, without a notice."""
    notices = []
    assert resolve_device(spec, notices.append) == torch.device("cpu")
    assert notices == []


@pytest.mark.parametrize("spec", ["auto", "AUTO", "", None])
def test_auto_falls_back_to_cpu_with_notice(no_cuda, spec):
    """'auto' (and an empty value, which means auto) without CUDA runs on the CPU and says so once."""
    notices = []
    assert resolve_device(spec, notices.append) == torch.device("cpu")
    assert len(notices) == 1
    assert "cpu" in notices[0].lower() and "cuda" in notices[0].lower()


def test_auto_notice_goes_to_stderr_by_default(no_cuda, capsys):
    """Without a callback the fallback notice is printed on stderr (stdout stays clean)."""
    assert resolve_device("auto") == torch.device("cpu")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "notice" in captured.err.lower() and captured.err.count("\n") == 1


def test_auto_prefers_cuda(one_cuda):
    """'auto' picks the CUDA device when there is one, silently."""
    notices = []
    assert resolve_device("auto", notices.append) == torch.device("cuda", 0)
    assert notices == []


@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "CUDA:0"])
def test_cuda_requested_but_absent(no_cuda, spec):
    """Asking for CUDA on a machine without it is a DeviceError naming the --device value."""
    with pytest.raises(DeviceError) as info:
        resolve_device(spec, lambda m: None)
    assert spec in str(info.value)
    assert isinstance(info.value, RANOInputError)


@pytest.mark.skipif(CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_cuda_absent_on_this_machine(spec):
    """The same, against the real torch.cuda of this CUDA-less machine (no monkeypatching)."""
    with pytest.raises(DeviceError, match="CUDA"):
        resolve_device(spec)


def test_cuda_index_checked(one_cuda):
    """cuda:0 exists on a one-GPU machine, cuda:1 does not."""
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match="cuda:1"):
        resolve_device("cuda:1")


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cuda:-1", "cuda0", "mps", "tpu", "0"])
def test_unknown_device_strings(no_cuda, spec):
    """Anything else is a DeviceError that names the value (never a silent CPU fallback)."""
    with pytest.raises(DeviceError) as info:
        resolve_device(spec, lambda m: None)
    assert spec in str(info.value)


def test_auto_falls_back_when_gpu_memory_is_short(one_cuda, monkeypatch):
    """'auto' with a GPU that has too little free memory runs on the CPU and says how much was free."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (int(0.5 * 2**30), 8 * 2**30))
    device, notice = choose_device("auto", needed_gib=2.0)
    assert device == "cpu" and "0.5 GiB free" in notice


def test_explicit_gpu_short_of_memory_is_kept_with_a_warning(one_cuda, monkeypatch):
    """An explicitly chosen GPU is used even when memory looks short (the user asked), with a warning."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (int(0.5 * 2**30), 8 * 2**30))
    device, warning = choose_device("cuda:0", needed_gib=2.0)
    assert device == "cuda:0" and "0.5 GiB free" in warning


def test_one_policy_for_the_gui_and_the_cli(no_cuda):
    """The Slicer menu path (choose_device) and the CLI path (resolve_device) agree: an explicit
    absent GPU is an error in both, auto falls back with a notice in both."""
    with pytest.raises(DeviceError):
        choose_device("cuda:0")
    with pytest.raises(DeviceError):
        resolve_device("cuda:0")
    device, notice = choose_device("auto")
    assert device == "cpu" and "no CUDA" in notice
    assert [c for c, _ in gpu_choices()] == ["auto", "cpu"]


def test_menu_lists_each_gpu_with_free_memory(one_cuda):
    choices = gpu_choices()
    assert [c for c, _ in choices] == ["auto", "cuda:0", "cpu"]
    assert "6.0 of 8.0 GiB free" in choices[1][1]
