"""Model bundles: written, validated, verified and loaded safely.

Guards RANOResponseLib.bundle: a bundle written with write_bundle reads back identically; every
malformed bundle.json is a BundleError naming the file; weights whose bytes changed are refused
before torch ever unpickles them; weights never run code; float16 weights come back as float32;
and a study lacking a modality the bundle needs is refused naming the modality and the bundle.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import COMPACT, copy_study, make_bundle, modality_file, random_state_dicts, tiny_spec
from RANOResponseLib.core.errors import BundleError, RANOInputError
from RANOResponseLib.core.names import CLASS_NAMES
from RANOResponseLib.imaging.io import read_study
from RANOResponseLib.model.bundle import (
    BUNDLE_ENV,
    Bundle,
    default_bundle_path,
    load_models,
    read_bundle,
    sha256,
    write_bundle,
)
from RANOResponseLib.model.networks import GRADCAM_LAYERS, architecture_args


@pytest.fixture
def bundle_copy(tmp_path, tiny_bundle) -> Path:
    """A private copy of the session's tiny bundle, free to be damaged."""
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


def _edit_meta(bundle: Path, edit) -> Path:
    meta_file = bundle / "bundle.json"
    meta = json.loads(meta_file.read_text())
    edit(meta)
    meta_file.write_text(json.dumps(meta))
    return meta_file


# -------------------------------------------------------------------------------- round trip


def test_write_read_round_trip(tmp_path):
    """Everything written (ids, architecture, spec, classes, layer, extra metadata) reads back equal,
    and the models load with exactly the written weights (float32 bundle)."""
    spec = tiny_spec(("CT1", "T1", "FLAIR"))
    args = architecture_args(COMPACT, len(spec.channels), len(CLASS_NAMES))
    states = random_state_dicts(2, len(spec.channels), seed=5)
    out = write_bundle(tmp_path / "b", bundle_id="round-trip", architecture={"name": COMPACT, "args": args},
                       spec=spec, state_dicts=states, gradcam_layer=GRADCAM_LAYERS[COMPACT],
                       extra={"cv": {"balanced_accuracy": 0.5}}, half=False, model_card="# card\n")
    b = read_bundle(out)
    assert isinstance(b, Bundle)
    assert b.id == "round-trip"
    assert b.spec == spec
    assert b.in_channels == len(spec.channels) == 6
    assert b.class_names == CLASS_NAMES
    assert b.architecture == {"name": COMPACT, "args": json.loads(json.dumps(args))}
    assert b.gradcam_layer == GRADCAM_LAYERS[COMPACT]
    assert b.meta["cv"] == {"balanced_accuracy": 0.5}
    assert (out / "MODEL_CARD.md").read_text() == "# card\n"
    assert [w["file"] for w in b.weights] == ["weights-0.pt", "weights-1.pt"]
    for w in b.weights:
        assert w["sha256"] == sha256(out / w["file"])
    models = load_models(b)
    assert len(models) == 2
    for m, sd in zip(models, states):
        assert not m.training
        for k, v in m.state_dict().items():
            assert torch.equal(v, sd[k].to(v.dtype)), k
    # read_bundle also accepts the bundle.json path itself
    assert read_bundle(out / "bundle.json").spec == spec
    # nothing staged is left next to it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_write_bundle_replaces_existing(tmp_path):
    """Writing over an existing bundle replaces it completely (no stale weight files)."""
    out = make_bundle(tmp_path / "b", n_models=2, seed=1, half=False)
    assert (out / "weights-1.pt").is_file()
    make_bundle(tmp_path / "b", n_models=1, seed=2, bundle_id="second")
    assert sorted(p.name for p in out.iterdir()) == ["bundle.json", "weights.pt"]
    assert read_bundle(out).id == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_float16_weights_load_as_float32(tiny_bundle, tiny_models):
    """Weights stored as float16 (to keep the repository small) are float32 in the built models,
    with the stored values."""
    stored = torch.load(tiny_bundle / "weights.pt", weights_only=True)
    floats = [k for k, v in stored.items() if v.is_floating_point()]
    assert floats and all(stored[k].dtype == torch.float16 for k in floats)
    bundle, models = tiny_models
    assert bundle.weights[0]["dtype"] == "float16"
    state = models[0].state_dict()
    for k in floats:
        assert state[k].dtype == torch.float32, k
        assert torch.equal(state[k], stored[k].float()), k
    assert all(p.dtype == torch.float32 for p in models[0].parameters())
    out = models[0](torch.zeros(1, bundle.in_channels, *reversed(bundle.spec.size)))
    assert out.dtype == torch.float32 and out.shape == (1, 4)


