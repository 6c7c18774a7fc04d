"""The input guard and the brain masks: what predict does with studies as they come from the scanner.

Guards RANOResponseLib.inference.guard / .inputs and the pipeline around them:

* a skull-stripped study and the same study with Rician noise in its background (every voxel
  non-zero, as in a real scan; the brain then comes from HD-BET) give the same label, nearly the
  same probabilities and the same crop, and the maps stay inside the brain;
* ``--brain-mask FILE`` and ``BASE,FOLLOW`` use the given masks (the noisy study with the stripped
  study's masks gives exactly the stripped study's network input);
* ``input_check`` is ``ok`` for a pair like the bundle's training pairs and a ``warning`` with
  reasons for thick slices (recorded in ``prediction.json``), an unusual brain or no statistics;
* what is not a brain MRI pair (a tiny image, uniform noise) is refused with one line, exit 2,
  nothing in ``--out``;
* ``input_statistics`` are recorded in a bundle (and in the shipped one) without touching its weights;
* the scene's copies of images no file holds (DICOM, resampled sequences) are 16-bit when that loses
  nothing visible (they are what makes an unstripped DICOM pair's scene slow to save).

The truth here never comes from the code under test: the noise is added by hand, masks are the
phantom's own non-zero region, thicknesses are what the test wrote, the recipe of the shipped
bundle's training data is read from its bundle.json.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import copy_study, modality_file
from RANOResponseCLI import main as cli_main
from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.names import MODALITIES
from RANOResponseLib.imaging.io import read_image
from RANOResponseLib.inference import guard
from RANOResponseLib.inference.pipeline import predict_pair, run_predict
from RANOResponseLib.model.bundle import default_bundle_path, read_bundle, set_input_statistics, sha256

# ----------------------------------------------------------------------------- study variants


def _stripped_mask(folder: Path) -> np.ndarray:
    """The phantom's brain: the non-zero voxels of its CT1 (the phantom is skull-stripped)."""
    return sitk.GetArrayFromImage(read_image(modality_file(folder, "CT1"))) != 0


def with_rician_background(src: Path, dst: Path, seed: int, sigma_fraction: float = 0.03) -> Path:
    """A copy of a stripped study whose background (outside its brain) holds Rician noise
    (the magnitude of complex Gaussian noise), so that no voxel is exactly 0 any more."""
    dst.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    brain = _stripped_mask(src)
    for m in MODALITIES:
        img = read_image(modality_file(src, m))
        arr = sitk.GetArrayFromImage(img)
        sigma = sigma_fraction * float(np.percentile(arr[brain], 50))
        noise = np.hypot(rng.normal(0, sigma, arr.shape), rng.normal(0, sigma, arr.shape)).astype(np.float32)
        out = sitk.GetImageFromArray(np.where(brain, arr, np.maximum(noise, 1e-3)).astype(np.float32))
        out.CopyInformation(img)
        sitk.WriteImage(out, str(dst / f"{m}.nii.gz"))
    return dst


def write_mask(stripped: Path, path: Path) -> Path:
    """The stripped study's brain mask (its non-zero voxels) as a file."""
    ref = read_image(modality_file(stripped, "CT1"))
    mask = sitk.GetImageFromArray(_stripped_mask(stripped).astype(np.uint8))
    mask.CopyInformation(ref)
    sitk.WriteImage(mask, str(path))
    return path


@pytest.fixture(scope="module")
def pair_2mm(tmp_path_factory):
    """The demo's phantom pair at 2 mm (the shipped bundle's grid), stripped and with a noisy background."""
    from RANOResponseLib.demo import demo_case

    root = tmp_path_factory.mktemp("pair-2mm")
    base, fu, _ = demo_case(root / "cohort", seed=7, spacing=2.0)
    noisy = SimpleNamespace(baseline=with_rician_background(base, root / "noisy" / "baseline", 1),
                            followup=with_rician_background(fu, root / "noisy" / "followup", 2))
    return SimpleNamespace(baseline=base, followup=fu, noisy=noisy)


@pytest.fixture(scope="module")
def stripped_result(pair_2mm):
    return predict_pair(pair_2mm.baseline, pair_2mm.followup, device="cpu", attributions=False,
                        notice=lambda m: None)


# ------------------------------------------------------------------ stripped versus full field


