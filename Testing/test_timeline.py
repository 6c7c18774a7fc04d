"""``rano-response timeline`` on a small 3 mm phantom cohort: categories, nadir, confirmation, cache,
outputs and bad input.

The truth of the categories comes from the phantom's own record (``phantom_truth.csv``: the sum of
products measured on the template-space masks, whether a new measurable lesion appeared; the rating
CSV's ``NonMeasurableLesions``) and RANO's course rules written out here (Wen et al. 2010), not
from RANOResponseLib.rano.course: progression against the nadir (the smallest sum since the
post-operative baseline, baseline included), response against the baseline, CR when no enhancing
lesion is left, and CR / PR confirmed by the first scan at least 4 weeks later. The timeline
measures each scan's own (resampled, moved) mask, so sums may differ from the template's by a few
percent: where that could change the category, every category the interval allows is accepted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from conftest import png_size
from RANOResponseCLI import main as cli_main
from RANOResponseLib.core.names import CLASS_NAMES
from RANOResponseLib.inference.timeline import CSV_COLUMNS, read_timeline, run_timeline
from RANOResponseLib.phantom.generator import RATING_CSV, PhantomConfig, generate_cohort
from RANOResponseLib.review.course_report import course_writers

COHORT = PhantomConfig(patients=2, seed=1401, spacing=3.0, min_followups=4, max_followups=4, quirks=False)
TOL = 0.10  # a scan's own 3 mm mask (moved, resampled) measures within 8 % of the template mask here
PD_RATIO, PR_RATIO, CONFIRM_WEEKS = 1.25, 0.50, 4.0


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("course-cohort")
    generate_cohort(root, COHORT)
    return root


@pytest.fixture(scope="module")
def runs(cohort, tmp_path_factory, tiny_bundle) -> dict[str, Path]:
    """Each patient's timeline (the cohort's masks, the tiny network); the first with plot and PDF."""
    out = {}
    for k, patient in enumerate(("Patient-001", "Patient-002")):
        folder = tmp_path_factory.mktemp("timeline") / patient
        run_timeline(cohort / "Imaging" / patient, folder, bundle=tiny_bundle, device="cpu", segmentation="cohort",
                     writers=course_writers() if k == 0 else (), show_progress=False)
        out[patient] = folder
    return out


def truth_rows(cohort: Path, patient: str) -> pd.DataFrame:
    truth = pd.read_csv(cohort / "phantom_truth.csv")
    ratings = pd.read_csv(cohort / RATING_CSV, dtype=str, keep_default_na=False)
    rows = truth[(truth["patient"] == patient) & (truth["folder_exists"].astype(str) == "True")].reset_index(drop=True)
    flag = dict(zip(ratings.loc[ratings["Patient"] == patient, "Date"],
                    ratings.loc[ratings["Patient"] == patient, "NonMeasurableLesions"]))
    rows["enhancing_left"] = (rows["n_measurable"] > 0) | rows["date"].map(lambda d: flag.get(d) == "x")
    return rows


def allowed_categories(rows: pd.DataFrame) -> dict[str, set[str]]:
    """Every RANO category a follow-up's sum of products (within TOL) allows, by the course rules."""
    base = int(np.nonzero((rows["role"] == "post-op").to_numpy())[0][0])
    spd = rows["spd_mm2"].astype(float).to_numpy()
    out = {}
    for i in range(base + 1, len(rows)):
        nadir = spd[base:i].min()
        lo, hi = spd[i] * (1 - TOL), spd[i] * (1 + TOL)
        if bool(rows["new_lesion"][i]):
            cats = {"PD"}
        elif not rows["enhancing_left"][i]:
            cats = {"CR"}
        elif nadir == 0:
            cats = {"PD"} if spd[i] > 0 else {"SD"}
        else:
            cats = set()
            if hi >= PD_RATIO * nadir * (1 - TOL):
                cats.add("PD")
            if lo < PD_RATIO * nadir * (1 + TOL):  # not progression: response against the baseline?
                if lo <= PR_RATIO * spd[base] * (1 + TOL):
                    cats.add("PR")
                if hi > PR_RATIO * spd[base] * (1 - TOL):
                    cats.add("SD")
        out[rows["date"][i]] = cats
    return out


