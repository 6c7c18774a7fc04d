"""The MRML scene logic (RANOResponseLib.scene) against the real MRML of the slicer-core wheel.

Guards what the Slicer module and ``predict``'s saved scene rely on: volume geometry survives
node <-> Study (RAS vs LPS) on an oblique anisotropic image and through Slicer's own NIfTI IO; the
registration as a transform node puts follow-up anatomy on the baseline anatomy in world
coordinates (checked against a known motion, in memory and from a .tfm); the crop ROI is the model
grid and moving it moves the crop; maps get heat colours with low values hidden; overlays reach
every slice view; the results table equals prediction.json; and the scene ``predict`` writes reads
back node by node.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import slicer  # slicer-core: real MRML without the application (a main dependency: no skip)
from conftest import modality_file
from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.names import MODALITIES
from RANOResponseLib.imaging.geometry import grid_center, lps_to_ras, model_grid, ras_to_lps
from RANOResponseLib.imaging.io import Study, read_image, read_study
from RANOResponseLib.imaging.preprocessing import InputSpec, default_channels, prepare_pair
from RANOResponseLib.inference.pipeline import SCENE_FILE, run_predict
from RANOResponseLib.mrml.outputs import output_writers
from RANOResponseLib.mrml.scene import (
    MAP_THRESHOLD,
    add_map_node,
    add_results_table,
    add_transform_node,
    export_study_nodes,
    fit_roi,
    harden,
    image_to_node,
    load_outputs,
    load_study_nodes,
    load_volume,
    new_scene,
    node_to_image,
    populate_scene,
    read_scene,
    roi_center,
    show_overlay,
    study_from_nodes,
    transform_to_ras_matrix,
    write_scene,
)
from vtkmodules.vtkCommonMath import vtkMatrix4x4

# ------------------------------------------------------------------------------------ helpers


def _oblique_image(seed: int = 0) -> sitk.Image:
    """Random voxels (no two alike) on an oblique, anisotropic, non-cubic grid."""
    arr = np.random.default_rng(seed).uniform(1, 100, (9, 11, 13)).astype(np.float32)  # z, y, x
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.3, 0.9, 2.7))
    img.SetOrigin((-31.5, 12.25, 40.0))
    img.SetDirection(sitk.VersorTransform((0.3, -0.4, 0.85), np.radians(33)).GetMatrix())
    return img


def _matrix(vtk_matrix) -> np.ndarray:
    return np.array([[vtk_matrix.GetElement(i, j) for j in range(4)] for i in range(4)])


def _ijk_to_ras(node) -> np.ndarray:
    vm = vtkMatrix4x4()
    node.GetIJKToRASMatrix(vm)
    return _matrix(vm)


def _from_parent(transform_node) -> np.ndarray:
    m = vtkMatrix4x4()
    transform_node.GetMatrixTransformFromParent(m)
    return _matrix(m)


def _to_world(node, ras_local) -> np.ndarray:
    """A point in a node's own RAS frame, through its parent transforms, in world RAS."""
    m = vtkMatrix4x4()
    parent = node.GetParentTransformNode()
    if parent is not None:
        parent.GetMatrixTransformToWorld(m)
    return (_matrix(m) @ np.append(ras_local, 1.0))[:3]


def _assert_same_geometry(a: sitk.Image, b: sitk.Image, atol: float = 1e-5) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=atol)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=atol)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=atol)


def _table_rows(node) -> list[tuple]:
    t = node.GetTable()
    cols = [t.GetColumnName(j) for j in range(t.GetNumberOfColumns())]
    return cols, [tuple(t.GetValue(i, j).ToString() for j in range(len(cols))) for i in range(t.GetNumberOfRows())]


def _parse_version(text: str) -> tuple:
    """MRML's own parser of a scene file's version label."""
    from vtkmodules.vtkCommonCore import reference

    parts = [reference(""), reference(0), reference(0), reference(0), reference(0)]
    assert slicer.vtkMRMLScene.ParseVersion(text, *parts), text
    return tuple(p.get() if hasattr(p, "get") else p for p in parts)


def _by_name(scene, name: str):
    node = scene.GetFirstNodeByName(name)
    assert node is not None, f"no node named {name!r}"
    return node


# --------------------------------------------------------------------------- volumes, studies


