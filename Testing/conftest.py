"""Shared, session-scoped test data for the RANOResponseLib tests.

Everything here is small on purpose (the whole suite runs on 2 CPU cores in a few minutes):

* ``case_pair``: one baseline / follow-up pair of study folders on disk, the demo's phantom case
  (Patient-001, post-op ``week-000-2`` and the first rated follow-up) at 4 mm voxels.
* ``known_motion``: an in-memory pair built from the ICBM152 template shipped in the nilearn
  wheel, whose follow-up is the baseline anatomy moved by a *known* rigid transform.
* ``tiny_bundle`` / ``tiny_models``: a compact DenseNet bundle with random weights on a 32^3,
  6 mm model grid, written with :func:`RANOResponseLib.bundle.write_bundle`.
* ``prepared``: the phantom pair registered and resampled onto the tiny bundle's grid.
* ``fine_cohort``: a 4-patient phantom at 1.5 mm, with its plan (the lesion geometry the generator
  intended), so measurements and labels can be checked against geometry instead of against the
  measuring code (:func:`planned_diameters`, :func:`planned_lesions`).

Session fixtures are shared between tests: tests must never modify what they return (copy first).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
from RANOResponseLib.core.names import CLASS_NAMES, MODALITIES
from RANOResponseLib.imaging.io import Study, read_study
from RANOResponseLib.imaging.preprocessing import InputSpec, default_channels
from RANOResponseLib.phantom.generator import (
    LesionShape,
    PatientPlan,
    PhantomConfig,
    PlannedTimepoint,
    generate_cohort,
    plan_cohort,
    template_dir,
)

REPO = Path(__file__).resolve().parents[1]

# The tiny model grid every test bundle uses: 32^3 voxels of 6 mm (a 192 mm cube).
TINY_SIZE = (32, 32, 32)
TINY_SPACING = (6.0, 6.0, 6.0)
COMPACT = "compact"


# ------------------------------------------------------------------------------------ helpers


def modality_file(folder: Path, modality: str) -> Path:
    for ext in (".nii.gz", ".nii", ".nrrd"):
        p = folder / f"{modality}{ext}"
        if p.is_file():
            return p
    raise FileNotFoundError(f"{folder}: no {modality}")


def copy_study(src: Path, dst: Path) -> Path:
    """Copy only the four modality images of a study folder (not its segmentation subfolders)."""
    dst.mkdir(parents=True, exist_ok=True)
    for m in MODALITIES:
        f = modality_file(src, m)
        shutil.copy2(f, dst / f.name)
    return dst


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; asserts the file really is a PNG."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert data[-8:-4] == b"IEND", f"{path} does not end with an IEND chunk (truncated?)"
    return width, height


def nib_affine_and_array(path: Path) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    img = nib.load(str(path))
    return img.affine, np.asarray(img.dataobj), img.header


def write_nib(array: np.ndarray, like: Path, out: Path, dtype=np.float32) -> Path:
    """Write ``array`` (nibabel x, y, z order) with the affine of the NIfTI file ``like``."""
    affine, _, _ = nib_affine_and_array(like)
    img = nib.Nifti1Image(np.asarray(array, dtype=dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(out))
    return out


def random_state_dicts(n: int, in_channels: int, seed: int, out_channels: int = 4) -> list[dict]:
    """``n`` compact DenseNets with different random weights (and non-trivial BN statistics)."""
    from RANOResponseLib.model.networks import architecture_args, build_network

    args = architecture_args(COMPACT, in_channels, out_channels)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        net = build_network(COMPACT, **args)
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, torch.nn.BatchNorm3d):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
                    m.weight.uniform_(0.7, 1.3)
                    m.bias.uniform_(-0.1, 0.1)
            net.class_layers.out.bias.uniform_(-0.3, 0.3)
        out.append(net.state_dict())
    return out


def tiny_spec(modalities=MODALITIES, size=TINY_SIZE, spacing=TINY_SPACING) -> InputSpec:
    mods = tuple(modalities)
    return InputSpec(mods, tuple(default_channels(mods)), tuple(spacing), tuple(size))


def make_bundle(out: Path, n_models: int = 1, seed: int = 0, modalities=MODALITIES,
                half: bool = True, bundle_id: str = "tiny-test") -> Path:
    from RANOResponseLib.model.bundle import write_bundle
    from RANOResponseLib.model.networks import GRADCAM_LAYERS, architecture_args

    spec = tiny_spec(modalities)
    args = architecture_args(COMPACT, len(spec.channels), len(CLASS_NAMES))
    return write_bundle(out, bundle_id=bundle_id, architecture={"name": COMPACT, "args": args}, spec=spec,
                        state_dicts=random_state_dicts(n_models, len(spec.channels), seed),
                        gradcam_layer=GRADCAM_LAYERS[COMPACT], half=half)


def cli_command() -> list[str]:
    """How to start the CLI in a subprocess: the installed entry point, else ``-m``."""
    script = Path(sys.executable).parent / "rano-response"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "RANOResponseCLI"]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("MPLBACKEND", "Agg")
    env.pop("RANO_RESPONSE_BUNDLE", None)
    return env


# ------------------------------------------------------------------------ ICBM-based images


@dataclass
class KnownMotion:
    """Two in-memory studies: ``followup`` = baseline anatomy moved by ``transform``.

    ``transform`` maps follow-up physical points to the baseline points of the same anatomy, so a
    perfect registration result R (baseline point -> follow-up point) satisfies T(R(p)) == p.
    """

    baseline: Study
    followup: Study
    transform: sitk.Euler3DTransform
    brain_points: np.ndarray  # (n, 3) physical points inside the baseline brain


@pytest.fixture(scope="session")
def icbm_hires() -> dict[str, sitk.Image]:
    return build_icbm_images()


def build_icbm_images() -> dict[str, sitk.Image]:
    """Four distinct 'modalities' from the 1 mm ICBM152 templates, box-averaged to 2 mm.

    T1 is the T1 template, CT1 adds an 'enhancing' blob, T2 and FLAIR are the GM and WM maps;
    background is exactly 0 everywhere (the brain masks rely on it).
    """
    d = template_dir()
    t1 = sitk.Cast(sitk.ReadImage(str(d / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")), sitk.sitkFloat32)
    gm = sitk.Cast(sitk.ReadImage(str(d / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")), sitk.sitkFloat32)
    wm = sitk.Cast(sitk.ReadImage(str(d / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")), sitk.sitkFloat32)
    # a bright blob (enhancement) at a fixed anatomical point, right hemisphere
    centre = np.array([-20.0, -5.0, 15.0])  # LPS mm in template space
    blob = sitk.GaussianSource(sitk.sitkFloat32, t1.GetSize(), sigma=[6.0] * 3,
                               mean=list(t1.TransformPhysicalPointToContinuousIndex(centre.tolist())),
                               scale=120.0, origin=(0, 0, 0), spacing=(1, 1, 1))
    blob.CopyInformation(t1)
    inside = sitk.Cast(sitk.NotEqual(t1, 0), sitk.sitkFloat32)
    images = {"T1": t1, "CT1": t1 + blob * inside, "T2": gm, "FLAIR": wm}
    # 2 mm box averages (cheap, and fine enough for the 3-4 mm grids made from them)
    inside2 = sitk.Cast(sitk.Equal(sitk.BinShrink(inside, [2, 2, 2]), 1.0), sitk.sitkFloat32)
    return {m: sitk.BinShrink(img, [2, 2, 2]) * inside2 for m, img in images.items()}


def icbm_grid(hires: sitk.Image, spacing: float, shift=(0.0, 0.0, 0.0), pad: int = 0) -> sitk.Image:
    size = [int(s * hires.GetSpacing()[i] / spacing) + pad for i, s in enumerate(hires.GetSize())]
    g = sitk.Image(size, sitk.sitkFloat32)
    g.SetSpacing([spacing] * 3)
    g.SetDirection(hires.GetDirection())
    g.SetOrigin([o + s for o, s in zip(hires.GetOrigin(), shift)])
    return g


def icbm_study(hires: dict[str, sitk.Image], grid: sitk.Image, transform: sitk.Transform | None,
               folder: Path) -> Study:
    images = {m: sitk.Resample(img, grid, transform or sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
              for m, img in hires.items()}
    return Study(folder=folder, images=images)


def known_transform(grid: sitk.Image) -> sitk.Euler3DTransform:
    """Rotations of 4, -3 and 5 degrees about the image centre and a (6, -8, 5) mm translation."""
    centre = grid.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in grid.GetSize()])
    return sitk.Euler3DTransform(centre, np.radians(4.0), np.radians(-3.0), np.radians(5.0), (6.0, -8.0, 5.0))


@pytest.fixture(scope="session")
def known_motion(icbm_hires) -> KnownMotion:
    """A 3 mm pair whose follow-up lives on its own (shifted, larger) grid and is moved rigidly."""
    base_grid = icbm_grid(icbm_hires["T1"], 3.0)
    fu_grid = icbm_grid(icbm_hires["T1"], 3.0, shift=(-7.3, 5.1, -4.4), pad=4)
    T = known_transform(base_grid)
    baseline = icbm_study(icbm_hires, base_grid, None, Path("icbm-baseline"))
    followup = icbm_study(icbm_hires, fu_grid, T, Path("icbm-followup"))
    t1 = sitk.GetArrayViewFromImage(baseline.images["T1"])
    idx = np.argwhere(t1 > 0.2 * t1.max())[::5]
    pts = np.array([base_grid.TransformIndexToPhysicalPoint([int(i) for i in p[::-1]]) for p in idx])
    return KnownMotion(baseline, followup, T, pts)


# ------------------------------------------------------------------------------- case pair


@dataclass
class CasePair:
    baseline: Path
    followup: Path


@pytest.fixture(scope="session")
def case_pair(tmp_path_factory) -> CasePair:
    """The demo's case pair (post-op study and first follow-up of a 1-patient phantom), at 4 mm."""
    from RANOResponseLib.demo import demo_case

    baseline, followup, _ = demo_case(tmp_path_factory.mktemp("cohort"), seed=7, spacing=4.0)
    return CasePair(baseline, followup)