def test_noise_in_the_background_is_no_longer_exactly_zero(pair_2mm):
    """The premise: the noisy copy has no voxel of exactly 0, the stripped one a large background of 0."""
    for m in MODALITIES:
        noisy = sitk.GetArrayFromImage(read_image(modality_file(pair_2mm.noisy.baseline, m)))
        clean = sitk.GetArrayFromImage(read_image(modality_file(pair_2mm.baseline, m)))
        assert (noisy == 0).sum() == 0 and (clean == 0).mean() > 0.3


@pytest.mark.slow
def test_background_noise_does_not_change_the_prediction(pair_2mm, stripped_result, tmp_path):
    """With --brain-mask auto the noisy pair is still recognised as skull-stripped (one brain-sized
    blob, nothing bright around it), its mask is the brain, not the field of view (the failure the
    issue opened with), and the prediction matches the stripped pair's: same label,
    probabilities within 0.1 (L1), crop centre within 2 mm; the maps are 0 outside the brain
    mask written as brain_mask.nii.gz, on the baseline CT1 grid."""
    result, files = run_predict(pair_2mm.noisy.baseline, pair_2mm.noisy.followup, tmp_path / "out", device="cpu",
                                brain_mask="auto", notice=lambda m: None)
    s = json.loads(files["prediction"].read_text())
    for tp in ("baseline", "followup"):
        assert s["inputs"]["studies"][tp]["brain_mask"]["method"] == "stripped"
        assert s["inputs"]["studies"][tp]["brain_mask"]["stripped"] is True
    assert stripped_result.description["studies"]["baseline"]["brain_mask"]["method"] == "stripped"
    assert result.label == stripped_result.label
    l1 = sum(abs(result.probabilities[c] - p) for c, p in stripped_result.probabilities.items())
    assert l1 < 0.1, (result.probabilities, stripped_result.probabilities)
    shift = np.subtract(result.model_grid()["center_ras"], stripped_result.model_grid()["center_ras"])
    assert np.linalg.norm(shift) < 2.0, shift

    ct1 = read_image(modality_file(pair_2mm.noisy.baseline, "CT1"))
    mask = sitk.ReadImage(str(files["brain_mask"]))
    assert mask.GetSize() == ct1.GetSize() and mask.GetOrigin() == ct1.GetOrigin()
    assert mask.GetDirection() == ct1.GetDirection() and mask.GetSpacing() == ct1.GetSpacing()
    inside = sitk.GetArrayFromImage(mask) > 0
    truth = _stripped_mask(pair_2mm.baseline)
    dice = 2 * (inside & truth).sum() / (inside.sum() + truth.sum())
    assert dice > 0.9, dice  # the phantom's brain, not the field of view
    for name in ("saliency", "gradcam"):
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(files[name])))
        assert arr.max() > 0.1 and np.all(arr[~inside] == 0), name


def test_mask_files_give_the_stripped_input(pair_2mm, stripped_result, tmp_path):
    """--brain-mask with the stripped study's masks: as a name inside each study folder, and as
    BASE,FOLLOW. The noisy pair cut to those masks is the stripped pair: the same network input."""
    base = copy_study(pair_2mm.noisy.baseline, tmp_path / "b")
    fu = copy_study(pair_2mm.noisy.followup, tmp_path / "f")
    write_mask(pair_2mm.baseline, base / "brain.nii.gz")
    write_mask(pair_2mm.followup, fu / "brain.nii.gz")
    by_name = predict_pair(base, fu, device="cpu", attributions=False, brain_mask="brain.nii.gz",
                           notice=lambda m: None)
    assert by_name.description["studies"]["baseline"]["brain_mask"]["method"] == "file"
    # the same input up to the registration's run-to-run jitter (ITK's multi-threaded metric)
    assert np.abs(by_name.prepared.array - stripped_result.prepared.array).mean() < 1e-3
    assert by_name.probabilities == pytest.approx(stripped_result.probabilities, abs=2e-3)
    pair = predict_pair(base, fu, device="cpu", attributions=False,
                        brain_mask=f"{base / 'brain.nii.gz'},{fu / 'brain.nii.gz'}", notice=lambda m: None)
    assert pair.description["studies"]["followup"]["brain_mask"]["file"] == str(fu / "brain.nii.gz")
    assert np.abs(pair.prepared.array - by_name.prepared.array).mean() < 1e-3
    with pytest.raises(RANOInputError, match="no-such-mask.nii.gz"):
        predict_pair(base, fu, device="cpu", attributions=False, brain_mask="no-such-mask.nii.gz",
                     notice=lambda m: None)


