"""RANO over the whole course of a patient: baseline, nadir, confirmation, the post-radiotherapy window.

A pair of scans is read with :func:`RANOResponseLib.rano.rules.rano_decision`; a course adds what
RANO defines over time (Wen et al. 2010; RANO 2.0, Wen et al. 2023), and this module holds those
rules, as pure functions over per-timepoint burdens (:class:`Burden`, made from a
:class:`~RANOResponseLib.rano.measurement.TimepointMeasurement`), without images:

* **Baseline** (:func:`choose_baseline`): the first post-operative scan (LUMIERE: the first rated
  ``Post-Op``), else the first scan after the pre-operative one, unless the reader names another.
* **Progression against the nadir**: the smallest burden since the baseline (the baseline
  included, the scan being read excluded) is the reference for PD: the same decision table with
  the nadir as "before" (a new measurable lesion, measurable disease where the nadir had none, or
  growth by the progression threshold).
* **Response against the baseline**: otherwise the table with the baseline as "before" decides CR
  (no enhancing disease left), PR (shrinkage by the response threshold) or SD.
* **Confirmation**: CR and PR count only when the first scan at least
  :attr:`CourseCriteria.confirmation_weeks` later shows the same response (or better):
  ``"yes"``, ``"no"``, or ``"pending"`` while there is no such scan yet.
* **RANO 2.0 volumetric**: the same rules on the enhancing volume of the measurable lesions with
  RANO 2.0's thresholds (:class:`~RANOResponseLib.rano.rules.RANOThresholds`, the one table).
  Progression within :attr:`CourseCriteria.pseudoprogression_weeks` after the end of
  radiotherapy is *preliminary* (pseudoprogression possible): confirmed (``"yes"``) when the first
  scan at least ``confirmation_weeks`` later is still PD with a burden no smaller, or a new
  measurable lesion; ``"no"`` (pseudoprogression likely) otherwise; ``"pending"`` until then.
  Neither LUMIERE nor a list of studies records when radiotherapy ended: unless given, it is
  *assumed* to be the baseline scan's date (RANO 2.0's baseline is the post-radiotherapy scan),
  and the assessment says so.

The reference for a follow-up in training's ``--pairing reference`` (the latest reference visit:
a post-operative scan or a PR / CR nadir, as BraTPRO pairs LUMIERE) is :func:`latest_reference`.
What images cannot tell (T2/FLAIR progression, steroids, clinical status) is said, never guessed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.rano.measurement import TimepointMeasurement
from RANOResponseLib.rano.rules import Decision, RANOThresholds, rano_decision

PRE_OP, POST_OP = "Pre-Op", "Post-Op"
REFERENCE_RATINGS = (POST_OP, "PR", "CR")  # BraTPRO's reference visits (post-op scan or a response nadir)
ROLES = ("pre-op", "pre-baseline", "baseline", "follow-up")
CONFIRMATIONS = ("yes", "no", "pending", "")
NOT_ASSESSED = ("Not assessed from the segmentations: T2/FLAIR non-enhancing progression, corticosteroid dose "
                "and clinical status.")


@dataclass(frozen=True)
class CourseCriteria:
    """The course's own rules of time (the percent thresholds are :class:`RANOThresholds`)."""

    confirmation_weeks: float = 4.0  # a CR / PR (and a preliminary PD) is confirmed this long after
    pseudoprogression_weeks: float = 12.0  # after the end of radiotherapy: PD is preliminary


# ------------------------------------------------------------------------------ ratings, baseline


def rating_kind(rating: str) -> str:
    """A LUMIERE rating as distributed -> its kind: ``"Post-Op "`` and ``"Post-Op/PD"`` are Post-Op."""
    return str(rating).split("/")[0].strip()


def is_reference_rating(rating: str) -> bool:
    """Post-Op (also the dirty ``Post-Op/PD``: a post-operative scan), PR or CR."""
    return rating_kind(rating) in REFERENCE_RATINGS


def latest_reference(ratings: Sequence[str]) -> int | None:
    """Index of the latest reference visit among the earlier timepoints' ``ratings`` (oldest
    first): a Post-Op scan or a PR / CR nadir. ``None`` if there is none."""
    for i in range(len(ratings) - 1, -1, -1):
        if is_reference_rating(ratings[i]):
            return i
    return None


@dataclass(frozen=True)
class BaselineChoice:
    """Which timepoint is the baseline, why, and which one (if known) is pre-operative."""

    index: int
    reason: str
    pre_op: int | None = None


