"""Tests of the LUMIERE-like phantom cohort generator (RANOResponseLib.phantom).

Cohorts are generated at 3-4 mm so the whole file runs in well under a minute on two cores; the
labels are checked on conftest's 1.5 mm ``fine_cohort`` against the geometry the generator
planned (:func:`phantom.plan_cohort`), through RANO's definition written out here, not against
the measuring or labelling code.
"""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from conftest import (
    DIAMETER_TOLERANCE_VOXELS,
    RANO_MIN_DIAMETER_MM,
    FineCohort,
    planned_lesions,
    planned_spd,
    rano_classes,
)
from RANOResponseLib.phantom import generator as phantom
from RANOResponseLib.phantom.generator import (
    DEMOGRAPHICS_COLUMNS,
    EXPERT_RATING_COLUMNS,
    MODALITIES,
    RATING_COLUMN,
    RATIONALE_COLUMN,
    PhantomConfig,
    measure_spd,
    new_measurable_lesion,
)

RATING_COLUMN_VERBATIM = (
    "Rating (according to RANO, PD: Progressive disease, SD: Stable disease, PR: Partial response, "
    "CR: Complete response, Pre-Op: Pre-Operative, Post-Op: Post-Operative)"
)
RATIONALE_COLUMN_VERBATIM = (
    "Rating rationale (CRET: complete resection of the enhancing tumor, PRET: partial resection of "
    "the enhancing tumor, T2-Progr.: T2-Progression, L: Lesion)"
)
NATIVE_SEG = Path("DeepBraTumIA-segmentation/native/segmentation/seg_mask.nii.gz")
ATLAS_SEG = Path("DeepBraTumIA-segmentation/atlas/segmentation/seg_mask.nii.gz")
WEEK_RE = re.compile(r"^week-\d{3}(-\d)?$")


# ------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------


