"""The automatic tumour segmentation in Slicer (RANOResponseLib.mrml.tumour_scene, scene.assemble,
the panel's logic) on the real MRML of slicer-core.

The label maps are the phantom's own DeepBraTumIA masks standing in for predict's segmentations
(conftest's ``automatic_prediction``: same labels, same grids, measured by predict's own code), so
every expected voxel count, segment and diameter comes from those files and from prediction.json,
not from the scene code under test.
Checked: a label map becomes a segmentation node with the three named, coloured segments and
comes back unchanged; the scene ``predict`` writes, read into a fresh scene, holds both
segmentation nodes (the follow-up's under the registration) and the diameter lines of the
measurable lesions with the table's lengths; the panel shows the network's class beside the
measured ones, flags a disagreement, and recomputes when a line moves.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import RANO_PD_RATIO, RANO_PR_RATIO, copy_study, modality_file
from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.names import LABEL_NAMES, MODALITIES
from RANOResponseLib.core.outputs import TRANSFORM_FILE
from RANOResponseLib.core.styles import TUMOUR_COLORS
from RANOResponseLib.imaging.geometry import lps_to_ras
from RANOResponseLib.mrml.logic import PanelLogic, export_result
from RANOResponseLib.mrml.panel_text import compare_classes, result_html
from RANOResponseLib.mrml.measurement_scene import find_diameter_lines, line_points
from RANOResponseLib.mrml.scene import image_to_node, load_outputs, new_scene, read_scene
from RANOResponseLib.mrml.tumour_scene import add_tumour_segmentation, segment_ids, tumour_labels
from RANOResponseLib.rano.measurement import PairMeasurement

MASK = Path("DeepBraTumIA-segmentation/native/segmentation/seg_mask.nii.gz")


def _mask(study: Path) -> sitk.Image:
    return sitk.ReadImage(str(study / MASK))


def _counts(image: sitk.Image) -> dict[int, int]:
    arr = sitk.GetArrayViewFromImage(image)
    return {v: int((arr == v).sum()) for v in LABEL_NAMES}


def _segment_voxels(node, reference) -> dict[int, int]:
    return _counts(tumour_labels(node, reference))


# ------------------------------------------------------------------------------ the node itself


def test_a_label_map_becomes_three_named_coloured_segments_and_comes_back(case_pair):
    mask = _mask(case_pair.followup)
    scene = new_scene()
    reference = image_to_node(scene, sitk.ReadImage(str(modality_file(case_pair.followup, "CT1"))), "CT1")
    node = add_tumour_segmentation(scene, case_pair.followup / MASK, "tumour", reference=reference)
    segmentation = node.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    assert names == ["enhancing", "necrotic / non-enhancing", "edema"]
    for value, segment_id in segment_ids(node).items():
        assert segmentation.GetSegment(segment_id).GetColor() == pytest.approx(TUMOUR_COLORS[value])
    truth = _counts(mask)
    assert all(truth[v] > 0 for v in LABEL_NAMES), "the phantom follow-up has all three labels"
    back = tumour_labels(node, reference)
    assert back.GetSize() == mask.GetSize()
    np.testing.assert_allclose(back.GetOrigin(), mask.GetOrigin(), atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(mask))
    # refilled in place: the same node, no second one
    add_tumour_segmentation(scene, mask, "tumour", node=node, reference=reference)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    assert segmentation.GetNumberOfSegments() == 3


def test_absent_labels_are_empty_segments_and_foreign_labels_are_refused():
    image = sitk.Image([12, 10, 8], sitk.sitkUInt8)
    image.SetSpacing((2.0, 2.0, 3.0))
    arr = np.zeros((8, 10, 12), np.uint8)
    arr[2:5, 3:6, 4:8] = 3  # edema only
    labels = sitk.GetImageFromArray(arr)
    labels.CopyInformation(image)
    scene = new_scene()
    node = add_tumour_segmentation(scene, labels, "edema only")
    assert node.GetSegmentation().GetNumberOfSegments() == 3
    assert _segment_voxels(node, None)[3] == int((arr == 3).sum())
    assert set(segment_ids(node)) == set(LABEL_NAMES)
    empty = add_tumour_segmentation(scene, sitk.Image(labels) * 0, "nothing")
    assert empty.GetSegmentation().GetNumberOfSegments() == 3
    arr[0, 0, 0] = 4
    foreign = sitk.GetImageFromArray(arr)
    with pytest.raises(RANOInputError, match=r"foreign: labels \[4\] are not tumour labels"):
        add_tumour_segmentation(scene, foreign, "foreign")


# --------------------------------------------------------------------------- predict's scene


@pytest.fixture
def automatic(automatic_prediction):
    return automatic_prediction


def _check_tumour_nodes(scene, out: Path, summary: dict, masks: dict, min_lines: int = 2) -> None:
    """Both segmentations over their studies (``masks``: timepoint -> the label map they must hold)
    and the lines of the measurable lesions of prediction.json's table, in ``scene``."""
    segmentations = {tp: scene.GetFirstNodeByName(name) for tp, name in
                     (("baseline", "RANO tumour baseline"), ("followup", "RANO tumour follow-up"))}
    assert all(n is not None and n.IsA("vtkMRMLSegmentationNode") for n in segmentations.values())
    base_ct1 = scene.GetFirstNodeByName("baseline CT1")
    fu_ct1 = scene.GetFirstNodeByName("follow-up CT1")
    transform = fu_ct1.GetTransformNodeID()
    assert transform is not None and base_ct1.GetTransformNodeID() is None
    assert segmentations["followup"].GetTransformNodeID() == transform
    assert segmentations["baseline"].GetTransformNodeID() is None
    for tp, reference in (("baseline", base_ct1), ("followup", fu_ct1)):
        assert _segment_voxels(segmentations[tp], reference) == _counts(masks[tp]), tp

    table = [r for r in summary["measured"]["lesions"] if r["measurable"] == "yes"]
    lines = find_diameter_lines(scene)
    assert len(table) >= min_lines, "the phantom pair has measurable lesions"
    assert sorted((ln.timepoint, f"L{ln.lesion_id}") for ln in lines) == sorted(
        ("followup" if r["timepoint"] == "follow-up" else "baseline", r["lesion"]) for r in table)
    for ln in lines:
        row = next(r for r in table if r["lesion"] == f"L{ln.lesion_id}"
                   and r["timepoint"] == ("follow-up" if ln.timepoint == "followup" else "baseline"))
        assert ln.lengths() == pytest.approx((row["d1_mm"], row["d2_mm"]), abs=1e-3)
        assert ln.long.GetTransformNodeID() == (transform if ln.timepoint == "followup" else None)
    # a follow-up line lies on the baseline anatomy in world coordinates: its endpoint is the
    # follow-up point brought back through the inverse of predict's registration file
    registration = sitk.ReadTransform(str(out / TRANSFORM_FILE))
    fu = next(ln for ln in lines if ln.timepoint == "followup")
    lesion = PairMeasurement.from_dict(summary["measured"]["measurements"]).followup.lesion(fu.lesion_id)
    world = [0.0, 0.0, 0.0]
    fu.long.GetNthControlPointPositionWorld(0, world)
    expected = lps_to_ras(registration.GetInverse().TransformPoint(lesion.d1_points[0]))
    np.testing.assert_allclose(world, expected, atol=1e-3)