# ------------------------------------------------------------------- phantom plan (geometry)

# The fine cohort: 1.5 mm voxels, so a voxel is small against the lesions (>= ~15 mm), no quirks.
FINE_COHORT = PhantomConfig(patients=4, seed=1, spacing=1.5, min_followups=3, max_followups=3, quirks=False)
# How far a measured diameter may lie from the planned one, in voxels: one for the pixel
# footprint and the voxelisation of the boundary, one for the slice and the direction of d1 that
# a voxel grid allows (the planned diameters are those of the lesion's central axial plane).
DIAMETER_TOLERANCE_VOXELS = 2.0


@dataclass
class FineCohort:
    root: Path
    config: PhantomConfig
    truth: pd.DataFrame
    plans: list[PatientPlan]


@pytest.fixture(scope="session")
def fine_cohort(tmp_path_factory) -> FineCohort:
    root = tmp_path_factory.mktemp("fine-cohort")
    truth = generate_cohort(root, FINE_COHORT)
    return FineCohort(root, FINE_COHORT, truth, plan_cohort(FINE_COHORT))


def planned_diameters(shape: LesionShape, size_mm: float, n: int = 720) -> tuple[float, float]:
    """The RANO diameters of a planned lesion, from its geometry alone (no voxels, no measuring code).

    The lesion is ``{p : shape.radius(p) < size}`` around its centre; ``radius`` is homogeneous of
    degree 1 along rays from the centre, so in the central axial plane the boundary in direction
    ``u`` lies at ``size / radius(u)``. ``d1`` is the longest chord between ``n`` boundary points,
    ``d2`` the extent of the boundary perpendicular to it.
    """
    phi = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    dy, dx = np.sin(phi), np.cos(phi)
    r = shape.radius(np.zeros(n, np.float32), dy.astype(np.float32), dx.astype(np.float32)).astype(float)
    pts = np.column_stack([dx, dy]) * (size_mm / r)[:, None]
    dist = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    i, j = np.unravel_index(int(np.argmax(dist)), dist.shape)
    axis = (pts[j] - pts[i]) / dist[i, j]
    across = pts @ np.array([-axis[1], axis[0]])
    return float(dist[i, j]), float(across.max() - across.min())