def test_node_round_trip_keeps_oblique_geometry_and_voxels():
    """image -> node -> image is exact on an oblique anisotropic grid, and the node's IJK->RAS
    puts each voxel at the image's LPS point with x and y negated."""
    scene = new_scene()
    img = _oblique_image()
    node = image_to_node(scene, img, "oblique")
    back = node_to_image(node)
    _assert_same_geometry(back, img, atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayViewFromImage(img))
    m = _ijk_to_ras(node)
    for idx in [(0, 0, 0), (12, 0, 8), (3, 10, 2)]:
        lps = np.array(img.TransformIndexToPhysicalPoint(idx))
        np.testing.assert_allclose((m @ [*idx, 1.0])[:3], lps * [-1, -1, 1], atol=1e-9)
    # node -> Study -> node: the core's view of a node converts back to the same node
    study = study_from_nodes({"CT1": node}, "oblique")
    again = image_to_node(scene, study.images["CT1"], "again")
    np.testing.assert_allclose(_ijk_to_ras(again), m, atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(node_to_image(again)), sitk.GetArrayViewFromImage(img))
    # shared voxels give the same node without a copy
    shared = image_to_node(scene, img, "shared", share=True)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(node_to_image(shared)), sitk.GetArrayViewFromImage(img))


def test_node_geometry_agrees_with_slicer_file_io(tmp_path):
    """Slicer's own storage nodes are the judge of the RAS/LPS conversion: a node written by
    export_study_nodes reads back with the core's reader as the same image, and that file loaded
    by a Slicer storage node has the same IJK->RAS as the node built in memory."""
    scene = new_scene()
    img = _oblique_image(1)
    node = image_to_node(scene, img, "oblique CT1")
    files = export_study_nodes({"CT1": node, "T1": None}, tmp_path / "exported")
    assert list(files) == ["CT1"] and files["CT1"] == tmp_path / "exported" / "CT1.nii.gz"
    assert [p.name for p in (tmp_path / "exported").iterdir()] == ["CT1.nii.gz"]  # no temporary left
    again = read_image(files["CT1"])
    _assert_same_geometry(again, img, atol=1e-4)
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(again), sitk.GetArrayViewFromImage(img), atol=1e-5)
    loaded = load_volume(scene, files["CT1"], "from file")
    np.testing.assert_allclose(_ijk_to_ras(loaded), _ijk_to_ras(node), atol=1e-4)
    assert node.GetStorageNode() is None  # exporting did not re-point the node


def test_load_study_nodes_and_study_from_nodes(case_pair):
    """Volume nodes named '<study> <modality>' from the files predict would read; the Study made
    from them equals read_study's (voxels and LPS geometry), with the files recorded."""
    scene = new_scene()
    nodes = load_study_nodes(scene, case_pair.baseline, MODALITIES, "baseline")
    assert list(nodes) == list(MODALITIES)
    assert [n.GetName() for n in nodes.values()] == [f"baseline {m}" for m in MODALITIES]
    study = study_from_nodes(nodes, "baseline")
    truth = read_study(case_pair.baseline)
    assert isinstance(study, Study) and study.folder == Path("baseline")
    for m in MODALITIES:
        _assert_same_geometry(study.images[m], truth.images[m], atol=1e-4)
        np.testing.assert_allclose(sitk.GetArrayViewFromImage(study.images[m]),
                                   sitk.GetArrayViewFromImage(truth.images[m]), atol=1e-4)
        assert study.files[m].resolve() == modality_file(case_pair.baseline, m).resolve()


def test_study_nodes_refuse_bad_input(tmp_path, case_pair):
    """Missing modality file: error naming the folder; a constant or NaN node: error naming it."""
    scene = new_scene()
    empty = tmp_path / "empty-study"
    empty.mkdir()
    with pytest.raises(RANOInputError, match="empty-study.*missing modality CT1"):
        load_study_nodes(scene, empty, ("CT1",), "baseline")
    assert load_study_nodes(scene, empty, ("CT1",), "baseline", missing_ok=True) == {}
    flat = sitk.Image(8, 8, 8, sitk.sitkFloat32) + 3.0
    with pytest.raises(RANOInputError, match="flat CT1.*empty image"):
        study_from_nodes({"CT1": image_to_node(scene, flat, "flat CT1")}, "flat")
    nan = sitk.GetArrayFromImage(_oblique_image())
    nan[2, 3, 4] = np.nan
    with pytest.raises(RANOInputError, match="nan-node.*1 NaN"):
        study_from_nodes({"T1": image_to_node(scene, sitk.GetImageFromArray(nan), "nan-node")}, "x")


