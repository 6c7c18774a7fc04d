"""Tumour segmentation of one timepoint with a segmentation bundle (:mod:`RANOResponseLib.model.segmentation`).

:func:`segment_study`: the study's sequences (on one grid: the output of
:func:`~RANOResponseLib.imaging.registration.align_study`, or a research timepoint) are prepared
by :func:`~RANOResponseLib.imaging.preprocessing.prepare_timepoint` (the one data path of
training and inference), run through the ensemble, turned into labels and put back on the
study's reference grid (:func:`~RANOResponseLib.imaging.preprocessing.labels_to_reference`),
zero outside the brain. Labels: 1 enhancing, 2 necrotic / non-enhancing, 3 edema.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from RANOResponseLib.core.errors import BundleError
from RANOResponseLib.core.names import reference_modality
from RANOResponseLib.imaging.io import Study
from RANOResponseLib.imaging.preprocessing import labels_to_reference, prepare_timepoint
from RANOResponseLib.imaging.registration import brain_mask
from RANOResponseLib.model.segmentation import SegBundle, load_seg_models


@dataclass
class Segmentation:
    """One timepoint's tumour labels and what they came from."""

    image: sitk.Image  # uint8 labels 0..3 on the study's reference grid
    seconds: float
    bundle_id: str
    volumes_ml: dict[str, float]  # label name -> volume

    def as_dict(self) -> dict[str, Any]:
        return {"bundle_id": self.bundle_id, "seconds": round(self.seconds, 3),
                "volumes_ml": {k: round(v, 3) for k, v in self.volumes_ml.items()}}


def _to_layout(x: np.ndarray, layout: str) -> np.ndarray:
    """(C, z, y, x) of our LPS grid -> the network's array layout (see ``model.segmentation.LAYOUTS``)."""
    if layout == "RAS":  # (C, x, y, z), x and y reversed: index increases towards right, anterior
        return np.ascontiguousarray(x.transpose(0, 3, 2, 1)[:, ::-1, ::-1, :])
    return x


def _from_layout(x: np.ndarray, layout: str) -> np.ndarray:
    """The inverse of :func:`_to_layout`."""
    if layout == "RAS":
        return np.ascontiguousarray(x[:, ::-1, ::-1, :].transpose(0, 3, 2, 1))
    return x


def class_scores(outputs: np.ndarray, bundle: SegBundle) -> np.ndarray:
    """Averaged network outputs ``(channels, z, y, x)`` (softmax probabilities or sigmoid
    channels) -> one score per class of ``bundle.labels`` ``(K, z, y, x)`` whose argmax is the label.

    Softmax: the probabilities themselves. Sigmoid: the channels thresholded and mapped to labels
    (the first entry of ``bundle.mapping`` that fits a voxel wins), as 0/1 scores; resampled
    linearly these give a partial-volume boundary on the reference grid.
    """
    if bundle.activation == "softmax":
        return outputs
    on = outputs > bundle.threshold
    label = np.zeros(outputs.shape[1:], np.uint8)
    free = np.ones(outputs.shape[1:], bool)
    for k, entry in enumerate(bundle.mapping, start=1):
        here = free & np.logical_and.reduce([on[c] for c in entry["channels"]])
        for c in entry["minus"]:
            here &= ~on[c]
        label[here] = k  # class index k is bundle.labels[k]
        free &= ~here
    return (label[None] == np.arange(len(bundle.labels), dtype=np.uint8)[:, None, None, None]).astype(np.float32)


def run_models(models: Sequence[torch.nn.Module], array: np.ndarray, bundle: SegBundle,
               device: Any = "cpu") -> np.ndarray:
    """The ensemble's averaged outputs (softmax or sigmoid, per the bundle) for one prepared
    timepoint ``(C, z, y, x)``, as ``(channels, z, y, x)`` float32 on the same grid."""
    x = torch.from_numpy(_to_layout(array, bundle.layout)[None]).to(device)
    total = None
    with torch.inference_mode():
        for model in models:
            logits = model(x)
            if isinstance(logits, (list, tuple)):  # e.g. MONAI's SegResNetVAE: (segmentation, VAE loss)
                logits = logits[0]
            p = torch.softmax(logits, 1) if bundle.activation == "softmax" else torch.sigmoid(logits)
            total = p if total is None else total + p
    assert total is not None
    out = (total / len(models))[0].float().cpu().numpy()
    _check_channels(out.shape[0], bundle)
    return _from_layout(out, bundle.layout)


