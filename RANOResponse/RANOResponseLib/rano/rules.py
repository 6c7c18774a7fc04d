"""Rule-based RANO response from lesion measurements, with its reasoning in plain sentences.

This module holds the one RANO decision table of the project (:func:`rano_decision`): the review
panel, ``rano-response measure``, the report, the comparison with the network and the phantom's
training labels all go through it. Two readings of the same measurements:

* RANO (Wen et al. 2010), bidimensional: sum of the products of perpendicular diameters (SPD)
  of the measurable enhancing lesions.
* RANO 2.0 volumetric (Wen et al. 2023): enhancing volume of the measurable lesions, with its
  own thresholds (:class:`RANOThresholds`).

The table, first matching row wins:

1. a new measurable enhancing lesion: PD;
2. no enhancing disease left at all, measurable or not: CR (RANO's CR needs *every* enhancing
   lesion gone; a measurable sum of 0 with non-measurable enhancement left is not CR);
3. no measurable disease at baseline: PD if there is measurable disease now, else SD
   (non-measurable enhancing disease only; its change cannot be measured);
4. sum up by at least the progression threshold (+25 % SPD, +40 % volume): PD;
5. sum down by at least the response threshold (-50 % SPD, -65 % volume): PR;
6. otherwise SD.

The comparison is against the pair's baseline (the previous scan), not the nadir; the course of a
patient (progression against the nadir, response against the baseline, confirmation) is read with
this same table by :mod:`RANOResponseLib.rano.course`. What images cannot tell (T2/FLAIR progression, steroids, clinical status, the confirmation scan that CR and
PR require) is listed, never guessed.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.rano.measurement import Lesion, PairMeasurement

CRITERIA = ("RANO", "RANO 2.0 volumetric")
_CRITERIA_ALIASES = {"rano": "RANO", "rano2": "RANO 2.0 volumetric", "rano 2.0": "RANO 2.0 volumetric",
                     "volumetric": "RANO 2.0 volumetric", "rano 2.0 volumetric": "RANO 2.0 volumetric"}
NOT_ASSESSED = ("Not assessed from the segmentations: T2/FLAIR non-enhancing progression, corticosteroid dose, "
                "clinical status and the confirmation scan that CR and PR require.")


@dataclass(frozen=True)
class RANOThresholds:
    """Percent changes that separate the categories (the only copy of RANO's thresholds)."""

    pr_percent: float = -50.0  # SPD
    pd_percent: float = 25.0
    pr_volume_percent: float = -65.0  # RANO 2.0 volumetric
    pd_volume_percent: float = 40.0


@dataclass
class RuleInputs:
    """What the decision needs; built from a :class:`PairMeasurement` by :func:`rule_inputs`
    (or by hand, e.g. in tests)."""

    spd_baseline_mm2: float
    spd_followup_mm2: float
    volume_baseline_ml: float
    volume_followup_ml: float
    enhancing_baseline: int  # enhancing lesions of any size
    enhancing_followup: int
    measurable_baseline: list[str] = field(default_factory=list)  # descriptions, for the reasoning
    measurable_followup: list[str] = field(default_factory=list)
    new_measurable: list[str] = field(default_factory=list)
    new_non_measurable: list[str] = field(default_factory=list)
    lost_measurability: list[str] = field(default_factory=list)  # measurable at baseline, not now
    edited: list[str] = field(default_factory=list)  # lesions whose diameters a reader changed


@dataclass
class RuleResult:
    """The rule-based category and why."""

    category: str  # under ``criteria``
    criteria: str
    bidimensional: str
    volumetric: str
    spd_change_percent: float | None
    volume_change_percent: float | None
    inputs: RuleInputs
    reasoning: list[str]
    thresholds: RANOThresholds = field(default_factory=RANOThresholds)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RuleResult":
        d = dict(d)
        d["inputs"] = RuleInputs(**d["inputs"])
        d["thresholds"] = RANOThresholds(**d.get("thresholds", {}))
        return cls(**d)


def _percent(before: float, after: float) -> float | None:
    """Percent change, rounded to 1e-6 so that a change of exactly +25 % is not 24.999999 %."""
    return None if before <= 0 else round((after - before) / before * 100.0, 6)


def rule_inputs(pair: PairMeasurement) -> RuleInputs:
    """Sums, counts and lesion descriptions from matched measurements."""
    b, f = pair.baseline, pair.followup
    lost = []
    for le in b.measurable:
        now = [f.lesion(i) for i in le.matched]
        if now and not any(x.measurable for x in now):
            lost.append(f"{le.name} (now {', '.join(x.describe() for x in now)})")
    return RuleInputs(
        spd_baseline_mm2=b.spd_mm2, spd_followup_mm2=f.spd_mm2,
        volume_baseline_ml=b.measurable_volume_ml, volume_followup_ml=f.measurable_volume_ml,
        enhancing_baseline=len(b.lesions), enhancing_followup=len(f.lesions),
        measurable_baseline=[le.describe() for le in b.measurable],
        measurable_followup=[le.describe() for le in f.measurable],
        new_measurable=[_where(le) for le in pair.new_measurable],
        new_non_measurable=[_where(le) for le in pair.new_lesions if not le.measurable],
        lost_measurability=lost,
        edited=[f"baseline {le.name}" for le in b.lesions if le.edited]
        + [f"follow-up {le.name}" for le in f.lesions if le.edited],
    )


def _where(le: Lesion) -> str:
    return f"{le.describe()}, {le.enhancing_ml:.2f} mL"


@dataclass(frozen=True)
class Decision:
    """One reading of the decision table: the category, the percent change and the row that decided."""

    category: str
    change_percent: float | None  # None without measurable disease at baseline
    row: str  # one of ROWS


ROWS = ("new lesion", "no enhancing disease", "measurable from none", "non-measurable only", "growth",
        "shrinkage", "stable")


def rano_decision(before: float, after: float, enhancing_left: bool, new_measurable: bool,
                  pr_percent: float = RANOThresholds.pr_percent,
                  pd_percent: float = RANOThresholds.pd_percent) -> Decision:
    """The RANO decision table (module docstring) on plain numbers; pure.

    Args:
        before, after: sum of the measurable lesions at baseline and follow-up (SPD in mm2, or
            enhancing volume in mL for the volumetric reading; any non-negative unit).
        enhancing_left: whether any enhancing lesion, measurable or not, remains at follow-up.
        new_measurable: whether a measurable enhancing lesion appeared where there was none.
        pr_percent, pd_percent: the response and progression thresholds (percent change).

    Raises :class:`RANOInputError` for a negative or non-finite sum, and for measurable disease
    at follow-up with ``enhancing_left`` false (a contradiction).
    """
    for name, value in (("sum at baseline", before), ("sum at follow-up", after)):
        if not math.isfinite(value) or value < 0:
            raise RANOInputError(f"{name} must be a finite non-negative number, got {value}")
    if after > 0 and not enhancing_left:
        raise RANOInputError(f"sum at follow-up is {after:g} but no enhancing disease is left")
    change = _percent(before, after)
    if new_measurable:
        return Decision("PD", change, "new lesion")
    if not enhancing_left:
        return Decision("CR", change, "no enhancing disease")
    if before <= 0:
        return Decision("PD", change, "measurable from none") if after > 0 else Decision(
            "SD", change, "non-measurable only")
    assert change is not None
    if change >= pd_percent:
        return Decision("PD", change, "growth")
    if change <= pr_percent:
        return Decision("PR", change, "shrinkage")
    return Decision("SD", change, "stable")


def _category(x: RuleInputs, before: float, after: float, pr: float, pd: float, unit: str,
              what: str) -> tuple[str, float | None, list[str]]:
    """One reading (SPD or volume) of :func:`rano_decision`, with its sentences."""
    d = rano_decision(before, after, x.enhancing_followup > 0, bool(x.new_measurable), pr, pd)
    text = f"{what}: {before:.1f} -> {after:.1f} {unit}" + (
        f" ({d.change_percent:+.1f} %)" if d.change_percent is not None else "")
    sentences = {
        "new lesion": f"{what}: PD because of a new measurable lesion ({'; '.join(x.new_measurable)}).",
        "no enhancing disease": (f"{what}: CR - no enhancing disease at either timepoint."
                                 if x.enhancing_baseline == 0 else
                                 f"{what}: CR - all enhancing disease has resolved "
                                 f"({x.enhancing_baseline} lesion(s) at baseline, none now)."),
        "measurable from none": f"{what}: PD - no measurable disease at baseline, measurable disease now "
                                f"({after:.1f} {unit}).",
        "non-measurable only": f"{what}: SD - non-measurable enhancing disease only "
                               f"({x.enhancing_followup} lesion(s)); the change cannot be measured.",
        "growth": f"{text}, at or above the {pd:+g} % progression threshold: PD.",
        "shrinkage": f"{text}, at or below the {pr:+g} % response threshold: PR.",
        "stable": f"{text}, between {pr:+g} % and {pd:+g} %: SD.",
    }
    reasons = [sentences[d.row]]
    if d.row == "shrinkage" and after == 0:
        reasons.append(f"{what}: not CR, because {x.enhancing_followup} non-measurable enhancing "
                       "lesion(s) remain.")
    return d.category, d.change_percent, reasons


def decide_inputs(x: RuleInputs, thresholds: RANOThresholds | None = None, criteria: str = "RANO") -> RuleResult:
    """The decision table on precomputed inputs (see the module docstring)."""
    t = thresholds or RANOThresholds()
    criteria = _CRITERIA_ALIASES.get(str(criteria).strip().lower(), criteria)
    if criteria not in CRITERIA:
        raise RANOInputError(f"criteria {criteria!r}: choose one of {', '.join(CRITERIA)} (or RANO2)")
    reasons = []
    if x.measurable_baseline:
        reasons.append(f"Baseline measurable lesions: {'; '.join(x.measurable_baseline)}.")
    else:
        reasons.append(f"Baseline: no measurable lesion ({x.enhancing_baseline} enhancing lesion(s) in all).")
    if x.measurable_followup:
        reasons.append(f"Follow-up measurable lesions: {'; '.join(x.measurable_followup)}.")
    else:
        reasons.append(f"Follow-up: no measurable lesion ({x.enhancing_followup} enhancing lesion(s) in all).")
    two_d, spd_change, s2 = _category(x, x.spd_baseline_mm2, x.spd_followup_mm2, t.pr_percent, t.pd_percent,
                                      "mm2", "RANO (sum of products)")
    vol, vol_change, sv = _category(x, x.volume_baseline_ml, x.volume_followup_ml, t.pr_volume_percent,
                                    t.pd_volume_percent, "mL", "RANO 2.0 (enhancing volume)")
    reasons += s2 + sv
    if two_d != vol:
        reasons.append(f"The bidimensional ({two_d}) and volumetric ({vol}) readings disagree; "
                       f"the category shown follows {criteria}.")
    for n in x.new_non_measurable:
        reasons.append(f"New non-measurable lesion ({n}): not PD by itself; check it on the next scan.")
    for n in x.lost_measurability:
        reasons.append(f"Baseline lesion {n} is no longer measurable and drops out of the sum.")
    if x.edited:
        reasons.append(f"Diameters edited by the reader: {', '.join(x.edited)}.")
    reasons.append("Compared with this pair's baseline scan, not with the nadir.")
    reasons.append(NOT_ASSESSED)
    category = two_d if criteria == "RANO" else vol
    return RuleResult(category, criteria, two_d, vol, spd_change, vol_change, x, reasons, t)


def decide(pair: PairMeasurement, thresholds: RANOThresholds | None = None, criteria: str = "RANO") -> RuleResult:
    """Rule-based RANO category of a measured, matched case pair."""
    return decide_inputs(rule_inputs(pair), thresholds, criteria)


# ------------------------------------------------------------------------------ vs the model


@dataclass
class Comparison:
    """The rule-based category beside the network's prediction."""

    rule: str
    model: str
    model_probability: float  # of the model's class
    rule_probability: float | None  # the model's probability of the rule's class
    agree: bool
    message: str

    def to_dict(self) -> dict:
        return asdict(self)


def _prediction_dict(prediction: Any) -> dict:
    """A prediction summary from whatever form the caller holds (read with the pipeline's reader)."""
    if hasattr(prediction, "summary"):  # pipeline.PairResult
        return prediction.summary()
    if isinstance(prediction, (str, Path)):
        from RANOResponseLib.core.outputs import read_prediction

        return read_prediction(prediction)
    if isinstance(prediction, Mapping) and "label" in prediction and "probabilities" in prediction:
        return dict(prediction)
    raise RANOInputError("prediction must be a PairResult, a prediction.json summary or its path")


def compare_with_prediction(rule: RuleResult, prediction: Any) -> Comparison:
    """Put the rule result beside the model's prediction and flag disagreement.

    ``prediction``: a :class:`pipeline.PairResult`, its ``summary()`` dict, a predict output
    folder or its ``prediction.json``.
    """
    p = _prediction_dict(prediction)
    probs = {str(k): float(v) for k, v in p["probabilities"].items()}
    model = str(p["label"])
    pm = probs.get(model, float("nan"))
    pr = probs.get(rule.category)
    if model == rule.category:
        msg = f"Model and rules agree: {model} (model p = {pm:.2f})."
    else:
        msg = (f"DISAGREEMENT: the model predicts {model} (p = {pm:.2f}) but the {rule.criteria} rules give "
               f"{rule.category}" + (f" (model p = {pr:.2f} for {rule.category})" if pr is not None else "")
               + ". Review the measurements and the images.")
    return Comparison(rule.category, model, pm, pr, model == rule.category, msg)


ASSESSMENT_JSON = "measurements.json"


def write_assessment(path: Path | str, pair: PairMeasurement, rule: RuleResult,
                     comparison: Comparison | None = None) -> Path:
    """``measurements.json``: the lesions of both timepoints, the rule result and, if a
    prediction was given, the comparison with it (written atomically)."""
    from RANOResponseLib.core.files import write_text

    d = {"measurements": pair.to_dict(), "rule": rule.to_dict(),
         "comparison": comparison.to_dict() if comparison else None}
    return write_text(json.dumps(d, indent=2) + "\n", path)


def read_assessment(path: Path | str) -> tuple[PairMeasurement, RuleResult, Comparison | None]:
    """Read what :func:`write_assessment` wrote."""
    path = Path(path)
    if not path.is_file():
        raise RANOInputError(f"{path}: measurements file not found")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        pair = PairMeasurement.from_dict(d["measurements"])
        rule = RuleResult.from_dict(d["rule"])
        comp = Comparison(**d["comparison"]) if d.get("comparison") else None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RANOInputError(f"{path}: not a measurements file written by `rano-response measure` ({e})") from None
    return pair, rule, comp