def test_brain_mask_none_on_a_full_field_is_refused(pair_2mm, tmp_path, capsys):
    """--brain-mask none takes every non-zero voxel as brain: on the noisy study that is the whole
    field of view, far beyond a brain, so predict refuses in one line (and suggests auto)."""
    out = tmp_path / "out"
    rc = cli_main(["predict", "--baseline", str(pair_2mm.noisy.baseline), "--followup", str(pair_2mm.noisy.followup),
                   "--out", str(out), "--device", "cpu", "--brain-mask", "none", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error:"), err
    assert str(pair_2mm.noisy.baseline) in err and "no brain found" in err and "auto" in err
    assert not out.exists()


# ------------------------------------------------------------------------------ refusals


def _write_study(folder: Path, arrays: dict[str, np.ndarray], spacing: float) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for m, arr in arrays.items():
        img = sitk.GetImageFromArray(arr.astype(np.float32))
        img.SetSpacing([spacing] * 3)
        sitk.WriteImage(img, str(folder / f"{m}.nii.gz"))
    return folder


@pytest.mark.parametrize("kind", ["tiny", "uniform_noise"])
def test_a_pair_that_is_not_a_brain_mri_is_refused(kind, tmp_path, capsys):
    """A tiny image (20 voxels a side) and a uniform-noise volume are no brain MRI pair: exit 2,
    one 'error:' line naming the study and saying so, nothing in --out."""
    rng = np.random.default_rng(3)
    shape, spacing = ((20, 20, 20), 1.0) if kind == "tiny" else ((64, 72, 64), 3.0)
    studies = [_write_study(tmp_path / name, {m: rng.uniform(10, 100, shape) for m in MODALITIES}, spacing)
               for name in ("baseline", "followup")]
    out = tmp_path / "results" / "out"
    rc = cli_main(["predict", "--baseline", str(studies[0]), "--followup", str(studies[1]), "--out", str(out),
                   "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("error:"), err
    assert str(studies[0]) in err and "not a brain MRI" in err, err
    assert not out.exists()
    assert not (tmp_path / "results").exists() or list((tmp_path / "results").iterdir()) == []


def test_refusal_rules():
    """The hard limits: a brain is 700-2500 ml, a field of view smaller than that holds none,
    registered brains that overlap with Dice < 0.5 mean a failed registration."""
    guard.refuse_non_brain(1400.0, "s", "model")
    for volume in (0.0, 300.0, 699.0, 2501.0, 16000.0):
        with pytest.raises(RANOInputError, match="s: no brain found.*not a brain MRI"):
            guard.refuse_non_brain(volume, "s", "model")
    guard.refuse_small_field(800.0, "s", "the CT1 field of view")
    with pytest.raises(RANOInputError, match="covers 8 ml, less than a brain"):
        guard.refuse_small_field(8.0, "s", "the CT1 field of view")
    guard.refuse_failed_registration(0.9, "f", "b")
    for dice in (0.3, float("nan")):
        with pytest.raises(RANOInputError, match="f: registration to b failed"):
            guard.refuse_failed_registration(dice, "f", "b")


# --------------------------------------------------------------------------- input check


def _description(volume=1500.0, thickness=1.0, dice=0.97, p50=0.1, coverage=None) -> dict:
    """A hand-made description of a pair, as prepare_inputs writes one."""
    alignment = {"method": "same grid"} if coverage is None else {"method": "registered", "coverage": coverage}
    study = {"brain_mask": {"method": "stripped", "stripped": True, "volume_ml": volume},
             "sequences": {"CT1": {"slice_thickness_mm": 1.0, "alignment": {"method": "reference"}},
                           "T2": {"slice_thickness_mm": thickness, "alignment": alignment}}}
    return {"studies": {"baseline": study, "followup": json.loads(json.dumps(study))},
            "registration": {"brain_dice": dice, "metric": -0.5},
            "channels": {"T2:followup": {"p5": p50 - 1.5, "p50": p50, "p95": p50 + 1.6}}}


def test_input_check_against_statistics():
    """Statistics from training descriptions; a pair like them is ok, each kind of oddity is a
    warning naming what is odd; thick slices say 'outside what the model was trained on'."""
    training = [_description(volume=v, dice=d, p50=p) for v, d, p in
                ((1400, 0.96, 0.0), (1600, 0.98, 0.2), (1500, 0.97, 0.1))]
    stats = guard.statistics(training, method="test")
    assert stats["pairs"] == 3 and stats["brain_volume_ml"]["min"] == 1400 and stats["brain_volume_ml"]["max"] == 1600
    assert stats["slice_thickness_mm"]["max"] == 1.0 and stats["registration_brain_dice"]["min"] == 0.96
    assert stats["channels"]["T2:followup"]["p50"]["max"] == pytest.approx(0.2)
    assert stats["stripped_fraction"] == 1.0

    assert guard.check(_description(), stats) == {"verdict": "ok", "reasons": []}
    assert guard.check(_description(volume=1650, thickness=1.2, p50=0.5), stats)["verdict"] == "ok"  # within margins
    odd = {
        "thick": (_description(thickness=5.0), ["T2 (baseline) has 5.0 mm slices", guard.OUTSIDE_TRAINING]),
        "volume": (_description(volume=1000.0), ["baseline brain mask of 1000 ml", "training range 1400-1600 ml"]),
        "dice": (_description(dice=0.8), ["Dice 0.800, less than in any training pair (0.960)"]),
        "intensity": (_description(p50=2.0), ["T2:followup intensities inside the brain unlike the training data"]),
        "coverage": (_description(coverage=0.7), ["T2 (baseline) images only 70% of the brain"]),
    }
    for kind, (description, words) in odd.items():
        check = guard.check(description, stats)
        assert check["verdict"] == "warning", kind
        text = " | ".join(check["reasons"])
        assert all(w in text for w in words), (kind, text)
    none = guard.check(_description(), None)
    assert none["verdict"] == "warning" and "no input statistics" in none["reasons"][0]


@pytest.fixture(scope="module")
def bundle_with_statistics(tmp_path_factory, tiny_bundle):
    """The tiny bundle with input_statistics from a 3-patient, 4 mm phantom cohort (other seed
    than the conftest case pair), prepared through the same path as predict."""
    from RANOResponseLib.phantom.generator import PhantomConfig, generate_cohort
    from ResponseTrainingLib.data.dataset import cache_pairs, input_statistics
    from RANOResponseLib.datasets.lumiere import build_pairs

    root = tmp_path_factory.mktemp("stats")
    generate_cohort(root / "cohort", PhantomConfig(patients=3, seed=11, spacing=4.0, min_followups=2,
                                                   max_followups=2, quirks=False))
    bundle = root / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    spec = read_bundle(bundle).spec
    pairs, _ = build_pairs(root / "cohort", spec.modalities, "previous")
    set_input_statistics(bundle, input_statistics(cache_pairs(pairs, spec, root / "cache", progress=False)))
    return bundle


def test_statistics_are_added_without_touching_the_weights(bundle_with_statistics, tiny_bundle):
    """set_input_statistics changes bundle.json's input_statistics only: same weights and sha256."""
    b, original = read_bundle(bundle_with_statistics), read_bundle(tiny_bundle)
    assert b.weights == original.weights and sha256(b.path / b.weights[0]["file"]) == b.weights[0]["sha256"]
    assert {k: v for k, v in b.meta.items() if k != "input_statistics"} == original.meta
    stats = b.input_statistics
    assert stats["pairs"] == 6 and stats["slice_thickness_mm"]["max"] == pytest.approx(4.0)
    assert 700 < stats["brain_volume_ml"]["min"] <= stats["brain_volume_ml"]["max"] < 2500
    assert set(stats["channels"]) == {str(c) for c in b.spec.channels}


def _thick(src: Path, dst: Path, modalities=("T2", "FLAIR"), thickness: float = 8.0) -> Path:
    """A copy of a study whose T2 and FLAIR are 2D-style: 4 mm in-plane, ``thickness`` mm slices
    (averaged through the slab), on their own grid."""
    copy_study(src, dst)
    for m in modalities:
        img = read_image(modality_file(src, m))
        smooth = sitk.SmoothingRecursiveGaussian(img, (0.01, 0.01, thickness / 2.355))
        size = [img.GetSize()[0], img.GetSize()[1], int(img.GetSize()[2] * img.GetSpacing()[2] / thickness) + 1]
        out = sitk.Resample(smooth, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(),
                            (img.GetSpacing()[0], img.GetSpacing()[1], thickness), img.GetDirection(), 0.0,
                            sitk.sitkFloat32)
        (dst / f"{m}.nii.gz").unlink()
        sitk.WriteImage(out, str(dst / f"{m}.nii.gz"))
    return dst


def test_input_check_ok_for_a_normal_pair_and_a_warning_for_thick_slices(bundle_with_statistics, case_pair,
                                                                          tmp_path):
    """The conftest pair (4 mm, like the statistics' cohort): input_check ok. The same pair with
    8 mm T2/FLAIR slices: each thickness recorded in prediction.json, the sequences registered
    onto CT1's grid, and a warning that they are outside what the model was trained on."""
    _, files = run_predict(case_pair.baseline, case_pair.followup, tmp_path / "normal", bundle=bundle_with_statistics,
                           device="cpu", attributions=False)
    normal = json.loads(files["prediction"].read_text())
    assert normal["input_check"] == {"verdict": "ok", "reasons": []}, normal["input_check"]

    base = _thick(case_pair.baseline, tmp_path / "thick" / "baseline")
    fu = _thick(case_pair.followup, tmp_path / "thick" / "followup")
    _, files = run_predict(base, fu, tmp_path / "thick-out", bundle=bundle_with_statistics, device="cpu",
                           attributions=False)
    s = json.loads(files["prediction"].read_text())
    for tp in ("baseline", "followup"):
        seqs = s["inputs"]["studies"][tp]["sequences"]
        assert seqs["T2"]["slice_thickness_mm"] == pytest.approx(8.0) and seqs["CT1"]["slice_thickness_mm"] == 4.0
        assert seqs["T2"]["alignment"]["method"] == "registered" and seqs["T1"]["alignment"]["method"] == "same grid"
        assert seqs["T2"]["alignment"]["coverage"] > 0.95
    check = s["input_check"]
    assert check["verdict"] == "warning"
    thick = [r for r in check["reasons"] if "8.0 mm slices" in r]
    assert len(thick) == 4 and all(guard.OUTSIDE_TRAINING in r for r in thick), check["reasons"]


# ------------------------------------------------------------------------------ shipped bundle


def test_the_shipped_bundle_records_its_training_inputs():
    """The shipped bundle carries input_statistics made from its own training cohort's recipe
    (phantoms, skull-stripped): slices as thick as the recipe's voxels, brains of a phantom's size,
    and every channel."""
    b = read_bundle(default_bundle_path())
    stats = b.input_statistics
    assert stats is not None and stats["version"] == guard.STATISTICS_VERSION
    recipe = b.meta["training"]["data_source"]["config"]
    assert recipe["spacing"] in (1.0, 2.0)
    assert stats["slice_thickness_mm"]["max"] == pytest.approx(recipe["spacing"])
    assert stats["stripped_fraction"] == 1.0
    assert stats["pairs"] >= 20
    assert set(stats["channels"]) == {str(c) for c in b.spec.channels}
    assert 700 < stats["brain_volume_ml"]["min"] <= stats["brain_volume_ml"]["max"] < 2500


def test_scene_copies_of_fileless_images_are_16_bit_when_that_loses_nothing_visible():
    """A resampled or DICOM-read sequence has no file for the scene to refer to: its copy is
    stored as 16-bit integers when its values span MR's usual range (rounded, so within 0.5),
    and kept as it is when they do not (a 0-1 image would lose everything)."""
    from RANOResponseLib.mrml.scene import _display_copy

    rng = np.random.default_rng(0)
    mr = sitk.GetImageFromArray(rng.uniform(0, 1800, (8, 9, 10)).astype(np.float32))
    copy = _display_copy(mr)
    assert copy.GetPixelID() == sitk.sitkInt16
    assert np.abs(sitk.GetArrayFromImage(copy) - sitk.GetArrayFromImage(mr)).max() <= 0.5
    unit = sitk.GetImageFromArray(rng.uniform(0, 1, (8, 9, 10)).astype(np.float32))
    assert _display_copy(unit) is unit