def planned_lesions(plan: PatientPlan, tp: PlannedTimepoint) -> list[tuple[LesionShape, float, float]]:
    """``(shape, d1, d2)`` of every lesion the plan draws with an enhancing rim at ``tp``."""
    return [(plan.shapes[s.shape], *planned_diameters(plan.shapes[s.shape], s.size_mm))
            for s in tp.lesions if s.active]


# RANO (Wen et al. 2010) as the phantom's labels must follow it, written out here on purpose (the
# truth of these tests does not come from RANOResponseLib.rano.rules): sum of the products of
# the perpendicular diameters (SPD) of the measurable enhancing lesions, against the previous scan.
RANO_PD_RATIO = 1.25  # SPD up by 25 % or more: progression
RANO_PR_RATIO = 0.50  # SPD down by 50 % or more: partial response
RANO_MIN_DIAMETER_MM = 10.0  # measurable: both diameters at least 10 mm


def rano_classes(before: tuple[float, float], after: tuple[float, float], enhancing_left: bool,
                 new_measurable: bool) -> set[str]:
    """Every RANO class that SPDs anywhere in ``before`` = (low, high) and ``after`` allow.

    A new measurable lesion is PD; no enhancing lesion at all (measurable or not) is CR; measurable
    disease where there was none is PD; otherwise the SPD ratio decides: >= 1.25 PD, <= 0.5 PR,
    SD between.
    """
    if new_measurable:
        return {"PD"}
    if not enhancing_left:
        return {"CR"}
    if before[1] == 0:
        return {"PD"} if after[0] > 0 else {"SD"}
    low, high = after[0] / before[1], after[1] / before[0]
    classes = set()
    if high >= RANO_PD_RATIO:
        classes.add("PD")
    if low <= RANO_PR_RATIO:
        classes.add("PR")
    if low < RANO_PD_RATIO and high > RANO_PR_RATIO:
        classes.add("SD")
    return classes


