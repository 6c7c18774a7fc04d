"""The RANO Response panel's logic (RANOResponseLib.mrml.logic.PanelLogic, which the Slicer module's
RANOResponseLogic subclasses) on the real MRML of slicer-core, with the real ``predict`` child.

A reviewer stepping through a worklist must not fill the scene: every case reuses the same volume
nodes, and a new case removes the previous one's prediction, crop region and diameter lines. Apply
leaves no work folder behind, and what the scene shows survives it (saved scene, report)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
from conftest import copy_study, make_bundle
from RANOResponseLib.core.errors import BundleError, DeviceError, RANOInputError
from RANOResponseLib.core.names import MODALITIES
from RANOResponseLib.datasets.samples import sample_case
from RANOResponseLib.mrml import scene as mrml_scene
from RANOResponseLib.mrml.logic import STEP_MESSAGES, PanelLogic, export_result, transform_from_node
from RANOResponseLib.mrml.scene import add_transform_node, new_scene, read_scene, write_scene

ROLES = ("baseline", "followup")


def params(**values) -> SimpleNamespace:
    """The panel's parameters as the module's parameter node holds them (unset paths are ``.``)."""
    p = dict(baselineFolder=Path("."), followupFolder=Path("."), bundle=Path("."), roi=None, mapName="Grad-CAM",
             opacity=0.4, worklist=Path("."), reviewDatabase=Path("."), reviewer="", transform=None,
             gradcam=None, saliency=None, table=None)
    p.update({f"{r}{m}": None for r in ROLES for m in MODALITIES})
    p.update(values)
    return SimpleNamespace(**p)


def count(scene, cls: str) -> int:
    return scene.GetNumberOfNodesByClass(cls)


def inventory(scene) -> dict[str, int]:
    """How many nodes of each class the scene holds."""
    out: dict[str, int] = {}
    for i in range(scene.GetNumberOfNodes()):
        cls = scene.GetNthNode(i).GetClassName()
        out[cls] = out.get(cls, 0) + 1
    return out


@pytest.fixture
def worklist(tmp_path, case_pair):
    """Two cases: the conftest phantom pair (4 mm) and the shipped sample (3 mm)."""
    sample = sample_case()
    path = tmp_path / "worklist.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case_id", "baseline", "followup"])
        w.writerow(["case-a", case_pair.baseline, case_pair.followup])
        w.writerow(["case-b", sample.baseline, sample.followup])
    return path


@pytest.fixture
def panel(tmp_path, worklist, tiny_bundle):
    logic = PanelLogic(new_scene())
    p = params(bundle=tiny_bundle, worklist=worklist, reviewDatabase=tmp_path / "review.sqlite", reviewer="dr-a")
    logic.open_review(p.worklist, p.reviewDatabase, p.reviewer)
    return logic, p


# ----------------------------------------------------------------------------- stepping


def test_stepping_through_cases_reuses_the_study_nodes(panel):
    logic, p = panel
    logic.load_review_case(p)
    first = inventory(logic.scene)
    nodes = {(r, m): getattr(p, f"{r}{m}") for r in ROLES for m in MODALITIES}
    assert count(logic.scene, "vtkMRMLScalarVolumeNode") == 8
    for where in ("next", "previous", "next", "previous"):
        assert logic.step_review(where) is None
        logic.load_review_case(p)
        assert inventory(logic.scene) == first, where
    assert all(getattr(p, f"{r}{m}") is node for (r, m), node in nodes.items())
    # the reused nodes hold this case's files, unmodified (Apply can read them from their folder)
    ct1 = p.baselineCT1.GetStorageNode().GetFileName()
    assert Path(ct1).parent == Path(logic.review.current.baseline).resolve()
    assert not p.baselineCT1.GetModifiedSinceRead()


def test_the_ends_of_the_worklist_stay_and_say_so(panel):
    logic, p = panel
    assert logic.review.index == 0
    assert logic.step_review("previous") == "Start of the worklist: this is its first case."
    assert logic.review.index == 0
    assert logic.step_review("next") is None and logic.review.index == 1
    assert logic.step_review("next") == "End of the worklist: this is its last case."
    assert logic.review.index == 1
    with pytest.raises(ValueError, match="unknown step 'last'"):
        logic.step_review("last")
    assert set(STEP_MESSAGES) == {"next", "previous", "first_unreviewed"}


def test_first_unreviewed_when_every_case_is_reviewed(panel):
    logic, _ = panel
    for _ in range(2):
        logic.save_verdict(agree=False, label="SD", confidence=3, note="")
        logic.step_review("next")
    assert logic.step_review("first_unreviewed") == "Every case of the worklist has your verdict."


# -------------------------------------------------------------------------------- Apply


def test_apply_then_the_next_case_leaves_no_trace(panel):
    """Apply on case A, then case B: A's transform, maps, table, ROI and lines are gone, and so is
    the work folder; A again and Apply again: the scene holds exactly what it held the first time."""
    logic, p = panel
    logic.load_review_case(p)
    loaded = inventory(logic.scene)
    job, notice = logic.start_prediction(p, "cpu")
    assert notice == ""
    summary = logic.finish_prediction(p, job)
    assert not job.workdir.exists()
    assert summary["label"] in summary["probabilities"]
    assert p.followupT2.GetTransformNodeID() == p.transform.GetID()
    logic.measure_case()
    assert count(logic.scene, "vtkMRMLMarkupsLineNode") > 0
    after_apply = inventory(logic.scene)

    assert logic.step_review("next") is None
    logic.load_review_case(p)
    for cls in ("vtkMRMLLinearTransformNode", "vtkMRMLTableNode", "vtkMRMLMarkupsROINode", "vtkMRMLMarkupsLineNode"):
        assert count(logic.scene, cls) == 0, cls
    assert count(logic.scene, "vtkMRMLScalarVolumeNode") == 8
    assert (p.transform, p.gradcam, p.saliency, p.table, p.roi) == (None,) * 5
    assert all(n.GetTransformNodeID() is None for n in (getattr(p, f"followup{m}") for m in MODALITIES))
    assert logic.result is None and logic.assessment is None
    # nothing left over but the colour tables and slice views the first overlay made (shared)
    extra = {k: v - loaded.get(k, 0) for k, v in inventory(logic.scene).items() if v != loaded.get(k, 0)}
    assert set(extra) <= {"vtkMRMLColorTableNode", "vtkMRMLSliceNode", "vtkMRMLSliceCompositeNode"}, extra

    assert logic.step_review("previous") is None
    logic.load_review_case(p)
    job = logic.start_prediction(p, "cpu")[0]
    logic.finish_prediction(p, job)
    logic.measure_case()
    assert inventory(logic.scene) == after_apply


def test_the_saved_scene_needs_no_work_folder(tmp_path, panel):
    logic, p = panel
    logic.load_review_case(p)
    job = logic.start_prediction(p, "cpu")[0]
    logic.finish_prediction(p, job)
    assert not job.workdir.exists()
    for node in (p.transform, p.gradcam, p.saliency):
        assert node.GetStorageNode() is None, f"{node.GetName()} still refers to a work-folder file"
    gradcam = slicer.util.arrayFromVolume(p.gradcam).copy()
    saved = write_scene(logic.scene, tmp_path / "scene" / "case.mrml", copy_data=False)
    reopened = read_scene(saved)
    found = [n for n in (reopened.GetNthNode(i) for i in range(reopened.GetNumberOfNodes()))
             if n.GetName() == p.gradcam.GetName() and n.IsA("vtkMRMLScalarVolumeNode")]
    assert len(found) == 1
    assert Path(found[0].GetStorageNode().GetFileName()).parent == saved.parent
    np.testing.assert_allclose(slicer.util.arrayFromVolume(found[0]), gradcam, atol=1e-6)


def test_report_is_built_from_the_scene_and_leaves_no_folder(tmp_path, panel, monkeypatch):
    logic, p = panel
    logic.load_review_case(p)
    with pytest.raises(RANOInputError, match="Run Apply on this case first"):
        logic.write_report(p, tmp_path / "report.pdf")
    job = logic.start_prediction(p, "cpu")[0]
    logic.finish_prediction(p, job)
    logic.measure_case()
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    report = logic.write_report(p, tmp_path / "report.pdf")
    assert report.read_bytes()[:5] == b"%PDF-"
    assert list(temp.iterdir()) == []


def test_export_result_writes_what_the_scene_shows(tmp_path, panel):
    logic, p = panel
    logic.load_review_case(p)
    job = logic.start_prediction(p, "cpu")[0]
    logic.finish_prediction(p, job)
    folder = export_result(logic.scene, logic.result.nodes, tmp_path / "prediction")
    pred = json.loads((folder / "prediction.json").read_text())
    assert pred["label"] == logic.result.nodes.summary["label"]
    case = logic.review.current
    assert Path(pred["inputs"]["baseline"]["CT1"]).parent == Path(case.baseline).resolve()
    cam = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / pred["outputs"]["gradcam"])))
    np.testing.assert_allclose(cam, slicer.util.arrayFromVolume(p.gradcam), atol=1e-6)
    # study files that are gone: the scene's study nodes are written instead
    moved = tmp_path / "moved"
    shutil.copytree(case.baseline, moved)
    logic.result.nodes.summary["inputs"]["baseline"] = {m: str(moved / f"{m}.nii.gz") for m in MODALITIES}
    shutil.rmtree(moved)
    again = export_result(logic.scene, logic.result.nodes, tmp_path / "again")
    files = json.loads((again / "prediction.json").read_text())["inputs"]["baseline"]
    assert set(files) == set(MODALITIES) and all(Path(f).parent == again / "baseline" for f in files.values())


def test_transform_from_node_maps_points_like_the_original():
    """The transform node -> SimpleITK conversion (measurement, report) against a known motion."""
    known = sitk.Euler3DTransform((10.0, -20.0, 5.0), 0.1, -0.05, 0.2, (4.0, -3.0, 7.5))
    scene = new_scene()
    node = add_transform_node(scene, known, "t")
    back = transform_from_node(node)
    for point in [(0.0, 0.0, 0.0), (37.0, -55.0, 81.0), (-120.0, 64.0, -9.0)]:
        np.testing.assert_allclose(back.TransformPoint(point), known.TransformPoint(point), atol=1e-6)


# ------------------------------------------------------------------------------- overlay


def test_overlay_is_reapplied_only_when_the_map_changes(panel, monkeypatch):
    logic, p = panel
    logic.load_review_case(p)
    logic.finish_prediction(p, logic.start_prediction(p, "cpu")[0])
    calls = []
    real = mrml_scene.show_overlay
    monkeypatch.setattr(mrml_scene, "show_overlay", lambda *a, **k: calls.append(k["opacity"]) or real(*a, **k))
    p.reviewer = "dr-b"  # typing a name, choosing a database: not the overlay's business
    p.reviewDatabase = Path("/elsewhere.sqlite")
    for _ in range(3):
        assert logic.update_overlay(p) is False
    assert calls == []
    p.opacity = 0.7
    assert logic.update_overlay(p) is True and logic.update_overlay(p) is False
    p.mapName = "Saliency"
    assert logic.update_overlay(p) is True
    assert calls == [0.7, 0.7]
    composites = mrml_scene._nodes(logic.scene, "vtkMRMLSliceCompositeNode")
    assert composites and all(c.GetForegroundVolumeID() == p.saliency.GetID() for c in composites)
    assert all(c.GetForegroundOpacity() == pytest.approx(0.7) for c in composites)


# ------------------------------------------------------------------ modalities and device


@pytest.fixture(scope="module")
def two_modality_bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundles") / "t1-flair", modalities=("T1", "FLAIR"),
                       bundle_id="tiny-t1-flair")


def test_only_the_bundles_modalities_are_required(tmp_path, case_pair, two_modality_bundle, tiny_bundle):
    base = tmp_path / "baseline"
    fu = tmp_path / "followup"
    for src, dst in ((case_pair.baseline, base), (case_pair.followup, fu)):
        copy_study(src, dst)
        for m in ("CT1", "T2"):
            (dst / f"{m}.nii.gz").unlink()
    logic = PanelLogic(new_scene())
    p = params(bundle=tiny_bundle, baselineFolder=base, followupFolder=fu)
    with pytest.raises(RANOInputError, match=r"missing CT1, T2 \(the model bundle needs CT1, T1, T2, FLAIR\)"):
        logic.load_studies(p)
    assert count(logic.scene, "vtkMRMLScalarVolumeNode") == 0  # refused before anything was loaded
    p.bundle = two_modality_bundle
    assert logic.load_studies(p) is p.baselineT1  # no CT1: the maps go over T1
    assert (p.baselineCT1, p.baselineT2, p.followupCT1, p.followupT2) == (None,) * 4
    assert logic.apply_readiness(p)[0] is True
    summary = logic.finish_prediction(p, logic.start_prediction(p, "cpu")[0])
    assert summary["bundle"]["id"] == "tiny-t1-flair"


def test_a_modality_the_next_case_lacks_loses_its_node(tmp_path, case_pair, two_modality_bundle):
    logic = PanelLogic(new_scene())
    p = params(bundle=two_modality_bundle, baselineFolder=case_pair.baseline, followupFolder=case_pair.followup)
    logic.load_studies(p)
    assert count(logic.scene, "vtkMRMLScalarVolumeNode") == 8  # the others are shown when present
    base = copy_study(case_pair.baseline, tmp_path / "b")
    (base / "CT1.nii.gz").unlink()
    p.baselineFolder = base
    logic.load_studies(p)
    assert p.baselineCT1 is None and count(logic.scene, "vtkMRMLScalarVolumeNode") == 7
    assert count(logic.scene, "vtkMRMLVolumeArchetypeStorageNode") == 7
    assert count(logic.scene, "vtkMRMLScalarVolumeDisplayNode") == 7


def test_apply_readiness_says_what_is_missing(tmp_path, tiny_bundle):
    logic = PanelLogic(new_scene())
    ready, tip = logic.apply_readiness(params(bundle=tiny_bundle))
    assert not ready and tip.startswith("Assign the volumes the model needs: baseline CT1,")
    ready, tip = logic.apply_readiness(params(bundle=tmp_path / "no-bundle"))
    assert not ready and tip == f"Model bundle: {tmp_path / 'no-bundle'}: model bundle not found (no bundle.json)"


def test_bundle_modalities_are_reread_only_when_bundle_json_changes(tmp_path, tiny_bundle):
    from RANOResponseLib.model.bundle import bundle_modalities

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    meta = bundle / "bundle.json"
    assert bundle_modalities(bundle) == MODALITIES
    stat = meta.stat()
    data = json.loads(meta.read_text())
    data["modalities"], data["channels"] = ["FLAIR"], ["FLAIR:followup", "FLAIR:baseline"]
    meta.write_text(json.dumps(data))
    os.utime(meta, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same modification time: the cached answer
    assert bundle_modalities(bundle) == MODALITIES
    os.utime(meta, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert bundle_modalities(meta) == ("FLAIR",)
    meta.write_text("{}")
    with pytest.raises(BundleError, match="no readable 'modalities'"):
        bundle_modalities(bundle)


def test_an_absent_gpu_is_an_error_not_a_switch_to_the_cpu(panel):
    logic, p = panel
    logic.load_review_case(p)
    assert logic.device_notice("cpu") == ""
    assert logic.device_notice("cuda:99").startswith("error: --device cuda:99:")
    assert logic.device_notice("gpu") == "error: --device gpu: unknown device (use auto, cpu, cuda or cuda:N)"
    with pytest.raises(DeviceError, match="cuda:99"):
        logic.start_prediction(p, "cuda:99")


def test_fit_roi_moves_its_own_region(panel):
    logic, p = panel
    logic.load_review_case(p)
    roi = logic.fit_roi(p)
    assert p.roi is roi and logic.fit_roi(p) is roi
    assert count(logic.scene, "vtkMRMLMarkupsROINode") == 1
    logic.step_review("next")
    logic.load_review_case(p)
    assert p.roi is None and count(logic.scene, "vtkMRMLMarkupsROINode") == 0


def test_clear_case_removes_lines_and_their_display_nodes(panel):
    logic, p = panel
    logic.load_review_case(p)
    before = inventory(logic.scene)
    logic.measure_case()
    logic.measure_case()  # measuring again replaces the lines
    lines = count(logic.scene, "vtkMRMLMarkupsLineNode")
    assert lines > 0 and count(logic.scene, "vtkMRMLMarkupsDisplayNode") == lines
    logic.clear_case(p)
    assert inventory(logic.scene) == before


def test_panel_logic_can_be_the_second_base_of_a_slicer_logic():
    """Slicer's ScriptedLoadableModuleLogic.__init__ calls ``super().__init__()`` with no arguments;
    in RANOResponseLogic that is PanelLogic.__init__, which must accept it (as the module then
    initialises PanelLogic with the scene)."""

    class ScriptedLoadableModuleLogic:  # what Slicer's does in __init__
        def __init__(self, parent=None):
            super().__init__()
            self.moduleName = "RANOResponse"

    class RANOResponseLogic(ScriptedLoadableModuleLogic, PanelLogic):
        def __init__(self, scene):
            ScriptedLoadableModuleLogic.__init__(self)
            PanelLogic.__init__(self, scene, python="PythonSlicer")

    scene = new_scene()
    logic = RANOResponseLogic(scene)
    assert logic.scene is scene and logic.python == "PythonSlicer" and logic.moduleName == "RANOResponse"


def test_apply_twice_on_a_case_reads_its_folders_and_keeps_the_result_linked(panel):
    """The second Apply finds the follow-up under the first one's transform: its image is still its
    file, so the case's own folders are used and the review panel still finds the prediction."""
    logic, p = panel
    logic.load_review_case(p)
    for _ in range(2):
        job = logic.start_prediction(p, "cpu")[0]
        assert job.inputs == {"baseline": Path(logic.review.current.baseline),
                              "followup": Path(logic.review.current.followup)}
        logic.finish_prediction(p, job)
        assert logic.result_for(logic.review.current) is logic.result
    assert count(logic.scene, "vtkMRMLLinearTransformNode") == 1