PROGRESS: list[str] = []


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    out = tmp_path_factory.mktemp("cohort")
    truth = phantom.generate_cohort(out, PhantomConfig(patients=5, seed=0, spacing=3.0), progress=PROGRESS.append)
    return out, truth


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two runs with one seed and one with another, without quirks, at 4 mm."""
    runs = {}
    for name, seed in (("a", 11), ("b", 11), ("c", 12)):
        out = tmp_path_factory.mktemp(f"run_{name}")
        phantom.generate_cohort(
            out, PhantomConfig(patients=2, seed=seed, spacing=4.0, min_followups=2, max_followups=2, quirks=False)
        )
        runs[name] = out
    return runs


def read_csv(path: Path) -> pd.DataFrame:
    """Read a CSV exactly as written: no NaN conversion, no whitespace stripping."""
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def existing_timepoints(out: Path, truth: pd.DataFrame) -> pd.DataFrame:
    rows = truth[truth["folder_exists"].astype(str) == "True"]
    assert len(rows) > 0
    return rows


def array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def grid(path: Path) -> tuple:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return (reader.GetSize(), reader.GetOrigin(), reader.GetSpacing(), reader.GetDirection())


# ------------------------------------------------------------------------------------------
# Layout and CSVs
# ------------------------------------------------------------------------------------------


def test_csv_columns_are_lumieres(cohort: tuple[Path, pd.DataFrame]) -> None:
    out, _ = cohort
    assert RATING_COLUMN == RATING_COLUMN_VERBATIM
    assert RATIONALE_COLUMN == RATIONALE_COLUMN_VERBATIM
    ratings = read_csv(out / "LUMIERE-ExpertRating-v202211.csv")
    assert list(ratings.columns) == [
        "Patient", "Date", "LessThan3Months", "NonMeasurableLesions",
        RATING_COLUMN_VERBATIM, RATIONALE_COLUMN_VERBATIM,
    ]
    assert list(ratings.columns) == list(EXPERT_RATING_COLUMNS)
    demographics = read_csv(out / "LUMIERE-Demographics_Pathology.csv")
    assert list(demographics.columns) == [
        "Patient", "Survival time (weeks)", "Sex", "Age at surgery (years)",
        "IDH (WT: wild type)", "IDH method", "MGMT qualitative", "MGMT quantitative",
    ]
    assert list(demographics.columns) == list(DEMOGRAPHICS_COLUMNS)
    assert sorted(demographics["Patient"]) == [f"Patient-{i:03d}" for i in range(1, 6)]
    ages = demographics["Age at surgery (years)"].astype(int)
    assert ages.between(18, 95).all()
    assert (demographics["Survival time (weeks)"].astype(int) > 0).all()


def test_layout(cohort: tuple[Path, pd.DataFrame]) -> None:
    out, truth = cohort
    assert len(PROGRESS) == len(existing_timepoints(out, truth))  # one progress line per timepoint
    ratings = read_csv(out / "LUMIERE-ExpertRating-v202211.csv")
    patients = sorted(p.name for p in (out / "Imaging").iterdir())
    assert patients == [f"Patient-{i:03d}" for i in range(1, 6)]
    assert (out / "phantom_truth.csv").is_file()
    for patient in patients:
        rows = ratings[ratings["Patient"] == patient]
        dates = list(rows["Date"])
        assert dates[:2] == ["week-000-1", "week-000-2"]
        assert rows[RATING_COLUMN].iloc[0] == "Pre-Op"
        assert rows[RATING_COLUMN].iloc[1].startswith("Post-Op")
        weeks = [int(d.split("-")[1]) for d in dates[2:]]
        assert len(weeks) >= 2 and weeks == sorted(weeks) and len(set(weeks)) == len(weeks)
        assert all(WEEK_RE.match(d) for d in dates)
        for folder in (out / "Imaging" / patient).iterdir():
            assert WEEK_RE.match(folder.name), folder
            assert folder.name in dates  # every folder on disk is rated
    for _, row in existing_timepoints(out, truth).iterrows():
        folder = out / "Imaging" / row["patient"] / row["date"]
        written = row["modalities"].split(";")
        for modality in MODALITIES:
            assert (folder / f"{modality}.nii.gz").is_file() == (modality in written)
        assert (folder / NATIVE_SEG).is_file() and (folder / ATLAS_SEG).is_file()


def test_images_are_valid_native_scans(cohort: tuple[Path, pd.DataFrame]) -> None:
    out, truth = cohort
    atlas_grids = set()
    for patient, rows in existing_timepoints(out, truth).groupby("patient"):
        grids = []
        for _, row in rows.iterrows():
            folder = out / "Imaging" / patient / row["date"]
            files = sorted(folder.glob("*.nii.gz"))
            assert len(files) >= 3
            tp_grids = {grid(f) for f in files} | {grid(folder / NATIVE_SEG)}
            assert len(tp_grids) == 1, f"modalities of {folder} are not on one grid"
            grids.append(tp_grids.pop())
            atlas_grids.add(grid(folder / ATLAS_SEG))
            zero_masks = []
            for f in files:
                raw = np.asarray(nib.load(str(f)).dataobj)  # nibabel keeps NaNs that SimpleITK hides
                assert raw.ndim == 3
                assert np.isfinite(raw).all(), f
                values = array(f)
                assert values.dtype in (np.int16, np.float32)
                assert values.min() >= 0
                zero = values == 0
                # Skull-stripped with a margin: the whole border of the field of view is background.
                for axis in range(3):
                    assert zero.take(0, axis=axis).all() and zero.take(-1, axis=axis).all()
                assert 0.05 < (~zero).mean() < 0.9
                zero_masks.append(zero)
            # Background is exactly zero in every modality at the same voxels (noise added inside only).
            for other in zero_masks[1:]:
                assert np.array_equal(zero_masks[0], other)
            native_seg = array(folder / NATIVE_SEG)
            assert set(np.unique(native_seg)) <= {0, 1, 2, 3}
            assert not (native_seg[zero_masks[0]] > 0).any()
        # Every timepoint of a patient has its own grid (pose, field of view).
        assert len(set(grids)) == len(grids)
    assert len(atlas_grids) == 1  # atlas segmentations all live on the template grid


# ------------------------------------------------------------------------------------------
# Determinism
# ------------------------------------------------------------------------------------------


def all_files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_same_seed_same_cohort(small_runs: dict[str, Path]) -> None:
    a, b = small_runs["a"], small_runs["b"]
    files = all_files(a)
    assert files == all_files(b)
    images = [f for f in files if f.name.endswith(".nii.gz")]
    assert len(images) >= 2 * 4 * 6
    for f in images:
        x, y = array(a / f), array(b / f)
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), f
        assert grid(a / f) == grid(b / f)
    for name in ("LUMIERE-ExpertRating-v202211.csv", "LUMIERE-Demographics_Pathology.csv", "phantom_truth.csv"):
        assert (a / name).read_text() == (b / name).read_text()


def test_other_seed_other_cohort(small_runs: dict[str, Path]) -> None:
    a, c = small_runs["a"], small_runs["c"]
    assert (a / "phantom_truth.csv").read_text() != (c / "phantom_truth.csv").read_text()
    f = Path("Imaging/Patient-001/week-000-1/T2.nii.gz")
    x, y = array(a / f), array(c / f)
    assert x.shape != y.shape or not np.array_equal(x, y)


def test_no_quirks_when_disabled(small_runs: dict[str, Path]) -> None:
    out = small_runs["a"]
    ratings = read_csv(out / "LUMIERE-ExpertRating-v202211.csv")
    assert set(ratings[RATING_COLUMN]) <= {"Pre-Op", "Post-Op", "PD", "SD", "PR", "CR"}
    assert (ratings["LessThan3Months"] == "").all()
    for _, row in ratings.iterrows():
        folder = out / "Imaging" / row["Patient"] / row["Date"]
        assert all((folder / f"{m}.nii.gz").is_file() for m in MODALITIES)


# ------------------------------------------------------------------------------------------
# Labels and ratings
# ------------------------------------------------------------------------------------------


def test_ratings_written_as_measured(cohort: tuple[Path, pd.DataFrame]) -> None:
    """The rating CSV says what the generator measured, except where a LUMIERE quirk is planted."""
    out, truth = cohort
    ratings = read_csv(out / "LUMIERE-ExpertRating-v202211.csv")
    written = {(r["Patient"], r["Date"]): r[RATING_COLUMN] for _, r in ratings.iterrows()}
    followups = existing_timepoints(out, truth)
    followups = followups[followups["role"] == "follow-up"]
    for _, row in followups.iterrows():
        assert written[(row["patient"], row["date"])] == row["rating_measured"], row["date"]
    assert len(followups) >= 10
    assert set(followups["rating_measured"]) == {"CR", "PR", "SD", "PD"}


def test_truth_spd_follows_planned_geometry(fine_cohort: FineCohort) -> None:
    """Every timepoint's measured SPD and number of measurable lesions (phantom_truth.csv) agree
    with the lesions the generator planned, measured on their geometry, within two voxels per
    diameter; and every planned enhancing lesion is measurable (the generator promises it)."""
    tol = DIAMETER_TOLERANCE_VOXELS * fine_cohort.config.spacing
    truth = fine_cohort.truth.set_index(["patient", "date"])
    checked = 0
    for plan in fine_cohort.plans:
        for tp in plan.timepoints:
            lesions = planned_lesions(plan, tp)
            assert all(min(d1, d2) - tol >= RANO_MIN_DIAMETER_MM for _, d1, d2 in lesions), (plan.patient, tp.folder)
            row = truth.loc[(plan.patient, tp.folder)]
            low, high = planned_spd(lesions, tol)
            assert low <= float(row["spd_mm2"]) <= high, (plan.patient, tp.folder, low, row["spd_mm2"], high)
            assert int(row["n_measurable"]) == len(lesions)
            checked += 1
    assert checked == sum(len(p.timepoints) for p in fine_cohort.plans) >= 16


def test_labels_follow_planned_geometry(fine_cohort: FineCohort) -> None:
    """Each follow-up's rating is a RANO class its planned geometry allows (diameters within two
    voxels); where the geometry allows one class only, it is that class, and such follow-ups are
    most of them and cover CR, PR and PD."""
    tol = DIAMETER_TOLERANCE_VOXELS * fine_cohort.config.spacing
    ratings = read_csv(fine_cohort.root / "LUMIERE-ExpertRating-v202211.csv")
    written = {(r["Patient"], r["Date"]): r[RATING_COLUMN] for _, r in ratings.iterrows()}
    decided: list[str] = []
    total = 0
    for plan in fine_cohort.plans:
        previous = None
        for tp in plan.timepoints:
            lesions = planned_lesions(plan, tp)
            spd = planned_spd(lesions, tol)
            if tp.role == "follow-up":
                assert previous is not None
                allowed = rano_classes(previous, spd, enhancing_left=bool(lesions),
                                       new_measurable=tp.new_lesion_intended)
                label = written[(plan.patient, tp.folder)]
                assert label in allowed, (plan.patient, tp.folder, tp.event, label, allowed)
                if len(allowed) == 1:
                    decided.append(label)
                total += 1
            previous = spd
    assert total == 12
    assert len(decided) >= 2 * total / 3
    assert {"CR", "PR", "PD"} <= set(decided)


def test_intended_classes_follow_prevalence_and_mostly_match(cohort: tuple[Path, pd.DataFrame]) -> None:
    _, truth = cohort
    followups = truth[(truth["role"] == "follow-up") & (truth["folder_exists"].astype(str) == "True")]
    intended = followups["intended"].value_counts()
    assert set(intended.index) == {"CR", "PR", "SD", "PD"}
    assert intended["PD"] == intended.max()
    agreement = (followups["intended"] == followups["rating_measured"]).mean()
    assert agreement >= 0.8


def test_contrast(cohort: tuple[Path, pd.DataFrame]) -> None:
    out, truth = cohort
    checked = 0
    for _, row in existing_timepoints(out, truth).iterrows():
        folder = out / "Imaging" / row["patient"] / row["date"]
        if not all((folder / f"{m}.nii.gz").is_file() for m in MODALITIES):
            continue
        seg = array(folder / NATIVE_SEG)
        img = {m: array(folder / f"{m}.nii.gz").astype(np.float64) for m in MODALITIES}
        normal = (img["T1"] > 0) & (seg == 0)
        # Normal-appearing WM: the brightest normal tissue on T1.
        wm = normal & (img["T1"] > np.percentile(img["T1"][normal], 75))
        enhancing, edema = seg == 1, seg == 3

        def mean(m: str, where: np.ndarray) -> float:
            return float(img[m][where].mean())

        if edema.sum() >= 10:
            assert mean("FLAIR", edema) > 1.3 * mean("FLAIR", wm)
        if enhancing.sum() >= 10 and edema.sum() >= 10:
            assert mean("CT1", enhancing) > 1.4 * mean("CT1", edema)
            assert mean("CT1", enhancing) > 1.4 * mean("CT1", wm)
            # The rim enhances on CT1 only: on T1 it is iso/slightly low.
            assert mean("T1", enhancing) < 1.05 * mean("T1", wm)
            checked += 1
    assert checked >= 10


# ------------------------------------------------------------------------------------------
# Units: measure_spd and new_measurable_lesion
# ------------------------------------------------------------------------------------------


def ellipse_volume(
    shape_zyx: tuple[int, int, int],
    spacing_xyz: tuple[float, float, float],
    semi_axes_mm: tuple[float, float],
    angle_deg: float,
    z_half_mm: float,
    centre_mm: tuple[float, float, float],
) -> np.ndarray:
    """Boolean ellipsoid-like lesion: an in-plane ellipse whose size shrinks away from its central slice."""
    sx, sy, sz = spacing_xyz
    z, y, x = np.meshgrid(
        np.arange(shape_zyx[0]) * sz - centre_mm[2],
        np.arange(shape_zyx[1]) * sy - centre_mm[1],
        np.arange(shape_zyx[2]) * sx - centre_mm[0],
        indexing="ij",
    )
    t = np.deg2rad(angle_deg)
    u = x * np.cos(t) + y * np.sin(t)
    v = -x * np.sin(t) + y * np.cos(t)
    scale = np.clip(1.0 - (z / z_half_mm) ** 2, 0.0, None)
    return (u / semi_axes_mm[0]) ** 2 + (v / semi_axes_mm[1]) ** 2 <= scale


def test_measure_spd_disk_and_ellipse() -> None:
    # Disk of diameter 20 mm on a 1 mm grid (two slices), enhancing ring around a necrotic core:
    # measured whole.
    seg = np.zeros((4, 40, 40), dtype=np.uint8)
    yy, xx = np.mgrid[:40, :40]
    r = np.hypot(yy - 20, xx - 20)
    seg[1:3, r <= 10] = 1
    seg[1:3, r <= 6] = 2
    spd, diameters = measure_spd(seg, (1.0, 1.0, 1.0))
    assert len(diameters) == 1
    d1, d2 = diameters[0]
    assert abs(d1 - 20) <= 1.0 and abs(d2 - 20) <= 1.0
    assert spd == pytest.approx(d1 * d2)

    # Rotated ellipse, anisotropic in-plane spacing, several slices (the central one is the largest).
    spacing = (0.5, 0.8, 2.0)  # SimpleITK (x, y, z)
    lesion = ellipse_volume((9, 60, 90), spacing, (15.0, 8.0), 30.0, 7.0, (22.0, 24.0, 8.0))
    seg = lesion.astype(np.uint8)  # all enhancing
    spd, diameters = measure_spd(seg, spacing)
    voxel = float(np.hypot(spacing[0], spacing[1]))
    (d1, d2), = diameters
    assert abs(d1 - 30.0) <= voxel and abs(d2 - 16.0) <= voxel
    # Array order matters: the same lesion read with x and y spacings swapped measures differently.
    _, swapped = measure_spd(seg, (0.8, 0.5, 2.0))
    assert abs(swapped[0][0] - d1) > voxel


def test_measure_spd_measurability_and_components() -> None:
    seg = np.zeros((5, 80, 80), dtype=np.uint8)
    yy, xx = np.mgrid[:80, :80]
    seg[1:4, np.hypot(yy - 20, xx - 20) <= 12] = 1  # measurable, ~24 mm
    seg[1:4, np.hypot(yy - 60, xx - 60) <= 4] = 1  # ~8-9 mm: enhancing but not measurable
    seg[1:4, np.hypot(yy - 20, xx - 62) <= 12] = 2  # necrosis without enhancement: not a lesion
    seg[1:4, np.hypot(yy - 62, xx - 18) <= 12] = 3  # edema: not a lesion
    spd, diameters = measure_spd(seg, (1.0, 1.0, 1.0))
    assert len(diameters) == 1
    assert spd == pytest.approx(diameters[0][0] * diameters[0][1])
    assert 22.0 <= diameters[0][0] <= 26.0

    small_only = np.zeros_like(seg)
    small_only[1:4, np.hypot(yy - 60, xx - 60) <= 4] = 1
    assert measure_spd(small_only, (1.0, 1.0, 1.0)) == (0.0, [])
    # The same small lesion on a coarser grid is large enough to measure.
    spd_coarse, coarse = measure_spd(small_only, (2.0, 2.0, 2.0))
    assert len(coarse) == 1 and spd_coarse > 100

    # Measurable needs two slices: the same 24 mm disk on one slice only is not.
    flat = np.zeros_like(seg)
    flat[2][np.hypot(yy - 20, xx - 20) <= 12] = 1
    assert measure_spd(flat, (1.0, 1.0, 1.0)) == (0.0, [])

    # Two measurable lesions add up; diagonal neighbours are one lesion (26-connectivity).
    two = np.zeros_like(seg)
    two[1:4, np.hypot(yy - 20, xx - 20) <= 8] = 1
    two[1:4, np.hypot(yy - 60, xx - 60) <= 8] = 1
    spd_two, both = measure_spd(two, (1.0, 1.0, 1.0))
    assert len(both) == 2 and spd_two == pytest.approx(sum(a * b for a, b in both))
    joined = np.zeros((3, 40, 40), dtype=np.uint8)
    joined[1, 5:20, 5:20] = 1
    joined[2, 20:35, 20:35] = 1  # touches the first only through a corner, one slice up: 2 slices
    assert len(measure_spd(joined, (1.0, 1.0, 1.0))[1]) == 1


def test_new_measurable_lesion() -> None:
    yy, xx = np.mgrid[:80, :80]
    before = np.zeros((4, 80, 80), dtype=np.uint8)
    before[1:3, np.hypot(yy - 20, xx - 20) <= 10] = 1
    grown = np.zeros_like(before)
    grown[1:3, np.hypot(yy - 20, xx - 20) <= 14] = 1
    assert not new_measurable_lesion(before, grown, (1.0, 1.0, 1.0))
    elsewhere = grown.copy()
    elsewhere[1:3, np.hypot(yy - 62, xx - 62) <= 8] = 1
    assert new_measurable_lesion(before, elsewhere, (1.0, 1.0, 1.0))
    tiny = grown.copy()
    tiny[1:3, np.hypot(yy - 62, xx - 62) <= 3] = 1
    assert not new_measurable_lesion(before, tiny, (1.0, 1.0, 1.0))


# ------------------------------------------------------------------------------------------
# Quirks
# ------------------------------------------------------------------------------------------


def test_quirks_present(cohort: tuple[Path, pd.DataFrame]) -> None:
    out, truth = cohort
    ratings = read_csv(out / "LUMIERE-ExpertRating-v202211.csv")
    values = list(ratings[RATING_COLUMN])
    assert "Post-Op " in values  # trailing space kept in the file
    assert "Post-Op/PD" in values
    early = ratings[ratings["LessThan3Months"] == "x"]
    assert len(early) >= 1
    for date in early["Date"]:
        assert int(date.split("-")[1]) <= 12
    assert ratings[RATIONALE_COLUMN].str.contains("not a RANO timepoint").sum() == 1

    missing_folder = [
        (p, d) for p, d in zip(ratings["Patient"], ratings["Date"]) if not (out / "Imaging" / p / d).is_dir()
    ]
    assert len(missing_folder) == 1
    missing_modality = [
        folder
        for folder in (out / "Imaging").glob("Patient-*/week-*")
        if not all((folder / f"{m}.nii.gz").is_file() for m in MODALITIES)
    ]
    assert len(missing_modality) == 1

    # Every quirk is recorded in the truth table, and Patient-001 is a clean case.
    quirks = ";".join(truth["quirk"].fillna("").astype(str))
    for name in ("post_op_pd", "post_op_trailing_space", "less_than_3_months", "not_rano_timepoint",
                 "missing_modality", "missing_folder"):
        assert name in quirks
    first = ratings[ratings["Patient"] == "Patient-001"]
    assert set(first[RATING_COLUMN]) <= {"Pre-Op", "Post-Op", "PD", "SD", "PR", "CR"}
    assert (first["LessThan3Months"] == "").all()
    assert not first[RATIONALE_COLUMN].str.contains("RANO").any()
    assert all((out / "Imaging" / "Patient-001" / d).is_dir() for d in first["Date"])
    assert (truth.loc[truth["patient"] == "Patient-001", "quirk"].fillna("") == "").all()


def test_template_dir_has_icbm152() -> None:
    folder = phantom.template_dir()
    for kind in ("t1", "gm", "wm"):
        assert (folder / f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz").is_file()


def test_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        phantom.generate_cohort(tmp_path, PhantomConfig(patients=0))
    with pytest.raises(ValueError):
        phantom.generate_cohort(tmp_path, PhantomConfig(min_followups=3, max_followups=2))