def planned_spd(lesions: list[tuple[LesionShape, float, float]], tol_mm: float) -> tuple[float, float]:
    """(lowest, highest) SPD that diameters within ``tol_mm`` of the planned ones give."""
    return (sum((d1 - tol_mm) * (d2 - tol_mm) for _, d1, d2 in lesions),
            sum((d1 + tol_mm) * (d2 + tol_mm) for _, d1, d2 in lesions))


def cohort_plan(root: Path) -> list[PatientPlan]:
    """The plan of a cohort on disk, from the recipe (``phantom.json``) the generator wrote."""
    return plan_cohort(PhantomConfig(**json.loads((root / "phantom.json").read_text())["config"]))


# Segmentation and measured RANO: one patient at 2 mm whose three rated follow-ups are a PD by
# growth (SPD x2.0), a PD with a new lesion, and an SD (x0.91).
SEG_COHORT = PhantomConfig(patients=1, seed=5, spacing=2.0, min_followups=3, max_followups=3, quirks=False)


@dataclass
class SegCohort:
    root: Path
    truth: pd.DataFrame  # phantom_truth.csv

    def pair(self, followup: str) -> CasePair:
        """The rated follow-up ``followup`` (a week folder) and the scan before it."""
        rows = self.truth.reset_index(drop=True)
        i = int(rows.index[rows["date"] == followup][0])
        folder = self.root / "Imaging" / "Patient-001"
        return CasePair(folder / rows.loc[i - 1, "date"], folder / rows.loc[i, "date"])


@pytest.fixture(scope="session")
def seg_cohort(tmp_path_factory) -> SegCohort:
    root = tmp_path_factory.mktemp("seg-cohort")
    return SegCohort(root, generate_cohort(root, SEG_COHORT))