@pytest.mark.slow
def test_the_scene_predict_writes_holds_both_segmentations_and_the_diameter_lines(automatic, case_pair, tmp_path):
    """The check of the issue: predict's scene writer, its .mrml read into a fresh scene."""
    from RANOResponseLib.mrml.outputs import scene_writer

    out = tmp_path / "prediction"
    shutil.copytree(automatic.out, out)
    files = {k: out / p.relative_to(automatic.out) for k, p in automatic.files.items()}
    written = scene_writer(pictures=False)(automatic.result, out, files)
    scene = read_scene(written["scene"])
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 3  # the brain mask and both tumours
    _check_tumour_nodes(scene, automatic.out, automatic.summary, automatic.masks)


@pytest.mark.slow
def test_loaded_outputs_hold_them_too_and_export_writes_them_back(automatic, case_pair, tmp_path):
    """The module's path (load_outputs after the child's predict) gives the same nodes, held in
    memory; export_result (what the report is built from) writes the label maps as they are."""
    scene = new_scene()
    nodes = load_outputs(scene, automatic.out)
    assert set(nodes.segmentations) == {"baseline", "followup"}
    for node_id in nodes.segmentations.values():
        assert scene.GetNodeByID(node_id).GetStorageNode() is None
    _check_tumour_nodes(scene, automatic.out, automatic.summary, automatic.masks)
    folder = export_result(scene, nodes, tmp_path / "exported")
    written = json.loads((folder / "prediction.json").read_text())["outputs"]
    for tp, mask in automatic.masks.items():
        back = sitk.ReadImage(str(folder / written[f"segmentation_{tp}"]))
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(mask))