def test_default_bundle_path_honours_environment(monkeypatch, tmp_path):
    """$RANO_RESPONSE_BUNDLE selects the bundle; without it the shipped location is used."""
    monkeypatch.setenv(BUNDLE_ENV, str(tmp_path / "mine"))
    assert default_bundle_path() == tmp_path / "mine"
    monkeypatch.delenv(BUNDLE_ENV)
    assert default_bundle_path().parent.name == "Models"


# ------------------------------------------------------------------------------ weight files


def test_changed_weights_bytes_are_refused(bundle_copy):
    """One flipped bit in the weights file: refused by sha256, and the message names the file."""
    w = bundle_copy / "weights.pt"
    data = bytearray(w.read_bytes())
    data[len(data) // 3] ^= 0x10
    w.write_bytes(bytes(data))
    b = read_bundle(bundle_copy)  # the description is still fine
    with pytest.raises(BundleError) as info:
        load_models(b)
    assert str(w) in str(info.value)
    assert "sha256" in str(info.value)
    assert isinstance(info.value, RANOInputError)


def test_swapped_weights_file_is_refused(tmp_path, bundle_copy):
    """A valid weights file of another model (different sha256) is refused too."""
    other = make_bundle(tmp_path / "other", n_models=1, seed=99)
    shutil.copy(other / "weights.pt", bundle_copy / "weights.pt")
    with pytest.raises(BundleError, match="sha256"):
        load_models(read_bundle(bundle_copy))


def test_missing_weights_file_is_refused(bundle_copy):
    """A bundle whose weights file is gone is refused when read, naming the file."""
    (bundle_copy / "weights.pt").unlink()
    with pytest.raises(BundleError) as info:
        read_bundle(bundle_copy)
    assert str(bundle_copy / "weights.pt") in str(info.value)


class _Payload:
    """Unpickling this would create a folder: a weights file must never be able to run code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_weights_never_run_code(bundle_copy, tmp_path):
    """A weights file that would run code when unpickled (with a matching sha256) is refused
    without running it (torch.load(weights_only=True))."""
    marker = tmp_path / "pwned"
    w = bundle_copy / "weights.pt"
    torch.save({"features.conv0.weight": torch.zeros(1), "evil": _Payload(str(marker))}, w)
    _edit_meta(bundle_copy, lambda m: m["weights"][0].update(sha256=sha256(w)))
    with pytest.raises(BundleError) as info:
        load_models(read_bundle(bundle_copy))
    assert str(w) in str(info.value)
    assert not marker.exists()


def test_garbage_weights_with_matching_sha_are_refused(bundle_copy):
    """A non-torch file with a matching sha256 is a BundleError, not a crash."""
    w = bundle_copy / "weights.pt"
    w.write_bytes(b"not a torch file at all" * 10)
    _edit_meta(bundle_copy, lambda m: m["weights"][0].update(sha256=sha256(w)))
    with pytest.raises(BundleError, match="cannot load"):
        load_models(read_bundle(bundle_copy))


def test_training_checkpoint_instead_of_state_dict_is_refused(bundle_copy):
    """A common export mistake, a checkpoint {'state_dict': ..., 'epoch': ...} saved as the weights
    (sha256 updated), is a BundleError naming the file, not a crash."""
    w = bundle_copy / "weights.pt"
    state = torch.load(w, weights_only=True)
    torch.save({"state_dict": state, "epoch": 5}, w)
    _edit_meta(bundle_copy, lambda m: m["weights"][0].update(sha256=sha256(w)))
    with pytest.raises(BundleError) as info:
        load_models(read_bundle(bundle_copy))
    assert str(w) in str(info.value)


def test_weights_of_another_architecture_are_refused(tmp_path, bundle_copy):
    """Weights that do not fit the declared architecture (sha256 fine) are a BundleError naming the file."""
    w = bundle_copy / "weights.pt"
    other = make_bundle(tmp_path / "small", n_models=1, seed=3, modalities=("CT1", "T1"))  # 4 input channels
    shutil.copy(other / "weights.pt", w)
    _edit_meta(bundle_copy, lambda m: m["weights"][0].update(sha256=sha256(w)))
    with pytest.raises(BundleError, match="do not fit") as info:
        load_models(read_bundle(bundle_copy))
    assert str(w) in str(info.value)


def test_unknown_gradcam_layer_is_refused(bundle_copy):
    """A Grad-CAM layer that is not a module of the network is refused at load time."""
    _edit_meta(bundle_copy, lambda m: m.update(gradcam_layer="features.denseblock9"))
    with pytest.raises(BundleError, match="denseblock9"):
        load_models(read_bundle(bundle_copy))


# ------------------------------------------------------------------------------- bundle.json


def _set(key, value):
    return lambda m: m.__setitem__(key, value)


def _set_arg(key, value):
    return lambda m: m["architecture"]["args"].__setitem__(key, value)


BAD_META = {
    "in_channels_mismatch": (_set_arg("in_channels", 6), "in_channels"),
    "out_channels_mismatch": (_set_arg("out_channels", 3), "out_channels"),
    "unknown_architecture": (lambda m: m["architecture"].__setitem__("name", "resnet50"), "resnet50"),
    "architecture_not_object": (_set("architecture", "compact"), "architecture"),
    "wrong_format": (_set("format", "monai-bundle"), "format"),
    "wrong_version": (_set("format_version", 99), "format_version"),
    "unknown_modality": (_set("modalities", ["CT1", "T1", "T2", "DWI"]), "modalities"),
    "duplicate_modality": (_set("modalities", ["CT1", "CT1", "T2", "FLAIR"]), "modalities"),
    "bad_channel": (lambda m: m["channels"].__setitem__(0, "CT1:later"), "CT1:later"),
    "channel_not_declared": (_set("modalities", ["CT1", "T1", "T2"]), "channels"),
    "one_class": (_set("class_names", ["PD"]), "class_names"),
    "bad_spacing": (_set("spacing_mm", [6, -6, 6]), "spacing_mm"),
    "short_spacing": (_set("spacing_mm", [6, 6]), "spacing_mm"),
    "tiny_input": (_set("input_size", [32, 8, 32]), "input_size"),
    "float_input": (_set("input_size", [32, 32.5, 32]), "input_size"),
    "bad_normalization": (_set("normalization", {"method": "minmax"}), "normalization"),
    "no_weights": (_set("weights", []), "weights"),
    "weights_without_sha": (_set("weights", [{"file": "weights.pt"}]), "sha256"),
}


@pytest.mark.parametrize("case", sorted(BAD_META))
def test_bad_bundle_json_is_refused(bundle_copy, case):
    """Inconsistent or malformed bundle.json contents are BundleErrors naming bundle.json and the field."""
    edit, word = BAD_META[case]
    meta_file = _edit_meta(bundle_copy, edit)
    with pytest.raises(BundleError) as info:
        read_bundle(bundle_copy)
    assert str(meta_file) in str(info.value)
    assert word in str(info.value)


REQUIRED = ("id", "architecture", "modalities", "channels", "class_names", "spacing_mm", "input_size",
            "normalization", "gradcam_layer", "weights")


@pytest.mark.parametrize("key", REQUIRED)
def test_missing_key_is_refused(bundle_copy, key):
    """A bundle.json without one of the required keys is refused, naming the key."""
    meta_file = _edit_meta(bundle_copy, lambda m: m.pop(key))
    with pytest.raises(BundleError) as info:
        read_bundle(bundle_copy)
    assert str(meta_file) in str(info.value)
    assert f"'{key}'" in str(info.value)


@pytest.mark.parametrize("text", ['{"format": "rano-response-bundle",', "", "[1, 2, 3]", "null"])
def test_invalid_json_is_refused(bundle_copy, text):
    """bundle.json that is not JSON, or not a JSON object, is a BundleError naming it."""
    meta_file = bundle_copy / "bundle.json"
    meta_file.write_text(text)
    with pytest.raises(BundleError) as info:
        read_bundle(bundle_copy)
    assert str(meta_file) in str(info.value)


def test_binary_bundle_json_is_refused(bundle_copy):
    """A bundle.json that is not even UTF-8 text (e.g. overwritten by a binary) is a BundleError."""
    meta_file = bundle_copy / "bundle.json"
    meta_file.write_bytes(b"\xff\xfe\x00{binary" + bytes(range(256)))
    with pytest.raises(BundleError) as info:
        read_bundle(bundle_copy)
    assert str(meta_file) in str(info.value)


def test_missing_bundle_is_refused(tmp_path):
    """A folder without bundle.json is a BundleError naming it."""
    with pytest.raises(BundleError, match="bundle.json"):
        read_bundle(tmp_path / "nothing-here")


# ----------------------------------------------------------------- bundle vs study modalities


def test_study_missing_a_bundle_modality_names_modality_folder_and_bundle(tiny_models, tmp_path, case_pair):
    """A study lacking a modality the bundle needs is refused, naming the modality, the folder
    and the bundle; with the modality present it reads."""
    bundle, _ = tiny_models
    study = copy_study(case_pair.followup, tmp_path / "fu")
    modality_file(study, "FLAIR").unlink()
    with pytest.raises(RANOInputError) as info:
        read_study(study, bundle.spec.modalities, required_by=f"bundle '{bundle.id}'")
    assert "FLAIR" in str(info.value)
    assert str(study) in str(info.value)
    assert bundle.id in str(info.value)
    assert set(read_study(case_pair.followup, bundle.spec.modalities).images) == set(bundle.spec.modalities)


@pytest.fixture(scope="module")
def two_modality_bundle(tmp_path_factory) -> Path:
    """A bundle that needs only T1 and FLAIR (4 channels)."""
    return make_bundle(tmp_path_factory.mktemp("b2") / "t1-flair", n_models=1, seed=4,
                       modalities=("T1", "FLAIR"), bundle_id="t1-flair")


def test_predict_refuses_study_without_bundle_modality(tmp_path, case_pair, two_modality_bundle):
    """predict with a study lacking FLAIR, which the bundle needs: an error naming FLAIR and the folder."""
    from RANOResponseLib.inference.pipeline import predict_pair

    fu = copy_study(case_pair.followup, tmp_path / "fu")
    modality_file(fu, "FLAIR").unlink()
    with pytest.raises(RANOInputError) as info:
        predict_pair(case_pair.baseline, fu, two_modality_bundle, device="cpu", attributions=False)
    assert "FLAIR" in str(info.value)
    assert str(fu) in str(info.value)
    assert "t1-flair" in str(info.value)  # the bundle that needs it


def test_predict_needs_only_bundle_modalities(tmp_path, case_pair, two_modality_bundle):
    """Studies with just the bundle's modalities (no CT1, no T2) predict, with T1 as the reference."""
    from RANOResponseLib.inference.pipeline import predict_pair

    studies = []
    for name, src in (("base", case_pair.baseline), ("fu", case_pair.followup)):
        folder = tmp_path / name
        folder.mkdir()
        for m in ("T1", "FLAIR"):
            shutil.copy(modality_file(src, m), folder)
        studies.append(folder)
    result = predict_pair(studies[0], studies[1], two_modality_bundle, device="cpu", attributions=False)
    assert result.bundle.spec.reference_modality == "T1"
    assert result.prepared.array.shape[0] == 4
    assert np.isclose(sum(result.probabilities.values()), 1.0, atol=1e-5)


def test_rewriting_a_bundle_replaces_it_whole(tmp_path):
    """Writing a single-model bundle over a 2-model ensemble leaves no stale member behind, and
    nothing half-written is left beside the folder."""
    out = tmp_path / "bundle"
    make_bundle(out, n_models=2)
    assert sorted(p.name for p in out.iterdir()) == ["bundle.json", "weights-0.pt", "weights-1.pt"]
    make_bundle(out, n_models=1, seed=3)
    assert sorted(p.name for p in out.iterdir()) == ["bundle.json", "weights.pt"]
    assert len(read_bundle(out).weights) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
