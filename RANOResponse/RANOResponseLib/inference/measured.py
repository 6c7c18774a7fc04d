"""RANO measured from predict's own segmentations, beside the network: ``prediction.json["measured"]``.

Both timepoints' labels (:func:`~RANOResponseLib.inference.segmentation.segment_study`) go
through the measurement assistant (:func:`~RANOResponseLib.rano.measurement.measure_pair`,
lesions matched through predict's registration), then through the one RANO decision table
(:func:`~RANOResponseLib.rano.rules.decide`, bidimensional and RANO 2.0 volumetric), and the
RANO category is put beside the network's class (:func:`~RANOResponseLib.rano.rules.compare_with_prediction`).
"""

from __future__ import annotations

from typing import Any, Mapping

import SimpleITK as sitk

from RANOResponseLib.rano.measurement import PairMeasurement, lesion_table, measure_pair
from RANOResponseLib.rano.rules import RuleResult, compare_with_prediction, decide

SOURCE = "automatic"  # what made the segmentations: predict's segmentation bundle
TRANSFORM_NOTE = "predict's registration (followup_to_baseline.tfm)"


def _ratio(before: float, after: float) -> float | None:
    return None if before <= 0 else after / before


def decide_both(pair: PairMeasurement) -> tuple[RuleResult, RuleResult]:
    """The RANO (bidimensional) and RANO 2.0 (volumetric) decisions for a measured, matched pair."""
    return decide(pair, criteria="RANO"), decide(pair, criteria="RANO 2.0 volumetric")


def measure_automatic(baseline: sitk.Image, followup: sitk.Image, transform: sitk.Transform,
                      prediction: Mapping[str, Any], segmentation_bundle: Mapping[str, Any],
                      segmentations: Mapping[str, Mapping[str, Any]] | None = None
                      ) -> tuple[PairMeasurement, dict[str, Any]]:
    """Measure two timepoints' automatic labels and decide RANO; returns the matched measurements
    and the ``measured`` block of ``prediction.json``.

    ``transform``: baseline point -> follow-up point (predict's registration);
    ``prediction``: the network's ``label`` and ``probabilities``; ``segmentation_bundle``:
    ``{"id", "path", "sha256"}``; ``segmentations``: per timepoint, its file in predict's output
    folder and what :meth:`~RANOResponseLib.inference.segmentation.Segmentation.as_dict` says.
    """
    pair = measure_pair(baseline, followup, transform, transform_note=TRANSFORM_NOTE)
    return pair, measured_block(pair, prediction, segmentation_bundle, segmentations)


def measured_block(pair: PairMeasurement, prediction: Mapping[str, Any], segmentation_bundle: Mapping[str, Any],
                   segmentations: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The ``measured`` block of ``prediction.json`` for measured, matched ``pair``:

    ``source``, ``segmentation_bundle``, ``segmentations`` (per timepoint: ``file``, ``bundle_id``,
    ``seconds``, ``volumes_ml`` per label name), ``lesions``
    (:func:`~RANOResponseLib.rano.measurement.lesion_table` rows), ``sums`` (SPD in mm2 and
    measurable enhancing volume in mL at both timepoints, with percent changes), ``ratio`` (SPD
    follow-up / baseline) and ``ratio_rano2`` (volume), ``category`` (RANO) and ``category_rano2``
    (RANO 2.0 volumetric) with their ``reasoning`` and ``reasoning_rano2``, ``agrees`` (RANO
    category == the network's class), ``comparison`` and ``measurements`` (lesions with their
    diameter endpoints, for drawing and editing).
    """
    rano, rano2 = decide_both(pair)
    comparison = compare_with_prediction(rano, {"label": prediction["label"],
                                                "probabilities": dict(prediction["probabilities"])})
    x = rano.inputs
    return {
        "source": SOURCE,
        "segmentation_bundle": dict(segmentation_bundle),
        "segmentations": {tp: dict(v) for tp, v in (segmentations or {}).items()},
        "lesions": lesion_table(pair),
        "sums": {"spd_baseline_mm2": x.spd_baseline_mm2, "spd_followup_mm2": x.spd_followup_mm2,
                 "spd_change_percent": rano.spd_change_percent,
                 "volume_baseline_ml": x.volume_baseline_ml, "volume_followup_ml": x.volume_followup_ml,
                 "volume_change_percent": rano.volume_change_percent},
        "ratio": _ratio(x.spd_baseline_mm2, x.spd_followup_mm2),
        "ratio_rano2": _ratio(x.volume_baseline_ml, x.volume_followup_ml),
        "category": rano.category,
        "category_rano2": rano2.category,
        "reasoning": rano.reasoning,
        "reasoning_rano2": rano2.reasoning,
        "agrees": comparison.agree,
        "comparison": comparison.to_dict(),
        "measurements": pair.to_dict(),
    }
