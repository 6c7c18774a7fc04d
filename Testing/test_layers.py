"""The import graph points down: each sub-package imports only the layers below it (or itself),
the clinical core never imports training code, and no Lib module imports the Slicer module files.

Every import counts, including the lazy ones inside functions. The layer order here is the one the
package docstrings state; a change of architecture changes both.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "RANOResponse" / "RANOResponseLib"
TRAIN = ROOT / "ResponseTraining" / "ResponseTrainingLib"

# lowest first; a module may import its own layer and any layer before it
CORE_LAYERS = ("core", "imaging", "rano", "datasets", "model", "inference", "review", "mrml", "phantom", "web", "<top>")
TRAIN_LAYERS = ("data", "analysis", "training", "<top>")
MODULE_FILES = ("RANOResponse", "ResponseTraining", "RANOResponseCLI")


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names]  # `from pkg import module`
    return names


def _layer(package: str, layers: tuple[str, ...], dotted: str) -> int | None:
    parts = dotted.split(".")
    if parts[0] != package:
        return None
    if len(parts) == 1 or parts[1] == "__version__":
        return None  # the package itself (its __init__ is loaded anyway)
    return layers.index(parts[1]) if parts[1] in layers else layers.index("<top>")


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def _own_layer(root: Path, layers: tuple[str, ...], path: Path) -> int:
    rel = path.relative_to(root).parts
    return layers.index(rel[0]) if len(rel) > 1 and rel[0] in layers else layers.index("<top>")


def test_every_core_subpackage_is_in_the_layer_table():
    subs = {p.parent.name for p in CORE.glob("*/__init__.py")}
    assert subs == set(CORE_LAYERS) - {"<top>"}
    assert {p.parent.name for p in TRAIN.glob("*/__init__.py")} == set(TRAIN_LAYERS) - {"<top>"}


@pytest.mark.parametrize("path", _files(CORE), ids=lambda p: str(p.relative_to(CORE)))
def test_core_points_down(path):
    mine = _own_layer(CORE, CORE_LAYERS, path)
    for name in _imports(path):
        top = name.split(".")[0]
        assert top not in ("ResponseTrainingLib", *MODULE_FILES), f"{path.name} imports {name}"
        layer = _layer("RANOResponseLib", CORE_LAYERS, name)
        if layer is not None and _layer("RANOResponseLib", CORE_LAYERS, name.rpartition(".")[0] or name) is not None:
            target = CORE_LAYERS[layer]
            if mine < CORE_LAYERS.index("<top>"):
                assert layer <= mine, f"{path.relative_to(CORE)} ({CORE_LAYERS[mine]}) imports {name} ({target})"


@pytest.mark.parametrize("path", _files(TRAIN), ids=lambda p: str(p.relative_to(TRAIN)))
def test_training_points_down(path):
    mine = _own_layer(TRAIN, TRAIN_LAYERS, path)
    for name in _imports(path):
        assert name.split(".")[0] not in MODULE_FILES, f"{path.name} imports {name}"
        layer = _layer("ResponseTrainingLib", TRAIN_LAYERS, name)
        if layer is not None and mine < TRAIN_LAYERS.index("<top>"):
            assert layer <= mine, f"{path.relative_to(TRAIN)} imports {name}"


def test_subpackages_say_what_they_own_and_may_import():
    for init in [*CORE.glob("*/__init__.py"), *TRAIN.glob("*/__init__.py"), CORE / "__init__.py", TRAIN / "__init__.py"]:
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
        assert len(doc) > 80, f"{init} has no docstring saying what it owns"
        if init.parent not in (CORE, TRAIN):
            assert "May import" in doc, f"{init} does not say what it may import"


@pytest.mark.parametrize("module", ["RANOResponse/RANOResponse.py", "ResponseTraining/ResponseTraining.py"])
def test_module_files_are_wiring_only(module):
    lines = (ROOT / module).read_text(encoding="utf-8").splitlines()
    assert len(lines) < 400, f"{module} has {len(lines)} lines"
