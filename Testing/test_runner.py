"""Apply in the Slicer module, without Qt: scene nodes -> study folders -> predict child -> scene.

Runs on the real MRML of slicer-core, with the real ``rano-response predict`` in a child process."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.names import MODALITIES
from RANOResponseLib.mrml.runner import PredictRequest, discard, finish_predict, start_predict, study_folder
from RANOResponseLib.mrml.scene import load_study_nodes

MODS = MODALITIES


@pytest.fixture
def scene_with_studies(case_pair):
    scene = slicer.vtkMRMLScene()
    base = load_study_nodes(scene, case_pair.baseline, MODS, "baseline")
    fu = load_study_nodes(scene, case_pair.followup, MODS, "followup")
    return scene, base, fu


def test_unmodified_nodes_are_read_from_their_own_folder(tmp_path, case_pair, scene_with_studies):
    _, base, _ = scene_with_studies
    assert study_folder(base, MODS, "baseline", tmp_path).resolve() == case_pair.baseline.resolve()
    assert not (tmp_path / "baseline").exists()


def test_edited_nodes_are_exported_with_their_edits(tmp_path, scene_with_studies):
    from RANOResponseLib.imaging.io import read_study

    _, base, _ = scene_with_studies
    arr = slicer.util.arrayFromVolume(base["T2"])
    arr[:] = 0
    arr[2:5, 2:5, 2:5] = 7
    slicer.util.arrayFromVolumeModified(base["T2"])
    folder = study_folder(base, MODS, "baseline", tmp_path)
    assert folder == tmp_path / "baseline"
    t2 = sitk.GetArrayFromImage(read_study(folder, MODS).images["T2"])
    assert t2.max() == 7 and int((t2 == 7).sum()) == 27


def test_missing_modality_is_named(tmp_path, scene_with_studies):
    _, base, _ = scene_with_studies
    partial = {m: n for m, n in base.items() if m != "FLAIR"}
    with pytest.raises(RANOInputError, match="FLAIR"):
        study_folder(partial, MODS, "baseline", tmp_path)


def test_apply_fills_the_scene_and_removes_its_work_folder(scene_with_studies, tiny_bundle):
    scene, base, fu = scene_with_studies
    request = PredictRequest(base, fu, MODS, bundle=tiny_bundle, device="cpu")
    job = start_predict(request)
    assert "--no-scene" in job.run.command and "--no-pictures" in job.run.command
    assert job.run.wait(240) == 0, job.run.lines
    written = sorted(p.relative_to(job.out).as_posix() for p in job.out.rglob("*") if p.is_file())
    # only what the scene reads: no .mrml, no pictures
    assert written == ["brain_mask.nii.gz", "followup_to_baseline.tfm", "gradcam.nii.gz", "prediction.json",
                       "saliency.nii.gz", "segmentation_baseline.nii.gz", "segmentation_followup.nii.gz"]
    summary = json.loads((job.out / "prediction.json").read_text())
    cam_file = sitk.GetArrayFromImage(sitk.ReadImage(str(job.out / "gradcam.nii.gz")))
    nodes = finish_predict(scene, job)
    assert not job.workdir.exists()
    assert nodes.summary["label"] == summary["label"]
    transform = scene.GetNodeByID(nodes.transform)
    assert transform is not None and transform.IsA("vtkMRMLLinearTransformNode")
    for node in fu.values():
        assert node.GetTransformNodeID() == transform.GetID()
    for node in base.values():
        assert node.GetTransformNodeID() is None
    gradcam = scene.GetNodeByID(nodes.gradcam)
    assert np.allclose(slicer.util.arrayFromVolume(gradcam).shape,
                       slicer.util.arrayFromVolume(base["CT1"]).shape)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(gradcam), cam_file, atol=1e-6)  # held in memory
    # the nodes that came from the deleted folder no longer refer to it
    assert transform.GetStorageNode() is None and gradcam.GetStorageNode() is None
    brain = scene.GetNodeByID(nodes.brain)  # the baseline brain mask, as a segmentation held in memory
    assert brain.IsA("vtkMRMLSegmentationNode") and brain.GetStorageNode() is None
    assert brain.GetSegmentation().GetNumberOfSegments() == 1
    table = scene.GetNodeByID(nodes.table)
    assert table.GetNumberOfRows() >= 4
    # no second copy of the studies: the request's nodes were reused
    assert scene.GetNodesByClass("vtkMRMLScalarVolumeNode").GetNumberOfItems() == 8 + 2


def test_a_failed_run_removes_its_work_folder_too(scene_with_studies, tmp_path):
    scene, base, fu = scene_with_studies
    job = start_predict(PredictRequest(base, fu, MODS, bundle=tmp_path / "no-bundle", device="cpu"))
    with pytest.raises(RANOInputError, match="prediction failed: .*no-bundle"):
        finish_predict(scene, job)
    assert not job.workdir.exists()


def test_cancel_leaves_the_scene_and_disk_clean(scene_with_studies, tiny_bundle):
    scene, base, fu = scene_with_studies
    before = scene.GetNumberOfNodes()
    job = start_predict(PredictRequest(base, fu, MODS, bundle=tiny_bundle, device="cpu"))
    deadline = time.monotonic() + 60
    events = []
    while job.run.running and not events and time.monotonic() < deadline:
        events = job.run.poll()  # the first progress line: the child is mid-run
        time.sleep(0.02)
    assert events and job.run.running, "the child was not running when cancel was pressed"
    pid = job.run.pid
    os.kill(pid, 0)  # alive (raises ProcessLookupError otherwise)
    assert job.workdir.exists()
    discard(job)
    assert not job.run.running and job.run.cancelled and job.run.returncode != 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not job.workdir.exists()
    assert scene.GetNumberOfNodes() == before
