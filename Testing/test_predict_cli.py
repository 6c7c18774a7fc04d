"""``predict`` end to end: pipeline.run_predict in-process and the ``rano-response`` CLI.

Guards what a user (or the Slicer module) gets from a prediction: prediction.json (label, four
probabilities, bundle id, per-stage timings), saliency and Grad-CAM maps exactly on the baseline
CT1 grid, a readable transform, a real PNG overlay; --no-maps; and for every kind of bad input an
exit status of 2, one 'error:' line naming the culprit, and nothing left in --out.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import BAD_KINDS, cli_command, cli_env, modality_file, png_size
from RANOResponseCLI import main as cli_main
from RANOResponseLib.core.names import CLASS_NAMES
from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.inference.pipeline import read_prediction, run_predict
from RANOResponseLib.model.device import NEEDED_GIB
from RANOResponseLib.mrml.outputs import output_writers

CUDA = torch.cuda.is_available()
STAGES = ("read", "register", "crop_resample", "inference", "attributions", "write")
SLICES = {"slice_axial.png", "slice_coronal.png", "slice_sagittal.png"}
SEGMENTATIONS = {"segmentation_baseline.nii.gz", "segmentation_followup.nii.gz"}
ALL_OUTPUTS = {"prediction.json", "saliency.nii.gz", "gradcam.nii.gz", "followup_to_baseline.tfm", "overlay.png",
               "brain_mask.nii.gz", *SLICES, "scene", *SEGMENTATIONS}


def _predict_args(baseline: Path, followup: Path, out: Path, *extra: str) -> list[str]:
    return ["predict", "--baseline", str(baseline), "--followup", str(followup), "--out", str(out), *extra]


def _assert_nothing_left(out: Path) -> None:
    """--out does not exist (or is empty), and no staging folder was left next to it."""
    assert not out.exists() or not any(out.iterdir()), f"{out} has {sorted(p.name for p in out.iterdir())}"
    if out.parent.exists():
        stray = [p.name for p in out.parent.iterdir() if ".partial" in p.name or ".tmp" in p.name]
        assert stray == []


# ------------------------------------------------------------------------ in-process predict


@pytest.fixture(scope="module")
def predict_run(tmp_path_factory, case_pair, tiny_bundle):
    """One full run_predict (maps and overlay) on the phantom pair with the tiny bundle."""
    out = tmp_path_factory.mktemp("predict") / "results" / "case-1"
    stages = []
    result, files = run_predict(case_pair.baseline, case_pair.followup, out, bundle=tiny_bundle, device="cpu", writers=output_writers(),
                                progress=lambda stage, frac: stages.append((stage, frac)))
    summary = json.loads((out / "prediction.json").read_text())
    return SimpleNamespace(out=out, result=result, files=files, stages=stages, summary=summary)


@pytest.mark.slow
def test_prediction_json(predict_run, tiny_models):
    """Label = argmax class, four probabilities summing to 1, bundle id, timings of every stage."""
    s = predict_run.summary
    bundle, _ = tiny_models
    probs = s["probabilities"]
    assert list(probs) == list(CLASS_NAMES)
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    assert all(0 <= p <= 1 for p in probs.values())
    assert s["label"] == max(probs, key=probs.get)
    assert s["label"] == predict_run.result.label
    assert s["maps_explain"] == s["label"]
    assert s["bundle"]["id"] == bundle.id
    assert s["bundle"]["sha256"] == [w["sha256"] for w in bundle.weights]
    assert s["ensemble_size"] == 1
    assert s["device"] == "cpu"
    timings = s["timings_s"]
    missing = set(STAGES) - set(timings)
    assert not missing, f"timings lack {missing}"
    assert all(isinstance(timings[k], (int, float)) and timings[k] >= 0 for k in STAGES)
    assert {v.split("/")[0] for v in s["outputs"].values()} == ALL_OUTPUTS - {"prediction.json"}
    assert s["outputs"]["scene"] == "scene/RANOResponse.mrml"
    grid = s["model_grid"]
    assert grid["placed"] == "brain" and grid["size"] == list(bundle.spec.size)
    assert grid["fov_mm"] == [n * d for n, d in zip(bundle.spec.size, bundle.spec.spacing)]
    assert s["inputs"]["baseline"]["CT1"] == str(modality_file(predict_run.result.baseline.folder, "CT1"))
    # the phantom is skull-stripped: its brain is its non-zero region, every sequence shares CT1's grid
    for tp in ("baseline", "followup"):
        study = s["inputs"]["studies"][tp]
        assert study["brain_mask"]["method"] == "stripped" and study["brain_mask"]["stripped"] is True
        assert 700 < study["brain_mask"]["volume_ml"] < 2500
        assert {m: q["alignment"]["method"] for m, q in study["sequences"].items()} == \
            {"CT1": "reference", "T1": "same grid", "T2": "same grid", "FLAIR": "same grid"}
        assert all(q["slice_thickness_mm"] == 4.0 for q in study["sequences"].values())  # the 4 mm phantom
    assert 0.9 < s["inputs"]["registration"]["brain_dice"] <= 1.0
    assert set(s["inputs"]["channels"]) == {str(c) for c in bundle.spec.channels}
    # the tiny test bundle records no input statistics: nothing to compare with, said so
    reasons = s["input_check"]["reasons"]
    assert s["input_check"]["verdict"] == "warning" and len(reasons) == 1 and "no input statistics" in reasons[0]
    assert "not for clinical use" in s["note"]
    np.testing.assert_allclose(list(probs.values()), predict_run.result.prediction.probabilities, atol=1e-6)


@pytest.mark.slow
def test_read_prediction_reads_what_predict_wrote(predict_run, tmp_path):
    """The one reader of prediction.json returns what the writer wrote (folder or file), and
    refuses a missing, truncated or foreign file with one message naming it."""
    on_disk = json.loads((predict_run.out / "prediction.json").read_text())
    assert read_prediction(predict_run.out) == read_prediction(predict_run.out / "prediction.json") == on_disk
    assert on_disk["label"] == predict_run.result.label
    with pytest.raises(RANOInputError, match=r"empty[/\\]prediction.json: not found"):
        read_prediction(tmp_path / "empty")
    cut = tmp_path / "cut" / "prediction.json"
    cut.parent.mkdir()
    text = (predict_run.out / "prediction.json").read_text()
    cut.write_text(text[: len(text) // 2])
    with pytest.raises(RANOInputError, match="not valid JSON") as e:
        read_prediction(cut.parent)
    assert str(cut) in str(e.value)
    cut.write_text(json.dumps({"probabilities": on_disk["probabilities"]}))
    with pytest.raises(RANOInputError, match="not a prediction"):
        read_prediction(cut)


@pytest.mark.slow
def test_outputs_complete_and_nothing_else(predict_run):
    """Exactly the five outputs, no temporary or staging files, in --out or next to it."""
    assert {p.name for p in predict_run.out.iterdir()} == ALL_OUTPUTS
    assert [p.name for p in predict_run.out.parent.iterdir()] == [predict_run.out.name]
    assert {p.relative_to(predict_run.out).parts[0] for p in predict_run.files.values()} == ALL_OUTPUTS
    assert all(p.is_file() for p in predict_run.files.values())
    assert (predict_run.out / "scene" / "RANOResponse.mrml").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["saliency", "gradcam"])
def test_maps_on_baseline_ct1_grid(predict_run, case_pair, name):
    """Maps have the baseline CT1's size, spacing, origin and direction, values in [0, 1], and are
    0 outside the baseline brain: they overlay the baseline in Slicer without resampling."""
    ct1 = sitk.ReadImage(str(modality_file(case_pair.baseline, "CT1")))
    m = sitk.ReadImage(str(predict_run.out / f"{name}.nii.gz"))
    assert m.GetSize() == ct1.GetSize()
    assert m.GetSpacing() == ct1.GetSpacing()
    assert m.GetOrigin() == ct1.GetOrigin()
    assert m.GetDirection() == ct1.GetDirection()
    arr = sitk.GetArrayFromImage(m)
    assert np.isfinite(arr).all()
    assert arr.min() >= 0 and arr.max() <= 1 + 1e-6
    assert arr.max() > 0.1
    brain = sitk.GetArrayFromImage(sitk.ReadImage(str(predict_run.out / "brain_mask.nii.gz"))) > 0
    assert np.all(arr[~brain] == 0)


@pytest.mark.slow
def test_brain_mask_file(predict_run, case_pair):
    """brain_mask.nii.gz: on the baseline CT1 grid, the stripped phantom's non-zero region with
    its holes filled (computed here with scipy), and the same mask is the scene's brain segment."""
    from scipy import ndimage

    ct1 = sitk.ReadImage(str(modality_file(case_pair.baseline, "CT1")))
    mask = sitk.ReadImage(str(predict_run.out / "brain_mask.nii.gz"))
    assert (mask.GetSize(), mask.GetSpacing(), mask.GetOrigin(), mask.GetDirection()) == \
        (ct1.GetSize(), ct1.GetSpacing(), ct1.GetOrigin(), ct1.GetDirection())
    truth = ndimage.binary_fill_holes(sitk.GetArrayFromImage(ct1) != 0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mask) > 0, truth)

    from RANOResponseLib.mrml.scene import read_scene

    scene = read_scene(predict_run.out / "scene" / "RANOResponse.mrml")
    segs = [scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode")
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"))]
    segs = [n for n in segs if n.GetName() == "RANO brain mask"]  # beside it: the tumour segmentations
    assert len(segs) == 1
    segmentation = segs[0].GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1 and segmentation.GetNthSegment(0).GetName() == "Brain"
    import slicer

    voxels = slicer.util.arrayFromSegmentInternalBinaryLabelmap(segs[0], segmentation.GetNthSegmentID(0))
    assert int(voxels.astype(bool).sum()) == int(truth.sum())


@pytest.mark.slow
def test_transform_file(predict_run):
    """followup_to_baseline.tfm reads back with SimpleITK as the registration's transform."""
    t = sitk.ReadTransform(str(predict_run.out / "followup_to_baseline.tfm"))
    reg = predict_run.result.registration.transform
    np.testing.assert_allclose(t.GetParameters(), reg.GetParameters(), atol=1e-9)
    np.testing.assert_allclose(t.GetFixedParameters(), reg.GetFixedParameters(), atol=1e-9)
    p = (10.0, -20.0, 30.0)
    np.testing.assert_allclose(t.TransformPoint(p), reg.TransformPoint(p), atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["overlay.png", *sorted(SLICES)])
def test_overlay_png(predict_run, name):
    """overlay.png and the three slice views are complete PNGs of a readable size that
    matplotlib can decode."""
    path = predict_run.out / name
    w, h = png_size(path)
    lo = (400, 300) if name == "overlay.png" else (200, 200)
    assert lo[0] <= w <= 5000 and lo[1] <= h <= 5000, (w, h)
    assert path.stat().st_size > 10_000
    import matplotlib.image

    img = matplotlib.image.imread(str(path))
    assert img.shape[:2] == (h, w)
    assert img[..., :3].std() > 0.05  # not a blank canvas


@pytest.mark.slow
def test_progress_reported_in_order(predict_run):
    """Progress is reported as each stage completes: read -> brain masks -> aligned -> registered
    -> resampled -> predicted -> segmented -> written, with strictly rising fractions ending at 1."""
    names = [s for s, _ in predict_run.stages]
    fracs = [f for _, f in predict_run.stages]
    assert names == ["read", "brain masks", "aligned", "registered", "resampled", "predicted", "segmented", "written"]
    assert fracs == sorted(set(fracs)) and 0.0 < fracs[0] and fracs[-1] == 1.0


# ------------------------------------------------------------------------------ CLI, success


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, case_pair, tiny_bundle):
    """The real console script in a subprocess, --device auto."""
    out = tmp_path_factory.mktemp("cli") / "results" / "case-1"
    proc = subprocess.run(cli_command() + _predict_args(case_pair.baseline, case_pair.followup, out,
                                                       "--bundle", str(tiny_bundle), "--device", "auto"),
                          capture_output=True, text=True, env=cli_env(), timeout=300)
    return SimpleNamespace(out=out, proc=proc)


