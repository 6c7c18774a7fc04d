"""Course-level RANO (rano.course) on hand-made courses.

Every expected category, nadir and confirmation below is written by hand from the RANO
definitions (Wen et al. 2010; RANO 2.0, Wen et al. 2023): progression is >= +25 % sum of products
(>= +40 % enhancing volume) against the smallest burden since the baseline (the nadir), or a new
measurable lesion; response is <= -50 % (<= -65 % volume) against the baseline; CR is no enhancing
disease at all; a CR or PR needs the first scan at least 4 weeks later to show it again.
"""

from __future__ import annotations

import pytest
from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.rano.course import (
    Burden,
    assess_course,
    choose_baseline,
    criteria_dict,
    latest_reference,
)


def course(*rows, volumes=None, lesions=None, new=None):
    """Burdens from ``(name, weeks, spd)`` rows; volumes default to spd / 100 mL, one lesion if spd > 0."""
    out = []
    for i, (name, weeks, spd) in enumerate(rows):
        vol = volumes[i] if volumes else spd / 100.0
        n = lesions[i] if lesions else (1 if spd > 0 else 0)
        out.append(Burden(name, weeks, spd, vol, n, tuple((new or {}).get(name, ()))))
    return out


def cats(result, reading="rano"):
    return [getattr(a, reading).category for a in result]


def confirmed(result, reading="rano"):
    return [getattr(a, reading).confirmed for a in result]


def test_progression_is_against_the_nadir_response_against_the_baseline():
    b = course(("week-000-1", 0, 2000), ("week-000-2", 0, 1000), ("week-014", 14, 900), ("week-026", 26, 400),
               ("week-034", 34, 350), ("week-046", 46, 480))
    r = assess_course(b, baseline=1, pre_op=0)
    assert [a.role for a in r] == ["pre-op", "baseline", "follow-up", "follow-up", "follow-up", "follow-up"]
    # 900: -10 % vs nadir 1000 and baseline -> SD; 400: -60 % vs baseline -> PR; 350: -65 % -> PR;
    # 480: +37 % vs the nadir 350 -> PD although it is -52 % against the baseline
    assert cats(r) == ["", "", "SD", "PR", "PR", "PD"]
    last = r[-1].rano
    assert last.nadir == 350 and last.nadir_timepoint == "week-034" and last.reference == "nadir"
    assert last.change_vs_nadir_pct == pytest.approx(100 * 130 / 350)
    assert last.change_vs_baseline_pct == pytest.approx(-52.0)
    # PR at 26 is confirmed by week-034 (>= 4 weeks later, PR); PR at 34 is not by week-046 (PD)
    assert confirmed(r) == ["", "", "", "yes", "no", ""]
    assert r[2].rano.nadir == 1000 and r[2].rano.nadir_timepoint == "week-000-2"  # the baseline counts
    assert r[3].rano.nadir == 900 and r[3].rano.nadir_timepoint == "week-014"


def test_nadir_progression_that_a_pair_with_the_previous_scan_would_miss():
    b = course(("b", 0, 1000), ("f1", 12, 500), ("f2", 20, 600), ("f3", 28, 640))
    r = assess_course(b, baseline=0)
    # f2: +20 % vs nadir 500, -40 % vs baseline: SD; f3: +28 % vs nadir 500 (only +6.7 % vs f2): PD
    assert cats(r) == ["", "PR", "SD", "PD"]
    assert r[1].rano.confirmed == "no"  # f2 (8 weeks later) is SD
    assert r[3].rano.nadir_timepoint == "f1"


def test_thresholds_are_inclusive():
    b = course(("b", 0, 1000), ("f1", 10, 500), ("f2", 20, 400), ("f3", 30, 500))
    r = assess_course(b, baseline=0)
    # exactly -50 % vs baseline: PR; 400 is -60 %: PR; 500 is exactly +25 % vs the nadir 400: PD
    assert cats(r) == ["", "PR", "PR", "PD"]
    assert r[3].rano.row == "growth"


def test_complete_response_confirmation_and_recurrence():
    b = course(("b", 0, 800), ("f1", 14, 0), ("f2", 16, 0), ("f3", 20, 0), ("f4", 30, 150),
               new={"f4": ("L2 13.0 x 11.5 mm (150 mm2)",)})
    r = assess_course(b, baseline=0)
    assert cats(r) == ["", "CR", "CR", "CR", "PD"]
    # f1 -> first scan >= 4 weeks later is f3 (CR): yes; f2 -> f3 (exactly 4 weeks): yes; f3 -> f4 (PD): no
    assert confirmed(r) == ["", "yes", "yes", "no", ""]
    assert r[4].rano.row == "new lesion" and "new measurable lesion" in r[4].rano.reasoning[0]


def test_confirmation_pending_without_a_late_enough_scan():
    b = course(("b", 0, 800), ("f1", 10, 300), ("f2", 12, 290))
    r = assess_course(b, baseline=0)
    assert cats(r) == ["", "PR", "PR"]
    assert confirmed(r) == ["", "pending", "pending"]  # f2 is only 2 weeks after f1


