"""Timepoints with tumour masks, prepared once for segmentation training and cached on disk.

Every timepoint of a LUMIERE-layout cohort that has a native DeepBraTumIA mask (pre-op, post-op
and follow-ups alike) is one training case. Its input goes through the clinical module's one data
path (:func:`~RANOResponseLib.imaging.preprocessing.prepare_timepoint`, the brain mask from
:func:`~RANOResponseLib.inference.inputs.find_brain`), exactly as ``predict`` segments a study; its
target is the mask on the same grid (:func:`~RANOResponseLib.imaging.preprocessing.labels_on_grid`).

Each case is stored as one ``.npz`` (image float16 (C, z, y, x), label uint8 (z, y, x), brain
bool) named by a hash of the files' sizes and modification times, the modalities, the spacing and
:data:`SEG_PREPARATION`, so a changed file, another spacing or a new preparation is never served
from an old entry, and later runs pointed at the same cache reuse it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.files import atomic_file
from RANOResponseLib.imaging.io import find_modality_file, read_image, read_study
from RANOResponseLib.imaging.preprocessing import labels_on_grid, prepare_timepoint
from RANOResponseLib.inference.inputs import find_brain
from RANOResponseLib.rano.measurement import find_segmentation
from tqdm import tqdm

# Part of the cache key: entries an older preparation wrote are not reused.
SEG_PREPARATION = "seg-prepare-v1"
MASK_SOURCE = "deepbratumia-native"
BRAIN_REFERENCE = "CT1"


@dataclass(frozen=True)
class SegCase:
    """One timepoint with its native mask; ``group`` (cohort/patient) keeps a patient in one fold."""

    cohort: str
    patient: str
    folder: Path
    mask: Path

    @property
    def id(self) -> str:
        return f"{self.cohort}_{self.patient}_{self.folder.name}"

    @property
    def group(self) -> str:
        return f"{self.cohort}/{self.patient}"


def find_seg_cases(roots: Sequence[Path | str], modalities: Sequence[str]) -> list[SegCase]:
    """Every timepoint of the cohorts ``roots`` (``ROOT/Imaging/<patient>/<week>``) that has a native
    DeepBraTumIA mask and all ``modalities``; a cohort without any is an input error naming it."""
    cases: list[SegCase] = []
    names = [Path(r).resolve().name for r in roots]
    for i, (root, name) in enumerate(zip(roots, names)):
        imaging = Path(root) / "Imaging"
        if not imaging.is_dir():
            raise RANOInputError(f"{imaging}: imaging folder not found (expected a LUMIERE-layout cohort)")
        cohort = name if names.count(name) == 1 else f"{name}-{i}"  # two cohorts of one folder name
        found = []
        for folder in sorted(p for p in imaging.glob("*/*") if p.is_dir()):
            if any(find_modality_file(folder, m) is None for m in modalities):
                continue
            try:
                mask = find_segmentation(folder, MASK_SOURCE).path
            except RANOInputError:
                continue
            found.append(SegCase(cohort, folder.parent.name, folder, mask))
        if not found:
            raise RANOInputError(f"{imaging}: no timepoint with {', '.join(modalities)} and a native "
                                 "DeepBraTumIA mask (DeepBraTumIA-segmentation/native/segmentation/seg_mask.nii.gz)")
        cases += found
    return cases


def case_key(case: SegCase, modalities: Sequence[str], spacing: Sequence[float]) -> str:
    """Cache file stem: the case id and a hash of its files' stats, the modalities, the spacing
    and the preparation's version."""
    files = [find_modality_file(case.folder, m) for m in modalities] + [case.mask]
    stats = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    blob = json.dumps({"files": stats, "modalities": list(modalities), "spacing": [float(s) for s in spacing],
                       "preparation": SEG_PREPARATION}, sort_keys=True)
    return f"{case.id}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


def prepare_case(case: SegCase, modalities: Sequence[str], spacing: Sequence[float],
                 device: Any = "cpu") -> dict[str, np.ndarray]:
    """One timepoint as predict prepares it (``image``), its mask on that grid (``label``) and
    the brain on the grid (``brain``)."""
    study = read_study(case.folder, modalities)
    brain = find_brain(study, BRAIN_REFERENCE, "auto", device).image
    prepared = prepare_timepoint(study, modalities, spacing, brain)
    label = labels_on_grid(read_image(case.mask), prepared.grid)
    return {"image": prepared.array.astype(np.float16), "label": label.astype(np.uint8),
            "brain": prepared.brain.astype(bool)}


def cache_cases(cases: Sequence[SegCase], modalities: Sequence[str], spacing: Sequence[float],
                cache_dir: Path | str, progress: bool = True, device: Any = "cpu") -> list[Path]:
    """Prepare every case once (atomic ``.npz`` per case); existing entries are reused."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for case in tqdm(cases, desc="prepare", unit="timepoint", disable=not progress):
        path = cache_dir / f"{case_key(case, modalities, spacing)}.npz"
        if not path.exists():
            arrays = prepare_case(case, modalities, spacing, device)
            with atomic_file(path) as tmp:
                np.savez(tmp, **arrays)
        paths.append(path)
    return paths


def load_case(path: Path | str) -> dict[str, np.ndarray]:
    """A cached case: ``image`` (float16), ``label`` (uint8), ``brain`` (bool)."""
    with np.load(path) as z:
        return {k: z[k] for k in ("image", "label", "brain")}