@pytest.fixture(scope="session")
def case_studies(case_pair):
    return read_study(case_pair.baseline), read_study(case_pair.followup)


# ---------------------------------------------------------------------------------- bundles


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """One compact DenseNet (8 channels, 32^3 at 6 mm), random weights, stored as float16."""
    return make_bundle(tmp_path_factory.mktemp("bundles") / "tiny", n_models=1, seed=1)


@pytest.fixture(scope="session")
def ensemble_bundle(tmp_path_factory) -> Path:
    """Two compact DenseNets with different random weights (an ensemble of 2)."""
    return make_bundle(tmp_path_factory.mktemp("bundles") / "ensemble", n_models=2, seed=2,
                       bundle_id="tiny-ensemble")


@pytest.fixture(scope="session")
def tiny_models(tiny_bundle):
    from RANOResponseLib.model.bundle import load_models, read_bundle

    b = read_bundle(tiny_bundle)
    return b, load_models(b, "cpu")


@pytest.fixture(scope="session")
def ensemble_models(ensemble_bundle):
    from RANOResponseLib.model.bundle import load_models, read_bundle

    b = read_bundle(ensemble_bundle)
    return b, load_models(b, "cpu")


@pytest.fixture(scope="session")
def registration(case_studies):
    from RANOResponseLib.imaging.registration import register_rigid

    base, fu = case_studies
    return register_rigid(base, fu)


@pytest.fixture(scope="session")
def prepared(case_studies, registration, tiny_models):
    """The phantom pair on the tiny bundle's model grid: PreparedPair with a (8, 32, 32, 32) array."""
    from RANOResponseLib.imaging.preprocessing import prepare_pair

    bundle, _ = tiny_models
    base, fu = case_studies
    return prepare_pair(base, fu, registration.transform, bundle.spec)


# ------------------------------------------------------------------------------- bad inputs


@dataclass
class BadCase:
    """A predict invocation that must be refused, and what its error message must name."""

    baseline: Path
    followup: Path
    args: list[str]  # extra CLI arguments (bundle, device)
    names: str  # the file, folder or option value the message must contain
    device: str = "cpu"
    bundle: Path | None = None


BAD_KINDS = (
    "missing_modality", "2d", "4d", "nan", "all_zero", "truncated", "same_folder",
    "same_folder_symlink", "sha256", "unknown_device", "cuda_absent",
)