# --------------------------------------------------------------------------------- transform


@pytest.mark.parametrize("source", ["memory", "tfm"])
def test_transform_node_puts_followup_on_baseline_anatomy(source, known_motion, tmp_path):
    """With the follow-up under the registration's transform node, a follow-up voxel's world
    RAS position is the baseline position of the same anatomy (known motion, to 1e-6 mm), and the
    baseline intensity there matches the follow-up voxel."""
    scene = new_scene()
    registration = known_motion.transform.GetInverse()  # baseline point -> follow-up point
    if source == "tfm":
        path = tmp_path / "followup_to_baseline.tfm"
        sitk.WriteTransform(registration, str(path))
        tnode = add_transform_node(scene, path, "reg")
        np.testing.assert_allclose(_from_parent(tnode),
                                   transform_to_ras_matrix(registration), atol=1e-9)
    else:
        tnode = add_transform_node(scene, registration, "reg")
    base_t1, fu_t1 = known_motion.baseline.images["T1"], known_motion.followup.images["T1"]
    fu_node = image_to_node(scene, fu_t1, "follow-up T1")
    fu_node.SetAndObserveTransformNodeID(tnode.GetID())
    arr = sitk.GetArrayViewFromImage(fu_t1)
    idx = np.argwhere(arr > 0.4 * arr.max())[::97][:60]  # (z, y, x) inside the brain
    m = _ijk_to_ras(fu_node)
    errors, pairs = [], []
    for k, j, i in idx:
        world = _to_world(fu_node, (m @ [i, j, k, 1.0])[:3])
        fu_point = np.array(fu_t1.TransformIndexToPhysicalPoint((int(i), int(j), int(k))))
        same_anatomy = np.array(known_motion.transform.TransformPoint(fu_point.tolist()))  # baseline LPS
        errors.append(np.linalg.norm(np.array(ras_to_lps(world)) - same_anatomy))
        cont = base_t1.TransformPhysicalPointToContinuousIndex(ras_to_lps(world))
        if all(0 <= c <= s - 1 for c, s in zip(cont, base_t1.GetSize())):
            pairs.append((arr[k, j, i], sitk.Resample(base_t1, [1, 1, 1], sitk.Transform(), sitk.sitkLinear,
                                                      ras_to_lps(world), (1, 1, 1)).GetPixel(0, 0, 0)))
    assert max(errors) < 1e-6
    fu_vals, base_vals = np.array(pairs).T
    assert len(pairs) > 30 and np.corrcoef(fu_vals, base_vals)[0, 1] > 0.9
    # without the transform the same voxels land elsewhere (the test has teeth)
    fu_node.SetAndObserveTransformNodeID(None)
    k, j, i = idx[0]
    assert np.linalg.norm(_to_world(fu_node, (m @ [i, j, k, 1.0])[:3]) - lps_to_ras(
        known_motion.transform.TransformPoint(fu_t1.TransformIndexToPhysicalPoint((int(i), int(j), int(k)))))) > 5


def test_harden_keeps_world_positions(known_motion):
    """Hardening moves the transform into the volume geometry: same world position, no parent."""
    scene = new_scene()
    tnode = add_transform_node(scene, known_motion.transform.GetInverse(), "reg")
    node = image_to_node(scene, known_motion.followup.images["T1"], "follow-up T1")
    node.SetAndObserveTransformNodeID(tnode.GetID())
    before = _to_world(node, (_ijk_to_ras(node) @ [5, 7, 9, 1.0])[:3])
    assert harden(scene, node)
    assert node.GetParentTransformNode() is None
    np.testing.assert_allclose((_ijk_to_ras(node) @ [5, 7, 9, 1.0])[:3], before, atol=1e-6)