def test_categories_against_the_planned_course(cohort, runs):
    n = 0
    for patient, out in runs.items():
        doc = read_timeline(out)
        rows = truth_rows(cohort, patient)
        assert doc["baseline"] == rows.loc[rows["role"] == "post-op", "date"].item()
        allowed = allowed_categories(rows)
        got = {r["timepoint"]: r["category"] for r in doc["timepoints"] if r["role"] == "follow-up"}
        assert set(got) == set(allowed)
        for tp, cats in allowed.items():
            assert got[tp] in cats, f"{patient} {tp}: {got[tp]}, truth allows {cats}"
            n += 1
        assert {r["timepoint"]: r["role"] for r in doc["timepoints"]}[rows["date"][0]] == "pre-op"
    assert n == 8


def test_nadir_not_the_previous_scan(cohort, runs):
    """Patient-001's last scan shrank by > 50 % against the scan before it (rated PR pairwise), but
    against the nadir and the baseline it is stable."""
    rows = truth_rows(cohort, "Patient-001")
    spd = rows["spd_mm2"].astype(float).to_numpy()
    base = int(np.nonzero((rows["role"] == "post-op").to_numpy())[0][0])
    assert spd[-1] <= 0.5 * spd[-2] and rows["rating_written"].iloc[-1] == "PR"  # the pairwise reading
    last = read_timeline(runs["Patient-001"])["timepoints"][-1]
    nadir = spd[base:-1].min()
    assert last["nadir_mm2"] == pytest.approx(nadir, rel=TOL)
    assert last["nadir_timepoint"] == rows["date"][base + int(np.argmin(spd[base:-1]))]
    assert last["change_vs_nadir_pct"] == pytest.approx(100 * (last["spd_mm2"] / last["nadir_mm2"] - 1), abs=0.01)
    assert last["category"] == "SD"


def test_nadir_at_every_follow_up(cohort, runs):
    for patient, out in runs.items():
        rows = truth_rows(cohort, patient)
        spd = dict(zip(rows["date"], rows["spd_mm2"].astype(float)))
        doc = read_timeline(out)
        names = [r["timepoint"] for r in doc["timepoints"]]
        b = names.index(doc["baseline"])
        for i, r in enumerate(doc["timepoints"]):
            if r["role"] != "follow-up":
                continue
            truth = min(spd[x] for x in names[b:i])
            assert r["nadir_mm2"] == pytest.approx(truth, rel=TOL, abs=20.0), f"{patient} {r['timepoint']}"
            measured = [x["spd_mm2"] for x in doc["timepoints"][b:i]]
            assert r["nadir_mm2"] == pytest.approx(min(measured))  # the smallest measured so far, baseline included


def test_confirmation_states(cohort, runs):
    seen = set()
    for patient, out in runs.items():
        doc = read_timeline(out)
        rows = [r for r in doc["timepoints"] if r["role"] == "follow-up"]
        allowed = allowed_categories(truth_rows(cohort, patient))
        for i, r in enumerate(rows):
            if r["category"] not in ("CR", "PR"):
                assert r["confirmed"] == ""
                continue
            later = [x for x in rows[i + 1:] if x["weeks"] - r["weeks"] >= CONFIRM_WEEKS]
            if not later:
                expected = "pending"
            else:
                need = {"CR"} if r["category"] == "CR" else {"PR", "CR"}
                cats = allowed[later[0]["timepoint"]]
                if cats <= need:
                    expected = "yes"
                elif not cats & need:
                    expected = "no"
                else:
                    continue  # the truth itself is ambiguous here
            assert r["confirmed"] == expected, f"{patient} {r['timepoint']}"
            seen.add(expected)
    assert "no" in seen  # Patient-002's CR is followed by a recurrence


