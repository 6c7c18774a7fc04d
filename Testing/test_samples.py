"""The shipped sample case pair (Resources/Samples) the Slicer self-test runs on: it reads, it fits
the shipped bundle, predict runs on it, it is small, documented, and the extension installs it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.names import CLASS_NAMES, MODALITIES
from RANOResponseLib.datasets.samples import DEFAULT_SAMPLE, sample_case, sample_names
from RANOResponseLib.imaging.io import read_study
from RANOResponseLib.model.bundle import default_bundle_path, read_bundle
from RANOResponseLib.rano.measurement import find_segmentation

ROOT = Path(__file__).resolve().parents[1]


def test_the_default_sample_is_shipped_and_described():
    sample = sample_case()
    assert sample.name == DEFAULT_SAMPLE and DEFAULT_SAMPLE in sample_names()
    assert sample.folder == ROOT / "Resources" / "Samples" / DEFAULT_SAMPLE
    assert sample.modalities == MODALITIES
    assert sample.truth["response"] in CLASS_NAMES
    assert sample.info["made_by"]["command"].startswith("rano-response phantom ")
    assert "--spacing 3" in sample.info["made_by"]["command"]


def test_the_sample_reads_and_fits_the_shipped_bundle():
    sample = sample_case()
    needed = read_bundle(default_bundle_path()).spec.modalities
    assert set(needed) <= set(sample.modalities)
    for folder in (sample.baseline, sample.followup):
        study = read_study(folder, needed)
        assert set(study.images) == set(needed)
        for image in study.images.values():
            assert image.GetSpacing() == pytest.approx((3.0, 3.0, 3.0))
        assert find_segmentation(folder).source == "deepbratumia-native"


def test_the_sample_stays_small():
    files = [p for p in sample_case().folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 3 * 2**20


def test_predict_runs_on_the_sample_with_the_shipped_bundle(tmp_path):
    from RANOResponseLib.inference.pipeline import run_predict

    sample = sample_case()
    result, files = run_predict(sample.baseline, sample.followup, tmp_path / "out", device="cpu")
    summary = json.loads(files["prediction"].read_text())
    assert summary["label"] in CLASS_NAMES
    assert sum(summary["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert {"gradcam", "saliency", "transform"} <= set(files)


def test_an_absent_sample_is_named():
    with pytest.raises(RANOInputError, match=r"no-such-sample[/\\]sample.json: sample case not found \(shipped samples: "
                                             + DEFAULT_SAMPLE):
        sample_case("no-such-sample")


def test_cmake_installs_every_sample_file():
    cmake = (ROOT / "RANOResponse" / "CMakeLists.txt").read_text(encoding="utf-8")
    name = re.search(r"set\(SAMPLE_NAME\s+(\S+)\)", cmake).group(1)
    block = re.search(r"set\(SAMPLE_FILES\n(.*?)\n\s*\)", cmake, re.S).group(1)
    listed = set(block.split())
    folder = sample_case(name).folder
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert listed == on_disk