def test_transform_refuses_non_linear_and_missing(tmp_path):
    scene = new_scene()
    field = sitk.DisplacementFieldTransform(3)
    disp = sitk.Image([8, 8, 8], sitk.sitkVectorFloat64, 3)
    arr = sitk.GetArrayFromImage(disp)
    arr[..., 0] = np.linspace(0, 5, 8)[None, None, :] ** 2
    disp = sitk.GetImageFromArray(arr, isVector=True)
    field.SetDisplacementField(disp)
    with pytest.raises(RANOInputError, match="not a linear transform"):
        add_transform_node(scene, field, "bad")
    with pytest.raises(RANOInputError, match="absent.tfm"):
        add_transform_node(scene, tmp_path / "absent.tfm", "bad")


# --------------------------------------------------------------------------------------- ROI


def _spec(size=(24, 28, 20), spacing=(4.0, 4.0, 4.0)) -> InputSpec:
    mods = ("CT1", "T1", "T2", "FLAIR")
    return InputSpec(mods, tuple(default_channels(mods)), spacing, size)


def test_fit_roi_is_the_model_grid(known_motion):
    """The ROI's centre is the model grid's centre in RAS and its size the model's field of view,
    whether fitted on the reference node, the Study or the image."""
    scene = new_scene()
    spec = _spec()
    ref = known_motion.baseline.images["CT1"]
    grid = model_grid(ref, spec.spacing, spec.size)
    node = image_to_node(scene, ref, "baseline CT1")
    for reference in (node, known_motion.baseline, ref):
        roi = fit_roi(scene, reference, spec, "crop")
        np.testing.assert_allclose(roi_center(roi), lps_to_ras(grid_center(grid)), atol=1e-6)
        np.testing.assert_allclose(roi.GetSize(), (96.0, 112.0, 80.0), atol=1e-9)
    assert not roi.GetDisplayNode().GetScaleHandleVisibility()  # size is the model's, fixed


