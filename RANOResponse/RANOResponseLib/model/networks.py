"""Networks: MONAI-compatible 3D DenseNets, the 2.5D timm wrapper, and their Grad-CAM layers."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import torch
from torch import nn

# Preset DenseNet configurations. The 121/169/264 presets are MONAI's own (same block configs
# as monai.networks.nets.DenseNet121/169/264); "compact" is small enough to train on a CPU.
# Recorded in full in bundle.json, so `monai.networks.nets.DenseNet(**args)` rebuilds any bundle.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "densenet121": {"init_features": 64, "growth_rate": 32, "block_config": [6, 12, 24, 16]},
    "densenet169": {"init_features": 64, "growth_rate": 32, "block_config": [6, 12, 32, 32]},
    "densenet264": {"init_features": 64, "growth_rate": 32, "block_config": [6, 12, 64, 48]},
    "compact": {"init_features": 16, "growth_rate": 8, "block_config": [4, 8, 6], "bn_size": 2},
    # 2.5D: k axial slices through the model grid's centre (the brain's centre) stacked as the
    # channels of a timm 2D backbone; see Slices25D.
    "timm25d": {"backbone": "resnet18", "slices": 5, "slice_step": 4},
}

# Grad-CAM target per preset: a dense block's output, which is not modified in place (unlike
# features.norm5, whose output the in-place class_layers.relu overwrites; EXPLAIN.md). The
# DenseNets use their last block. For `compact` the first block: on 24 selection pairs the
# shipped ensemble's Grad-CAM peak fell inside tumour + edema in 96% of pairs at denseblock1 and
# 4% at denseblock3, whose 7-voxel maps cannot point at a lesion (Testing/gradcam_layers.py;
# the figures are in rano-compact-phantom-v3's bundle.json, "gradcam_layer_choice").
GRADCAM_LAYERS = {
    "densenet121": "features.denseblock4",
    "densenet169": "features.denseblock4",
    "densenet264": "features.denseblock4",
    "compact": "features.denseblock1",
    "timm25d": "cam",
}


def architecture_args(name: str, in_channels: int, out_channels: int, **overrides: Any) -> dict[str, Any]:
    """Full constructor arguments for a preset, as recorded in ``bundle.json``."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r} (known: {', '.join(ARCHITECTURES)})")
    args = {"spatial_dims": 3, "in_channels": in_channels, "out_channels": out_channels,
            **ARCHITECTURES[name], **overrides}
    return args