@pytest.mark.slow
def test_predict_with_the_shipped_segmentation_writes_both_nodes_and_the_lines(seg_cohort, tiny_bundle, tmp_path):
    """The issue's check end to end: ``predict`` with the shipped segmentation bundle on a 2 mm
    phantom pair; its scene, read into a fresh scene, holds both segmentations exactly as the
    segmentation files predict wrote and a line pair per measurable lesion of its table."""
    from RANOResponseLib.core.outputs import SCENE_FILE, SEGMENTATION_FILES
    from RANOResponseLib.inference.pipeline import run_predict
    from RANOResponseLib.mrml.outputs import output_writers

    rated = seg_cohort.truth[seg_cohort.truth["role"] == "follow-up"]["date"].tolist()
    pair = seg_cohort.pair(rated[0])
    out = tmp_path / "prediction"
    run_predict(pair.baseline, pair.followup, out, bundle=tiny_bundle, device="cpu", writers=output_writers(False))
    summary = json.loads((out / "prediction.json").read_text())
    assert summary["measured"]["source"] == "automatic"
    masks = {tp: sitk.ReadImage(str(out / name)) for tp, name in SEGMENTATION_FILES.items()}
    _check_tumour_nodes(read_scene(out / SCENE_FILE), out, summary, masks, min_lines=1)


# ------------------------------------------------------------------------------------ the panel


def _panel(automatic, scene=None) -> tuple[PanelLogic, SimpleNamespace]:
    logic = PanelLogic(scene or new_scene())
    p = SimpleNamespace(transform=None, table=None, gradcam=None, saliency=None, roi=None, mapName="Grad-CAM",
                        opacity=0.4, **{f"baseline{m}": None for m in MODALITIES})
    nodes = load_outputs(logic.scene, automatic.out)
    p.baselineCT1 = logic.scene.GetNodeByID(nodes.baseline["CT1"])
    logic.show_prediction(p, nodes, {"baseline": Path("b"), "followup": Path("f")})
    return logic, p


@pytest.mark.slow
@pytest.mark.parametrize("network", ["PD", "SD"])
def test_the_results_panel_puts_the_network_beside_the_measurement(automatic, network):
    """Measured classes from prediction.json's block; a network class that differs is flagged in red."""
    summary = dict(automatic.summary, label=network)
    measured = summary["measured"]
    comparison = compare_classes(summary)
    assert (comparison.network, comparison.rano, comparison.rano2) == (network, measured["category"],
                                                                       measured["category_rano2"])
    assert comparison.source == "automatic segmentation, bundle phantom-masks"
    html = result_html(summary, comparison)
    disagree = network != measured["category"] or network != measured["category_rano2"]
    assert ("DISAGREEMENT" in html) is disagree and ("#b00000" in html) is disagree
    assert f"<b>{measured['category']}</b>" in html and "automatic segmentation, bundle phantom-masks" in html
    # the tiny bundle has neither calibration nor a suggestion model (prediction.json says so)
    p = summary["probabilities"][network]
    assert html.startswith(f"<b>Network: {network} (probability {p:.2f}, not calibrated)</b>")
    assert "<b>Suggested: none (the bundle has no suggestion model)</b>" in html and "UNCERTAIN" not in html


@pytest.mark.slow
def test_the_results_panel_shows_the_suggestion_and_the_uncertain_flag_of_prediction_json(automatic, tmp_path):
    """A predict folder whose prediction.json holds calibrated probabilities flagged uncertain and
    a suggestion: the panel (read from the folder) shows all three opinions."""
    out = tmp_path / "prediction"
    shutil.copytree(automatic.out, out)
    summary = json.loads((out / "prediction.json").read_text())
    summary.update(calibrated=True, uncertain={"flag": True, "why": "top probability 0.30 (PD) is below 0.60"},
                   suggested={"category": "PR", "probabilities": {"CR": 0.1, "PR": 0.6, "SD": 0.2, "PD": 0.1},
                              "used": ["network probabilities (calibrated)", "measured RANO category (PD, automatic)"],
                              "model": {}})
    (out / "prediction.json").write_text(json.dumps(summary))
    logic, _ = _panel(SimpleNamespace(out=out))
    text = logic.result_text()
    label = summary["label"]
    assert f"<b>Network: {label} (probability {summary['probabilities'][label]:.2f}, calibrated)</b>" in text
    assert "<b>UNCERTAIN: top probability 0.30 (PD) is below 0.60</b>" in text
    assert ("<b>Suggested: PR (network + measured RANO)</b><br>a suggestion (probability 0.60): the reader decides"
            in text)
    assert text.index("Measured RANO 2.0") < text.index("Suggested: PR")
    logic.clear_case()