def choose_baseline(names: Sequence[str], ratings: Mapping[str, str] | None = None,
                    override: str | None = None) -> BaselineChoice:
    """The course's baseline among ``names`` (timepoints, oldest first).

    In order: ``override`` (``--baseline-timepoint``); the first timepoint rated Post-Op in
    ``ratings`` (name -> rating as written); the first timepoint after the one rated Pre-Op;
    without either, the first scan is taken as pre-operative (LUMIERE counts weeks from the
    pre-operative MRI) and the baseline is the scan after it (a course of one scan: that scan);
    ``pre_op`` follows the same rules.
    Raises :class:`RANOInputError` for an override that is not one of ``names``.
    """
    if not names:
        raise RANOInputError("a course needs at least one timepoint")
    kinds = [rating_kind((ratings or {}).get(n, "")) for n in names]
    pre = next((i for i, k in enumerate(kinds) if k == PRE_OP), None)
    post = next((i for i, k in enumerate(kinds) if k == POST_OP), None)
    if post is not None:
        pre = max((i for i in range(post) if kinds[i] == PRE_OP), default=None)
    assumed = post is None and pre is None and len(names) > 1  # nothing rated: the first scan is pre-op
    if assumed:
        pre = 0
    if override is not None:
        if override not in names:
            raise RANOInputError(f"--baseline-timepoint {override}: not a timepoint of this course "
                                 f"(timepoints: {', '.join(names)})")
        i = list(names).index(override)
        return BaselineChoice(i, f"given (--baseline-timepoint {override})", pre if pre is not None and pre < i else None)
    if post is not None:
        return BaselineChoice(post, f"first post-operative scan ({names[post]}, rated {POST_OP})", pre)
    if assumed:
        return BaselineChoice(1, f"no Pre-Op / Post-Op rating: the first scan ({names[0]}) is taken as pre-operative "
                                 f"and the next one as the baseline (give --baseline-timepoint otherwise)", 0)
    if pre is not None and pre + 1 < len(names):
        return BaselineChoice(pre + 1, f"first scan after the pre-operative one ({names[pre]}, rated {PRE_OP})", pre)
    if len(names) == 1:
        return BaselineChoice(0, "the only scan")
    return BaselineChoice(len(names) - 1, "no scan after the one rated Pre-Op: the last scan")  # nothing to assess


# ------------------------------------------------------------------------------ burdens, readings


@dataclass(frozen=True)
class Burden:
    """What the course rules need of one timepoint's measurement."""

    timepoint: str
    weeks: float
    spd_mm2: float  # sum of the products of the measurable enhancing lesions (RANO)
    volume_ml: float  # enhancing volume of the measurable lesions (RANO 2.0 volumetric)
    enhancing_lesions: int  # enhancing lesions of any size, measurable or not
    new_measurable: tuple[str, ...] = ()  # measurable lesions not seen at the previous timepoint

    @classmethod
    def of(cls, timepoint: str, weeks: float, m: TimepointMeasurement,
           new_measurable: Sequence[str] = ()) -> "Burden":
        """The burden of a measured timepoint; ``new_measurable`` describes its new measurable lesions."""
        return cls(timepoint, float(weeks), m.spd_mm2, m.measurable_volume_ml, len(m.lesions), tuple(new_measurable))


@dataclass
class Reading:
    """One reading (RANO's sum of products, or RANO 2.0's volume) of one timepoint."""

    category: str  # CR / PR / SD / PD; "" at and before the baseline
    row: str  # the row of rules.ROWS that decided ("" at and before the baseline)
    reference: str  # "nadir" (PD) or "baseline" (CR / PR / SD); ""
    value: float
    nadir: float | None  # smallest value since the baseline, before this timepoint
    nadir_timepoint: str
    change_vs_nadir_pct: float | None
    change_vs_baseline_pct: float | None
    confirmed: str = ""  # one of CONFIRMATIONS
    reasoning: list[str] = field(default_factory=list)


@dataclass
class TimepointAssessment:
    """The course's verdict on one timepoint, in both readings."""

    timepoint: str
    weeks: float
    role: str  # one of ROLES
    rano: Reading
    rano2: Reading
    pseudoprogression_window: bool = False  # within the post-radiotherapy window (see the module doc)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Scale:
    """How one reading is read: its value, thresholds, unit and name."""

    value: Callable[[Burden], float]
    pr: float
    pd: float
    unit: str
    what: str


