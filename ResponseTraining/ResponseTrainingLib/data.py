"""Preprocessed case pairs, cached on disk so an epoch never redoes registration.

Each pair goes through the clinical module's own path (``read_study`` -> ``register_rigid`` ->
``prepare_pair``); the resulting (C, z, y, x) array is stored as float16 ``.npy`` under a key
that includes the input spec, written atomically.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from RANOResponseLib.io import atomic_file, read_study
from RANOResponseLib.preprocessing import InputSpec, prepare_pair, register_rigid

from .lumiere import Pair


def spec_key(spec: InputSpec) -> str:
    blob = json.dumps(asdict(spec), sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def preprocess_pair(pair: Pair, spec: InputSpec) -> np.ndarray:
    """The network input for one pair, exactly as ``rano-response predict`` builds it."""
    base = read_study(pair.baseline, spec.modalities)
    fu = read_study(pair.followup, spec.modalities)
    reg = register_rigid(base, fu)
    return prepare_pair(base, fu, reg.transform, spec).array


def cache_pairs(pairs: Sequence[Pair], spec: InputSpec, cache_dir: Path, progress: bool = True) -> list[Path]:
    """Preprocess every pair once; later calls (and resumed runs) reuse the files."""
    cache_dir = Path(cache_dir) / spec_key(spec)
    cache_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for pair in tqdm(pairs, desc="preprocess", unit="pair", disable=not progress):
        path = cache_dir / f"{pair.id}.npy"
        if not path.exists():
            arr = preprocess_pair(pair, spec).astype(np.float16)
            with atomic_file(path) as tmp:
                np.save(tmp, arr)
        paths.append(path)
    return paths


def load_cached(paths: Sequence[Path]) -> np.ndarray:
    """All cached arrays stacked: (N, C, z, y, x) float16 (kept small in memory)."""
    return np.stack([np.load(p) for p in paths])
