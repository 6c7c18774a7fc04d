"""The segmentation's labels as network input channels (issue 12: inputs that help the network look
at the lesion), the clinical-input augmentation, and the rule that picks the shipped ensemble's members.

Truth comes from the phantom's own masks (their voxel counts), never from the code under test.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import COMPACT, TINY_SIZE, TINY_SPACING, random_state_dicts
from RANOResponseLib.core.errors import BundleError
from RANOResponseLib.core.names import CLASS_NAMES, MODALITIES
from RANOResponseLib.imaging.preprocessing import InputSpec, difference_channels, tumour_channels

MASK = Path("DeepBraTumIA-segmentation/native/segmentation/seg_mask.nii.gz")
SEG_SPEC = InputSpec(MODALITIES, tuple(difference_channels(MODALITIES) + tumour_channels()), TINY_SPACING, TINY_SIZE)
VOXEL_ML = float(np.prod(TINY_SPACING)) / 1000.0


@dataclass
class StandIn:
    """What a segmenter returns (inference.segmentation.Segmentation): the labels as ``.image``."""

    image: sitk.Image


def mask_ml(path: Path, label: int) -> float:
    img = sitk.ReadImage(str(path))
    return float((sitk.GetArrayViewFromImage(img) == label).sum()) * float(np.prod(img.GetSpacing())) / 1000.0


def phantom_segmenter(study, brain):
    """The phantom's own mask, on the aligned study's grid (nearest neighbour)."""
    mask = sitk.ReadImage(str(study.folder / MASK))
    return StandIn(sitk.Resample(mask, study.images["CT1"], sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))


@pytest.fixture(scope="module")
def seg_inputs(case_pair):
    from RANOResponseLib.imaging.studies import load_study
    from RANOResponseLib.inference.inputs import prepare_inputs

    base, fu = load_study(case_pair.baseline, MODALITIES), load_study(case_pair.followup, MODALITIES)
    return prepare_inputs(base, fu, SEG_SPEC, segmenter=phantom_segmenter)


def test_segmentation_channels_hold_the_label_volumes(seg_inputs, case_pair):
    arr = seg_inputs.prepared.array
    names = [str(c) for c in SEG_SPEC.channels]
    assert arr.shape == (10, *TINY_SIZE[::-1])
    seg = arr[4:]
    assert seg.min() >= 0.0 and seg.max() <= 1.0
    for label, name in ((1, "seg-enhancing"), (3, "seg-edema")):
        for tp, folder in (("baseline", case_pair.baseline), ("followup", case_pair.followup)):
            truth = mask_ml(folder / MASK, label)
            got = float(arr[names.index(f"{name}:{tp}")].sum()) * VOXEL_ML
            assert truth > 1.0, "the demo pair has lesions at both timepoints"
            assert got == pytest.approx(truth, rel=0.15), (name, tp)


def test_segmentation_channels_leave_the_mri_channels_unchanged(seg_inputs, case_pair):
    from RANOResponseLib.imaging.preprocessing import prepare_pair

    plain = InputSpec(MODALITIES, tuple(difference_channels(MODALITIES)), TINY_SPACING, TINY_SIZE)
    s = seg_inputs
    masks = (s.brains["baseline"].image, s.brains["followup"].image)
    ref = prepare_pair(s.baseline, s.followup, s.registration.transform, plain, masks=masks)
    np.testing.assert_allclose(s.prepared.array[:4], ref.array, atol=1e-5)
    assert set(s.segmentations) == {"baseline", "followup"}
    assert "segmentation" in s.timings


def test_a_spec_reading_segmentations_needs_a_segmenter(case_pair):
    from RANOResponseLib.imaging.studies import load_study
    from RANOResponseLib.inference.inputs import prepare_inputs

    assert SEG_SPEC.reads_segmentation
    assert not InputSpec(MODALITIES, tuple(difference_channels(MODALITIES))).reads_segmentation
    base, fu = load_study(case_pair.baseline, MODALITIES), load_study(case_pair.followup, MODALITIES)
    with pytest.raises(ValueError, match="segmenter"):
        prepare_inputs(base, fu, SEG_SPEC)


def _seg_bundle(out: Path, channels=None) -> Path:
    from RANOResponseLib.model.bundle import write_bundle
    from RANOResponseLib.model.networks import GRADCAM_LAYERS, architecture_args

    spec = SEG_SPEC if channels is None else InputSpec(MODALITIES, channels, TINY_SPACING, TINY_SIZE)
    args = architecture_args(COMPACT, len(spec.channels), len(CLASS_NAMES))
    return write_bundle(out, bundle_id="tiny-seg-channels", architecture={"name": COMPACT, "args": args}, spec=spec,
                        state_dicts=random_state_dicts(1, len(spec.channels), 5),
                        gradcam_layer=GRADCAM_LAYERS[COMPACT])


def test_bundle_declares_segmentation_channels(tmp_path):
    from RANOResponseLib.imaging.preprocessing import Channel
    from RANOResponseLib.model.bundle import read_bundle

    b = read_bundle(_seg_bundle(tmp_path / "ok"))
    assert b.spec.reads_segmentation and len(b.spec.channels) == 10
    with pytest.raises(BundleError, match="declared modalities"):  # an unknown segmentation label
        _seg_bundle(tmp_path / "bad", tuple(difference_channels(MODALITIES)) + (Channel("seg-tumour", "followup"),))


@pytest.fixture(scope="module")
def seg_channel_prediction(case_pair, tmp_path_factory, monkeypatch_module):
    """predict (in process) with a tiny bundle reading segmentation channels and the shipped
    segmentation bundle; segment_study counted."""
    import RANOResponseLib.inference.pipeline as pipeline
    import RANOResponseLib.inference.segmentation as segmentation

    calls = []
    real = segmentation.segment_study

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch_module.setattr(segmentation, "segment_study", counting)
    bundle = _seg_bundle(tmp_path_factory.mktemp("segch") / "bundle")
    out = tmp_path_factory.mktemp("segch-out") / "prediction"
    result, files = pipeline.run_predict(case_pair.baseline, case_pair.followup, out, bundle=bundle, device="cpu",
                                         attributions=False)
    return result, files, out, len(calls)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_predict_segments_once_and_feeds_the_labels_to_the_network(seg_channel_prediction):
    result, files, out, n_calls = seg_channel_prediction
    assert n_calls == 2  # one per timepoint: the measurement reuses the network's segmentations
    summary = json.loads((out / "prediction.json").read_text())
    assert summary["measured"]["category"] in CLASS_NAMES
    names = [str(c) for c in result.prepared.channels]
    for tp in ("baseline", "followup"):
        written = out / f"segmentation_{tp}.nii.gz"
        assert written.is_file()
        truth = mask_ml(written, 1)
        got = float(result.prepared.array[names.index(f"seg-enhancing:{tp}")].sum()) * VOXEL_ML
        assert got == pytest.approx(truth, rel=0.15, abs=0.3)


def test_no_segmentation_still_segments_for_such_a_network(case_pair, tmp_path):
    from RANOResponseLib.inference.pipeline import run_predict

    bundle = _seg_bundle(tmp_path / "bundle")
    out = tmp_path / "prediction"
    run_predict(case_pair.baseline, case_pair.followup, out, bundle=bundle, device="cpu", attributions=False,
                segmentation=False)
    summary = json.loads((out / "prediction.json").read_text())
    assert "measured" not in summary or summary["measured"] is None
    assert (out / "segmentation_baseline.nii.gz").is_file()  # part of the network's input


# ------------------------------------------------------------------------------ augmentation

def test_augmentation_touches_only_the_mri_channels_and_repeats():
    from ResponseTrainingLib.data.dataset import augmenter

    spec = InputSpec(MODALITIES, tuple(difference_channels(MODALITIES) + tumour_channels()), (3.0,) * 3, (24, 28, 20))
    rng = np.random.default_rng(0)
    x = np.zeros((10, 20, 28, 24), np.float32)
    x[:4, 4:16, 5:23, 4:20] = rng.normal(size=(4, 12, 18, 16))
    x[4:, 8:12, 10:14, 8:12] = 1.0
    aug = augmenter(spec)
    changed_mri = 0
    for seed in range(12):
        y = aug.set_random_state(seed)(x.copy())
        z = aug.set_random_state(seed)(x.copy())
        np.testing.assert_array_equal(y, z)
        seg = y[4:]
        assert seg.min() >= -1e-6 and seg.max() <= 1.0 + 1e-6  # fractions stay fractions
        # the six segmentation channels moved together (one spatial draw), all alike here
        for c in range(1, 6):
            np.testing.assert_allclose(seg[c], seg[0], atol=1e-6)
        changed_mri += int(not np.allclose(y[:4], x[:4], atol=1e-3))
    assert changed_mri >= 6


# ---------------------------------------------------------------------------- ensemble rule

def test_members_at_chance_on_validation_are_left_out():
    from ResponseTrainingLib.training.cv import ensemble_members

    records = {0: {"val_balanced_accuracy": 0.25}, 1: {"val_balanced_accuracy": 0.62},
               2: {"val_balanced_accuracy": 0.80}, 3: {"val_balanced_accuracy": 0.34}}
    m = ensemble_members(records, 4)
    assert m["kept"] == [1, 2] and m["left_out"] == [0, 3]
    none = ensemble_members({0: {"val_balanced_accuracy": 0.2}, 1: {"val_balanced_accuracy": 0.3}}, 4)
    assert none["kept"] == [0, 1] and "all kept" in none["rule"]