def _scales(t: RANOThresholds) -> tuple[_Scale, _Scale]:
    return (_Scale(lambda b: b.spd_mm2, t.pr_percent, t.pd_percent, "mm2", "RANO (sum of products)"),
            _Scale(lambda b: b.volume_ml, t.pr_volume_percent, t.pd_volume_percent, "mL",
                   "RANO 2.0 (enhancing volume)"))


def _pct(p: float | None) -> str:
    return "" if p is None else f" ({p:+.1f} %)"


def _read(burdens: Sequence[Burden], i: int, base: int, s: _Scale) -> Reading:
    """The category of follow-up ``i``: PD against the nadir, else CR / PR / SD against the baseline."""
    cur, b0 = burdens[i], burdens[base]
    k = min(range(base, i), key=lambda j: (s.value(burdens[j]), j))  # earliest smallest
    nadir, v, v0 = s.value(burdens[k]), s.value(cur), s.value(b0)
    left = cur.enhancing_lesions > 0
    vs_nadir: Decision = rano_decision(nadir, v, left, bool(cur.new_measurable), s.pr, s.pd)
    vs_base: Decision = rano_decision(v0, v, left, False, s.pr, s.pd)
    r = Reading("", "", "", v, nadir, burdens[k].timepoint, vs_nadir.change_percent, vs_base.change_percent)
    u, what, at = s.unit, s.what, f"nadir {nadir:.1f} {s.unit} at {burdens[k].timepoint}"
    if vs_nadir.category == "PD":
        r.category, r.row, r.reference = "PD", vs_nadir.row, "nadir"
        r.reasoning.append({
            "new lesion": f"{what}: PD because of a new measurable lesion ({'; '.join(cur.new_measurable)}).",
            "measurable from none": f"{what}: PD - measurable disease ({v:.1f} {u}) where the {at} had none.",
            "growth": f"{what}: {v:.1f} {u} against the {at}{_pct(vs_nadir.change_percent)}, at or above the "
                      f"{s.pd:+g} % progression threshold: PD.",
        }[vs_nadir.row])
        return r
    r.reference = "baseline"
    r.category = vs_base.category if vs_base.category in ("CR", "PR") else "SD"
    r.row = vs_base.row
    against_nadir = (f"against the {at}{_pct(vs_nadir.change_percent)} below the {s.pd:+g} % progression "
                     "threshold")
    if r.category == "CR":
        r.reasoning.append(f"{what}: CR - no enhancing disease left ({b0.enhancing_lesions} enhancing lesion(s) at "
                           f"the baseline {b0.timepoint}).")
    elif r.category == "PR":
        r.reasoning.append(f"{what}: {v:.1f} {u} against the baseline {v0:.1f} {u}{_pct(vs_base.change_percent)}, at "
                           f"or below the {s.pr:+g} % response threshold: PR.")
        if v == 0:
            r.reasoning.append(f"{what}: not CR, because {cur.enhancing_lesions} non-measurable enhancing lesion(s) "
                               "remain.")
    elif vs_base.row == "non-measurable only":
        r.reasoning.append(f"{what}: SD - no measurable disease at the baseline nor now; "
                           f"{cur.enhancing_lesions} non-measurable enhancing lesion(s), whose change cannot be measured.")
    else:
        r.reasoning.append(f"{what}: {v:.1f} {u}; {against_nadir}, and against the baseline {v0:.1f} {u}"
                           f"{_pct(vs_base.change_percent)} above the {s.pr:+g} % response threshold: SD.")
    return r


def _confirm(burdens: Sequence[Burden], readings: Sequence[Reading], i: int, s: _Scale, c: CourseCriteria,
             preliminary_pd: bool) -> None:
    """Fill ``readings[i].confirmed`` (and say why) from the first scan ``confirmation_weeks`` later."""
    r = readings[i]
    if r.category not in ("CR", "PR") and not (r.category == "PD" and preliminary_pd):
        return
    later = [j for j in range(i + 1, len(burdens)) if burdens[j].weeks - burdens[i].weeks >= c.confirmation_weeks]
    what = f"{s.what}: {r.category} at {burdens[i].timepoint}"
    if not later:
        r.confirmed = "pending"
        r.reasoning.append(f"{what} awaits confirmation by a scan at least {c.confirmation_weeks:g} weeks later.")
        return
    j = later[0]
    then = readings[j]
    gap = burdens[j].weeks - burdens[i].weeks
    if r.category == "PD":
        ok = then.category == "PD" and (then.row == "new lesion" or s.value(burdens[j]) >= r.value)
        r.confirmed = "yes" if ok else "no"
        r.reasoning.append(f"{what} (preliminary) " + (
            f"confirmed by {burdens[j].timepoint} ({gap:g} weeks later: PD, burden not smaller)." if ok else
            f"not confirmed by {burdens[j].timepoint} ({gap:g} weeks later: {then.category}, "
            f"{s.value(burdens[j]):.1f} {s.unit}): pseudoprogression likely."))
        return
    ok = then.category in (("CR",) if r.category == "CR" else ("PR", "CR"))
    r.confirmed = "yes" if ok else "no"
    r.reasoning.append(f"{what} " + ("confirmed" if ok else "not confirmed") +
                       f" by {burdens[j].timepoint} ({gap:g} weeks later: {then.category}).")


