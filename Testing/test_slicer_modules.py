"""Static checks of the two Slicer module files, which need the Slicer application to run.

What can be checked without Qt is checked here: every ``self.ui.<name>`` exists in the module's
.ui file, every GUI-bound parameter exists in the parameter node, every Lib function the module
imports exists with that name, every ``self.logic.<method>`` exists, and the module files stay
thin (they import nothing that computes)."""

from __future__ import annotations

import ast
import importlib
import re
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


@pytest.mark.parametrize("module", MODULES)
def test_self_logic_calls_exist_in_the_logic_class(module):
    logic = _classes(module)[f"{module}Logic"]
    methods = {f.name for f in logic.body if isinstance(f, ast.FunctionDef)}
    called = set(re.findall(r"self\.logic\.(\w+)\(", _source(module)))
    assert called and called - methods == set(), f"missing logic methods: {sorted(called - methods)}"


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


def test_runtime_requirements_match_the_pins():
    from RANOResponseLib.mrml.dependencies import PACKAGES

    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().split()
                if "==" in line and not line.startswith("#"))
    pins = {k.lower(): v for k, v in pins.items()}
    for requirement in PACKAGES.values():
        name, version = requirement.split("==")
        assert pins.get(name.lower()) == version, f"{requirement} differs from constraints.txt"


def test_missing_packages_reports_only_missing_ones():
    from RANOResponseLib.mrml.dependencies import missing_packages

    assert missing_packages({"json": "json==0", "no_such_package_xyz": "no-such-package-xyz==1.0"}) == [
        "no-such-package-xyz==1.0"]