@pytest.mark.slow
def test_moving_a_diameter_line_recomputes_the_measured_class(automatic, case_pair):
    """Shrinking the follow-up lesion's lines below half the baseline sum turns the phantom's
    growth (PD) into a partial response (RANO's -50 % threshold, written out in conftest)."""
    intended = automatic.summary["measured"]["category"]
    assert intended == "PD"  # the conftest pair simulates growth
    logic, _ = _panel(automatic)
    calls = []
    logic.on_change = lambda: calls.append(logic.result_text())
    before = logic.result_text()
    assert "Measured RANO" in before and f"<b>{intended}</b>" in before
    baseline_spd = sum(r["product_mm2"] for r in automatic.summary["measured"]["lesions"]
                       if r["timepoint"] == "baseline" and r["measurable"] == "yes")
    fu_lines = [ln for ln in find_diameter_lines(logic.scene, "followup")]
    assert len(fu_lines) == 1, "one measurable follow-up lesion in the phantom pair"
    target = 0.8 * RANO_PR_RATIO * baseline_spd  # a product below half the baseline sum
    d1, d2 = fu_lines[0].lengths()
    scale = float(np.sqrt(target / (d1 * d2)))
    assert min(d1, d2) * scale >= 10.0, "both diameters stay measurable"
    for line in (fu_lines[0].long, fu_lines[0].perpendicular):
        a, b = line_points(line)
        mid = (a + b) / 2
        line.SetNthControlPointPosition(0, *(mid + scale * (a - mid)))
        line.SetNthControlPointPosition(1, *(mid + scale * (b - mid)))
    assert calls, "moving a line did not call the panel back"
    comparison = compare_classes(logic.result.nodes.summary, logic.assessment)
    ratio = logic.assessment.pair.followup.spd_mm2 / baseline_spd
    assert ratio == pytest.approx(0.8 * RANO_PR_RATIO, rel=0.02) and ratio < RANO_PD_RATIO
    assert comparison.rano == "PR"
    moved = f"follow-up L{fu_lines[0].lesion_id}"
    assert comparison.edited == [moved]
    assert "PR" in calls[-1] and f"Diameters moved by the reader: {moved}" in calls[-1]
    logic.clear_case()
    for cls in ("vtkMRMLSegmentationNode", "vtkMRMLMarkupsLineNode"):
        assert logic.scene.GetNumberOfNodesByClass(cls) == 0, cls


@pytest.mark.slow
def test_the_review_panel_and_its_report_use_the_automatic_measurement_without_a_manual_mask(
        automatic, case_pair, tmp_path, monkeypatch):
    """No manual mask next to the studies: Measure and the report take predict's segmentations
    (as the scene shows them) and say so; before a prediction there is nothing to measure."""
    from RANOResponseLib.review import report

    folders = {tp: copy_study(study, tmp_path / "Patient-001" / study.name)
               for tp, study in (("baseline", case_pair.baseline), ("followup", case_pair.followup))}
    worklist = tmp_path / "worklist.csv"
    worklist.write_text(f"case_id,baseline,followup\ncase-1,{folders['baseline']},{folders['followup']}\n")
    logic = PanelLogic(new_scene())
    logic.open_review(worklist, tmp_path / "review.sqlite", "dr-a")
    with pytest.raises(RANOInputError, match="no automatic segmentation: run Apply"):
        logic.measure_case()
    p = SimpleNamespace(transform=None, table=None, gradcam=None, saliency=None, roi=None, mapName="Grad-CAM",
                        opacity=0.4, reviewDatabase=tmp_path / "review.sqlite",
                        **{f"{r}{m}": None for r in ("baseline", "followup") for m in MODALITIES})
    logic.show_prediction(p, load_outputs(logic.scene, automatic.out), folders)
    html = logic.measure_case()
    measured = automatic.summary["measured"]
    assert "Measured from automatic segmentation, bundle phantom-masks." in html
    assert logic.assessment.rule.category == measured["category"]
    assert len(logic.assessment.lines) == sum(r["measurable"] == "yes" for r in measured["lesions"])
    seen = {}
    render = report.render_report

    def spy(inputs, out, png_prefix=None):
        seen["inputs"] = inputs
        return render(inputs, out, png_prefix)

    monkeypatch.setattr(report, "render_report", spy)
    pdf = logic.write_report(p, tmp_path / "case.pdf")
    assert pdf.read_bytes()[:5] == b"%PDF-"
    assert seen["inputs"].measured_from == "automatic segmentation, bundle phantom-masks"
    assert seen["inputs"].rule.category == measured["category"]
