"""Deterministic longitudinal glioblastoma phantom cohort laid out like LUMIERE.

LUMIERE (see ``shared/reference/LUMIERE.md``) cannot be downloaded in our build environment, so
the reader, the preprocessing and the training code are exercised on a generated cohort that has
the same folder layout, the same CSV column names and the same dirty CSV values. The phantom is
built on a real brain: the ICBM152 2009a templates (T1, GM and WM maps, 1 mm, skull-stripped)
that ship inside the nilearn wheel. Nothing is downloaded and nilearn itself is never imported.

What one patient looks like::

    Imaging/Patient-001/week-000-1/{CT1,T1,T2,FLAIR}.nii.gz             Pre-Op, large tumour
    Imaging/Patient-001/week-000-2/...                                   Post-Op, resection cavity
    Imaging/Patient-001/week-0NN/...                                     rated follow-ups
    Imaging/Patient-001/week-0NN/DeepBraTumIA-segmentation/native/segmentation/seg_mask.nii.gz
    Imaging/Patient-001/week-0NN/DeepBraTumIA-segmentation/atlas/segmentation/seg_mask.nii.gz

How a cohort is made:

1. *Planning* (cheap, no images): the number of follow-ups per patient is drawn, a quota of
   intended RANO classes following LUMIERE's prevalence is shuffled and fitted to the patients'
   lesion trajectories (a CR needs enhancing disease before it, after a CR only a recurrence can
   follow), and every lesion's size, shape and position is decided in template space.
2. *Rendering*: each timepoint's lesions are drawn as label maps on the template grid (this is the
   ``atlas`` segmentation) and turned into four contrasts from the GM/WM/CSF maps.
3. *Rating*: the written rating is the *measured* one: :func:`measure_spd` on the template-space
   label maps of the previous and the current timepoint, then the RANO decision table of
   :func:`RANOResponseLib.rano.rules.rano_decision` (the review panel's; CR only when no
   enhancing lesion at all is left). Lesions are measured as the measurement assistant does
   (:func:`~RANOResponseLib.rano.measurement.bidimensional`,
   :class:`~RANOResponseLib.rano.measurement.MeasurableCriteria`).
4. *Acquisition*: every timepoint is resampled into its own native grid through a random rigid
   motion, multiplied by a smooth bias field, given Rician noise, rescaled and stored as int16
   or float32, like real scans.

Everything is driven by :class:`numpy.random.SeedSequence` children of ``PhantomConfig.seed``;
the same configuration gives byte-identical image arrays and identical CSV files.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy import ndimage

from RANOResponseLib.core.names import LABEL_CORE, LABEL_EDEMA, LABEL_ENHANCING, MODALITIES
from RANOResponseLib.datasets.lumiere import DEMOGRAPHICS_CSV, RATING_CSV
from RANOResponseLib.rano.measurement import MeasurableCriteria, bidimensional
from RANOResponseLib.rano.rules import RANOThresholds, rano_decision

__all__ = [
    "PhantomConfig",
    "PatientPlan",
    "PlannedTimepoint",
    "LesionState",
    "LesionShape",
    "template_dir",
    "plan_cohort",
    "generate_cohort",
    "measure_spd",
    "new_measurable_lesion",
    "MODALITIES",
    "RATING_COLUMN",
    "RATIONALE_COLUMN",
    "EXPERT_RATING_COLUMNS",
    "DEMOGRAPHICS_COLUMNS",
    "TRUTH_COLUMNS",
]

# --------------------------------------------------------------------------------------------
# Constants: names copied verbatim from LUMIERE (shared/reference/LUMIERE.md)
# --------------------------------------------------------------------------------------------


RATING_COLUMN = (
    "Rating (according to RANO, PD: Progressive disease, SD: Stable disease, PR: Partial response, "
    "CR: Complete response, Pre-Op: Pre-Operative, Post-Op: Post-Operative)"
)
RATIONALE_COLUMN = (
    "Rating rationale (CRET: complete resection of the enhancing tumor, PRET: partial resection of "
    "the enhancing tumor, T2-Progr.: T2-Progression, L: Lesion)"
)
EXPERT_RATING_COLUMNS: tuple[str, ...] = (
    "Patient",
    "Date",
    "LessThan3Months",
    "NonMeasurableLesions",
    RATING_COLUMN,
    RATIONALE_COLUMN,
)
DEMOGRAPHICS_COLUMNS: tuple[str, ...] = (
    "Patient",
    "Survival time (weeks)",
    "Sex",
    "Age at surgery (years)",
    "IDH (WT: wild type)",
    "IDH method",
    "MGMT qualitative",
    "MGMT quantitative",
)
TRUTH_CSV = "phantom_truth.csv"
NOT_RANO_RATIONALE = "not a RANO timepoint: early post-op scan"

TRUTH_COLUMNS: tuple[str, ...] = (
    "patient",
    "date",  # week folder name, as in the rating CSV
    "week",
    "role",  # pre-op / post-op / follow-up
    "intended",  # class the trajectory was built for ('' for pre-op/post-op)
    "event",  # what happened to the lesions (growth, new lesion, recurrence, shrink, ...)
    "new_lesion_intended",
    "spd_mm2",  # measured on the atlas (template-space) segmentation
    "spd_prev_mm2",  # same, previous timepoint
    "new_lesion",  # measured: a measurable lesion not overlapping the previous lesions
    "n_measurable",
    "rating_measured",  # rules.rano_decision(spd_prev, spd, enhancing left, new_lesion); Pre-Op / Post-Op rows
    "rating_written",  # what the rating CSV says (quirks included)
    "quirk",  # ';'-separated quirk names, '' if clean
    "folder_exists",
    "modalities",  # ';'-separated modality files written
    "spacing",
    "dtype",
    "native_size",  # 'x y z'
    "rot_x_deg",
    "rot_y_deg",
    "rot_z_deg",
    "trans_x_mm",
    "trans_y_mm",
    "trans_z_mm",
)

# What makes a lesion measurable: the measurement assistant's definition, RANO's defaults.
MEASURABLE = MeasurableCriteria()

# LUMIERE prevalence among rated follow-ups.
CLASS_PREVALENCE: dict[str, float] = {"PD": 0.67, "SD": 0.20, "PR": 0.06, "CR": 0.07}

_TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

# Appearance codes used while rendering (a finer split than the segmentation labels).
_APP_NORMAL, _APP_RIM, _APP_NECROSIS, _APP_EDEMA, _APP_CAVITY = 0, 1, 2, 3, 4
_APP_TO_LABEL = np.array([0, LABEL_ENHANCING, LABEL_CORE, LABEL_EDEMA, LABEL_CORE], dtype=np.uint8)

# Relative intensities (normal-appearing WM on T1 = 1). T1: WM > GM > CSF; T2: CSF > GM > WM;
# FLAIR: CSF dark, GM > WM; CT1 like T1 with a small global gain. The enhancing rim is bright on
# CT1 only, necrosis is dark on T1/CT1 and bright on T2, the resection cavity behaves like fluid,
# and edema is bright on T2 and FLAIR.
_INTENSITY: dict[str, dict[str, float]] = {
    "CT1": {"wm": 1.06, "gm": 0.70, "csf": 0.26, "rim": 1.95, "necrosis": 0.42, "cavity": 0.22, "edema": 0.78},
    "T1": {"wm": 1.00, "gm": 0.64, "csf": 0.24, "rim": 0.86, "necrosis": 0.40, "cavity": 0.20, "edema": 0.74},
    "T2": {"wm": 0.50, "gm": 0.72, "csf": 1.50, "rim": 0.85, "necrosis": 1.25, "cavity": 1.45, "edema": 1.15},
    "FLAIR": {"wm": 0.60, "gm": 0.80, "csf": 0.12, "rim": 0.95, "necrosis": 0.70, "cavity": 0.14, "edema": 1.30},
}

# Lesion geometry (millimetres, "size" = outer radius of the enhancing lesion along its major axis).
_SIZE_CAP_MM = 26.0
_PRE_OP_SIZE_MM = (16.0, 22.0)
_NEW_LESION_SIZE_MM = (9.5, 13.0)
_PD_SPD_RATIO = (1.8, 2.6)
_SD_SPD_RATIO = (0.76, 1.02)
_PR_SPD_RATIO = (0.22, 0.34)
_P_NEW_LESION_PD = 0.25


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


@dataclass
class PhantomConfig:
    """What cohort to generate.

    Attributes:
        patients: number of patients (``Patient-001`` ...).
        seed: root seed; everything random derives from it.
        spacing: isotropic voxel size in mm of the template grid and of every native grid.
            The template is resampled to it once, so 3 or 4 mm makes small test cohorts cheap.
        min_followups: fewest rated follow-ups per patient (after Pre-Op and Post-Op).
        max_followups: most rated follow-ups per patient.
        quirks: add LUMIERE's CSV/layout quirks (never on Patient-001): ``Post-Op `` with a
            trailing space, one ``Post-Op/PD``, one early follow-up flagged ``LessThan3Months``,
            one rationale saying the row is not a RANO timepoint, one timepoint lacking a
            modality file and one CSV row whose folder does not exist. All of them need at least
            3 patients with follow-ups; with fewer, those that do not fit are left out.
    """

    patients: int = 6
    seed: int = 0
    spacing: float = 1.0
    min_followups: int = 2
    max_followups: int = 4
    quirks: bool = True

    def validate(self) -> None:
        """Raise ``ValueError`` for a configuration that cannot be generated."""
        if self.patients < 1:
            raise ValueError(f"patients must be >= 1, got {self.patients}")
        if not (0.5 <= self.spacing <= 6.0):
            raise ValueError(f"spacing must be between 0.5 and 6 mm, got {self.spacing}")
        if not (0 <= self.min_followups <= self.max_followups):
            raise ValueError(
                f"need 0 <= min_followups <= max_followups, got {self.min_followups}, {self.max_followups}"
            )
        if self.max_followups > 40:
            raise ValueError("max_followups must be <= 40")


def template_dir() -> Path:
    """Folder holding the ICBM152 2009a templates inside the installed nilearn package.

    Found with :func:`importlib.util.find_spec`, which locates the package without importing it
    (importing nilearn takes seconds). Raises ``FileNotFoundError`` if nilearn or the files are
    missing; nothing is ever downloaded.
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("nilearn is not installed: the phantom needs its bundled ICBM152 templates")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    missing = [name for name in _TEMPLATE_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"ICBM152 template files missing from {folder}: {', '.join(missing)}")
    return folder