def _check_channels(n: int, bundle: SegBundle) -> None:
    """The network gives as many channels as the bundle says it maps (softmax: one per label;
    sigmoid: at least those the mapping uses)."""
    if bundle.activation == "softmax":
        ok, need = n == len(bundle.labels), f"{len(bundle.labels)} (one per label)"
    else:
        used = 1 + max(c for e in bundle.mapping for c in (*e["channels"], *e["minus"]))
        ok, need = n >= used, f"at least {used} (the mapping uses them)"
    if not ok:
        where = bundle.meta.get("mapping_file") or bundle.path / "bundle.json"
        raise BundleError(f"{where}: the network gives {n} output channels, the bundle needs {need}")


def remove_small_enhancing(labels: sitk.Image, min_ml: float) -> sitk.Image:
    """Enhancing (label 1) components (26-connected) smaller than ``min_ml`` set to background."""
    if min_ml <= 0:
        return labels
    enhancing = sitk.Equal(labels, 1)
    components = sitk.ConnectedComponent(enhancing, True)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(components)
    small = [c for c in stats.GetLabels() if stats.GetPhysicalSize(c) / 1000.0 < min_ml]
    if not small:
        return labels
    arr = sitk.GetArrayFromImage(labels)
    arr[np.isin(sitk.GetArrayViewFromImage(components), small)] = 0
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(labels)
    return out


def label_volumes(labels: sitk.Image, names: dict[int, str]) -> dict[str, float]:
    """Volume in mL of each named label."""
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    counts = np.bincount(sitk.GetArrayViewFromImage(labels).ravel(), minlength=max(names) + 1)
    return {name: float(counts[v]) * voxel_ml for v, name in sorted(names.items())}


def segment_study(study: Study, brain: sitk.Image | None, bundle: SegBundle, device: Any = "cpu",
                  models: Sequence[torch.nn.Module] | None = None) -> Segmentation:
    """Segment one timepoint: labels (uint8, 1 enhancing, 2 necrotic / non-enhancing, 3 edema) on
    the study's reference grid (its first modality of ``core.names.REFERENCE_ORDER``).

    ``study``: sequences on one grid; ``brain``: its brain mask on that grid (None: the images
    are skull-stripped, their non-zero voxels are the brain); ``models``: already loaded
    (:func:`~RANOResponseLib.model.segmentation.load_seg_models`), else loaded here. Labels
    are zero outside the brain; enhancing components smaller than the bundle's ``min_lesion_ml``
    are removed.
    """
    t = time.perf_counter()
    models = load_seg_models(bundle, device) if models is None else models
    reference = study.images[reference_modality(study.images)]
    brain = brain_mask(reference) if brain is None else brain
    prepared = prepare_timepoint(study, bundle.modalities, bundle.spacing, brain, bundle.normalization,
                                 bundle.clip if bundle.clip is not None else float("inf"))
    scores = class_scores(run_models(models, prepared.array, bundle, device), bundle)
    labels = labels_to_reference(scores, bundle.labels, prepared.grid, reference, brain)
    labels = remove_small_enhancing(labels, bundle.min_lesion_ml)
    return Segmentation(labels, time.perf_counter() - t, bundle.id, label_volumes(labels, bundle.label_names))


# One segmentation bundle kept loaded per process, so a Slicer session, a batch or a training
# run's preprocessing does not reload its weights per case.
_SEG_MODEL_CACHE: dict[str, Any] = {}


def cached_seg_models(bundle: SegBundle, device: Any = "cpu") -> list[torch.nn.Module]:
    """``bundle``'s networks on ``device`` (:func:`~RANOResponseLib.model.segmentation.load_seg_models`),
    loaded once and kept until another bundle or device is asked for."""
    key = (str(bundle.path), tuple(bundle.sha256), str(device))
    if _SEG_MODEL_CACHE.get("key") != key:
        _SEG_MODEL_CACHE["key"], _SEG_MODEL_CACHE["models"] = key, load_seg_models(bundle, device)
    return _SEG_MODEL_CACHE["models"]


def bundle_segmenter(bundle: SegBundle, device: Any = "cpu"):
    """``(study, brain) -> Segmentation`` with ``bundle`` (its networks loaded once): the segmenter
    :func:`~RANOResponseLib.inference.inputs.prepare_inputs` takes for segmentation channels."""
    models = cached_seg_models(bundle, device)
    return lambda study, brain: segment_study(study, brain, bundle, device, models)