def test_moving_the_roi_moves_the_crop(known_motion):
    """roi_center of a moved ROI, given to prepare_pair (RAS -> LPS), centres the crop there:
    the grid moves by the ROI's motion and the network input changes."""
    scene = new_scene()
    spec = _spec()
    base, fu, t = known_motion.baseline, known_motion.followup, known_motion.transform
    roi = fit_roi(scene, base, spec, "crop")
    default = prepare_pair(base, fu, t, spec)
    at_roi = prepare_pair(base, fu, t, spec, center=ras_to_lps(roi_center(roi)))
    np.testing.assert_allclose(at_roi.grid.GetOrigin(), default.grid.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(at_roi.array, default.array, atol=1e-6)
    c = np.array(roi_center(roi))
    roi.SetCenter(*(c + (16.0, -8.0, 12.0)))  # a user drags it: 16 mm right, 8 posterior, 12 up
    moved = prepare_pair(base, fu, t, spec, center=ras_to_lps(roi_center(roi)))
    np.testing.assert_allclose(np.array(moved.grid.GetOrigin()) - default.grid.GetOrigin(), (-16.0, 8.0, 12.0),
                               atol=1e-6)
    assert np.abs(moved.array - default.array).max() > 1.0


def test_roi_centre_is_in_world_coordinates():
    """An ROI under a transform reports its world centre (where the crop must be)."""
    scene = new_scene()
    roi = fit_roi(scene, _oblique_image(), _spec(size=(4, 4, 4)), "crop", center_ras=(10.0, 20.0, 30.0))
    np.testing.assert_allclose(roi_center(roi), (10.0, 20.0, 30.0), atol=1e-9)
    # an ITK (resampling) translation of -5 mm along LPS x = +5 mm R from parent: the ROI moves 5 mm left
    shift = sitk.TranslationTransform(3, (-5.0, 0.0, 0.0))
    roi.SetAndObserveTransformNodeID(add_transform_node(scene, shift, "t").GetID())
    np.testing.assert_allclose(roi_center(roi), (5.0, 20.0, 30.0), atol=1e-9)


# ------------------------------------------------------------------------ maps, views, table


@pytest.mark.parametrize("kind,cmap", [("gradcam", "inferno"), ("saliency", "viridis")])
def test_map_node_styling(kind, cmap, tmp_path):
    """Heat colours from the kind's colour table (transparent low end), range 0..1, values under
    the threshold hidden; the same from a file."""
    scene = new_scene()
    img = _oblique_image()
    img = sitk.RescaleIntensity(img, 0.0, 1.0)
    for source in (img, tmp_path / f"{kind}.nii.gz"):
        if isinstance(source, Path):
            sitk.WriteImage(img, str(source))
        node = add_map_node(scene, source, f"map {kind}", kind)
        d = node.GetDisplayNode()
        colors = scene.GetNodeByID(d.GetColorNodeID())
        assert colors.GetName().endswith(f"({cmap})") and colors.GetNumberOfColors() == 256
        lut = colors.GetLookupTable()
        assert lut.GetTableValue(0)[3] == 0.0 and lut.GetTableValue(255)[3] == 1.0
        assert not d.GetAutoWindowLevel() and (d.GetWindowLevelMin(), d.GetWindowLevelMax()) == (0.0, 1.0)
        assert d.GetApplyThreshold() and d.GetLowerThreshold() == pytest.approx(MAP_THRESHOLD)
        assert node.GetAttribute("RANOResponse.map") == kind
    assert len([n for n in _all(scene, "vtkMRMLColorTableNode") if cmap in n.GetName()]) == 1  # built once
    with pytest.raises(ValueError):
        add_map_node(scene, img, "x", "heat")


def _all(scene, cls: str) -> list:
    c = scene.GetNodesByClass(cls)
    return [c.GetItemAsObject(i) for i in range(c.GetNumberOfItems())]


def test_show_overlay_sets_every_view():
    """A bare scene gets Red/Yellow/Green axial/sagittal/coronal views; each composite shows the
    map over the anatomy at the opacity; a second call reuses them."""
    scene = new_scene()
    bg = image_to_node(scene, _oblique_image(), "anatomy")
    fg = add_map_node(scene, sitk.RescaleIntensity(_oblique_image(2), 0, 1), "map", "gradcam")
    composites = show_overlay(scene, bg, fg, opacity=0.35)
    views = {n.GetLayoutName(): n.GetOrientation() for n in _all(scene, "vtkMRMLSliceNode")}
    assert views == {"Red": "Axial", "Yellow": "Sagittal", "Green": "Coronal"}
    assert sorted(c.GetLayoutName() for c in composites) == ["Green", "Red", "Yellow"]
    for c in composites:
        assert (c.GetBackgroundVolumeID(), c.GetForegroundVolumeID()) == (bg.GetID(), fg.GetID())
        assert c.GetForegroundOpacity() == pytest.approx(0.35)
    show_overlay(scene, bg, None)
    assert len(_all(scene, "vtkMRMLSliceCompositeNode")) == 3
    assert all(c.GetForegroundVolumeID() is None for c in _all(scene, "vtkMRMLSliceCompositeNode"))


SUMMARY = {"label": "PD", "probabilities": {"CR": 0.1, "PR": 0.2, "SD": 0.3, "PD": 0.4},
           "ensemble_spread": {"CR": 0.01, "PR": 0.02, "SD": 0.03, "PD": 0.04},
           "maps_explain": "PD", "bundle": {"id": "bundle-x"}, "rano_response_version": "9.9"}


def test_results_table():
    scene = new_scene()
    node = add_results_table(scene, SUMMARY, "results")
    cols, rows = _table_rows(node)
    assert cols == ["Class", "Probability", "Ensemble spread", "Predicted", "Model"]
    assert [r[0] for r in rows] == ["CR", "PR", "SD", "PD"]
    assert {r[4] for r in rows} == {"bundle-x"}  # the model id is visible in the table view
    assert [float(r[1]) for r in rows] == [0.1, 0.2, 0.3, 0.4]
    assert [float(r[2]) for r in rows] == [0.01, 0.02, 0.03, 0.04]
    assert [r[3] for r in rows] == ["", "", "", "yes"]
    assert node.GetAttribute("RANOResponse.label") == "PD"
    assert node.GetAttribute("RANOResponse.bundle") == "bundle-x"
    assert "not for clinical use" in node.GetDescription()


# -------------------------------------------------------------------------- whole predictions


@pytest.fixture(scope="module")
def predicted(tmp_path_factory, case_pair, tiny_bundle):
    """One run_predict (tiny bundle, 4 mm phantom pair) and its output folder."""
    out = tmp_path_factory.mktemp("scene-predict") / "case"
    result, files = run_predict(case_pair.baseline, case_pair.followup, out, bundle=tiny_bundle, device="cpu",
                                writers=output_writers(), segmentation=False)  # segmentations: test_tumour_scene
    summary = json.loads((out / "prediction.json").read_text())
    return SimpleNamespace(out=out, result=result, files=files, summary=summary)


def _check_prediction_nodes(scene, nodes, summary, out: Path) -> None:
    """What a prediction must have put into a scene, node by node."""
    base = {m: scene.GetNodeByID(i) for m, i in nodes.baseline.items()}
    fu = {m: scene.GetNodeByID(i) for m, i in nodes.followup.items()}
    tnode = scene.GetNodeByID(nodes.transform)
    assert set(base) == set(fu) == set(MODALITIES)
    assert all(n.GetTransformNodeID() is None for n in base.values())
    assert all(n.GetTransformNodeID() == tnode.GetID() for n in fu.values())
    reg = sitk.ReadTransform(str(out / "followup_to_baseline.tfm"))
    np.testing.assert_allclose(_from_parent(tnode), transform_to_ras_matrix(reg),
                               atol=1e-6)
    roi = scene.GetNodeByID(nodes.roi)
    np.testing.assert_allclose(roi_center(roi), summary["model_grid"]["center_ras"], atol=1e-3)
    np.testing.assert_allclose(roi.GetSize(), summary["model_grid"]["fov_mm"], atol=1e-6)
    for kind, cmap in (("gradcam", "inferno"), ("saliency", "viridis")):
        node = scene.GetNodeByID(getattr(nodes, kind))
        truth = sitk.ReadImage(str(out / f"{kind}.nii.gz"))
        np.testing.assert_allclose(sitk.GetArrayFromImage(node_to_image(node)),
                                   sitk.GetArrayViewFromImage(truth), atol=1e-6)
        d = node.GetDisplayNode()
        assert cmap in scene.GetNodeByID(d.GetColorNodeID()).GetName() and d.GetApplyThreshold()
    composites = _all(scene, "vtkMRMLSliceCompositeNode")
    assert {c.GetLayoutName() for c in composites} >= {"Red", "Yellow", "Green"}
    for c in composites:
        assert c.GetBackgroundVolumeID() == base["CT1"].GetID()
        assert c.GetForegroundVolumeID() == nodes.gradcam
        assert 0 < c.GetForegroundOpacity() < 1
    cols, rows = _table_rows(scene.GetNodeByID(nodes.table))
    # a saved table (.tsv) keeps 6 significant digits; prediction.json has them all
    assert {r[0]: float(r[1]) for r in rows} == pytest.approx(summary["probabilities"], abs=1e-6)
    assert {r[0]: float(r[2]) for r in rows} == pytest.approx(summary["ensemble_spread"], abs=1e-6)
    assert [r[0] for r in rows if r[3] == "yes"] == [summary["label"]]
    table = scene.GetNodeByID(nodes.table)
    assert table.GetAttribute("RANOResponse.label") == summary["label"]
    assert table.GetAttribute("RANOResponse.bundle") == summary["bundle"]["id"]


@pytest.mark.slow
def test_predict_writes_a_scene_that_reads_back(predicted, case_pair):
    """``predict``'s scene/RANOResponse.mrml, read into a fresh scene: both studies by name (the
    follow-up under the transform), the transform, the ROI, both maps with their colours, the
    composite nodes showing Grad-CAM over baseline CT1, and the table equal to prediction.json."""
    path = predicted.out / SCENE_FILE
    assert predicted.summary["outputs"]["scene"] == SCENE_FILE
    scene = read_scene(path)
    names = [f"{s} {m}" for s in ("baseline", "follow-up") for m in MODALITIES]
    vols = {n: _by_name(scene, n) for n in names}
    for n, node in vols.items():
        folder = case_pair.baseline if n.startswith("baseline") else case_pair.followup
        truth = read_image(modality_file(folder, n.split()[1]))
        assert node.GetImageData().GetDimensions() == truth.GetSize(), n
    from RANOResponseLib.mrml.scene import SceneNodes

    nodes = SceneNodes(
        baseline={m: vols[f"baseline {m}"].GetID() for m in MODALITIES},
        followup={m: vols[f"follow-up {m}"].GetID() for m in MODALITIES},
        transform=_by_name(scene, "RANO follow-up to baseline").GetID(),
        table=_by_name(scene, "RANO results").GetID(), roi=_by_name(scene, "RANO crop region").GetID(),
        gradcam=_by_name(scene, "RANO Grad-CAM").GetID(), saliency=_by_name(scene, "RANO Saliency").GetID())
    _check_prediction_nodes(scene, nodes, predicted.summary, predicted.out)
    # data files are referred to by relative names: the outputs beside the scene folder, no copies
    root = ET.parse(path).getroot()
    files = {e.get("fileName") for e in root if e.get("fileName")}
    assert {"../gradcam.nii.gz", "../saliency.nii.gz", "../followup_to_baseline.tfm"} <= files
    # labelled as Slicer labels its scenes (no "saved with another application" warning on loading)
    app, major, minor, _, _ = _parse_version(root.get("version"))
    assert app == "Slicer" and (major, minor) >= (5, 0)
    assert not any(Path(f).is_absolute() for f in files)
    assert not any(p.suffix == ".gz" for p in path.parent.iterdir())


@pytest.mark.slow
def test_load_outputs_equals_populate_scene(predicted, case_pair):
    """The Slicer path (load_outputs over the user's nodes) and the in-memory path (populate_scene)
    put the same prediction into a scene; a second run on the same case updates its nodes."""
    scene = new_scene()
    base = load_study_nodes(scene, case_pair.baseline, MODALITIES, "baseline")
    fu = load_study_nodes(scene, case_pair.followup, MODALITIES, "followup")
    nodes = load_outputs(scene, predicted.out, baseline_nodes={**base, "extra": None}, followup_nodes=fu)
    assert nodes.baseline == {m: n.GetID() for m, n in base.items()}
    assert nodes.followup == {m: n.GetID() for m, n in fu.items()}
    assert nodes.summary["label"] == predicted.summary["label"]
    _check_prediction_nodes(scene, nodes, predicted.summary, predicted.out)
    count = scene.GetNumberOfNodes()
    again = load_outputs(scene, predicted.out, baseline_nodes=base, followup_nodes=fu)
    assert (again.gradcam, again.transform, again.table, again.roi) == (nodes.gradcam, nodes.transform,
                                                                        nodes.table, nodes.roi)
    assert scene.GetNumberOfNodes() == count

    memory = new_scene()
    populated = populate_scene(memory, predicted.result)
    _check_prediction_nodes(memory, populated, predicted.summary, predicted.out)

    studies = new_scene()  # without nodes: the studies come from prediction.json's inputs
    from_files = load_outputs(studies, predicted.out)
    assert _by_name(studies, "follow-up T2").GetID() == from_files.followup["T2"]
    _check_prediction_nodes(studies, from_files, predicted.summary, predicted.out)


def test_load_outputs_refuses_a_folder_without_prediction(tmp_path):
    with pytest.raises(RANOInputError, match="prediction.json: not found"):
        load_outputs(new_scene(), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".mrml", ".mrb"])