def test_non_measurable_disease():
    # baseline: one enhancing lesion too small to measure (SPD 0); then none; then measurable disease
    b = course(("b", 0, 0), ("f1", 12, 0), ("f2", 20, 0), ("f3", 24, 120), lesions=[1, 1, 0, 1])
    r = assess_course(b, baseline=0)
    # f1: no measurable disease at baseline nor now, enhancing left: SD; f2: nothing enhancing: CR;
    # f3: measurable disease where the nadir had none: PD
    assert cats(r) == ["", "SD", "CR", "PD"]
    assert r[3].rano.row == "measurable from none"


def test_rano2_volumetric_thresholds_and_post_radiotherapy_window():
    b = course(("b", 0, 1000), ("f1", 8, 1300), ("f2", 14, 1000), ("f3", 30, 1400),
               volumes=[10.0, 13.5, 12.0, 14.5])
    r = assess_course(b, baseline=0)  # radiotherapy's end assumed at the baseline (week 0)
    # SPD +30 % -> PD; volume +35 % < +40 % -> SD
    assert cats(r) == ["", "PD", "SD", "PD"]  # f2: 0 % vs the nadir 1000 (b); f3: +40 %
    assert cats(r, "rano2") == ["", "SD", "SD", "PD"]  # volumes +35 %, +20 %, +45 % vs the nadir 10
    assert [a.pseudoprogression_window for a in r] == [False, True, False, False]  # < 12 weeks after week 0
    assert r[1].rano.confirmed == ""  # RANO's PD needs no confirmation
    assert any("pseudoprogression possible" in s for s in r[1].rano.reasoning)


def test_rano2_preliminary_progression_confirmed_or_not():
    vols_not = [10.0, 15.0, 12.0]  # +50 % at week 8 (preliminary PD), then +20 %: SD -> not confirmed
    r = assess_course(course(("b", 0, 1000), ("f1", 8, 1000), ("f2", 14, 1000), volumes=vols_not), baseline=0)
    assert cats(r, "rano2") == ["", "PD", "SD"] and confirmed(r, "rano2") == ["", "no", ""]
    assert any("pseudoprogression likely" in s for s in r[1].rano2.reasoning)
    vols_yes = [10.0, 15.0, 16.0]  # still PD (+60 % vs nadir 10) and larger: confirmed
    r = assess_course(course(("b", 0, 1000), ("f1", 8, 1000), ("f2", 14, 1000), volumes=vols_yes), baseline=0)
    assert confirmed(r, "rano2") == ["", "yes", ""]
    r = assess_course(course(("b", 0, 1000), ("f1", 8, 1000), volumes=[10.0, 15.0]), baseline=0)
    assert confirmed(r, "rano2") == ["", "pending"]
    # radiotherapy ended long before: no window, no confirmation needed
    r = assess_course(course(("b", 0, 1000), ("f1", 8, 1000), volumes=[10.0, 15.0]), baseline=0, rt_end_weeks=-20)
    assert r[1].pseudoprogression_window is False and confirmed(r, "rano2") == ["", ""]


def test_baseline_choice():
    names = ["week-000-1", "week-000-2", "week-012", "week-020"]
    c = choose_baseline(names, {"week-000-1": "Pre-Op", "week-000-2": "Post-Op ", "week-012": "SD"})
    assert (c.index, c.pre_op) == (1, 0) and "Post-Op" in c.reason
    assert choose_baseline(names, {"week-000-2": "Post-Op/PD"}).index == 1
    c = choose_baseline(names, {"week-000-1": "Pre-Op", "week-012": "PD"})  # no Post-Op row
    assert (c.index, c.pre_op) == (1, 0)
    c = choose_baseline(names)  # nothing known: first scan taken as pre-operative
    assert (c.index, c.pre_op) == (1, 0) and "taken as pre-operative" in c.reason
    c = choose_baseline(names, {"week-000-1": "Pre-Op", "week-000-2": "Post-Op"}, override="week-012")
    assert (c.index, c.pre_op) == (2, 0)
    assert choose_baseline(["week-010"]).index == 0
    with pytest.raises(RANOInputError, match="week-099"):
        choose_baseline(names, override="week-099")


def test_roles_before_an_overridden_baseline():
    b = course(("week-000-1", 0, 2000), ("week-000-2", 0, 1000), ("week-012", 12, 900), ("week-020", 20, 300))
    r = assess_course(b, baseline=2, pre_op=0)
    assert [a.role for a in r] == ["pre-op", "pre-baseline", "baseline", "follow-up"]
    assert cats(r) == ["", "", "", "PR"]  # 300 vs 900: -67 %


def test_latest_reference_visit():
    assert latest_reference(["Pre-Op", "Post-Op ", "SD", "PR", "PD"]) == 3
    assert latest_reference(["Pre-Op", "Post-Op/PD", "PD"]) == 1
    assert latest_reference(["Pre-Op", "SD"]) is None
    assert latest_reference([]) is None


def test_refuses_a_course_out_of_order():
    with pytest.raises(RANOInputError, match="chronological"):
        assess_course(course(("a", 10, 100), ("b", 5, 100)), baseline=0)


def test_criteria_record_the_radiotherapy_assumption():
    d = criteria_dict()
    assert d["pd_percent"] == 25.0 and d["pr_volume_percent"] == -65.0 and d["confirmation_weeks"] == 4.0
    assert d["rt_end"] == "assumed at the baseline scan"
    assert criteria_dict(rt_end_weeks=10.0)["rt_end"] == "given"
