"""Static checks of the two Slicer module files, which need the Slicer application to run.

What can be checked without Qt is checked here: every ``self.ui.<name>`` exists in the module's
.ui file, every GUI-bound parameter exists in the parameter node, every Lib function the module
imports exists with that name, every ``self.logic.<method>`` exists, and the module files stay
thin (they import nothing that computes)."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("RANOResponse", "ResponseTraining")
QT_CLASSES = {"QWidget", "QLabel", "QPushButton", "QComboBox", "QProgressBar", "QLineEdit", "QPlainTextEdit",
              "QSpinBox", "QCheckBox", "QTableWidget"}


def _source(module: str) -> str:
    return (ROOT / module / f"{module}.py").read_text(encoding="utf-8")


def _ui(module: str) -> ET.Element:
    return ET.parse(ROOT / module / "Resources" / "UI" / f"{module}.ui").getroot()


def _ui_widgets(module: str) -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in _ui(module).iter("widget")}


def _classes(module: str) -> dict[str, ast.ClassDef]:
    tree = ast.parse(_source(module))
    return {n.name: n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}


@pytest.mark.parametrize("module", MODULES)
def test_every_self_ui_name_is_in_the_ui_file(module):
    used = set(re.findall(r"self\.ui\.(\w+)", _source(module)))
    assert used, "the widget uses no .ui widgets"
    missing = used - set(_ui_widgets(module))
    assert not missing, f"{module}.py uses self.ui.{sorted(missing)} not in {module}.ui"


@pytest.mark.parametrize("module", MODULES)
def test_ui_file_declares_its_custom_widgets(module):
    root = _ui(module)
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = set(_ui_widgets(module).values())
    assert used - QT_CLASSES - declared == set()
    assert root.find("widget").get("class") == "qMRMLWidget"


@pytest.mark.parametrize("module", MODULES)
def test_gui_bound_parameters_exist_in_the_parameter_node(module):
    node = _classes(module)[f"{module}ParameterNode"]
    decorators = {d.id for d in node.decorator_list if isinstance(d, ast.Name)}
    assert "parameterNodeWrapper" in decorators
    fields = {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}
    bound = {p.findtext("string") for p in _ui(module).iter("property") if p.get("name") == "SlicerParameterName"}
    assert bound, "no widget is bound to the parameter node"
    assert bound - fields == set(), f"bound in the .ui but not parameters: {sorted(bound - fields)}"


@pytest.mark.parametrize("module", MODULES)
def test_module_has_the_four_classes_and_a_test(module):
    classes = _classes(module)
    for suffix in ("", "Widget", "Logic", "Test"):
        assert f"{module}{suffix}" in classes
    tests = [f.name for f in classes[f"{module}Test"].body if isinstance(f, ast.FunctionDef)]
    assert "runTest" in tests and any(t.startswith("test_") for t in tests)


def _lib_imports(module: str) -> dict[str, str]:
    """Names the module file imports from a Lib package -> the Lib module they come from."""
    return {alias.asname or alias.name: node.module for node in ast.walk(ast.parse(_source(module)))
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0].endswith("Lib")
            for alias in node.names}


def _logic_members(module: str) -> set[str]:
    """Methods of the module's Logic class, with those it inherits from a Lib class."""
    logic = _classes(module)[f"{module}Logic"]
    members = {f.name for f in logic.body if isinstance(f, ast.FunctionDef)}
    imported = _lib_imports(module)
    for base in logic.bases:
        if isinstance(base, ast.Name) and base.id in imported:
            members |= set(dir(getattr(importlib.import_module(imported[base.id]), base.id)))
    return members


@pytest.mark.parametrize("module", MODULES)
def test_self_logic_calls_exist_in_the_logic_class(module):
    called = set(re.findall(r"self\.logic\.(\w+)\(", _source(module)))
    missing = called - _logic_members(module)
    assert called and not missing, f"missing logic methods: {sorted(missing)}"


def test_clinical_logic_is_the_lib_panel_logic():
    """RANOResponseLogic adds only what needs the Slicer application to the Lib's PanelLogic, and
    every attribute the widget reads from it (not a call) is one PanelLogic has."""
    from RANOResponseLib.mrml.logic import PanelLogic

    logic = _classes("RANOResponse")["RANOResponseLogic"]
    assert "PanelLogic" in {b.id for b in logic.bases if isinstance(b, ast.Name)}
    own = {f.name for f in logic.body if isinstance(f, ast.FunctionDef)}
    assert own == {"__init__", "getParameterNode", "ensurePackages"}, own
    read = set(re.findall(r"self\.logic\.(\w+)\b(?!\()", _source("RANOResponse")))
    instance = PanelLogic(scene=None)
    assert read and all(hasattr(instance, name) for name in read), sorted(read)


def test_panel_parameters_are_in_the_parameter_node():
    """What PanelLogic reads from the parameter object exists in the module's parameter node."""
    from RANOResponseLib.core.names import MODALITIES
    from RANOResponseLib.mrml.logic import PanelParameters

    node = _classes("RANOResponse")["RANOResponseParameterNode"]
    fields = {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}
    wanted = set(PanelParameters.__annotations__) | {f"{r}{m}" for r in ("baseline", "followup") for m in MODALITIES}
    assert wanted - fields == set(), sorted(wanted - fields)


def test_module_file_imports_only_light_lib_modules_at_load():
    """Slicer loads the module file before the runtime's packages are installed: what it imports at
    the top must import no third-party package (a fresh interpreter proves it)."""
    top = [n for n in ast.parse(_source("RANOResponse")).body
           if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("RANOResponseLib")]
    assert top, "the module file imports nothing from RANOResponseLib at load"
    code = ("import sys; " + "; ".join(f"import {n.module}" for n in top) +
            "; heavy = sorted({m.split('.')[0] for m in sys.modules} & {'numpy', 'SimpleITK', 'nibabel', "
            "'torch', 'scipy', 'pandas', 'matplotlib', 'vtk', 'vtkmodules', 'slicer', 'packaging'}); print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("module", MODULES)
def test_lib_names_the_module_imports_exist(module):
    """The module file imports Lib functions lazily (inside methods); each must exist."""
    imports = [n for n in ast.walk(ast.parse(_source(module)))
               if isinstance(n, ast.ImportFrom) and n.module and n.module.split(".")[0].endswith("Lib")]
    assert imports
    for node in imports:
        lib = importlib.import_module(node.module)
        for alias in node.names:
            assert hasattr(lib, alias.name), f"{module}.py imports {alias.name} from {node.module}: not there"


@pytest.mark.parametrize("module", MODULES)
def test_module_file_stays_thin(module):
    """A widget that computes is a bug: no numeric or imaging library in the module file."""
    heavy = re.findall(r"^\s*(?:import|from)\s+(numpy|torch|SimpleITK|monai|scipy|pandas|sklearn)\b",
                       _source(module), re.M)
    assert not heavy, f"{module}.py imports {heavy}; that work belongs in {module}Lib"