def test_write_scene_self_contained(suffix, predicted, tmp_path):
    """write_scene with copied data (.mrml + files, or one .mrb) reads back with the same nodes,
    independent of the original files."""
    scene = new_scene()
    nodes = populate_scene(scene, predicted.result)
    path = write_scene(scene, tmp_path / "saved" / f"case{suffix}")
    if suffix == ".mrml":
        written = {p.name for p in path.parent.iterdir()}
        assert {"RANO_Grad-CAM.nii.gz", "RANO_follow-up_to_baseline.tfm", "RANO_crop_region.mrk.json",
                "RANO_results.tsv", "baseline_CT1.nii.gz"} <= written, written
        files = {e.get("fileName") for e in ET.parse(path).getroot() if e.get("fileName")}
        assert all("/" not in f for f in files), files
    back = read_scene(path)
    ids = SimpleNamespace(**{k: _by_name(back, scene.GetNodeByID(getattr(nodes, k)).GetName()).GetID()
                             for k in ("transform", "table", "roi", "gradcam", "saliency")})
    from RANOResponseLib.mrml.scene import SceneNodes

    again = SceneNodes(baseline={m: _by_name(back, f"baseline {m}").GetID() for m in MODALITIES},
                       followup={m: _by_name(back, f"follow-up {m}").GetID() for m in MODALITIES}, **vars(ids))
    _check_prediction_nodes(back, again, predicted.summary, predicted.out)


def test_write_scene_refuses_other_suffix(tmp_path):
    with pytest.raises(RANOInputError, match="must end in .mrml or .mrb"):
        write_scene(new_scene(), tmp_path / "scene.txt")
