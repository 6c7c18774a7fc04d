"""The input guard: is this pair what the model was trained on, or a brain MRI pair at all?

Two kinds of verdict, both before the network runs:

- **refused** (:class:`~RANOResponseLib.core.errors.RANOInputError`, one line, exit 2): what is
  clearly not a brain MRI pair. A field of view or a brain mask outside :data:`BRAIN_VOLUME_ML`
  (no brain found, a tiny image, the whole head taken as brain), or a follow-up whose brain does
  not land on the baseline's after registration (:data:`MIN_BRAIN_DICE`).
- **warning** (``prediction.json``'s ``input_check``): a pair the network can run on, but unlike
  its training data as recorded in the bundle's ``input_statistics`` (:func:`statistics`, made
  at training time from the training pairs through the same preparation): slices thicker than the
  thickest it saw, a brain volume or intensities inside the brain outside the training range, a
  worse registration, a sequence that misses part of the brain.

The description of a pair these work on is made by
:func:`RANOResponseLib.inference.inputs.prepare_inputs`: ``{"studies": {timepoint: {"brain_mask":
{...}, "sequences": {modality: {...}}}}, "registration": {...}, "channels": {channel: {...}}}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from RANOResponseLib.core.errors import RANOInputError

STATISTICS_VERSION = 1
BRAIN_VOLUME_ML = (700.0, 2500.0)  # a brain mask outside this range is not an adult human brain
MIN_BRAIN_DICE = 0.5  # registered brains overlapping less than this: the registration failed
PERCENTILES = (5, 50, 95)  # of the z-scored network input inside the brain, per channel
# Tolerances around the training range before a warning is raised
THICKNESS_FACTOR = 1.25  # slices up to 25 % thicker than the thickest training slices pass
VOLUME_FACTOR = 0.10  # brain volume within 10 % of the training range passes
Z_MARGIN = 0.5  # a channel percentile within half a standard deviation of the training range passes
DICE_MARGIN = 0.05  # registration overlap down to 0.05 below the worst training pair passes
MIN_COVERAGE = 0.95  # a sequence should image at least 95 % of the brain
OUTSIDE_TRAINING = "outside what the model was trained on"


def refuse_small_field(field_ml: float, where: Path | str, what: str) -> None:
    """A field of view smaller than any brain cannot hold one: refused before any extraction."""
    if field_ml < BRAIN_VOLUME_ML[0]:
        raise RANOInputError(f"{where}: {what} covers {field_ml:.0f} ml, less than a brain "
                             f"({BRAIN_VOLUME_ML[0]:.0f}-{BRAIN_VOLUME_ML[1]:.0f} ml); not a brain MRI")


def refuse_non_brain(volume_ml: float, where: Path | str, method: str) -> None:
    """A brain mask outside :data:`BRAIN_VOLUME_ML` means no brain was found: refused."""
    lo, hi = BRAIN_VOLUME_ML
    if not lo <= volume_ml <= hi:
        hint = " (--brain-mask none takes every non-zero voxel as brain; try auto)" if method == "none" else ""
        raise RANOInputError(f"{where}: no brain found: the brain mask ({method}) is {volume_ml:.0f} ml, "
                             f"outside {lo:.0f}-{hi:.0f} ml{hint}; not a brain MRI")


def refuse_failed_registration(dice: float, where: Path | str, baseline: Path | str) -> None:
    """Registered brains that barely overlap: the registration failed (or not the same head)."""
    if not dice >= MIN_BRAIN_DICE:
        raise RANOInputError(f"{where}: registration to {baseline} failed (the registered brains overlap "
                             f"with Dice {dice:.2f} < {MIN_BRAIN_DICE}); are they the same patient?")


def _range(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray(values, float)
    return {"min": float(v.min()), "p5": float(np.percentile(v, 5)), "median": float(np.median(v)),
            "p95": float(np.percentile(v, 95)), "max": float(v.max())}


def statistics(descriptions: Sequence[Mapping[str, Any]], method: str = "") -> dict[str, Any]:
    """A bundle's ``input_statistics`` from the descriptions of its training pairs.

    Ranges (min, p5, median, p95, max) over the pairs of: brain volume (ml, both timepoints),
    slice thickness (mm, every sequence), registration overlap of the brains (Dice), and per
    channel each of :data:`PERCENTILES` of its z-scored values inside the brain; also the
    fraction of studies that came skull-stripped.
    """
    if not descriptions:
        raise ValueError("input statistics need at least one described pair")
    studies = [s for d in descriptions for s in d["studies"].values()]
    channels = list(descriptions[0]["channels"])
    return {
        "version": STATISTICS_VERSION,
        "pairs": len(descriptions),
        "method": method,
        "brain_volume_ml": _range([s["brain_mask"]["volume_ml"] for s in studies]),
        "slice_thickness_mm": _range([q["slice_thickness_mm"] for s in studies for q in s["sequences"].values()]),
        "registration_brain_dice": _range([d["registration"]["brain_dice"] for d in descriptions]),
        "stripped_fraction": float(np.mean([bool(s["brain_mask"]["stripped"]) for s in studies])),
        "channels": {c: {f"p{p}": _range([d["channels"][c][f"p{p}"] for d in descriptions]) for p in PERCENTILES}
                     for c in channels},
    }


def check(description: Mapping[str, Any], stats: Mapping[str, Any] | None) -> dict[str, Any]:
    """``input_check`` for ``prediction.json``: ``{"verdict": "ok" | "warning", "reasons": [...]}``.

    Compares a described pair with a bundle's ``input_statistics`` (None: the bundle has none,
    which is itself a warning: nothing to compare with).
    """
    reasons: list[str] = []
    for tp, study in description["studies"].items():
        for m, seq in study["sequences"].items():
            coverage = seq.get("alignment", {}).get("coverage")
            if coverage is not None and coverage < MIN_COVERAGE:
                reasons.append(f"{m} ({tp}) images only {coverage:.0%} of the brain")
    if not stats:
        reasons.append("the bundle records no input statistics: the input could not be compared with "
                       "its training data")
        return {"verdict": "warning", "reasons": reasons}
    thick = stats["slice_thickness_mm"]["max"]
    for tp, study in description["studies"].items():
        for m, seq in study["sequences"].items():
            t = seq["slice_thickness_mm"]
            if t > thick * THICKNESS_FACTOR:
                reasons.append(f"{m} ({tp}) has {t:.1f} mm slices, thicker than the model's training data "
                               f"(at most {thick:.1f} mm): {OUTSIDE_TRAINING}")
    vol = stats["brain_volume_ml"]
    for tp, study in description["studies"].items():
        v = study["brain_mask"]["volume_ml"]
        if not vol["min"] * (1 - VOLUME_FACTOR) <= v <= vol["max"] * (1 + VOLUME_FACTOR):
            reasons.append(f"{tp} brain mask of {v:.0f} ml ({study['brain_mask']['method']}) lies outside the "
                           f"training range {vol['min']:.0f}-{vol['max']:.0f} ml: {OUTSIDE_TRAINING}")
    dice, low = description["registration"]["brain_dice"], stats["registration_brain_dice"]["min"]
    if dice < low - DICE_MARGIN:
        reasons.append(f"follow-up registration: the brains overlap with Dice {dice:.3f}, less than in any "
                       f"training pair ({low:.3f})")
    for ch, values in description["channels"].items():
        known = stats["channels"].get(ch)
        if known is None:
            continue
        off = [f"p{p} {values[f'p{p}']:+.2f} (training {known[f'p{p}']['min']:+.2f} to {known[f'p{p}']['max']:+.2f})"
               for p in PERCENTILES
               if not known[f"p{p}"]["min"] - Z_MARGIN <= values[f"p{p}"] <= known[f"p{p}"]["max"] + Z_MARGIN]
        if off:
            reasons.append(f"{ch} intensities inside the brain unlike the training data (z-score {', '.join(off)})")
    return {"verdict": "warning" if reasons else "ok", "reasons": reasons}