def measure_spd(seg: np.ndarray, spacing_xyz: tuple[float, float, float]) -> tuple[float, list[tuple[float, float]]]:
    """RANO sum of bidimensional products (mm^2) of the enhancing lesions in a label map.

    A lesion is a 26-connected component of labels 1 and 2 that contains enhancing (label 1)
    voxels. On the axial slice (constant z) where the lesion is largest, ``d1`` is its longest
    diameter (maximum Feret diameter) and ``d2`` its longest extent perpendicular to ``d1``;
    both include the in-plane pixel footprint, so a voxelised disk of diameter D measures D within
    a voxel. (Principal axes would do; the Feret diameter is what a reader measures.) A lesion
    is measurable by :data:`MEASURABLE` (both diameters >= 10 mm, seen on >= 2 slices).

    Args:
        seg: label map as SimpleITK gives it, numpy order ``(z, y, x)``.
        spacing_xyz: voxel size in SimpleITK order ``(x, y, z)``.

    Returns:
        ``(spd, [(d1, d2), ...])`` over the measurable lesions, largest ``d1*d2`` first.
    """
    _, _, lesions = _enhancing_lesions(seg, spacing_xyz)
    measurable = [(d1, d2) for _, d1, d2, n in lesions if not MEASURABLE.why_not(d1, d2, n, spacing_xyz[2])]
    measurable.sort(key=lambda d: -d[0] * d[1])
    return float(sum(d1 * d2 for d1, d2 in measurable)), measurable


def new_measurable_lesion(
    seg_prev: np.ndarray, seg_now: np.ndarray, spacing_xyz: tuple[float, float, float]
) -> bool:
    """True if ``seg_now`` holds a measurable enhancing lesion that touches no lesion of ``seg_prev``.

    Both maps must be on the same grid (the atlas segmentations are). "Touches" means sharing a
    voxel with labels 1 or 2 of the previous map, so a growing or shrinking lesion, or one that
    regrows from an old resection cavity, is not new.
    """
    if seg_prev.shape != seg_now.shape:
        raise ValueError(f"segmentations differ in shape: {seg_prev.shape} vs {seg_now.shape}")
    components, box, lesions = _enhancing_lesions(seg_now, spacing_xyz)
    if box is None:
        return False
    previous = np.isin(np.asarray(seg_prev)[box], (LABEL_ENHANCING, LABEL_CORE))
    for label_id, d1, d2, n_slices in lesions:
        if not MEASURABLE.why_not(d1, d2, n_slices, spacing_xyz[2]):
            if not previous[components == label_id].any():
                return True
    return False


def plan_cohort(config: PhantomConfig) -> list[PatientPlan]:
    """The cohort :func:`generate_cohort` draws for ``config``, without drawing it.

    Every patient's lesion shapes and, per timepoint, each lesion's size and state and the class
    the trajectory was built for: the intended geometry, from which tests derive the expected
    measurements and RANO classes independently of the measuring code.
    """
    config.validate()
    return _plan(config, _load_template(float(config.spacing)), _seeds(config))