def test_new_lesion_keeps_its_course_id(runs, cohort):
    doc = read_timeline(runs["Patient-002"])
    rows = truth_rows(cohort, "Patient-002")
    new_at = set(rows.loc[rows["new_lesion"].astype(bool), "date"])
    assert new_at  # the recurrence after the CR
    for r in doc["timepoints"]:
        flagged = {le["id"] for le in r["lesions"] if le["new"] and le["measurable"]}
        assert bool(flagged) == (r["timepoint"] in new_at), r["timepoint"]
        for le in r["lesions"]:
            if le["new"]:
                assert le["first_seen"] == r["timepoint"]
    ids = [le["id"] for r in doc["timepoints"] for le in r["lesions"]]
    primary = doc["timepoints"][0]["lesions"][0]["id"]
    # pre-op, baseline and the two follow-ups before the CR: the one primary lesion, always the same id
    assert all([le["id"] for le in r["lesions"]] == [primary] for r in doc["timepoints"][:4])
    assert primary not in {le["id"] for le in doc["timepoints"][-1]["lesions"]}  # the recurrence is a new lesion
    assert sorted(d["id"] for d in doc["lesions"]) == sorted(set(ids))


def test_outputs(runs):
    out = runs["Patient-001"]
    doc = read_timeline(out)
    assert doc["outputs"] == {"csv": "timeline.csv", "plot": "burden.png", "report": "timeline_report.pdf"}
    table = pd.read_csv(out / "timeline.csv", dtype=str, keep_default_na=False)
    assert list(table.columns) == list(CSV_COLUMNS)
    for c in ("timepoint", "weeks", "spd_mm2", "nadir_mm2", "category", "confirmed", "category_rano2"):
        assert c in table.columns
    assert list(table["timepoint"]) == [r["timepoint"] for r in doc["timepoints"]]
    assert set(table["category"]) - {""} <= set(CLASS_NAMES)
    assert set(table["confirmed"]) <= {"", "yes", "no", "pending"}
    assert [float(w) for w in table["weeks"]] == [r["weeks"] for r in doc["timepoints"]]
    pdf = (out / "timeline_report.pdf").read_bytes()
    assert pdf.startswith(b"%PDF")
    pages = len(re.findall(rb"/Type\s*/Page\b(?!s)", pdf))
    assert pages == 1 + len(doc["timepoints"])
    width, height = png_size(out / "burden.png")
    assert width > 600 and height > 300
    for r in doc["timepoints"]:  # every file it names exists, segmentations on the scan's own grid
        seg = sitk.ReadImage(str(out / r["segmentation"]))
        ref = sitk.ReadImage(str(out / r["reference_image"]))
        assert seg.GetSize() == ref.GetSize() and np.allclose(seg.GetOrigin(), ref.GetOrigin())
        assert sitk.ReadTransform(str(out / r["to_baseline_transform"])) is not None
        assert r["network"] is None or (r["network"]["label"] in CLASS_NAMES
                                        and r["network"]["previous"] in [x["timepoint"] for x in doc["timepoints"]])
    assert all((r["network"] is not None) == (r["role"] == "follow-up") for r in doc["timepoints"])


def test_course_lines_for_a_pair(runs):
    """What the case report or a pair's panel can say about a follow-up from the course."""
    from RANOResponseLib.review.course_report import course_lines

    doc = read_timeline(runs["Patient-001"])
    last = doc["timepoints"][-1]
    lines = course_lines(doc, last["timepoint"])
    assert f"RANO {last['category']}" in lines[0] and f"at {last['nadir_timepoint']}" in lines[0]
    assert lines[1] == last["reasoning"].split("\n")[0]
    assert course_lines(doc, "week-999") == []


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.stat().st_ino)
            for p in (folder / "timepoints").rglob("*") if p.is_file() and p.name != "measurement.json"
            and p.name != "cache.json"}


