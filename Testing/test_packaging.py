"""Packaging guards: the Lib packages stay free of Qt and the Slicer app, every module file is
listed in its CMakeLists (an installed extension never misses a file), and the shipped bundle
is valid, small, and documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("RANOResponse", "ResponseTraining")
FORBIDDEN = re.compile(r"^\s*(import (qt|ctk)\b|from (qt|ctk) import|import slicer\.app|.*\bslicer\.app\b)", re.M)


@pytest.mark.parametrize("module", MODULES)
def test_lib_has_no_qt_or_slicer_app(module):
    for path in (ROOT / module / f"{module}Lib").rglob("*.py"):
        hits = FORBIDDEN.findall(path.read_text(encoding="utf-8"))
        assert not hits, f"{path} uses Qt/ctk/slicer.app"


@pytest.mark.parametrize("module", MODULES)
def test_cmake_lists_every_module_file(module):
    folder = ROOT / module
    cmake = (folder / "CMakeLists.txt").read_text(encoding="utf-8").replace("${MODULE_NAME}", module)
    listed = set(re.findall(r"^\s+(\S+\.(?:py|png|ui|svg))\s*$", cmake, re.M))
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*")
               if p.is_file() and p.suffix in (".py", ".png", ".ui", ".svg") and "__pycache__" not in p.parts}
    assert on_disk - listed == set(), f"not listed in {module}/CMakeLists.txt"
    assert listed - on_disk == set(), f"listed but missing in {module}/"


def test_top_level_cmake_adds_each_module():
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    for module in MODULES:
        assert f"add_subdirectory({module})" in text
    assert 'EXTENSION_DEPENDS "PyTorch"' in text


def test_shipped_bundle_is_valid_and_documented():
    from RANOResponseLib.model.bundle import default_bundle_path, load_models, read_bundle

    path = default_bundle_path()
    bundle = read_bundle(path)
    models = load_models(bundle, "cpu")  # sha256 checked, weights_only load
    assert len(models) == len(bundle.weights) >= 1
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert size < 25 * 2**20, f"bundle is {size / 2**20:.1f} MB"
    card = (path / "MODEL_CARD.md").read_text(encoding="utf-8").lower()
    assert "not for clinical use" in card and "balanced accuracy" in card
    cv = bundle.meta["metrics"]["cv"]["cnn"]  # cross-validated figures of the image-only model
    assert 0 <= cv["median"]["balanced_accuracy"] <= 1 and cv["pooled"]["n"] > 0
    # one model per fold, all shipped but those the validation rule left out (bundle.json "ensemble")
    members = bundle.meta.get("ensemble") or {"kept": list(range(cv["folds"])), "left_out": []}
    assert len(members["kept"]) + len(members["left_out"]) == cv["folds"]
    assert len(members["kept"]) == len(bundle.weights)
    assert bundle.meta["training"]["command"].startswith("rano-response train")
    assert bundle.meta["training"]["device"]


def test_shipped_classifier_is_calibrated_suggests_and_reads_the_segmentation():
    """Issue 12: the shipped ensemble carries per-member temperatures, the suggestion model fitted on
    categories measured from automatic segmentations, and reads the segmentation's labels."""
    from RANOResponseLib.model.bundle import default_bundle_path, read_bundle

    bundle = read_bundle(default_bundle_path())
    assert bundle.calibration is not None and len(bundle.calibration["temperatures"]) == len(bundle.weights)
    assert bundle.suggestion is not None and "measured" in " ".join(bundle.suggestion["features"])
    assert bundle.spec.reads_segmentation
    card = (default_bundle_path() / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "measured-automatic" in card and "left out" in card


def _cmake_bundle(variable: str) -> tuple[str, set[str]]:
    """The bundle id CMakeLists.txt sets in ``variable`` and the files it installs from that bundle."""
    cmake = (ROOT / "RANOResponse" / "CMakeLists.txt").read_text(encoding="utf-8")
    bundle_id = re.search(rf"set\({variable}\s+(\S+)\)", cmake).group(1)
    return bundle_id, set(re.findall(rf"\.\./Resources/Models/\$\{{{variable}\}}/(\S+)", cmake))


def test_cmake_ships_the_default_model_bundle():
    """The installed module must carry the bundle predict loads by default, every file of it."""
    from RANOResponseLib.model.bundle import DEFAULT_BUNDLE_ID, default_bundle_path

    bundle_id, listed = _cmake_bundle("MODEL_BUNDLE_ID")
    assert bundle_id == DEFAULT_BUNDLE_ID
    on_disk = {p.name for p in default_bundle_path().iterdir() if p.is_file()}
    assert listed == on_disk, f"bundle files listed {sorted(listed)} vs on disk {sorted(on_disk)}"


def test_cmake_ships_the_default_segmentation_bundle():
    """The installed module must carry the segmentation bundle predict uses by default, every file of it."""
    from RANOResponseLib.model.segmentation import DEFAULT_SEG_BUNDLE_ID, default_seg_bundle_path

    bundle_id, listed = _cmake_bundle("SEG_BUNDLE_ID")
    assert bundle_id == DEFAULT_SEG_BUNDLE_ID
    on_disk = {p.name for p in default_seg_bundle_path().iterdir() if p.is_file()}
    assert listed == on_disk, f"segmentation bundle files listed {sorted(listed)} vs on disk {sorted(on_disk)}"