@pytest.fixture
def make_bad_case(tmp_path, case_pair, tiny_bundle) -> Callable[[str], BadCase]:
    """Factory: a fresh copy of the case pair with one thing broken (see BAD_KINDS)."""

    def make(kind: str) -> BadCase:
        base = copy_study(case_pair.baseline, tmp_path / "inputs" / "baseline")
        fu = copy_study(case_pair.followup, tmp_path / "inputs" / "followup")
        bundle = tiny_bundle
        device = "cpu"
        flair = modality_file(fu, "FLAIR")
        names = str(flair)
        if kind == "missing_modality":
            modality_file(fu, "T2").unlink()
            names = str(fu)
        elif kind == "2d":
            img = sitk.ReadImage(str(flair))
            flair.unlink()
            flair = fu / "FLAIR.nii.gz"
            sitk.WriteImage(img[:, :, img.GetSize()[2] // 2], str(flair))
            names = str(flair)
        elif kind == "4d":
            _, arr, _ = nib_affine_and_array(flair)
            write_nib(np.stack([arr, arr], axis=-1), flair, flair)
        elif kind == "nan":
            # in the baseline this time: either study must be checked
            ct1 = modality_file(base, "CT1")
            _, arr, _ = nib_affine_and_array(ct1)
            arr = arr.astype(np.float32)
            inside = np.argwhere(arr != 0)
            for i, j, k in inside[:: max(1, len(inside) // 5)][:5]:
                arr[i, j, k] = np.nan
            write_nib(arr, ct1, ct1)
            names = str(ct1)
        elif kind == "all_zero":
            _, arr, _ = nib_affine_and_array(flair)
            write_nib(np.zeros_like(arr, dtype=np.float32), flair, flair)
        elif kind == "truncated":
            data = flair.read_bytes()
            flair.write_bytes(data[: len(data) // 2])
        elif kind == "same_folder":
            fu = base
            names = str(base)
        elif kind == "same_folder_symlink":
            link = tmp_path / "inputs" / "followup-link"
            link.symlink_to(base, target_is_directory=True)
            fu = link
            names = str(link)
        elif kind == "sha256":
            bundle = tmp_path / "bundle"
            shutil.copytree(tiny_bundle, bundle)
            w = bundle / "weights.pt"
            data = bytearray(w.read_bytes())
            data[len(data) // 2] ^= 0x01
            w.write_bytes(bytes(data))
            names = str(w)
        elif kind == "unknown_device":
            device = "gpu"
            names = "gpu"
        elif kind == "cuda_absent":
            device = "cuda"
            names = "cuda"
        else:
            raise ValueError(kind)
        return BadCase(base, fu, ["--bundle", str(bundle), "--device", device], names, device, bundle)

    return make


# ------------------------------------------------------------- predict with stand-in segmentations


@dataclass
class AutomaticPrediction:
    out: Path  # the predict output folder (segmentation_*.nii.gz, prediction.json with "measured")
    result: object  # the in-memory PairResult, its segmentations and measurement set the same way
    files: dict  # what run_predict wrote
    masks: dict  # timepoint -> the label map standing in for predict's segmentation
    pair: object  # rano.measurement.PairMeasurement of the two masks, matched through predict's registration
    summary: dict  # prediction.json


@pytest.fixture(scope="session")
def automatic_prediction(tmp_path_factory, case_pair, tiny_bundle) -> AutomaticPrediction:
    """A real ``run_predict`` on the 4 mm case pair (tiny bundle, no segmentation bundle), completed
    as predict completes it when it segments: the phantom's own DeepBraTumIA masks stand in for
    the automatic label maps (same labels, each on its timepoint's grid), written as
    ``segmentation_*.nii.gz`` and measured into prediction.json's ``measured`` block by predict's
    own :func:`inference.measured.measured_block`. Scene, panel and report tests then know every
    voxel and diameter from those files."""
    from RANOResponseLib.core.outputs import SEGMENTATION_FILES, TRANSFORM_FILE
    from RANOResponseLib.inference.measured import measured_block
    from RANOResponseLib.inference.pipeline import run_predict
    from RANOResponseLib.rano.measurement import measure_pair

    out = tmp_path_factory.mktemp("automatic") / "prediction"
    result, files = run_predict(case_pair.baseline, case_pair.followup, out, bundle=tiny_bundle, device="cpu",
                                segmentation=False)
    mask = Path("DeepBraTumIA-segmentation/native/segmentation/seg_mask.nii.gz")
    masks = {"baseline": sitk.ReadImage(str(case_pair.baseline / mask)),
             "followup": sitk.ReadImage(str(case_pair.followup / mask))}
    pair = measure_pair(masks["baseline"], masks["followup"], out / TRANSFORM_FILE)
    summary = json.loads((out / "prediction.json").read_text())
    summary["measured"] = measured_block(pair, summary, {"id": "phantom-masks", "path": "", "sha256": []},
                                         {tp: {"file": f} for tp, f in SEGMENTATION_FILES.items()})
    for tp, image in masks.items():
        files[f"segmentation_{tp}"] = out / SEGMENTATION_FILES[tp]
        sitk.WriteImage(image, str(files[f"segmentation_{tp}"]), True)
        summary["outputs"][f"segmentation_{tp}"] = SEGMENTATION_FILES[tp]
    (out / "prediction.json").write_text(json.dumps(summary))

    @dataclass
    class StandIn:  # inference.segmentation.Segmentation's image
        image: sitk.Image

    result.segmentations = {tp: StandIn(image) for tp, image in masks.items()}
    result.pair_measurement, result.measured = pair, summary["measured"]
    return AutomaticPrediction(out, result, files, masks, pair, summary)