def test_second_run_recomputes_nothing(runs, cohort, tiny_bundle):
    out = runs["Patient-002"]
    before = _files(out)
    doc = run_timeline(cohort / "Imaging" / "Patient-002", out, bundle=tiny_bundle, device="cpu",
                       segmentation="cohort", show_progress=False)
    assert doc["computed"] == {"brain": [], "segmentation": [], "registration": [], "network": []}
    assert all(r["cached"] for r in doc["timepoints"])
    assert _files(out) == before  # the same files (mtime and inode), not rewritten


def test_one_new_scan_computes_only_that_scan(cohort, tmp_path, tiny_bundle):
    src = cohort / "Imaging" / "Patient-001"
    weeks = sorted(d.name for d in src.iterdir() if d.is_dir())
    patient = tmp_path / "Imaging" / "Patient-001"
    for w in weeks[:-1]:
        shutil.copytree(src / w, patient / w)
    out = tmp_path / "out"
    first = run_timeline(patient, out, bundle=tiny_bundle, device="cpu", segmentation="cohort", show_progress=False)
    assert first["baseline"] == weeks[1] and "taken as pre-operative" in first["baseline_reason"]  # no rating CSV here
    shutil.copytree(src / weeks[-1], patient / weeks[-1])
    doc = run_timeline(patient, out, bundle=tiny_bundle, device="cpu", segmentation="cohort", show_progress=False)
    assert doc["computed"] == {"brain": [weeks[-1]], "segmentation": [weeks[-1]], "registration": [weeks[-1]],
                               "network": [weeks[-1]]}
    assert [r["cached"] for r in doc["timepoints"]] == [True] * (len(weeks) - 1) + [False]
    # a changed baseline invalidates every transform (they map baseline points), nothing else
    doc = run_timeline(patient, out, baseline_timepoint=weeks[2], network=False, device="cpu", segmentation="cohort",
                       show_progress=False)
    assert doc["computed"]["segmentation"] == [] and doc["computed"]["brain"] == []
    assert doc["computed"]["registration"] == [w for w in weeks if w != weeks[2]]
    assert [r["role"] for r in doc["timepoints"]][:3] == ["pre-op", "pre-baseline", "baseline"]


def test_course_csv_with_dates(cohort, tmp_path):
    imaging = cohort / "Imaging" / "Patient-002"
    weeks = sorted(d.name for d in imaging.iterdir() if d.is_dir())[:3]
    csv = tmp_path / "course.csv"
    pd.DataFrame({"study": [str(imaging / w) for w in weeks], "date": ["2024-01-01", "2024-01-03", "2024-04-08"],
                  "rating": ["Pre-Op", "Post-Op", ""], "timepoint": ["pre", "post", "first follow-up"]}
                 ).to_csv(csv, index=False)
    doc = run_timeline(csv, tmp_path / "out", network=False, device="cpu", segmentation="cohort", show_progress=False)
    assert doc["patient"] == "course" and doc["baseline"] == "post"
    assert [r["timepoint"] for r in doc["timepoints"]] == ["pre", "post", "first_follow-up"]
    assert [r["weeks"] for r in doc["timepoints"]] == [0.0, round(2 / 7, 2), 14.0]
    assert [r["date"] for r in doc["timepoints"]] == ["2024-01-01", "2024-01-03", "2024-04-08"]
    assert doc["timepoints"][2]["role"] == "follow-up" and doc["timepoints"][2]["category"] in CLASS_NAMES


DICOM_SERIES = {  # what each sequence's series says about itself (the default series rules read it)
    "CT1": dict(description="AX T1 POST GD", protocol="AX T1 SE +C", tr=550, te=12, contrast="GADOVIST"),
    "T1": dict(description="AX T1 PRE", protocol="AX T1 SE", tr=550, te=12),
    "T2": dict(description="t2_tse_tra", protocol="t2_tse_tra", tr=5000, te=95),
    "FLAIR": dict(description="t2_tirm_tra_dark-fluid", protocol="t2_tirm_tra_dark-fluid", tr=9000, te=85, ti=2500),
}


