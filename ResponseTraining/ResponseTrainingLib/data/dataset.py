"""Preprocessed case pairs, cached on disk so an epoch never redoes registration.

Each pair goes through the clinical module's own path (:func:`~RANOResponseLib.imaging.studies.load_study`
-> :func:`~RANOResponseLib.inference.inputs.prepare_inputs`: brain masks, sequences aligned, the
follow-up registered, cut to the brain, resampled and z-scored inside it, exactly as
``rano-response predict`` does); the resulting (C, z, y, x) array is stored as float16 ``.npy``
under a key that includes the input spec and the preparation's version, written atomically, with
the pair's description (brain volumes, slice thickness, registration quality, intensities inside
the brain) beside it as ``.json``. A cohort is preprocessed once and shared by every fold (and by
later runs pointed at the same ``--cache``); the descriptions become the bundle's
``input_statistics`` (:func:`input_statistics`), which predict's input guard compares with.

The cached arrays are served through MONAI's ``CacheDataset`` (loaded once into memory);
augmentation runs on top of it per item in :class:`EpochView`, with a random state derived from
(seed, fold, epoch, position), so the draws do not depend on which process or in which order an
item is loaded: a resumed run and a DDP run see exactly what a plain run sees.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from RANOResponseLib.core.files import atomic_file, write_text
from RANOResponseLib.datasets.lumiere import Pair, build_pairs
from RANOResponseLib.imaging.preprocessing import InputSpec
from RANOResponseLib.imaging.studies import load_study
from RANOResponseLib.inference import guard
from RANOResponseLib.inference.inputs import prepare_inputs
from RANOResponseLib.model.bundle import read_bundle, set_input_statistics
from tqdm import tqdm

# The preparation's version, part of the cache key: arrays an older preparation cached are not
# reused (v2: brain masks, sequences aligned, registration from the brains' principal axes).
PREPARATION = "brain-mask-v2"


def spec_key(spec: InputSpec) -> str:
    """Cache folder name: a hash of everything in the input spec and the preparation's version."""
    blob = json.dumps({"spec": asdict(spec), "preparation": PREPARATION}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def preprocess_pair(pair: Pair, spec: InputSpec, device: Any = "cpu") -> tuple[np.ndarray, dict[str, Any]]:
    """The network input for one pair, exactly as ``rano-response predict`` builds it, and its
    description (see :mod:`RANOResponseLib.inference.guard`). ``device`` runs brain extraction
    for studies that are not skull-stripped."""
    base = load_study(pair.baseline, spec.modalities)
    fu = load_study(pair.followup, spec.modalities)
    inputs = prepare_inputs(base, fu, spec, brain="auto", device=device)
    return inputs.prepared.array, inputs.description


def cache_pairs(pairs: Sequence[Pair], spec: InputSpec, cache_dir: Path, progress: bool = True,
                on_pair: Callable[[int, int], None] | None = None, device: Any = "cpu") -> list[Path]:
    """Preprocess every pair once; later calls (other folds, resumed runs) reuse the files.

    Each pair gives ``<id>.npy`` (float16 array) and ``<id>.json`` (its description)."""
    cache_dir = Path(cache_dir) / spec_key(spec)
    cache_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, pair in enumerate(tqdm(pairs, desc="preprocess", unit="pair", disable=not progress)):
        path = cache_dir / f"{pair.id}.npy"
        if not (path.exists() and path.with_suffix(".json").exists()):
            arr, description = preprocess_pair(pair, spec, device)
            with atomic_file(path) as tmp:
                np.save(tmp, arr.astype(np.float16))
            write_text(json.dumps(description) + "\n", path.with_suffix(".json"))
        paths.append(path)
        if on_pair:
            on_pair(i + 1, len(pairs))
    return paths


def input_statistics(paths: Sequence[Path]) -> dict[str, Any]:
    """A bundle's ``input_statistics`` from the cached pairs' descriptions (the ``.json`` beside
    each ``.npy`` :func:`cache_pairs` wrote)."""
    descriptions = [json.loads(Path(p).with_suffix(".json").read_text(encoding="utf-8")) for p in paths]
    return guard.statistics(descriptions, method=f"RANOResponseLib.inference.inputs.prepare_inputs ({PREPARATION}), "
                                                 "brain masks auto")


def add_input_statistics(bundle: Path | str | None, data: Path | str, cache: Path | str, every: int = 1,
                         progress: bool = True, device: Any = "cpu") -> dict[str, Any]:
    """Record ``input_statistics`` in an existing bundle from the data it was trained on.

    The pairs are those its training used (LUMIERE layout under ``data``, the bundle's modalities
    and pairing), prepared through :func:`cache_pairs` (reusing ``cache``); ``every``: use every
    n-th pair only (a documented subset when preparing all of them would take too long; the
    statistics record how many pairs they come from). Returns the statistics written.
    """
    b = read_bundle(bundle)
    pairing = b.meta.get("training", {}).get("config", {}).get("pairing", "previous")
    pairs, _ = build_pairs(data, b.spec.modalities, pairing)
    chosen = list(pairs)[:: max(1, int(every))]
    stats = input_statistics(cache_pairs(chosen, b.spec, Path(cache), progress=progress, device=device))
    stats["data"] = {"name": Path(data).name, "pairs_available": len(pairs), "every": max(1, int(every)),
                     "pairing": pairing}
    set_input_statistics(b.path, stats)
    return stats


def _load_npy(item: dict[str, Any]) -> dict[str, Any]:
    return {**item, "image": np.load(item["image"])}


def cached_dataset(paths: Sequence[Path], labels: Sequence[int]):
    """The cached arrays as a MONAI ``CacheDataset`` of ``{"image": float16 (C,z,y,x), "label"}``."""
    from monai.data import CacheDataset

    data = [{"image": str(p), "label": int(y)} for p, y in zip(paths, labels)]
    return CacheDataset(data, transform=_load_npy, cache_rate=1.0, num_workers=0, progress=False)


def augmenter():
    """MONAI transforms on (C, z, y, x) arrays: one spatial draw for all channels."""
    from monai.transforms import Compose, RandAffine, RandFlip, RandGaussianNoise, RandScaleIntensity

    return Compose([
        RandFlip(prob=0.5, spatial_axis=2),  # left-right
        RandAffine(prob=0.5, rotate_range=(0.12, 0.12, 0.12), translate_range=(4, 4, 4),
                   scale_range=(0.05, 0.05, 0.05), padding_mode="zeros"),
        RandScaleIntensity(factors=0.1, prob=0.3),
        RandGaussianNoise(prob=0.3, std=0.05),
    ])


def item_seed(*parts: int) -> int:
    """A 32-bit seed from integers (seed, fold, epoch, position, ...), stable across processes."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class EpochView(torch.utils.data.Dataset):
    """One epoch's sample order over a cached dataset, with seeded per-item augmentation.

    ``view[p]`` is dataset item ``order[p]``, augmented with a random state seeded from
    ``(seed, p)``: the same whichever rank or resumed process loads it.
    """

    def __init__(self, dataset, order: Sequence[int], seed: int, augment: Callable | None = None) -> None:
        self.dataset, self.order, self.seed, self.augment = dataset, list(order), int(seed), augment

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, p: int) -> tuple[torch.Tensor, int]:
        item = self.dataset[self.order[p]]
        x = np.asarray(item["image"], dtype=np.float32)
        if self.augment is not None:
            self.augment.set_random_state(seed=item_seed(self.seed, p))
            x = np.asarray(self.augment(x), dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(x)), int(item["label"])


def stacked(dataset, indices: Sequence[int]) -> np.ndarray:
    """Items ``indices`` of a cached dataset as one (N, C, z, y, x) float16 array."""
    return np.stack([dataset[int(i)]["image"] for i in indices]) if len(indices) else np.zeros((0,))