def assess_course(
    burdens: Sequence[Burden],
    baseline: int,
    pre_op: int | None = None,
    thresholds: RANOThresholds | None = None,
    criteria: CourseCriteria | None = None,
    rt_end_weeks: float | None = None,
) -> list[TimepointAssessment]:
    """RANO and RANO 2.0 at every timepoint of a course (``burdens`` oldest first).

    ``baseline``, ``pre_op``: indices (:func:`choose_baseline`). ``rt_end_weeks``: when
    radiotherapy ended, on the burdens' week scale; ``None`` assumes the baseline's week (see the
    module docstring). Timepoints before the baseline get no category.
    """
    if not 0 <= baseline < len(burdens):
        raise RANOInputError(f"baseline index {baseline} outside a course of {len(burdens)} timepoints")
    weeks = [b.weeks for b in burdens]
    if any(b < a for a, b in zip(weeks, weeks[1:])):
        raise RANOInputError(f"timepoints are not in chronological order: {[b.timepoint for b in burdens]}")
    t, c = thresholds or RANOThresholds(), criteria or CourseCriteria()
    rt_end = burdens[baseline].weeks if rt_end_weeks is None else float(rt_end_weeks)
    rt_note = "assumed at the baseline scan" if rt_end_weeks is None else "given"
    scales = _scales(t)
    per_scale: list[list[Reading]] = []
    for s in scales:
        readings = []
        for i, b in enumerate(burdens):
            if i < baseline:
                readings.append(Reading("", "", "", s.value(b), None, "", None, None,
                                        reasoning=[f"{s.what}: before the baseline ({burdens[baseline].timepoint}); "
                                                   "not assessed."]))
            elif i == baseline:
                readings.append(Reading("", "", "", s.value(b), s.value(b), b.timepoint, None, None, reasoning=[
                    f"{s.what}: baseline, {s.value(b):.1f} {s.unit} ({b.enhancing_lesions} enhancing lesion(s)); "
                    "later scans are compared with it for response and with the nadir for progression."]))
            else:
                readings.append(_read(burdens, i, baseline, s))
        per_scale.append(readings)
    out = []
    for i, b in enumerate(burdens):
        window = i > baseline and b.weeks - rt_end < c.pseudoprogression_weeks
        for n, (s, readings) in enumerate(zip(scales, per_scale)):
            _confirm(burdens, readings, i, s, c, preliminary_pd=window and n == 1)
            r = readings[i]
            if window and r.category == "PD":
                r.reasoning.append(
                    f"{s.what}: within {c.pseudoprogression_weeks:g} weeks after the end of radiotherapy (week "
                    f"{rt_end:g}, {rt_note}): pseudoprogression possible"
                    + (" (RANO 2.0: preliminary PD)." if n == 1 else
                       "; RANO calls this PD only if most new enhancement lies outside the radiation field (not "
                       "assessed)."))
            if i > baseline:
                r.reasoning.append(NOT_ASSESSED)
        role = ("pre-op" if i == pre_op else "pre-baseline") if i < baseline else (
            "baseline" if i == baseline else "follow-up")
        out.append(TimepointAssessment(b.timepoint, b.weeks, role, per_scale[0][i], per_scale[1][i], window))
    return out


def criteria_dict(thresholds: RANOThresholds | None = None, criteria: CourseCriteria | None = None,
                  rt_end_weeks: float | None = None) -> dict:
    """The thresholds and course rules an assessment used (``timeline.json``'s ``criteria``)."""
    return {**asdict(thresholds or RANOThresholds()), **asdict(criteria or CourseCriteria()),
            "rt_end_weeks": rt_end_weeks,
            "rt_end": "assumed at the baseline scan" if rt_end_weeks is None else "given",
            "progression_reference": "nadir (smallest burden since the baseline, baseline included)",
            "response_reference": "baseline"}