def test_automatic_segmentation_path_and_dicom(cohort, tmp_path):
    """The default mode segments with a segmentation bundle (here a tiny one with random weights);
    a course CSV may list DICOM study folders (the reference image is then kept as NIfTI)."""
    import torch
    from RANOResponseLib.core.names import LABEL_NAMES, MODALITIES
    from RANOResponseLib.imaging.io import read_study
    from RANOResponseLib.model.segmentation import build_seg_network, write_seg_bundle
    from RANOResponseLib.phantom.dicom_export import write_series

    arch = {"name": "UNet", "args": {"spatial_dims": 3, "in_channels": 4, "out_channels": 4, "channels": [4, 8],
                                     "strides": [2], "num_res_units": 0}}
    torch.manual_seed(3)
    bundle = write_seg_bundle(tmp_path / "seg", [build_seg_network(arch).state_dict()], arch, list(MODALITIES),
                              (6.0, 6.0, 6.0), LABEL_NAMES, {"note": "test"}, {}, "# test\n", meta={"id": "tiny-seg"})
    imaging = cohort / "Imaging" / "Patient-001"
    weeks = sorted(d.name for d in imaging.iterdir() if d.is_dir())[1:3]
    study = read_study(imaging / weeks[1])
    dicom = tmp_path / "dicom-study"
    for n, (m, spec) in enumerate(DICOM_SERIES.items(), start=2):
        write_series(study.images[m], dicom / f"{n:04d}", patient_id="P1", study_uid="1.2.826.0.1.77.1",
                     series_number=n, **spec)
    csv = tmp_path / "c.csv"
    pd.DataFrame({"study": [str(imaging / weeks[0]), str(dicom)], "date": ["2024-01-01", "2024-04-01"],
                  "rating": ["Post-Op", ""]}).to_csv(csv, index=False)
    out = tmp_path / "out"
    doc = run_timeline(csv, out, seg_bundle=bundle, network=False, device="cpu", show_progress=False)
    assert doc["segmentation"]["mode"] == "auto" and doc["segmentation"]["bundle"]["id"] == "tiny-seg"
    assert doc["computed"]["segmentation"] == [weeks[0], "dicom-study"]
    r = doc["timepoints"][1]
    assert r["reference_image"] == "timepoints/dicom-study/reference.nii.gz"
    reference = sitk.ReadImage(str(out / r["reference_image"]))
    assert np.allclose(reference.GetOrigin(), study.images["CT1"].GetOrigin(), atol=1e-3)
    brain = sitk.GetArrayFromImage(sitk.ReadImage(str(out / r["brain_mask"])))
    seg_image = sitk.ReadImage(str(out / r["segmentation"]))
    seg = sitk.GetArrayFromImage(seg_image)
    assert seg_image.GetSize() == reference.GetSize() and seg.shape == brain.shape
    assert seg.max() <= 3 and not seg[brain == 0].any()  # labels, zero outside the brain


# ------------------------------------------------------------------------------ bad input


