"""Apply in the Slicer module, without Qt: scene nodes -> study folders -> predict child -> scene.

Runs on the real MRML of slicer-core, with the real ``rano-response predict`` in a child process."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

from RANOResponseLib.core.errors import RANOInputError  # noqa: E402
from RANOResponseLib.mrml.runner import PredictRequest, discard, finish_predict, start_predict, study_folder  # noqa: E402
from RANOResponseLib.mrml.scene import load_study_nodes  # noqa: E402

MODS = ("CT1", "T1", "T2", "FLAIR")


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
    import SimpleITK as sitk
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


def test_apply_fills_the_scene(scene_with_studies, tiny_bundle):
    scene, base, fu = scene_with_studies
    request = PredictRequest(base, fu, MODS, bundle=tiny_bundle, device="cpu")
    job = start_predict(request)
    nodes = finish_predict(scene, job)
    summary = json.loads((job.out / "prediction.json").read_text())
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
    table = scene.GetNodeByID(nodes.table)
    assert table.GetNumberOfRows() >= 4
    # no second copy of the studies: the request's nodes were reused
    assert scene.GetNodesByClass("vtkMRMLScalarVolumeNode").GetNumberOfItems() == 8 + 2


def test_cancel_leaves_the_scene_and_disk_clean(scene_with_studies, tiny_bundle):
    scene, base, fu = scene_with_studies
    before = scene.GetNumberOfNodes()
    job = start_predict(PredictRequest(base, fu, MODS, bundle=tiny_bundle, device="cpu"))
    deadline = time.monotonic() + 60
    while job.run.running and not job.run.poll() and time.monotonic() < deadline:
        time.sleep(0.02)
    discard(job)
    assert not job.run.running and job.run.cancelled
    assert not job.workdir.exists()
    assert scene.GetNumberOfNodes() == before
