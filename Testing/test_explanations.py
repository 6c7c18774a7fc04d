"""Explanation measures (issue 12): synthetic maps whose energy and peak are placed by hand
against a tumour region, the follow-up's labels mapped onto the baseline grid through a known
translation, and evaluate's aggregation."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from RANOResponseLib.inference.explanations import explain_result, measure_map, measure_maps, region_on_baseline
from ResponseTrainingLib.analysis.evaluate import explanation_summary


def _image(array: np.ndarray, spacing=2.0, origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing([spacing] * 3)
    img.SetOrigin(origin)
    return img


def _box(shape, lo, hi, value=1, dtype=np.uint8) -> np.ndarray:
    a = np.zeros(shape, dtype=dtype)
    a[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = value
    return a


SHAPE = (20, 20, 20)


def test_energy_share_and_pointing_game_on_a_hand_placed_map():
    region = _image(_box(SHAPE, (5, 5, 5), (10, 10, 10)))  # 125 voxels
    a = np.zeros(SHAPE, np.float32)
    a[5:10, 5:10, 5:10] = 0.7 / 125  # 70 % of the energy inside...
    a[15, 15, 15] = 0.3  # ...and 30 % in one voxel outside, which is the peak
    m = measure_map(_image(a), region)
    assert m["energy_inside"] == pytest.approx(0.7, rel=1e-6) and m["peak_inside"] is False
    # peak at array index (z, y, x) = (15, 15, 15), i.e. LPS (30, 30, 30) mm -> RAS (-30, -30, 30)
    assert m["peak_ras"] == [-30.0, -30.0, 30.0]
    a[7, 7, 7] = 0.5  # replaces one inside voxel's 0.7/125: now the peak is inside
    m = measure_map(_image(a), region)
    inside = 0.7 - 0.7 / 125 + 0.5
    assert m["peak_inside"] is True and m["energy_inside"] == pytest.approx(inside / (inside + 0.3), rel=1e-6)
    zero = measure_map(_image(np.zeros(SHAPE, np.float32)), region)
    assert zero["energy_inside"] is None and zero["peak_inside"] is False


def test_follow_up_labels_reach_the_baseline_grid_through_the_registration():
    reference = _image(np.zeros(SHAPE, np.float32))
    baseline = _image(_box(SHAPE, (2, 2, 2), (4, 4, 4), value=1))  # a small lesion at the baseline
    # the follow-up lives on its own grid, 10 mm further along x; its edema box sits at follow-up
    # points (30..40, 10..20, 10..20) mm (x, y, z), which are baseline points (20..30, ...) mm
    fu = _image(_box(SHAPE, (5, 5, 10), (10, 10, 15), value=3), origin=(10.0, 0.0, 0.0))
    move = sitk.TranslationTransform(3, (10.0, 0.0, 0.0))  # baseline point -> follow-up point
    region = sitk.GetArrayFromImage(region_on_baseline(reference, baseline, fu, move))
    expected = _box(SHAPE, (2, 2, 2), (4, 4, 4)) | _box(SHAPE, (5, 5, 10), (10, 10, 15))
    np.testing.assert_array_equal(region, expected)
    # without the transform the follow-up box lands 5 voxels off along x
    wrong = sitk.GetArrayFromImage(region_on_baseline(reference, None, fu, None))
    np.testing.assert_array_equal(wrong, _box(SHAPE, (5, 5, 15), (10, 10, 20)))


def test_explain_result_measures_every_map_and_the_region_share():
    brain = _image(_box(SHAPE, (0, 0, 0), (20, 20, 10)))  # 4000 voxels
    seg = SimpleNamespace(image=_image(_box(SHAPE, (0, 0, 0), (10, 10, 4), value=3)))  # 400 voxels, all in brain
    sal = np.zeros(SHAPE, np.float32)
    sal[1, 1, 1] = 1.0
    cam = np.zeros(SHAPE, np.float32)
    cam[15, 15, 5] = 1.0
    result = SimpleNamespace(maps={"saliency": _image(sal), "gradcam": _image(cam)},
                             segmentations={"baseline": seg, "followup": seg},
                             brains={"baseline": SimpleNamespace(image=brain)},
                             registration=SimpleNamespace(transform=sitk.Transform()))
    e = explain_result(result)
    assert e["region_share_of_brain"] == pytest.approx(0.1) and e["region_ml"] == pytest.approx(400 * 8 / 1000)
    assert e["maps"]["saliency"]["peak_inside"] is True and e["maps"]["saliency"]["energy_inside"] == 1.0
    assert e["maps"]["gradcam"]["peak_inside"] is False and e["maps"]["gradcam"]["energy_inside"] == 0.0
    assert explain_result(SimpleNamespace(**{**vars(result), "segmentations": {}})) is None  # no segmentation
    region = region_on_baseline(result.maps["saliency"], seg, None)
    assert measure_maps(result.maps, region)["region_share_of_brain"] is None  # no brain given


def test_evaluate_aggregates_shares_and_hits():
    table = pd.DataFrame({"saliency_energy_inside": [0.2, 0.4, None], "saliency_peak_inside": [True, False, None],
                          "gradcam_energy_inside": [0.1, 0.3, 0.5], "gradcam_peak_inside": [True, True, False],
                          "region_share_of_brain": [0.05, 0.1, 0.15]})
    s = explanation_summary(table)
    assert s["saliency"] == {"pairs": 2, "mean_energy_inside": pytest.approx(0.3),
                             "median_energy_inside": pytest.approx(0.3), "pointing_game": 0.5}
    assert s["gradcam"]["pointing_game"] == pytest.approx(2 / 3) and s["gradcam"]["pairs"] == 3
    assert s["mean_region_share_of_brain"] == pytest.approx(0.1)
    assert explanation_summary(table.assign(saliency_energy_inside=None, gradcam_energy_inside=None)) is None


def test_predict_result_measured_against_its_written_files(automatic_prediction):
    """A real predict result (maps on the baseline grid, the phantom's masks standing in for the
    segmentations): the measures agree with the files predict wrote, recomputed here with numpy."""
    from RANOResponseLib.core.outputs import SEGMENTATION_FILES, TRANSFORM_FILE

    out = automatic_prediction.out
    e = explain_result(automatic_prediction.result)
    tfm = sitk.ReadTransform(str(out / TRANSFORM_FILE))
    for name in ("saliency", "gradcam"):
        m = sitk.ReadImage(str(out / f"{name}.nii.gz"))
        base = sitk.Resample(sitk.ReadImage(str(out / SEGMENTATION_FILES["baseline"])), m, sitk.Transform(),
                             sitk.sitkNearestNeighbor)
        fu = sitk.Resample(sitk.ReadImage(str(out / SEGMENTATION_FILES["followup"])), m, tfm, sitk.sitkNearestNeighbor)
        region = (sitk.GetArrayFromImage(base) > 0) | (sitk.GetArrayFromImage(fu) > 0)
        a = np.clip(sitk.GetArrayFromImage(m).astype(np.float64), 0, None)
        assert region.any() and a.sum() > 0
        assert e["maps"][name]["energy_inside"] == pytest.approx(a[region].sum() / a.sum(), rel=1e-3)
        assert e["maps"][name]["peak_inside"] == bool(region.flat[int(np.argmax(a))])