def _bad(args: list[str], out: Path, capsys, names: str) -> None:
    code = cli_main(["timeline", *args, "--out", str(out), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: ") and names in err[-1], err
    assert not out.exists()


def test_bad_inputs(cohort, tmp_path, capsys):
    patient = cohort / "Imaging" / "Patient-001"
    out = tmp_path / "out"
    _bad(["--patient", str(tmp_path / "nowhere")], out, capsys, str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    _bad(["--patient", str(empty)], out, capsys, str(empty))
    _bad(["--patient", str(patient), "--baseline-timepoint", "week-999", "--no-network", "--segmentation", "cohort"],
         out, capsys, "week-999")
    csv = tmp_path / "c.csv"
    csv.write_text(f"study,date\n{patient / 'week-000-1'},2024-01-01\n{patient / 'week-000-2'},01/02/2024\n")
    _bad(["--patient", str(csv)], out, capsys, str(csv))
    csv.write_text(f"study,date\n{patient / 'week-000-1'},2024-01-01\n{tmp_path / 'missing'},2024-02-01\n")
    _bad(["--patient", str(csv), "--no-network", "--segmentation", "cohort"], out, capsys, str(tmp_path / "missing"))
    csv.write_text("folder,when\nx,y\n")
    _bad(["--patient", str(csv)], out, capsys, str(csv))
    # no timepoint with the cohort's mask
    copy = tmp_path / "Imaging" / "Patient-001"
    for w in sorted(d.name for d in patient.iterdir() if d.is_dir())[:2]:
        shutil.copytree(patient / w, copy / w)
        shutil.rmtree(copy / w / "DeepBraTumIA-segmentation")
    _bad(["--patient", str(copy), "--no-network", "--segmentation", "cohort"], out, capsys, str(copy / "week-000-1"))
    _bad(["--patient", str(patient), "--no-network", "--seg-bundle", str(tmp_path / "no-bundle")], out, capsys,
         str(tmp_path / "no-bundle"))


def test_a_failed_rerun_leaves_the_previous_output(cohort, tmp_path, capsys):
    src = cohort / "Imaging" / "Patient-001"
    patient = tmp_path / "Imaging" / "Patient-001"
    for w in sorted(d.name for d in src.iterdir() if d.is_dir())[:3]:
        shutil.copytree(src / w, patient / w)
    out = tmp_path / "out"
    args = ["timeline", "--patient", str(patient), "--out", str(out), "--no-network", "--segmentation", "cohort",
            "--device", "cpu", "--quiet"]
    assert cli_main(args) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    ct1 = next(patient.glob("week-0[1-9]*/CT1.nii.gz"))
    data = ct1.read_bytes()
    ct1.write_bytes(data[: len(data) // 2])  # truncated
    os.utime(ct1, ns=(ct1.stat().st_atime_ns, ct1.stat().st_mtime_ns + 10**9))
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and str(ct1) in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_timepoint_that_cannot_be_segmented_is_left_out_and_said(cohort, tmp_path):
    src = cohort / "Imaging" / "Patient-002"
    patient = tmp_path / "Imaging" / "Patient-002"
    weeks = sorted(d.name for d in src.iterdir() if d.is_dir())[:4]
    for w in weeks:
        shutil.copytree(src / w, patient / w)
    shutil.rmtree(patient / weeks[2] / "DeepBraTumIA-segmentation")  # as some LUMIERE timepoints are
    doc = run_timeline(patient, tmp_path / "out", network=False, device="cpu", segmentation="cohort",
                       show_progress=False)
    assert [x["timepoint"] for x in doc["skipped"]] == [weeks[2]]
    assert str(patient / weeks[2]) in doc["skipped"][0]["reason"]
    assert [r["timepoint"] for r in doc["timepoints"]] == [weeks[0], weeks[1], weeks[3]]


def test_read_timeline_refuses_other_files(tmp_path):
    from RANOResponseLib.core.errors import RANOInputError

    with pytest.raises(RANOInputError, match="timeline file not found"):
        read_timeline(tmp_path)
    f = tmp_path / "timeline.json"
    f.write_text(json.dumps({"patient": "x"}))
    with pytest.raises(RANOInputError, match=str(f)):
        read_timeline(tmp_path)


def test_agreement_with_the_cohort_masks(cohort, runs):
    """The issue's check (Testing/course_agreement.py) on the cohort's own masks."""
    from course_agreement import agreement

    table = pd.concat([agreement(out, cohort / "Imaging" / p) for p, out in runs.items()])
    assert len(table) == 8 and table["agree"].mean() >= 0.9
