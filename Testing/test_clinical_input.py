"""Clinical-style studies (RANOResponseLib.phantom.clinical) and issue item 6: the same answer for a
study as it comes from the scanner as for its skull-stripped original.

The clinical-style versions are built from held-out phantom pairs (a seed the shipped bundle was
not trained on, checked below) and a real full head, pydeface 2.1.0's averaged T1, fetched with
pip at test time by :mod:`realdata` (never committed). The phantom is generated at 2 mm, the
shipped bundle's grid, so the whole file runs in a few minutes on two CPU cores.

What is checked against something the builder does not decide: that the head really surrounds
the brain (skull dark, then scalp fat bright, then air, along rays out of the brain), that the
background is Rician noise (mean/std of a Rayleigh distribution) and never 0, that thick slices
average their slab (not a point sample), that the recorded motion is the motion in the images,
that the DICOM series read back (through the product's reader) with the recorded geometry and
the right modality, and that ``predict`` agrees with the stripped original.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk
from conftest import modality_file
from RANOResponseCLI import main as cli_main
from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.names import MODALITIES
from RANOResponseLib.imaging.io import read_image
from RANOResponseLib.imaging.studies import check_pair, load_study
from RANOResponseLib.inference.pipeline import predict_pair
from RANOResponseLib.model.bundle import default_bundle_path
from RANOResponseLib.phantom.clinical import (
    CLINICAL_TRUTH_CSV,
    VARIANTS,
    acquisitions_of,
    load_head,
    make_clinical_cohort,
    make_clinical_study,
    native_to_template,
    study_seed,
)
from RANOResponseLib.phantom.generator import PhantomConfig, generate_cohort
from realdata import pydeface_head

HELD_OUT = PhantomConfig(patients=4, seed=2025, spacing=2.0, min_followups=1, max_followups=1, quirks=False)
# Post-operative baseline -> first rated follow-up: the first two patients, rated PD and SD. Both
# have a clear answer on the stripped original (top-two margin >= MIN_MARGIN, asserted below): on
# a near-tie the label is not a property of the input (patients 3 and 4: CR by 0.10, a second PD).
PAIRS = (("Patient-001", "week-000-2", "week-016"), ("Patient-002", "week-000-2", "week-015"))
SEED = 5
MAX_L1 = 0.1  # issue item 6: probabilities within 0.1 (L1) of the stripped original's
MIN_MARGIN = 0.15
PATIENT, DATE = PAIRS[0][0], PAIRS[0][2]  # the study the structural tests look at
RAYLEIGH_MEAN_OVER_STD = math.sqrt(math.pi / 2) / math.sqrt(2 - math.pi / 2)  # 1.913


@pytest.fixture(scope="module")
def head():
    return load_head(pydeface_head())


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, head) -> tuple[Path, pd.DataFrame, pd.DataFrame]:
    """(root, phantom truth, clinical truth): the held-out pairs in every clinical-style variant."""
    root = tmp_path_factory.mktemp("clinical")
    truth = generate_cohort(root, HELD_OUT)
    timepoints = [(p, d) for p, a, b in PAIRS for d in (a, b)]
    clinical = make_clinical_cohort(root, head, variants=VARIANTS, seed=SEED, timepoints=timepoints)
    return root, truth, clinical


def _row(clinical: pd.DataFrame, variant: str, patient: str = PATIENT, date: str = DATE) -> pd.Series:
    hit = clinical[(clinical["variant"] == variant) & (clinical["patient"] == patient) & (clinical["date"] == date)]
    assert len(hit) == 1
    return hit.iloc[0]


def _array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image).astype(np.float64)


def _original(root: Path, patient: str = PATIENT, date: str = DATE) -> dict[str, sitk.Image]:
    folder = root / "Imaging" / patient / date
    return {m: read_image(modality_file(folder, m)) for m in MODALITIES}


def test_pairs_are_held_out_from_the_shipped_bundle(cohort):
    data_source = json.loads((default_bundle_path() / "bundle.json").read_text())["training"]["data_source"]
    assert data_source["generator"] == "RANOResponseLib.phantom"
    assert data_source["config"]["seed"] != HELD_OUT.seed
    root, truth, clinical = cohort
    assert len(clinical) == len(VARIANTS) * 2 * len(PAIRS)
    assert {truth.set_index(["patient", "date"]).loc[(p, b), "rating_written"] for p, _, b in PAIRS} == {"PD", "SD"}
    for patient, base, follow in PAIRS:
        rows = truth[truth["patient"] == patient].set_index("date")
        assert rows.loc[base, "role"] == "post-op" and rows.loc[follow, "role"] == "follow-up"
    assert (root / "clinical" / CLINICAL_TRUTH_CSV).is_file()


def test_head_surrounds_the_brain_skull_then_scalp_then_air(cohort):
    """Rays leave the brain through its upper part: T1 goes dark (CSF, bone), then bright (scalp
    fat), then to air, as in a head, and the distance d from the brain to the scalp fat says that
    the brain sits centred in the skull: median 5-11 mm, under 3 mm on at most 5 % of the rays,
    and a left-right and front-back offset -3 * mean(d * direction) within 2.75 mm (a brain
    offset by o inside a shell shortens d by o . direction). Measured on four studies: median
    7.5-8 mm, <= 1 % under 3 mm, offsets <= 1.9 mm; the head moved by 6 mm along any axis fails
    at least one of these."""
    root, _, clinical = cohort
    t1 = read_image(Path(_row(clinical, "head")["folder"]) / "T1.nii.gz")
    original = _original(root)["T1"]
    brain = sitk.Resample(sitk.Cast(original != 0, sitk.sitkUInt8), t1, sitk.Transform(), sitk.sitkNearestNeighbor)
    b = sitk.GetArrayFromImage(brain).astype(bool)
    a = _array(t1)
    wm = np.percentile(a[b], 90)  # white matter: the brightest tissue of a T1 brain
    centre = np.argwhere(b).mean(axis=0)  # z, y, x
    spacing = np.array(t1.GetSpacing())[::-1]
    golden, step = np.pi * (3 - np.sqrt(5)), 0.5
    distances, directions, layered = [], [], 0
    for i in range(400):  # evenly spread directions (Fibonacci sphere) above the brain's centre (LPS z up)
        z = 1 - 2 * (i + 0.5) / 400
        if z < 0.1:
            continue
        r = math.sqrt(1 - z * z)
        d = np.array([z, r * math.sin(golden * i), r * math.cos(golden * i)])  # z, y, x
        idx = np.rint(centre + np.arange(0, 160, step)[:, None] * d / spacing).astype(int)
        idx = idx[np.all((idx >= 0) & (idx < a.shape), axis=1)]
        last = np.flatnonzero(b[tuple(idx.T)])[-1]
        profile = a[tuple(idx[last + 1:last + 1 + int(40 / step)].T)] / wm  # the next 40 mm
        fat = np.flatnonzero(profile > 0.9)
        distances.append(fat[0] * step if fat.size else 40.0)
        directions.append(d)
        layered += bool(fat.size and (profile[:fat[0]] < 0.45).any() and (profile[fat[0]:] < 0.1).any())
    distances, directions = np.array(distances), np.array(directions)
    offset = -3 * (distances[:, None] * directions).mean(axis=0)
    summary = (f"median {np.median(distances):.1f} mm, {np.mean(distances < 3):.0%} under 3 mm, "
               f"offset LR {offset[2]:.1f} AP {offset[1]:.1f} mm, {layered} of {len(distances)} rays layered")
    assert len(distances) > 150
    assert layered >= 0.95 * len(distances), summary
    assert 5 <= np.median(distances) <= 11 and np.mean(distances < 3) <= 0.05, summary
    assert abs(offset[1]) <= 2.75 and abs(offset[2]) <= 2.75, summary


def test_full_head_keeps_the_brain_and_has_rician_background_everywhere(cohort):
    root, _, clinical = cohort
    folder = Path(_row(clinical, "head")["folder"])
    original = _original(root)
    for m in MODALITIES:
        img = read_image(folder / f"{m}.nii.gz")
        a = _array(img)
        assert a.min() >= 1, f"{m}: a voxel is exactly 0"
        # The brain's inner voxels are the stripped original's, on the same (padded) grid.
        orig = sitk.Resample(original[m], img, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0)
        o = _array(orig)
        inner = sitk.GetArrayFromImage(sitk.BinaryErode(sitk.Cast(orig != 0, sitk.sitkUInt8), [1, 1, 1])) > 0
        assert np.abs(a[inner] - o[inner]).max() <= 0.5 + 1e-6, m
        # Air at the grid's corners: magnitude of complex Gaussian noise, i.e. Rayleigh.
        n = 8
        corners = np.concatenate([a[z:z + n, y:y + n, x:x + n].ravel()
                                  for z in (0, a.shape[0] - n) for y in (0, a.shape[1] - n) for x in (0, a.shape[2] - n)])
        ratio = corners.mean() / corners.std()
        assert abs(ratio - RAYLEIGH_MEAN_OVER_STD) < 0.2, f"{m}: background mean/std {ratio:.2f} is not Rician"
        assert corners.mean() < 0.15 * np.median(o[o != 0]), m


def test_fluid_around_the_brain_is_bright_on_t2_dark_on_flair(cohort):
    root, _, clinical = cohort
    folder = Path(_row(clinical, "head")["folder"])
    images = {m: read_image(folder / f"{m}.nii.gz") for m in ("T1", "T2", "FLAIR")}
    original = sitk.Resample(_original(root)["T1"], images["T1"], sitk.Transform(), sitk.sitkNearestNeighbor)
    brain = sitk.Cast(original != 0, sitk.sitkUInt8)
    shell = sitk.GetArrayFromImage(sitk.BinaryDilate(brain, [1, 1, 1]) - brain) > 0  # 2 mm outside
    t1 = _array(original)
    wm = t1 > np.percentile(t1[t1 != 0], 85)
    for m, low, high in (("T2", 1.5, None), ("FLAIR", None, 0.6)):
        a = _array(images[m])
        ratio = np.median(a[shell]) / np.median(a[wm])
        assert (low is None or ratio > low) and (high is None or ratio < high), f"{m}: CSF / WM = {ratio:.2f}"


def test_thick_slices_average_their_slab(cohort):
    """The 5 mm T2 slices match the head version's T2 averaged over each 5 mm slab better than
    its central planes: anti-aliased, not point-sampled."""
    _, _, clinical = cohort
    row = _row(clinical, "thick")
    acq = acquisitions_of(row)["T2"]
    assert acq.kind == "2D" and acq.spacing == (0.9, 0.9, 5.0)
    thick = read_image(Path(row["folder"]) / "T2.nii.gz")
    assert np.allclose(thick.GetSpacing(), (0.9, 0.9, 5.0)) and np.allclose(thick.GetDirection(), np.eye(3).ravel())
    source = read_image(Path(_row(clinical, "head")["folder"]) / "T2.nii.gz")
    planes = _array(sitk.Resample(source, thick, sitk.Transform(), sitk.sitkLinear, 0.0))
    fine = sitk.Image([thick.GetSize()[0], thick.GetSize()[1], thick.GetSize()[2] * 5], sitk.sitkFloat32)
    fine.SetSpacing((0.9, 0.9, 1.0))
    fine.SetOrigin(np.array(thick.GetOrigin()) - np.array([0, 0, 2.0]))
    slabs = _array(sitk.Resample(source, fine, sitk.Transform(), sitk.sitkLinear, 0.0))
    slabs = slabs.reshape(thick.GetSize()[2], 5, *slabs.shape[1:]).mean(axis=1)
    t = _array(thick)
    inside = (planes > np.percentile(planes, 60)) & (slabs > 0)
    slab_error = np.abs(t - slabs)[inside].mean()
    plane_error = np.abs(t - planes)[inside].mean()
    assert slab_error < 0.8 * plane_error, (slab_error, plane_error)


def test_every_sequence_its_own_acquisition_with_the_recorded_motion(cohort):
    root, _, clinical = cohort
    row = _row(clinical, "oblique")
    acqs = acquisitions_of(row)
    head_t = {m: read_image(Path(_row(clinical, "head")["folder"]) / f"{m}.nii.gz") for m in MODALITIES}
    grids = set()
    for m in MODALITIES:
        img = read_image(Path(row["folder"]) / f"{m}.nii.gz")
        direction = np.array(img.GetDirection()).reshape(3, 3)
        assert np.abs(direction - np.diag(np.diag(direction))).max() > math.sin(math.radians(5)), f"{m} not oblique"
        assert np.allclose(img.GetDirection(), acqs[m].direction, atol=1e-6)
        grids.add((tuple(np.round(img.GetOrigin(), 3)), img.GetSize()))
        moved = acqs[m].motion()
        assert (m == "CT1") == (max(map(abs, acqs[m].motion_deg)) == 0 and max(map(abs, acqs[m].motion_mm)) == 0)
        # Undo the recorded motion: the image lands on the head version (same scanner frame).
        reference = head_t[m]
        original = sitk.Resample(_original(root)[m], reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0)
        brain = sitk.GetArrayFromImage(sitk.BinaryErode(sitk.Cast(original != 0, sitk.sitkUInt8), [1, 1, 1])) > 0
        undone = _array(sitk.Resample(img, reference, moved.GetInverse(), sitk.sitkLinear, 0.0))
        kept = _array(sitk.Resample(img, reference, sitk.Transform(), sitk.sitkLinear, 0.0))
        ref = _array(reference)
        corr_undone = np.corrcoef(undone[brain], ref[brain])[0, 1]
        corr_kept = np.corrcoef(kept[brain], ref[brain])[0, 1]
        assert corr_undone > 0.9, (m, corr_undone)
        if m != "CT1":
            assert corr_undone > corr_kept + 0.02, (m, corr_undone, corr_kept)
    assert len(grids) == len(MODALITIES), "each sequence should have its own field of view"


def test_dicom_version_reads_back_with_the_recorded_geometry(cohort):
    root, _, clinical = cohort
    patient, base, follow = PAIRS[0]
    studies = []
    for date in (base, follow):
        row = _row(clinical, "dicom", patient, date)
        study = load_study(row["folder"], MODALITIES)
        acqs = acquisitions_of(row)
        for m in MODALITIES:
            image, acq = study.images[m], acqs[m]
            assert image.GetSize() == acq.size, m
            assert np.allclose(image.GetOrigin(), acq.origin, atol=1e-3), m
            assert np.allclose(image.GetDirection(), acq.direction, atol=1e-5), m
            assert np.allclose(image.GetSpacing(), acq.spacing, atol=1e-4), m
            assert sitk.GetArrayViewFromImage(image).min() >= 1, m
        descriptions = {m: study.sources[m]["description"] for m in MODALITIES}
        assert "POST" in descriptions["CT1"] and "POST" not in descriptions["T1"]
        assert "FLAIR" in descriptions["FLAIR"] and "TSE" in descriptions["T2"]
        t2_file = next(p for p in Path(study.sources["T2"]["series_folder"]).iterdir() if p.is_file())
        ds = pydicom.dcmread(t2_file, stop_before_pixels=True)
        assert ds.MRAcquisitionType == "2D" and float(ds.SliceThickness) == 5.0 and t2_file.suffix == ""
        studies.append(study)
    check_pair(*studies)  # same patient, two studies
    assert studies[0].patient["StudyInstanceUID"] != studies[1].patient["StudyInstanceUID"]


def test_building_is_deterministic(cohort, head, tmp_path):
    root, truth, clinical = cohort
    row = truth[(truth["patient"] == PATIENT) & (truth["date"] == DATE)].iloc[0]
    source = root / "Imaging" / PATIENT / DATE
    again = make_clinical_study(source, head, native_to_template(row), tmp_path / "again", "thick",
                                study_seed(SEED, PATIENT, DATE, "thick"))
    other = make_clinical_study(source, head, native_to_template(row), tmp_path / "other", "thick",
                                study_seed(SEED + 1, PATIENT, DATE, "thick"))
    first = Path(_row(clinical, "thick")["folder"])
    for m in MODALITIES:
        a = sitk.GetArrayFromImage(read_image(first / f"{m}.nii.gz"))
        assert np.array_equal(a, sitk.GetArrayFromImage(read_image(tmp_path / "again" / f"{m}.nii.gz"))), m
        assert not np.array_equal(a, sitk.GetArrayFromImage(read_image(tmp_path / "other" / f"{m}.nii.gz"))), m
    assert again == acquisitions_of(_row(clinical, "thick")) and other != again


def test_a_head_without_a_known_placement_is_refused(tmp_path, capsys):
    fake = sitk.Image([40, 40, 40], sitk.sitkInt16) + 5
    sitk.WriteImage(fake, str(tmp_path / "head.nii.gz"))
    with pytest.raises(RANOInputError, match="not a head whose placement is known"):
        load_head(tmp_path / "head.nii.gz")
    out = tmp_path / "cohort"
    rc = cli_main(["phantom", "--out", str(out), "--patients", "1", "--clinical", str(tmp_path / "head.nii.gz")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and "head.nii.gz" in err[0]
    assert not out.exists()
    rc = cli_main(["phantom", "--out", str(out), "--patients", "1", "--clinical", str(pydeface_head()),
                   "--clinical-variants", "head,sideways"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "sideways" in err[0] and not out.exists()


def test_phantom_command_writes_the_clinical_versions(tmp_path, capsys):
    out = tmp_path / "cohort"
    rc = cli_main(["phantom", "--out", str(out), "--patients", "1", "--seed", "3", "--spacing", "4",
                   "--min-followups", "1", "--max-followups", "1", "--no-quirks",
                   "--clinical", str(pydeface_head()), "--clinical-variants", "head"])
    assert rc == 0
    table = pd.read_csv(out / "clinical" / CLINICAL_TRUTH_CSV, dtype={"date": str})
    truth = pd.read_csv(out / "phantom_truth.csv", dtype={"date": str})
    assert sorted(table["date"]) == sorted(truth["date"]) and set(table["variant"]) == {"head"}
    for date in truth["date"]:
        for m in MODALITIES:
            assert (out / "clinical" / "head" / "Patient-001" / date / f"{m}.nii.gz").is_file()
    assert "clinical-style studies" in capsys.readouterr().out


# ---------------------------------------------------------------- issue item 6: the same answer


@pytest.fixture(scope="module")
def stripped_predictions(cohort):
    root = cohort[0]
    predictions = {p: predict_pair(root / "Imaging" / p / a, root / "Imaging" / p / b, attributions=False,
                                   segmentation=False, notice=lambda _m: None) for p, a, b in PAIRS}
    for patient, result in predictions.items():
        top, second = sorted(result.probabilities.values())[-1:-3:-1]
        assert top - second >= MIN_MARGIN, f"{patient} is a near-tie for this bundle ({result.probabilities}): " \
                                           "choose another held-out pair"
    return predictions


@pytest.mark.parametrize("variant", VARIANTS)
def test_clinical_versions_get_the_stripped_originals_answer(variant, cohort, stripped_predictions):
    root = cohort[0]
    report = []
    for patient, base, follow in PAIRS:
        ref = stripped_predictions[patient]
        got = predict_pair(root / "clinical" / variant / patient / base, root / "clinical" / variant / patient / follow,
                           attributions=False, segmentation=False, notice=lambda _m: None)
        l1 = sum(abs(got.probabilities[c] - ref.probabilities[c]) for c in ref.probabilities)
        report.append(f"{patient} {variant}: {got.label} vs stripped {ref.label}, L1 {l1:.3f}")
        print(report[-1])
        assert got.label == ref.label and l1 <= MAX_L1, "; ".join(report)