def generate_cohort(
    out: Path, config: PhantomConfig, progress: Callable[[str], None] | None = None
) -> pd.DataFrame:
    """Write a phantom cohort under ``out`` and return its ground-truth table.

    Writes ``out/Imaging/Patient-NNN/<week>/...``, ``LUMIERE-ExpertRating-v202211.csv``,
    ``LUMIERE-Demographics_Pathology.csv`` and ``phantom_truth.csv`` (the returned table, one row
    per CSV row, columns :data:`TRUTH_COLUMNS`). ``out`` may exist; files of the same names are
    overwritten, nothing else is removed.

    Args:
        out: destination folder.
        config: what to generate; the same config always gives the same arrays and CSVs.
        progress: optional callback receiving one short line per written timepoint.
    """
    config.validate()
    out = Path(out)
    say = progress or (lambda _msg: None)
    tpl = _load_template(float(config.spacing))
    seeds = _seeds(config)
    plans = _plan(config, tpl, seeds)
    image_ss, demo_ss = seeds.images, seeds.demographics

    imaging = out / "Imaging"
    imaging.mkdir(parents=True, exist_ok=True)
    truth_rows: list[dict[str, object]] = []
    rating_rows: list[dict[str, str]] = []
    spacing_xyz = (tpl.spacing,) * 3
    for plan, ss in zip(plans, image_ss):
        tp_ss = ss.spawn(len(plan.timepoints))
        prev_labels: np.ndarray | None = None
        prev_spd = 0.0
        patient_rows: list[tuple[int, dict[str, str], dict[str, object]]] = []
        for tp, tss in zip(plan.timepoints, tp_ss):
            rng = np.random.default_rng(tss)
            app = _render_appearance(tpl, plan.shapes, tp.lesions)
            labels = _APP_TO_LABEL[app]
            spd, diameters = measure_spd(labels, spacing_xyz)
            _, _, lesions = _enhancing_lesions(labels, spacing_xyz)
            non_measurable = len(lesions) > len(diameters)
            if tp.role == "pre-op":
                new_lesion, measured = False, "Pre-Op"
            elif tp.role == "post-op":
                new_lesion, measured = False, "Post-Op"
            else:
                assert prev_labels is not None
                new_lesion = new_measurable_lesion(prev_labels, labels, spacing_xyz)
                measured = rano_decision(prev_spd, spd, enhancing_left=bool(lesions), new_measurable=new_lesion).category
            acq = _write_timepoint(imaging / plan.patient / tp.folder, tpl, app, labels, tp, rng)
            written = measured
            if "post_op_pd" in tp.quirks:
                written = "Post-Op/PD"
            elif "post_op_trailing_space" in tp.quirks:
                written = "Post-Op "
            rationale = NOT_RANO_RATIONALE if "not_rano_timepoint" in tp.quirks else _rationale(tp, measured)
            rating = {
                "Patient": plan.patient,
                "Date": tp.folder,
                "LessThan3Months": "x" if "less_than_3_months" in tp.quirks else "",
                "NonMeasurableLesions": "x" if non_measurable else "",
                RATING_COLUMN: written,
                RATIONALE_COLUMN: rationale,
            }
            truth = {
                "patient": plan.patient,
                "date": tp.folder,
                "week": tp.week,
                "role": tp.role,
                "intended": tp.intended,
                "event": tp.event,
                "new_lesion_intended": tp.new_lesion_intended,
                "spd_mm2": round(spd, 4),
                "spd_prev_mm2": round(prev_spd, 4) if tp.role != "pre-op" else np.nan,
                "new_lesion": new_lesion,
                "n_measurable": len(diameters),
                "rating_measured": measured,
                "rating_written": written,
                "quirk": ";".join(tp.quirks),
                "folder_exists": True,
                "spacing": tpl.spacing,
                **acq,
            }
            patient_rows.append((tp.week, rating, truth))
            say(f"{plan.patient} {tp.folder} ({tp.role}{', ' + measured if tp.role == 'follow-up' else ''})")
            prev_labels, prev_spd = labels, spd
        for week, folder, rated in plan.missing_folder_rows:
            rating = {
                "Patient": plan.patient,
                "Date": folder,
                "LessThan3Months": "",
                "NonMeasurableLesions": "",
                RATING_COLUMN: rated,
                RATIONALE_COLUMN: "",
            }
            truth = {name: "" for name in TRUTH_COLUMNS}
            truth.update(
                patient=plan.patient, date=folder, week=week, role="follow-up", rating_written=rated,
                quirk="missing_folder", folder_exists=False, spacing=tpl.spacing, new_lesion=False,
                new_lesion_intended=False, spd_mm2=np.nan, spd_prev_mm2=np.nan,
            )
            patient_rows.append((week, rating, truth))
        patient_rows.sort(key=lambda row: row[0])  # stable: same-week rows keep their order
        rating_rows.extend(r for _, r, _ in patient_rows)
        truth_rows.extend(t for _, _, t in patient_rows)

    pd.DataFrame(rating_rows, columns=list(EXPERT_RATING_COLUMNS)).to_csv(out / RATING_CSV, index=False)
    _demographics(plans, np.random.default_rng(demo_ss)).to_csv(out / DEMOGRAPHICS_CSV, index=False)
    truth_df = pd.DataFrame(truth_rows, columns=list(TRUTH_COLUMNS))
    truth_df.to_csv(out / TRUTH_CSV, index=False)
    write_recipe(out, config)
    return truth_df


@dataclass(frozen=True)
class _Seeds:
    """The independent random streams of a cohort, all children of ``PhantomConfig.seed``."""

    counts: np.random.SeedSequence
    quota: np.random.SeedSequence
    quirks: np.random.SeedSequence
    demographics: np.random.SeedSequence
    plans: list[np.random.SeedSequence]  # one per patient
    images: list[np.random.SeedSequence]  # one per patient


def _seeds(config: PhantomConfig) -> _Seeds:
    root = np.random.SeedSequence(config.seed)
    cohort_ss, *patient_ss = root.spawn(config.patients + 1)
    counts_ss, quota_ss, quirk_ss, demo_ss = cohort_ss.spawn(4)
    plan_ss: list[np.random.SeedSequence] = []
    image_ss: list[np.random.SeedSequence] = []
    for ss in patient_ss:
        p, i = ss.spawn(2)
        plan_ss.append(p)
        image_ss.append(i)
    return _Seeds(counts_ss, quota_ss, quirk_ss, demo_ss, plan_ss, image_ss)


def _plan(config: PhantomConfig, tpl: _Template, seeds: _Seeds) -> list[PatientPlan]:
    counts_rng = np.random.default_rng(seeds.counts)
    n_followups = [
        int(v) for v in counts_rng.integers(config.min_followups, config.max_followups + 1, size=config.patients)
    ]
    quirks = _allocate_quirks(config, n_followups, np.random.default_rng(seeds.quirks))
    return _plan_cohort(tpl, config, n_followups, quirks, seeds.plans, np.random.default_rng(seeds.quota))


RECIPE_JSON = "phantom.json"


def phantom_command(config: PhantomConfig, out: Path | str = "DIR") -> str:
    """The ``rano-response phantom`` command that regenerates this cohort byte for byte."""
    cmd = (f"rano-response phantom --out {out} --patients {config.patients} --seed {config.seed} "
           f"--spacing {config.spacing:g} --min-followups {config.min_followups} "
           f"--max-followups {config.max_followups}")
    return cmd + ("" if config.quirks else " --no-quirks")