def build_network(name: str, backend: str = "native", **args: Any) -> nn.Module:
    """Build a 3D DenseNet from a preset name and its recorded arguments.

    ``backend="monai"`` builds ``monai.networks.nets.DenseNet`` itself; the default ``native``
    builds :class:`DenseNet3D`, which has the same modules, parameter names and outputs.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r} (known: {', '.join(ARCHITECTURES)})")
    if name == "timm25d":
        return Slices25D(**args)
    args = dict(args)
    args["block_config"] = tuple(args.get("block_config", ARCHITECTURES[name]["block_config"]))
    if backend == "monai":
        from monai.networks.nets import DenseNet

        return DenseNet(**args)
    if backend != "native":
        raise ValueError(f"unknown backend {backend!r}")
    return DenseNet3D(**args)


# Why a re-statement of monai.networks.nets.DenseNet: `import monai` imports all of MONAI
# (about 6 s on 2 CPU cores, a third of our 20 s end-to-end budget, paid again by every
# inference subprocess Slicer starts). This class builds the very same modules under the very
# same names (a MONAI state_dict loads into it and vice versa; Testing/test_model.py checks
# that both give identical outputs), restricted to what bundles use: 3D, batch norm, ReLU.


class _DenseLayer(nn.Module):
    def __init__(self, in_channels: int, growth_rate: int, bn_size: int, dropout_prob: float) -> None:
        super().__init__()
        mid = bn_size * growth_rate
        self.layers = nn.Sequential(OrderedDict([
            ("norm1", nn.BatchNorm3d(in_channels)),
            ("relu1", nn.ReLU(inplace=True)),
            ("conv1", nn.Conv3d(in_channels, mid, kernel_size=1, bias=False)),
            ("norm2", nn.BatchNorm3d(mid)),
            ("relu2", nn.ReLU(inplace=True)),
            ("conv2", nn.Conv3d(mid, growth_rate, kernel_size=3, padding=1, bias=False)),
        ]))
        if dropout_prob > 0:
            self.layers.add_module("dropout", nn.Dropout3d(dropout_prob))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.layers(x)], 1)


class DenseNet3D(nn.Module):
    """3D DenseNet (Huang et al. 2017) with MONAI's module layout: ``features`` (conv0, norm0,
    relu0, pool0, denseblockN/denselayerM, transitionN, norm5) and ``class_layers``."""

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 4,
        init_features: int = 64,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        bn_size: int = 4,
        dropout_prob: float = 0.0,
    ) -> None:
        super().__init__()
        if spatial_dims != 3:
            raise ValueError("DenseNet3D is 3D only; use backend='monai' for other dimensions")
        self.features = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv3d(in_channels, init_features, kernel_size=7, stride=2, padding=3, bias=False)),
            ("norm0", nn.BatchNorm3d(init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool3d(kernel_size=3, stride=2, padding=1)),
        ]))
        ch = init_features
        for i, n_layers in enumerate(block_config):
            block = nn.Sequential()
            for j in range(n_layers):
                block.add_module(f"denselayer{j + 1}", _DenseLayer(ch + j * growth_rate, growth_rate, bn_size, dropout_prob))
            self.features.add_module(f"denseblock{i + 1}", block)
            ch += n_layers * growth_rate
            if i == len(block_config) - 1:
                self.features.add_module("norm5", nn.BatchNorm3d(ch))
            else:
                self.features.add_module(f"transition{i + 1}", nn.Sequential(OrderedDict([
                    ("norm", nn.BatchNorm3d(ch)),
                    ("relu", nn.ReLU(inplace=True)),
                    ("conv", nn.Conv3d(ch, ch // 2, kernel_size=1, bias=False)),
                    ("pool", nn.AvgPool3d(kernel_size=2, stride=2)),
                ])))
                ch //= 2
        self.class_layers = nn.Sequential(OrderedDict([
            ("relu", nn.ReLU(inplace=True)),
            ("pool", nn.AdaptiveAvgPool3d(1)),
            ("flatten", nn.Flatten(1)),
            ("out", nn.Linear(ch, out_channels)),
        ]))
        for m in self.modules():  # MONAI's initialisation
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.class_layers(self.features(x))


class _Lift3D(nn.Module):
    """(B, F, h, w) -> (B, F, 1, h, w): lets the 3D Grad-CAM code treat 2D features as a slab."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(2)


class Slices25D(nn.Module):
    """2.5D classifier: ``slices`` axial slices, ``slice_step`` voxels apart, centred on the model
    grid's middle slice (the grid is centred on the brain), with all their channels stacked,
    through a timm 2D CNN (``timm.create_model(backbone, in_chans=C * slices)``).

    It takes the same (B, C, z, y, x) input as the 3D networks, so bundles, ``predict`` and the
    maps work unchanged; Grad-CAM uses the backbone's last feature map (module ``cam``), spread
    over the slab's depth.
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 8, out_channels: int = 4,
                 backbone: str = "resnet18", slices: int = 5, slice_step: int = 4,
                 pretrained_file: str | None = None, **timm_args: Any) -> None:
        super().__init__()
        import timm  # optional dependency: only 2.5D bundles need it

        self.slices, self.slice_step = int(slices), int(slice_step)
        kwargs: dict[str, Any] = dict(in_chans=in_channels * self.slices, num_classes=out_channels, **timm_args)
        if pretrained_file:  # transfer learning from a local weights file only (never downloads)
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(pretrained_file)})
        self.net = timm.create_model(backbone, **kwargs)
        self.cam = _Lift3D()

    def slice_index(self, depth: int) -> torch.Tensor:
        offsets = (torch.arange(self.slices) - (self.slices - 1) / 2) * self.slice_step
        return (depth // 2 + offsets).round().long().clamp(0, depth - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, z, y, w = x.shape
        x2 = x[:, :, self.slice_index(z).to(x.device)].reshape(b, c * self.slices, y, w)
        feat = self.net.forward_features(x2)
        if feat.ndim != 4:
            raise ValueError("Slices25D needs a CNN backbone with (B, F, h, w) features")
        return self.net.forward_head(self.cam(feat).squeeze(2))