@pytest.mark.slow
def test_cli_predict_auto_device(cli_run):
    """`rano-response predict --device auto` succeeds (with a CPU notice when there is no CUDA),
    prints the label it wrote, and writes all five outputs."""
    proc = cli_run.proc
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "error:" not in proc.stderr
    assert {p.name for p in cli_run.out.iterdir()} == ALL_OUTPUTS
    summary = json.loads((cli_run.out / "prediction.json").read_text())
    assert f"label: {summary['label']}" in proc.stdout.splitlines()
    # auto: the CPU, said in one notice, or a CUDA device that exists, silently; never a silent CPU
    notices = [line for line in proc.stderr.splitlines() if line.startswith("notice:")]
    if summary["device"] == "cpu":
        assert len(notices) == 1 and "CPU" in notices[0], proc.stderr
    else:
        kind, _, index = summary["device"].partition(":")
        assert CUDA and kind == "cuda" and int(index) < torch.cuda.device_count(), summary["device"]
        assert notices == [], proc.stderr
    if not CUDA:
        assert summary["device"] == "cpu"
    elif torch.cuda.mem_get_info(0)[0] > 2 * NEEDED_GIB * 2**30:  # a free GPU is used
        assert summary["device"].startswith("cuda:")
    assert sum(summary["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert set(STAGES) <= set(summary["timings_s"])
    png_size(cli_run.out / "overlay.png")


@pytest.mark.slow
def test_cli_no_maps(tmp_path, case_pair, tiny_bundle, capsys):
    """--no-maps writes prediction.json, the transform and the segmentations only: no saliency,
    Grad-CAM or overlay."""
    out = tmp_path / "results" / "no-maps"
    rc = cli_main(_predict_args(case_pair.baseline, case_pair.followup, out, "--bundle", str(tiny_bundle),
                                "--device", "cpu", "--no-maps", "--quiet"))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.err == ""
    assert {p.name for p in out.iterdir()} == {"prediction.json", "followup_to_baseline.tfm", "brain_mask.nii.gz",
                                              "scene", *SEGMENTATIONS}
    s = json.loads((out / "prediction.json").read_text())
    assert s["maps_explain"] is None
    assert "attributions" not in s["timings_s"]
    assert s["label"] == max(s["probabilities"], key=s["probabilities"].get)
    assert f"label: {s['label']}" in captured.out
    assert "input check: warning" in captured.out.splitlines()  # the tiny bundle records no input statistics


# ------------------------------------------------------------------------ CLI, bad input


def _check_refused(rc: int, err: str, names: str, out: Path) -> None:
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, f"stderr is not one line: {err!r}"
    assert lines[0].startswith("error:")
    assert names in lines[0], f"{names!r} not named in {lines[0]!r}"
    assert "Traceback" not in err
    _assert_nothing_left(out)


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_cli_refuses_bad_input(kind, make_bad_case, tmp_path, capsys, monkeypatch):
    """Each bad input: exit 2, stderr is ONE 'error:' line naming the file (or --device value),
    and --out is not created, with no staging folder beside it (cli.main in-process, --quiet)."""
    if kind == "cuda_absent":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    case = make_bad_case(kind)
    results = tmp_path / "results"
    results.mkdir()
    out = results / "case"
    rc = cli_main(_predict_args(case.baseline, case.followup, out, *case.args, "--quiet"))
    captured = capsys.readouterr()
    _check_refused(rc, captured.err, case.names, out)
    assert captured.out == ""


def test_cli_error_is_last_and_only_error_line_without_quiet(make_bad_case, tmp_path, capsys):
    """Without --quiet the error is still one 'error:' line: progress is reported after a stage
    completes, so input that fails to read prints nothing else."""
    case = make_bad_case("truncated")
    out = tmp_path / "results" / "case"
    rc = cli_main(_predict_args(case.baseline, case.followup, out, *case.args))
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.splitlines()
    assert lines[-1].startswith("error:") and case.names in lines[-1]
    assert len(lines) == 1, lines
    _assert_nothing_left(out)


def test_cli_refuses_out_that_is_a_file(tmp_path, case_pair, tiny_bundle, capsys):
    """An --out that is an existing file: exit 2, error naming it, the file untouched, no staging."""
    out = tmp_path / "taken"
    out.write_text("keep")
    rc = cli_main(_predict_args(case_pair.baseline, case_pair.followup, out, "--bundle", str(tiny_bundle),
                                "--device", "cpu", "--no-maps", "--quiet"))
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error:") and str(out) in err and err.count("\n") == 1
    assert out.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


@pytest.mark.slow
def test_cli_roi_center_places_the_crop(tmp_path, case_pair, tiny_bundle, predict_run, capsys):
    """--roi-center R,A,S (RAS mm, a negative R included) centres the crop there: prediction.json
    records it, and the network input differs from the default crop; --no-scene writes no scene."""
    default = np.array(predict_run.summary["model_grid"]["center_ras"])
    centre = default + (-12.0, 6.0, -18.0)
    if centre[0] >= 0:
        centre[0] = -abs(centre[0]) - 1.0  # exercise a value that starts with '-'
    out = tmp_path / "roi"
    rc = cli_main(_predict_args(case_pair.baseline, case_pair.followup, out, "--bundle", str(tiny_bundle),
                                "--device", "cpu", "--no-maps", "--no-scene", "--quiet",
                                "--roi-center", ",".join(f"{v:.3f}" for v in centre)))
    assert rc == 0, capsys.readouterr().err
    s = json.loads((out / "prediction.json").read_text())
    np.testing.assert_allclose(s["model_grid"]["center_ras"], centre, atol=1e-3)
    assert s["model_grid"]["placed"] == "roi"
    assert s["probabilities"] != predict_run.summary["probabilities"]
    assert not (out / "scene").exists()


@pytest.mark.parametrize("value", ["1,2", "a,b,c", "1,2,inf"])
def test_cli_roi_center_must_be_a_point(value, capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["predict", "--baseline", "x", "--followup", "y", "--out", "z", "--roi-center", value])
    assert info.value.code == 2
    assert "R,A,S" in capsys.readouterr().err


def test_cli_roi_beside_the_head_is_refused(tmp_path, case_pair, tiny_bundle, capsys):
    """A crop that holds no brain: exit 2, one error line naming the study, nothing written."""
    out = tmp_path / "results" / "case"
    rc = cli_main(_predict_args(case_pair.baseline, case_pair.followup, out, "--bundle", str(tiny_bundle),
                                "--device", "cpu", "--no-maps", "--quiet", "--roi-center", "900,0,0"))
    _check_refused(rc, capsys.readouterr().err, str(case_pair.baseline), out)


def test_cli_usage_error_exit_status(capsys):
    """A missing required option is an argparse usage error (exit 2), not a traceback."""
    with pytest.raises(SystemExit) as info:
        cli_main(["predict", "--baseline", "x"])
    assert info.value.code == 2
    assert "--followup" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("kind", [
    "truncated",
    "sha256",
    pytest.param("cuda_absent", marks=pytest.mark.skipif(CUDA, reason="this machine has CUDA")),
])
def test_cli_subprocess_refuses_bad_input(kind, make_bad_case, tmp_path):
    """The real console script: exit status 2, one 'error:' line on stderr naming the culprit,
    nothing in --out (a few representative cases; the rest run in-process above)."""
    case = make_bad_case(kind)
    results = tmp_path / "results"
    results.mkdir()
    out = results / "case"
    proc = subprocess.run(cli_command() + _predict_args(case.baseline, case.followup, out, *case.args, "--quiet"),
                          capture_output=True, text=True, env=cli_env(), timeout=300)
    _check_refused(proc.returncode, proc.stderr, case.names, out)
    assert proc.stdout == ""


def test_rerun_into_same_out_leaves_no_stale_outputs(tmp_path, case_pair, tiny_bundle):
    """A --no-maps run into a folder that holds an earlier run's maps removes them, so the
    folder never shows maps that do not belong to its prediction.json; other files stay."""
    out = tmp_path / "same"
    run_predict(case_pair.baseline, case_pair.followup, out, bundle=tiny_bundle, device="cpu", writers=output_writers())
    assert (out / "gradcam.nii.gz").exists()
    (out / "notes.txt").write_text("mine")
    run_predict(case_pair.baseline, case_pair.followup, out, bundle=tiny_bundle, device="cpu", attributions=False,
                writers=output_writers(pictures=False), segmentation=False)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["brain_mask.nii.gz", "followup_to_baseline.tfm", "notes.txt", "prediction.json", "scene"]