def write_recipe(out: Path, config: PhantomConfig) -> Path:
    """``phantom.json``: the generator config and command, so a trainer can record its data."""
    import json
    from dataclasses import asdict

    path = Path(out) / RECIPE_JSON
    path.write_text(json.dumps({"generator": "RANOResponseLib.phantom", "config": asdict(config),
                                "command": phantom_command(config)}, indent=2) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


def _enhancing_lesions(
    seg: np.ndarray, spacing_xyz: tuple[float, float, float]
) -> tuple[np.ndarray, tuple[slice, ...] | None, list[tuple[int, float, float, int]]]:
    """Label the enhancing lesions and measure each.

    Returns ``(components, box, [(id, d1, d2, n_slices), ...])`` where ``components`` labels the
    lesions inside ``box``, the bounding box of labels 1 and 2 (``None`` when there are none).
    """
    seg = np.asarray(seg)
    if seg.ndim != 3:
        raise ValueError(f"expected a 3D label map, got shape {seg.shape}")
    sx, sy = float(spacing_xyz[0]), float(spacing_xyz[1])
    lesion = (seg == LABEL_ENHANCING) | (seg == LABEL_CORE)
    box = _bounding_box(lesion)
    if box is None:
        return np.zeros((0, 0, 0), dtype=np.int32), None, []
    seg, lesion = seg[box], lesion[box]
    components, n = ndimage.label(lesion, structure=np.ones((3, 3, 3), dtype=bool))
    enhancing = seg == LABEL_ENHANCING
    # Components holding at least one enhancing voxel.
    has_enhancing = np.bincount(components[enhancing], minlength=n + 1) > 0
    out: list[tuple[int, float, float, int]] = []
    for label_id, sub in enumerate(ndimage.find_objects(components), start=1):
        if sub is None or not has_enhancing[label_id]:
            continue
        mask = components[sub] == label_id
        areas = mask.sum(axis=(1, 2))
        z = int(np.argmax(areas))
        yx = np.argwhere(mask[z])
        points = np.column_stack([yx[:, 1] * sx, yx[:, 0] * sy])  # (x, y) in mm
        d = bidimensional(points, sx, sy)  # the measurement assistant's own definition
        out.append((label_id, d.d1, d.d2, int((areas > 0).sum())))
    return components, box, out


# --------------------------------------------------------------------------------------------
# Template
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Template:
    """The ICBM152 brain on the requested grid, with what the generator needs from it."""

    spacing: float
    reference: sitk.Image  # geometry only (template origin/direction, requested spacing)
    gm: np.ndarray  # (z, y, x) float32 fractions 0..1
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray  # bool
    normal: dict[str, np.ndarray]  # tumour-free contrast per modality, relative units
    brain_corners: list[tuple[float, float, float]]  # physical corners of the brain's bounding box
    brain_centre: tuple[float, float, float]  # physical
    cand_mm: np.ndarray  # (N, 3) candidate lesion centres in array-frame mm (z, y, x)
    cand_edge_mm: np.ndarray  # (N,) distance to the brain edge
    cand_wm: np.ndarray  # (N,) WM fraction
    cand_x_phys: np.ndarray  # (N,) physical x (LPS; sign tells the hemisphere)


@functools.lru_cache(maxsize=2)
def _load_template(spacing: float) -> _Template:
    folder = template_dir()
    raw = {
        key: sitk.Cast(sitk.ReadImage(str(folder / name)), sitk.sitkFloat32) for key, name in _TEMPLATE_FILES.items()
    }
    t1 = sitk.GetArrayFromImage(raw["t1"])
    tissue = (sitk.GetArrayFromImage(raw["gm"]) + sitk.GetArrayFromImage(raw["wm"])) / 255.0
    brain_img = sitk.GetImageFromArray(((t1 > 0) | (tissue > 0.05)).astype(np.float32))
    brain_img.CopyInformation(raw["t1"])
    images = {"gm": raw["gm"] / 255.0, "wm": raw["wm"] / 255.0, "brain": brain_img}
    if spacing != 1.0:
        images = {key: _resample_to_spacing(img, spacing) for key, img in images.items()}
    reference = images["brain"]
    brain = sitk.GetArrayFromImage(images["brain"]) >= 0.5
    gm = np.clip(sitk.GetArrayFromImage(images["gm"]), 0.0, 1.0) * brain
    wm = np.clip(sitk.GetArrayFromImage(images["wm"]), 0.0, 1.0) * brain
    # CSF = brain mask minus GM minus WM.
    csf = np.clip(brain.astype(np.float32) - gm - wm, 0.0, 1.0)
    normal = {
        m: (gm * v["gm"] + wm * v["wm"] + csf * v["csf"]).astype(np.float32) for m, v in _INTENSITY.items()
    }

    zz, yy, xx = np.nonzero(brain)
    lo, hi = (int(xx.min()), int(yy.min()), int(zz.min())), (int(xx.max()), int(yy.max()), int(zz.max()))
    corners = [
        reference.TransformContinuousIndexToPhysicalPoint((float(x), float(y), float(z)))
        for x in (lo[0] - 0.5, hi[0] + 0.5)
        for y in (lo[1] - 0.5, hi[1] + 0.5)
        for z in (lo[2] - 0.5, hi[2] + 0.5)
    ]
    centre = reference.TransformContinuousIndexToPhysicalPoint(
        (float(xx.mean()), float(yy.mean()), float(zz.mean()))
    )

    # Candidate lesion centres on a ~2 mm lattice: WM voxels with their distance to the brain edge.
    step = max(1, int(round(2.0 / spacing)))
    coarse = brain[::step, ::step, ::step]
    edge = ndimage.distance_transform_edt(coarse, sampling=step * spacing)
    wm_coarse = wm[::step, ::step, ::step]
    keep = coarse & (wm_coarse > 0.4) & (edge >= 8.0)
    idx = np.argwhere(keep) * step
    x_phys = reference.GetOrigin()[0] + reference.GetDirection()[0] * idx[:, 2] * spacing
    return _Template(
        spacing=spacing,
        reference=reference,
        gm=gm.astype(np.float32),
        wm=wm.astype(np.float32),
        csf=csf.astype(np.float32),
        brain=brain,
        normal=normal,
        brain_corners=corners,
        brain_centre=centre,
        cand_mm=idx.astype(np.float64) * spacing,
        cand_edge_mm=edge[keep].astype(np.float64),
        cand_wm=wm_coarse[keep].astype(np.float64),
        cand_x_phys=x_phys.astype(np.float64),
    )


def _resample_to_spacing(image: sitk.Image, spacing: float) -> sitk.Image:
    """Resample a 1 mm template image onto an isotropic ``spacing`` grid with the same origin.

    When coarsening, the image is first block-averaged by the integer part of the factor
    (``BinShrink``), so that tissue fractions are averaged rather than point-sampled; that is much
    cheaper than a Gaussian pre-filter and good enough for a phantom.
    """
    size = [int(math.floor((n - 1) * sp / spacing)) + 1 for n, sp in zip(image.GetSize(), image.GetSpacing())]
    origin = image.GetOrigin()
    shrink = int(math.floor(spacing / image.GetSpacing()[0] + 1e-6))
    if shrink > 1:
        image = sitk.BinShrink(image, [shrink] * 3)
    return sitk.Resample(
        image, size, sitk.Transform(), sitk.sitkLinear, origin, (spacing,) * 3,
        image.GetDirection(), 0.0, sitk.sitkFloat32,
    )


# --------------------------------------------------------------------------------------------
# Lesions
# --------------------------------------------------------------------------------------------


@dataclass
class LesionShape:
    """Fixed geometry of one lesion: a perturbed ellipsoid that scales with its size."""

    centre_mm: np.ndarray  # (3,) array-frame (z, y, x) mm on the template grid
    rotation: np.ndarray  # (3, 3) orthonormal
    axes: np.ndarray  # (3,) relative semi-axes, largest 1
    wave_dirs: np.ndarray  # (K, 3) unit vectors
    wave_freq: np.ndarray  # (K,)
    wave_phase: np.ndarray  # (K,)
    wave_amp: np.ndarray  # (K,)
    cap_mm: float  # largest size that still fits inside the brain here

    @property
    def amplitude(self) -> float:
        return float(self.wave_amp.sum())

    @property
    def min_factor(self) -> float:
        """Smallest boundary radius per unit size."""
        return float(self.axes.min()) / (1.0 + self.amplitude)

    @property
    def max_factor(self) -> float:
        """Largest boundary radius per unit size."""
        return 1.0 / (1.0 - self.amplitude)

    def radius(self, dz: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
        """Normalised radius (mm along the major axis): the lesion boundary of size s is ``radius == s``.

        An ellipsoid distance scaled by ``1 + noise(direction)``, a smooth low-frequency random
        function of the direction only, so the shape stays the same when the lesion grows.
        """
        d = (dz, dy, dx)
        rotated = [sum(self.rotation[j, i] * d[j] for j in range(3)) for i in range(3)]
        ellipsoid = np.sqrt(sum((rotated[i] / self.axes[i]) ** 2 for i in range(3)))
        norm = np.maximum(np.sqrt(dz * dz + dy * dy + dx * dx), 1e-6)
        noise = np.zeros(np.broadcast_shapes(dz.shape, dy.shape, dx.shape), dtype=np.float32)
        for k in range(len(self.wave_amp)):
            g = self.wave_dirs[k]
            cosine = (g[0] * dz + g[1] * dy + g[2] * dx) / norm
            noise += self.wave_amp[k] * np.cos(np.pi * self.wave_freq[k] * cosine + self.wave_phase[k])
        return (ellipsoid * (1.0 + noise)).astype(np.float32)


@dataclass
class LesionState:
    """One lesion at one timepoint. Drawn as enhancing (labels 1 and 2) where
    ``shape.radius < size_mm`` when ``active``; an inactive lesion has no enhancing rim."""

    shape: int  # index into the patient's shapes
    size_mm: float  # outer radius of the enhancing lesion (major axis)
    core_fraction: float  # core radius / size
    edema_mm: float
    active: bool  # has an enhancing rim
    core: str  # 'necrosis' or 'cavity'
    primary: bool = False


@dataclass
class PlannedTimepoint:
    """One timepoint of a patient's plan: its lesions and the class it was built for."""

    folder: str
    week: int
    role: str  # 'pre-op', 'post-op', 'follow-up'
    lesions: list[LesionState]
    intended: str = ""
    event: str = ""
    new_lesion_intended: bool = False
    quirks: list[str] = field(default_factory=list)
    missing_modality: str | None = None


@dataclass
class PatientPlan:
    """One patient's plan: the lesion shapes and the timepoints that size them."""

    patient: str
    shapes: list[LesionShape]
    timepoints: list[PlannedTimepoint]
    leftover: int  # intended classes that could not be fitted (replaced by PD)
    missing_folder_rows: list[tuple[int, str, str]] = field(default_factory=list)  # (week, folder, rating)


def _make_shape(rng: np.random.Generator, centre_mm: np.ndarray, cap_mm: float) -> LesionShape:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    rotation = q * np.sign(np.diag(r))  # random orthonormal matrix
    axes = np.array([1.0, rng.uniform(0.8, 1.0), rng.uniform(0.8, 1.0)])
    k = 6
    dirs = rng.standard_normal((k, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    amp = rng.uniform(0.3, 1.0, size=k)
    amp *= rng.uniform(0.12, 0.22) / amp.sum()
    return LesionShape(
        centre_mm=np.asarray(centre_mm, dtype=np.float64),
        rotation=rotation,
        axes=axes,
        wave_dirs=dirs,
        wave_freq=rng.uniform(0.7, 2.4, size=k),
        wave_phase=rng.uniform(0.0, 2 * np.pi, size=k),
        wave_amp=amp,
        cap_mm=cap_mm,
    )


def _min_radius_mm(spacing: float) -> float:
    """Smallest boundary radius that stays reliably measurable (diameter >= 10 mm) on this grid."""
    return 5.0 + 0.5 * spacing + 0.8


def _place_primary(tpl: _Template, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Centre in one hemisphere's WM, far from the brain edge; returns (centre, edge distance)."""
    side = 1.0 if rng.random() < 0.5 else -1.0
    hemisphere = tpl.cand_x_phys * side >= 12.0
    for min_edge in (30.0, 26.0, 22.0, 18.0, 14.0, 8.0):
        ok = np.flatnonzero(hemisphere & (tpl.cand_wm > 0.5) & (tpl.cand_edge_mm >= min_edge))
        if ok.size:
            i = int(ok[rng.integers(ok.size)])
            return tpl.cand_mm[i].copy(), float(tpl.cand_edge_mm[i])
    i = int(np.argmax(tpl.cand_edge_mm))
    return tpl.cand_mm[i].copy(), float(tpl.cand_edge_mm[i])


def _place_new(
    tpl: _Template, shapes: list[LesionShape], size_mm: float, max_factor: float, rng: np.random.Generator
) -> tuple[np.ndarray, float] | None:
    """Centre for a new lesion away from all others; returns (centre, size cap) or None."""
    cap = np.minimum(_SIZE_CAP_MM, (tpl.cand_edge_mm - 2.0) / max_factor)
    for shape in shapes:
        reserved = shape.cap_mm * shape.max_factor + 2.0 * tpl.spacing + 6.0
        gap = np.linalg.norm(tpl.cand_mm - shape.centre_mm, axis=1) - reserved
        cap = np.minimum(cap, gap / max_factor)
    ok = np.flatnonzero(cap >= 1.15 * size_mm)
    if ok.size == 0:
        return None
    i = int(ok[rng.integers(ok.size)])
    return tpl.cand_mm[i].copy(), float(cap[i])


def _render_appearance(tpl: _Template, shapes: list[LesionShape], lesions: list[LesionState]) -> np.ndarray:
    """Appearance-code map (uint8, template grid) of one timepoint's lesions.

    Each lesion's distance field is evaluated on a sub-box around it only. Edema is drawn first
    (so a rim or core of any lesion wins over another lesion's edema), limited to the brain,
    avoiding CSF and reaching further into WM than into GM.
    """
    app = np.zeros(tpl.brain.shape, dtype=np.uint8)
    sp = tpl.spacing
    rim_min = max(2.5, 1.2 * sp)
    fields = []
    for state in lesions:
        shape = shapes[state.shape]
        reach = (state.size_mm + 1.3 * state.edema_mm) * shape.max_factor + 2 * sp
        lo = np.maximum(np.floor((shape.centre_mm - reach) / sp).astype(int), 0)
        hi = np.minimum(np.ceil((shape.centre_mm + reach) / sp).astype(int) + 1, tpl.brain.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        dz, dy, dx = (
            (np.arange(a, b, dtype=np.float32) * sp - c).reshape(shape_)
            for a, b, c, shape_ in zip(lo, hi, shape.centre_mm, ((-1, 1, 1), (1, -1, 1), (1, 1, -1)))
        )
        r = shape.radius(dz, dy, dx)
        if state.active:
            outer = state.size_mm
            core = min(state.core_fraction * state.size_mm, state.size_mm - rim_min)
        else:
            outer = core = state.core_fraction * state.size_mm
        fields.append((box, r, outer, core, state))
        if state.edema_mm > 0:
            wm = tpl.wm[box]
            edema = (r < outer + state.edema_mm * (0.3 + 0.9 * wm)) & tpl.brain[box] & (tpl.csf[box] < 0.5)
            region = app[box]
            region[edema & (region == _APP_NORMAL)] = _APP_EDEMA
    for box, r, outer, core, state in fields:
        region = app[box]
        free = ((region == _APP_NORMAL) | (region == _APP_EDEMA)) & tpl.brain[box]
        core_code = _APP_CAVITY if state.core == "cavity" else _APP_NECROSIS
        region[free & (r < outer) & (r >= core)] = _APP_RIM
        region[free & (r < core)] = core_code
    return app


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------


def _class_quota(n: int) -> list[str]:
    """Intended follow-up classes for ``n`` follow-ups: LUMIERE prevalence, largest remainder,
    every class at least once when ``n >= 4``."""
    classes = list(CLASS_PREVALENCE)
    exact = np.array([CLASS_PREVALENCE[c] * n for c in classes])
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    if n >= 4:
        for i in range(len(classes)):
            while counts[i] == 0:
                counts[int(np.argmax(counts))] -= 1
                counts[i] += 1
    return [c for c, k in zip(classes, counts) for _ in range(int(k))]


def _feasible(cls: str, states: list[LesionState], shapes: list[LesionShape], r_min: float) -> bool:
    active = [s for s in states if s.active]
    if cls == "PD":
        return True
    if cls in ("SD", "CR"):
        return bool(active)
    if cls == "PR":
        lowest = math.sqrt(_PR_SPD_RATIO[0])
        return any(s.size_mm * lowest * shapes[s.shape].min_factor >= r_min for s in active)
    raise ValueError(cls)


def _evolve(
    cls: str,
    states: list[LesionState],
    shapes: list[LesionShape],
    tpl: _Template,
    r_min: float,
    rng: np.random.Generator,
) -> tuple[list[LesionState], str, bool]:
    """Lesions at the next follow-up for an intended class: (states, event, new lesion)."""
    states = [replace(s) for s in states]
    active = [s for s in states if s.active]
    if cls == "SD":
        m = math.sqrt(rng.uniform(*_SD_SPD_RATIO))
        for s in active:
            s.size_mm *= m
            s.edema_mm *= rng.uniform(0.9, 1.1)
        return states, "stable", False
    if cls == "PR":
        m = math.sqrt(rng.uniform(*_PR_SPD_RATIO))
        kept: list[LesionState] = []
        for s in states:
            if s.active:
                s.size_mm *= m
                s.edema_mm *= rng.uniform(0.4, 0.7)
                if s.size_mm * shapes[s.shape].min_factor < r_min:
                    if not s.primary:
                        continue  # resolved satellite
                    s.active = False
            kept.append(s)
        return kept, "shrinkage", False
    if cls == "CR":
        kept = []
        for s in states:
            if s.active and not s.primary:
                continue  # enhancing lesion gone
            if s.active:
                s.active = False
                s.size_mm *= rng.uniform(0.6, 0.9)  # cavity collapses a little
            s.edema_mm = rng.uniform(0.0, 2.5)
            kept.append(s)
        return kept, "enhancement resolved", False
    # PD
    m = math.sqrt(rng.uniform(*_PD_SPD_RATIO))
    grow_fits = bool(active) and all(s.size_mm * m <= shapes[s.shape].cap_mm for s in active)
    want_new = not active or not grow_fits or rng.random() < _P_NEW_LESION_PD
    if want_new:
        shape_rng = np.random.default_rng(int(rng.integers(2**63)))
        probe = _make_shape(shape_rng, np.zeros(3), 0.0)
        size = max(rng.uniform(*_NEW_LESION_SIZE_MM), 1.25 * r_min / probe.min_factor)
        placed = _place_new(tpl, shapes, size, probe.max_factor, rng)
        if placed is not None:
            probe.centre_mm, probe.cap_mm = placed
            size = min(size, probe.cap_mm)
            shapes.append(probe)
            for s in active:
                s.size_mm *= math.sqrt(rng.uniform(0.95, 1.1))
            states.append(
                LesionState(
                    shape=len(shapes) - 1, size_mm=size, core_fraction=rng.uniform(0.3, 0.6),
                    edema_mm=rng.uniform(6.0, 14.0), active=True, core="necrosis",
                )
            )
            return states, ("recurrence (new lesion)" if not active else "new lesion"), True
    if not active:
        # No room for a new lesion: the tumour regrows around the old cavity instead.
        for s in states:
            if s.primary:
                s.active = True
                s.size_mm = max(s.size_mm * 1.3, 1.3 * r_min / shapes[s.shape].min_factor)
                s.edema_mm = rng.uniform(6.0, 12.0)
        return states, "recurrence at the cavity", False
    for s in active:
        s.size_mm *= m
        s.edema_mm = min(25.0, s.edema_mm * rng.uniform(1.1, 1.4) + 2.0)
    return states, "growth", False


def _allocate_quirks(
    config: PhantomConfig, n_followups: list[int], rng: np.random.Generator
) -> dict[int, dict[str, object]]:
    """Decide which patient (never the first) carries which LUMIERE quirk.

    Returns ``{patient_index: {quirk_name: detail}}``; details are filled while planning.
    """
    quirks: dict[int, dict[str, object]] = {}
    if not config.quirks or config.patients < 2:
        return quirks
    order = [int(i) for i in rng.permutation(np.arange(1, config.patients))]
    n = len(order)

    def put(i: int, name: str, detail: object = True) -> None:
        quirks.setdefault(i, {})[name] = detail

    put(order[0], "post_op_pd")
    for k, i in enumerate(order[1:]):
        if k == 0 or rng.random() < 0.5:
            put(i, "post_op_trailing_space")
    with_followups = [i for i in order if n_followups[i] >= 1]
    if with_followups:
        ltm = with_followups[1 % len(with_followups)]
        put(ltm, "less_than_3_months")
        not_rano = with_followups[2 % len(with_followups)]
        if not_rano != ltm:
            put(not_rano, "not_rano_timepoint", 0)
        elif n_followups[not_rano] >= 2:
            put(not_rano, "not_rano_timepoint", 1)
        mm = with_followups[3 % len(with_followups)]
        put(mm, "missing_modality", (int(rng.integers(n_followups[mm])), str(rng.choice(MODALITIES))))
    put(order[4 % n], "missing_folder")
    return quirks


def _plan_patient(
    index: int,
    tpl: _Template,
    n_followups: int,
    quota: list[str],
    quirks: dict[str, object],
    plan_ss: np.random.SeedSequence,
) -> PatientPlan:
    """Plan one patient's lesions and weeks, taking intended classes from ``quota`` (consumed)."""
    rng = np.random.default_rng(plan_ss)
    r_min = _min_radius_mm(tpl.spacing)
    centre, edge = _place_primary(tpl, rng)
    shape = _make_shape(rng, centre, 0.0)
    shape.cap_mm = min(_SIZE_CAP_MM, (edge - 2.0) / shape.max_factor)
    shapes = [shape]
    pre_size = min(rng.uniform(*_PRE_OP_SIZE_MM), max(shape.cap_mm, 1.4 * r_min / shape.min_factor))
    pre = LesionState(
        shape=0, size_mm=pre_size, core_fraction=rng.uniform(0.45, 0.7), edema_mm=rng.uniform(12.0, 24.0),
        active=True, core="necrosis", primary=True,
    )
    post_size = max(pre_size * rng.uniform(0.55, 0.75), 1.2 * r_min / shape.min_factor)
    rim = rng.uniform(3.0, 5.0)
    post = LesionState(
        shape=0, size_mm=post_size, core_fraction=max(0.3, 1.0 - rim / post_size),
        edema_mm=rng.uniform(5.0, 12.0), active=True, core="cavity", primary=True,
    )
    timepoints = [
        PlannedTimepoint("week-000-1", 0, "pre-op", [pre]),
        PlannedTimepoint("week-000-2", 0, "post-op", [post]),
    ]
    if "post_op_pd" in quirks:
        timepoints[1].quirks.append("post_op_pd")
    elif "post_op_trailing_space" in quirks:
        timepoints[1].quirks.append("post_op_trailing_space")

    week = int(rng.integers(6, 12)) if "less_than_3_months" in quirks else int(rng.integers(13, 18))
    states = [post]
    leftover = 0
    for k in range(n_followups):
        if k > 0:
            week += int(rng.integers(8, 15))
        cls = next((c for c in quota if _feasible(c, states, shapes, r_min)), None)
        if cls is None:
            cls, leftover = "PD", leftover + 1
        else:
            quota.remove(cls)
        states, event, new = _evolve(cls, states, shapes, tpl, r_min, rng)
        tp = PlannedTimepoint(f"week-{week:03d}", week, "follow-up", states, cls, event, new)
        if k == 0 and "less_than_3_months" in quirks:
            tp.quirks.append("less_than_3_months")
        if quirks.get("not_rano_timepoint") == k:
            tp.quirks.append("not_rano_timepoint")
        missing = quirks.get("missing_modality")
        if isinstance(missing, tuple) and missing[0] == k:
            tp.missing_modality = missing[1]
            tp.quirks.append(f"missing_modality:{missing[1]}")
        timepoints.append(tp)
    plan = PatientPlan(f"Patient-{index + 1:03d}", shapes, timepoints, leftover)
    if "missing_folder" in quirks:
        gap_week = timepoints[-1].week + int(rng.integers(8, 15))
        plan.missing_folder_rows.append((gap_week, f"week-{gap_week:03d}", "PD"))
    return plan


def _plan_cohort(
    tpl: _Template,
    config: PhantomConfig,
    n_followups: list[int],
    quirks: dict[int, dict[str, object]],
    plan_ss: Sequence[np.random.SeedSequence],
    quota_rng: np.random.Generator,
    attempts: int = 64,
) -> list[PatientPlan]:
    """Fit a shuffled class quota to the patients' trajectories.

    Slots are filled in order with the first class of the shuffled quota that the lesions allow
    (see :func:`_feasible`); a slot nothing fits becomes PD. If that loses a class, the quota is
    reshuffled (up to ``attempts`` times) and the best fit is kept. Patient-level draws restart
    from the same seed on every attempt, so the result depends on the seed only.
    """
    total = sum(n_followups)
    base = _class_quota(total)
    required = set(base)
    best: tuple[tuple[int, int], list[PatientPlan]] | None = None
    for _ in range(attempts):
        quota = [base[i] for i in quota_rng.permutation(len(base))]
        plans = [
            _plan_patient(i, tpl, n_followups[i], quota, quirks.get(i, {}), plan_ss[i])
            for i in range(config.patients)
        ]
        got = {tp.intended for p in plans for tp in p.timepoints if tp.role == "follow-up"}
        score = (len(required - got), sum(p.leftover for p in plans))
        if best is None or score < best[0]:
            best = (score, plans)
        if score == (0, 0):
            break
    assert best is not None
    return best[1]


# --------------------------------------------------------------------------------------------
# Acquisition: template -> native grid, bias, noise, scaling, writing
# --------------------------------------------------------------------------------------------


def _write_timepoint(
    folder: Path,
    tpl: _Template,
    app: np.ndarray,
    labels: np.ndarray,
    tp: PlannedTimepoint,
    rng: np.random.Generator,
) -> dict[str, object]:
    """Write one timepoint's images and segmentations; returns its acquisition parameters."""
    sp = tpl.spacing
    angles = rng.uniform(-10.0, 10.0, size=3)
    translation = rng.uniform(-12.0, 12.0, size=3)
    transform = sitk.Euler3DTransform()  # maps native points to template points
    transform.SetCenter(tpl.brain_centre)
    transform.SetRotation(*(float(a) for a in np.deg2rad(angles)))
    transform.SetTranslation(tuple(float(t) for t in translation))
    inverse = transform.GetInverse()
    moved = np.array([inverse.TransformPoint(c) for c in tpl.brain_corners])
    lo = moved.min(axis=0) - rng.uniform(3.0, 20.0, size=3)
    hi = moved.max(axis=0) + rng.uniform(3.0, 20.0, size=3)
    size = [int(v) for v in np.ceil((hi - lo) / sp).astype(int) + 1]
    origin = tuple(float(v) for v in lo)

    resampler = sitk.ResampleImageFilter()
    resampler.SetSize(size)
    resampler.SetOutputOrigin(origin)
    resampler.SetOutputSpacing((sp, sp, sp))
    resampler.SetOutputDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    resampler.SetTransform(transform)
    resampler.SetDefaultPixelValue(0)

    def to_native(array: np.ndarray, interpolator: int, pixel: int) -> np.ndarray:
        image = sitk.GetImageFromArray(array)
        image.CopyInformation(tpl.reference)
        resampler.SetInterpolator(interpolator)
        resampler.SetOutputPixelType(pixel)
        return sitk.GetArrayFromImage(resampler.Execute(image))

    def write(array: np.ndarray, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        image = sitk.GetImageFromArray(array)
        image.SetOrigin(origin)
        image.SetSpacing((sp, sp, sp))
        sitk.WriteImage(image, str(path), True)

    folder.mkdir(parents=True, exist_ok=True)
    mask = to_native(tpl.brain.astype(np.uint8), sitk.sitkNearestNeighbor, sitk.sitkUInt8) > 0
    flat = np.flatnonzero(mask)
    # Normalised native coordinates of brain voxels for the polynomial bias field.
    coords = [
        (c.astype(np.float32) / max(n - 1, 1)) * 2.0 - 1.0
        for c, n in zip(np.unravel_index(flat, mask.shape), mask.shape)
    ]
    terms = [coords[0], coords[1], coords[2], coords[0] ** 2, coords[1] ** 2, coords[2] ** 2,
             coords[0] * coords[1], coords[0] * coords[2], coords[1] * coords[2]]

    dtype = np.int16 if rng.random() < 0.5 else np.float32
    written: list[str] = []
    box = _bounding_box(app > 0)
    for modality in MODALITIES:
        # Draw every modality's parameters even if it is not written, so that dropping a file
        # (quirk) leaves the other modalities identical.
        coeff = np.concatenate([rng.uniform(-0.1, 0.1, 3), rng.uniform(-0.06, 0.06, 3), rng.uniform(-0.04, 0.04, 3)])
        sigma = rng.uniform(0.02, 0.04) * _INTENSITY[modality]["wm"]
        target_max = rng.uniform(300.0, 4000.0)
        noise_ss = np.random.SeedSequence(int(rng.integers(2**63)))
        if modality == tp.missing_modality:
            continue
        clean = tpl.normal[modality].copy()
        if box is not None:
            lut = np.array(
                [0.0] + [_INTENSITY[modality][k] for k in ("rim", "necrosis", "edema", "cavity")], dtype=np.float32
            )
            codes = app[box]
            clean[box] = np.where(codes > 0, lut[codes], clean[box])
        native = to_native(clean, sitk.sitkLinear, sitk.sitkFloat32)
        values = native.ravel()[flat]
        # Smooth multiplicative bias field: exp of a quadratic polynomial, limited to about +-20%.
        poly = sum(c * t for c, t in zip(coeff.astype(np.float32), terms))
        peak = float(np.abs(poly).max()) if poly.size else 0.0
        if peak > 0.2:
            poly *= 0.2 / peak
        values = values * np.exp(poly)
        # Rician noise: magnitude of a complex signal with Gaussian noise on both channels.
        noise_rng = np.random.default_rng(noise_ss)
        real = values + sigma * noise_rng.standard_normal(values.size, dtype=np.float32)
        imag = sigma * noise_rng.standard_normal(values.size, dtype=np.float32)
        values = np.sqrt(real * real + imag * imag)
        scale = target_max / float(values.max()) if values.size else 1.0
        out = np.zeros(mask.shape, dtype=np.float32)
        out.ravel()[flat] = values * scale  # background stays exactly 0
        if dtype == np.int16:
            out = np.rint(out).astype(np.int16)
            out[mask & (out == 0)] = 1  # keep brain voxels non-zero so the brain mask is recoverable
        write(out, folder / f"{modality}.nii.gz")
        written.append(modality)

    native_labels = to_native(labels, sitk.sitkNearestNeighbor, sitk.sitkUInt8)
    native_labels[~mask] = 0
    seg_root = folder / "DeepBraTumIA-segmentation"
    write(native_labels, seg_root / "native" / "segmentation" / "seg_mask.nii.gz")
    atlas = sitk.GetImageFromArray(labels)
    atlas.CopyInformation(tpl.reference)
    (seg_root / "atlas" / "segmentation").mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(atlas, str(seg_root / "atlas" / "segmentation" / "seg_mask.nii.gz"), True)
    return {
        "modalities": ";".join(written),
        "dtype": np.dtype(dtype).name,
        "native_size": " ".join(str(v) for v in size),
        "rot_x_deg": round(float(angles[0]), 4),
        "rot_y_deg": round(float(angles[1]), 4),
        "rot_z_deg": round(float(angles[2]), 4),
        "trans_x_mm": round(float(translation[0]), 4),
        "trans_y_mm": round(float(translation[1]), 4),
        "trans_z_mm": round(float(translation[2]), 4),
    }


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    if not mask.any():
        return None
    spans = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        spans.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(spans)


# --------------------------------------------------------------------------------------------
# CSV content
# --------------------------------------------------------------------------------------------


def _rationale(tp: PlannedTimepoint, measured: str) -> str:
    if tp.role == "pre-op":
        return ""
    if tp.role == "post-op":
        return "PRET"
    t = RANOThresholds()
    return {
        "PD": "new L" if "new lesion" in tp.event else f"L increase >{t.pd_percent:g}%",
        "SD": "",
        "PR": f"L decrease >{-t.pr_percent:g}%",
        "CR": "no enhancing L",
    }[measured]


def _demographics(plans: list[PatientPlan], rng: np.random.Generator) -> pd.DataFrame:
    rows = []
    for plan in plans:
        last = max([tp.week for tp in plan.timepoints] + [w for w, _, _ in plan.missing_folder_rows])
        idh_mutant = rng.random() < 0.08
        methylated = rng.random() < 0.45
        rows.append(
            {
                "Patient": plan.patient,
                "Survival time (weeks)": int(last + rng.integers(2, 60)),
                "Sex": "female" if rng.random() < 0.4 else "male",
                "Age at surgery (years)": int(rng.integers(35, 82)),
                "IDH (WT: wild type)": "Mutated" if idh_mutant else "WT",
                "IDH method": "NGS" if rng.random() < 0.5 else "IHC",
                "MGMT qualitative": "methylated" if methylated else "not methylated",
                "MGMT quantitative": round(float(rng.uniform(12.0, 60.0) if methylated else rng.uniform(0.0, 8.0)), 1),
            }
        )
    return pd.DataFrame(rows, columns=list(DEMOGRAPHICS_COLUMNS))
