"""What the network sees, made from two studies by one function: :func:`prepare_inputs`.

``predict`` and training (:mod:`ResponseTrainingLib.data.dataset`) both call it, so a model is
trained on exactly what it will be shown. Per study: the brain mask of its reference image
(CT1; skull-stripped images give theirs for free, others go through HD-BET, or a file), then every
other sequence registered to the reference and resampled onto its grid
(:func:`~RANOResponseLib.imaging.registration.align_study`). Then the follow-up is registered to
the baseline as brains alone, and both are cut to their brains, resampled onto the model grid
around the baseline brain and z-scored inside it
(:func:`~RANOResponseLib.imaging.preprocessing.prepare_pair`): a study and its skull-stripped
copy give the same input. Along the way, the input guard (:mod:`.guard`) refuses what is not a
brain MRI pair, and the pair is described (brain masks, slice thickness, alignment, registration
quality, intensities inside the brain) for ``prediction.json`` and for a bundle's
``input_statistics``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import SimpleITK as sitk

from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.imaging.brain import mask_from_stripped, mask_volume_ml, read_mask, stripped_kind
from RANOResponseLib.imaging.geometry import field_of_view_ml
from RANOResponseLib.imaging.io import Study
from RANOResponseLib.imaging.preprocessing import DIFFERENCE, InputSpec, PreparedPair, prepare_pair
from RANOResponseLib.imaging.registration import (
    RegistrationParams,
    RegistrationResult,
    align_study,
    brain_mask,
    dice_coefficient,
    register_rigid,
)
from RANOResponseLib.inference import guard

BRAIN_MODES = ("auto", "model", "none")
TIMEPOINTS = ("baseline", "followup")
# How a study's brain mask is found: a mode of BRAIN_MODES, or a mask file.
BrainSource = str | Path


@dataclass
class BrainMask:
    """A study's brain mask on its reference image's grid, and how it was found."""

    image: sitk.Image  # uint8, 1 = brain
    method: str  # "stripped" (the image's non-zero region), "model" (HD-BET), "file", "none" (non-zero voxels)
    stripped: bool  # whether the reference image came skull-stripped
    volume_ml: float
    file: Path | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "stripped": self.stripped, "volume_ml": round(self.volume_ml, 2),
                "file": None if self.file is None else str(self.file), "seconds": round(self.seconds, 3)}


@dataclass
class PreparedInputs:
    """The two studies aligned, their brains, the registration, the network input, its description."""

    baseline: Study  # every sequence on the reference image's grid
    followup: Study
    brains: dict[str, BrainMask]  # timepoint -> mask
    registration: RegistrationResult
    prepared: PreparedPair
    description: dict[str, Any]  # see RANOResponseLib.inference.guard
    timings: dict[str, float] = field(default_factory=dict)
    # timepoint -> what ``segmenter`` returned (its ``.image``: labels on that study's grid), when
    # the network reads segmentation channels (InputSpec.reads_segmentation)
    segmentations: dict[str, Any] = field(default_factory=dict)


def brain_sources(brain: str | Sequence[str | Path], baseline: Study, followup: Study) -> tuple[BrainSource, BrainSource]:
    """Where each study's brain mask comes from, from ``--brain-mask``'s value.

    ``auto``, ``model`` or ``none`` for both studies; a file name found inside each study folder;
    ``BASE,FOLLOW`` (or a pair) naming one mask file per study.
    """
    if not isinstance(brain, str):
        base, fu = brain
        return Path(base), Path(fu)
    if brain in BRAIN_MODES:
        return brain, brain
    if "," in brain:
        parts = [p.strip() for p in brain.split(",")]
        if len(parts) != 2 or not all(parts):
            raise RANOInputError(f"--brain-mask {brain}: give auto, model, none, a file name or BASE,FOLLOW")
        return Path(parts[0]), Path(parts[1])
    if Path(brain).name != brain:  # one path cannot be both studies' mask (each has its own grid)
        raise RANOInputError(f"--brain-mask {brain}: give a file name found in each study folder, "
                             "or two mask files as BASE,FOLLOW")
    return baseline.folder / brain, followup.folder / brain


_EXTRACTORS: dict[str, Any] = {}  # device -> BrainExtractor, kept loaded between studies and calls


def extractor(device: Any):
    """The HD-BET brain extractor for ``device``, loaded once per process."""
    # imported when first needed: a pair of skull-stripped studies never loads HD-BET
    from RANOResponseLib.model.brain_extraction import BrainExtractor

    key = str(device)
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = BrainExtractor(device)
    return _EXTRACTORS[key]


def find_brain(study: Study, reference: str, source: BrainSource, device: Any = "cpu") -> BrainMask:
    """The brain mask of ``study``'s ``reference`` image (see :class:`BrainMask` for the methods);
    refused (:mod:`.guard`) when no brain is found. (:func:`prepare_inputs` refuses a field of view
    too small to hold a brain first, for both studies, before any extraction.)"""
    t = time.perf_counter()
    image = study.images[reference]
    kind = stripped_kind(image)
    stripped = kind is not None
    file = None
    if isinstance(source, Path):
        method, file = "file", source
        mask = read_mask(source, image)
    elif source == "none":
        method, mask = "none", brain_mask(image)
    elif source == "auto" and stripped:
        method, mask = "stripped", mask_from_stripped(image, kind)
    elif source in ("auto", "model"):
        method, mask = "model", extractor(device).extract(image)
    else:
        raise RANOInputError(f"--brain-mask {source}: give auto, model, none, a file name or BASE,FOLLOW")
    volume = mask_volume_ml(mask)
    guard.refuse_non_brain(volume, file or study.folder, method)
    return BrainMask(mask, method, stripped, volume, file, time.perf_counter() - t)


def slice_thickness_mm(study: Study, modality: str) -> float:
    """How thick a sequence's slices are: the recorded slice thickness (DICOM) or the largest
    voxel spacing, whichever is larger (slices with gaps are as thick as their spacing)."""
    recorded = study.sources.get(modality, {}).get("slice_thickness") or 0.0
    return float(max(float(recorded), *study.images[modality].GetSpacing()))


def prepare_inputs(
    baseline: Study,
    followup: Study,
    spec: InputSpec,
    brain: str | Sequence[str | Path] = "auto",
    device: Any = "cpu",
    registration: RegistrationParams | None = None,
    center: Sequence[float] | None = None,
    progress: Callable[[str], None] | None = None,
    segmenter: Callable[[Study, sitk.Image], Any] | None = None,
) -> PreparedInputs:
    """Brain masks, aligned sequences, registration and the network input for one pair.

    ``brain``: ``--brain-mask`` (see :func:`brain_sources`); ``device`` runs HD-BET where it is
    needed; ``center``: the crop centre in LPS mm (default: the baseline brain's centre);
    ``progress`` is told each step as it completes ("brain masks", "aligned", "registered",
    "resampled", and "segmented inputs" when the network reads segmentation channels). ``segmenter``:
    ``(aligned study, its brain mask) -> segmentation`` with the labels as ``.image``
    (:func:`~RANOResponseLib.inference.segmentation.segment_study`), called for both timepoints
    when ``spec`` reads segmentation channels (and only then). Raises :class:`RANOInputError` for a
    pair that is not a brain MRI pair.
    """
    say = progress or (lambda stage: None)
    timings: dict[str, float] = {}
    reference = spec.reference_modality
    studies = {"baseline": baseline, "followup": followup}
    t = time.perf_counter()
    sources = dict(zip(TIMEPOINTS, brain_sources(brain, baseline, followup)))
    for s in studies.values():  # both cheap checks before any (slow) brain extraction
        guard.refuse_small_field(field_of_view_ml(s.images[reference]), s.folder, f"the {reference} field of view")
    brains = {tp: find_brain(studies[tp], reference, sources[tp], device) for tp in TIMEPOINTS}
    timings["brain_mask"] = time.perf_counter() - t
    say("brain masks")

    t = time.perf_counter()
    thickness = {tp: {m: slice_thickness_mm(s, m) for m in s.images} for tp, s in studies.items()}
    aligned, alignment = {}, {}
    for tp, s in studies.items():
        aligned[tp], alignment[tp] = align_study(s, brains[tp].image, reference)
    timings["align"] = time.perf_counter() - t
    say("aligned")

    segmentations: dict[str, Any] = {}
    if spec.reads_segmentation:
        if segmenter is None:
            raise ValueError("the input spec reads segmentation channels: give a segmenter")
        t = time.perf_counter()
        segmentations = {tp: segmenter(aligned[tp], brains[tp].image) for tp in TIMEPOINTS}
        timings["segmentation"] = time.perf_counter() - t
        say("segmented inputs")

    t = time.perf_counter()
    masks = (brains["baseline"].image, brains["followup"].image)
    reg = register_rigid(aligned["baseline"], aligned["followup"], registration, masks=masks)
    timings["register"] = time.perf_counter() - t
    say("registered")

    t = time.perf_counter()
    prepared = prepare_pair(aligned["baseline"], aligned["followup"], reg.transform, spec, center=center, masks=masks,
                            labels={tp: s.image for tp, s in segmentations.items()} or None)
    dice = dice_coefficient(prepared.brains["baseline"], prepared.brains["followup"])
    guard.refuse_failed_registration(dice, followup.folder, baseline.folder)
    timings["crop_resample"] = time.perf_counter() - t
    say("resampled")

    description = {
        "studies": {tp: {"brain_mask": brains[tp].as_dict(),
                         "sequences": {m: {"source": studies[tp].sources.get(m, {}),
                                           "slice_thickness_mm": thickness[tp][m],
                                           "alignment": alignment[tp].get(m, {"method": "reference"})}
                                       for m in studies[tp].images}}
                    for tp in TIMEPOINTS},
        "registration": {"brain_dice": round(dice, 4), "metric": reg.metric},
        "channels": channel_statistics(prepared),
    }
    return PreparedInputs(aligned["baseline"], aligned["followup"], brains, reg, prepared,
                          _plain(description), timings, segmentations)


def channel_statistics(prepared: PreparedPair) -> dict[str, dict[str, float]]:
    """Per channel, :data:`guard.PERCENTILES` of its z-scored values inside the brain on the
    model grid (the baseline's brain for difference channels; segmentation channels are
    fractions of a voxel, 0 to 1)."""
    out = {}
    for i, ch in enumerate(prepared.channels):
        inside = prepared.brains["baseline" if ch.timepoint == DIFFERENCE else ch.timepoint]
        values = prepared.array[i][inside]
        qs = np.percentile(values, guard.PERCENTILES) if values.size else [0.0] * len(guard.PERCENTILES)
        out[str(ch)] = {f"p{p}": round(float(q), 4) for p, q in zip(guard.PERCENTILES, qs)}
    return out


def _plain(value: Any) -> Any:
    """JSON-ready: tuples as lists, numpy scalars and paths as plain values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value
