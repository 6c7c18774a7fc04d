"""The dependency check the Slicer module runs (RANOResponseLib.mrml.dependencies): version ranges, not
pins; only what the runtime imports; nothing installed without asking; incompatible versions named."""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from RANOResponseLib.mrml import dependencies
from RANOResponseLib.mrml.dependencies import OPTIONAL, RUNTIME, Dependency, check, compatible, ensure

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "RANOResponse" / "RANOResponseLib"
NOT_RUNTIME = ("phantom", "demo.py", "bench.py", "web")  # tests, demos, benchmarks and the browser station
# (the web extra, installed on the review server, not into Slicer), not the Slicer module's runtime
SLICER_APP = {"vtk", "vtkmodules", "slicer", "packaging", "torch"}  # Slicer itself; torch: the PyTorch extension


def _runtime_imports() -> set[str]:
    found = set()
    for path in CORE.rglob("*.py"):
        if path.relative_to(CORE).parts[0] in NOT_RUNTIME:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            found |= {n.split(".")[0] for n in names}
    return {n for n in found if n not in sys.stdlib_module_names and not n.startswith("RANOResponse")}


def test_the_list_is_what_the_runtime_imports():
    listed = {d.module for d in RUNTIME}
    imported = _runtime_imports()
    assert imported - listed - SLICER_APP - set(OPTIONAL) == set(), "imported at run time but not checked"
    assert listed - imported == set(), "checked but never imported at run time"
    assert "nilearn" not in listed and "sklearn" not in listed


def test_the_ranges_are_the_ones_pyproject_declares():
    declared = {Requirement(r).name.lower(): str(Requirement(r).specifier)
                for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    for dep in RUNTIME:
        spec = Requirement(dep.requirement).specifier
        assert "==" not in str(spec), f"{dep.requirement}: a pin, not a range"
        assert str(spec) == declared[dep.name.lower()], dep.requirement


def test_this_environment_satisfies_every_range():
    assert check() == []


def test_missing_and_incompatible_packages_are_named():
    numpy_version = __import__("numpy").__version__
    problems = check([Dependency("numpy", "numpy<1"), Dependency("no_such_pkg_xq", "no-such-pkg-xq>=1"),
                      Dependency("nibabel", "nibabel>=5")])
    assert [str(p) for p in problems] == [f"numpy {numpy_version}: incompatible (needs numpy<1)",
                                          "no-such-pkg-xq: not installed (needs no-such-pkg-xq>=1)"]


def test_version_comparison():
    dep = Dependency("monai", "monai>=1.5,<1.7")
    assert compatible(dep, "1.6.1") and compatible(dep, "1.6.0rc1")
    assert not compatible(dep, "1.7.0") and not compatible(dep, "1.4.2")
    assert compatible(dep, "unknown")  # imports, but reports no version: nothing to compare


# --------------------------------------------------------------------------------- ensure


class Dialogs:
    """What the Slicer module passes in (confirm dialog, pip_install, PyTorch extension, warning)."""

    def __init__(self, answer: bool, install=None) -> None:
        self.answer, self.install = answer, install
        self.asked: list[str] = []
        self.pip: list[list[str]] = []
        self.warned: list[str] = []
        self.torch = 0

    def confirm(self, text: str) -> bool:
        self.asked.append(text)
        return self.answer

    def pip_install(self, requirements: list[str]) -> None:
        self.pip.append(list(requirements))
        if self.install:
            self.install()

    def install_torch(self) -> bool:
        self.torch += 1
        return True

    def run(self, deps) -> bool:
        return ensure(self.confirm, self.pip_install, self.install_torch, self.warned.append, deps)


@pytest.fixture
def fake_dist(tmp_path, monkeypatch):
    """``install()`` puts a package 'fakepkg_xq' 1.2 (with its metadata, as pip would) on the path."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))

    def install() -> None:
        (site / "fakepkg_xq").mkdir()
        (site / "fakepkg_xq" / "__init__.py").write_text("")
        meta = site / "fakepkg_xq-1.2.dist-info"
        meta.mkdir()
        (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: fakepkg-xq\nVersion: 1.2\n")
        __import__("importlib").invalidate_caches()

    return install


def test_nothing_is_asked_when_all_is_there():
    d = Dialogs(answer=False)
    assert d.run([Dependency("nibabel", "nibabel>=5")]) is True
    assert d.asked == [] and d.pip == [] and d.torch == 0


def test_a_declined_install_installs_nothing(fake_dist):
    d = Dialogs(answer=False, install=fake_dist)
    assert d.run([Dependency("fakepkg_xq", "fakepkg-xq>=1,<2")]) is False
    assert d.pip == [] and "fakepkg-xq: not installed (needs fakepkg-xq>=1,<2)" in d.asked[0]


def test_an_accepted_install_installs_the_range(fake_dist):
    d = Dialogs(answer=True, install=fake_dist)
    assert d.run([Dependency("fakepkg_xq", "fakepkg-xq>=1,<2")]) is True
    assert d.pip == [["fakepkg-xq>=1,<2"]] and d.warned == []


def test_an_install_that_does_not_help_is_reported():
    d = Dialogs(answer=True)
    assert d.run([Dependency("no_such_pkg_xq", "no-such-pkg-xq>=1")]) is False
    assert d.warned == ["Still not usable after installing (restart Slicer and try again):\n"
                        "  no-such-pkg-xq: not installed (needs no-such-pkg-xq>=1)"]


def test_slicers_own_packages_are_reported_never_installed():
    d = Dialogs(answer=True)
    assert d.run([Dependency("numpy", "numpy<1", provided_by_slicer=True)]) is True
    assert d.pip == [] and d.asked == []
    assert len(d.warned) == 1 and "numpy" in d.warned[0] and "needs numpy<1" in d.warned[0]


def test_torch_comes_from_the_pytorch_extension_after_asking(monkeypatch):
    monkeypatch.setattr(dependencies, "torch_missing", lambda: True)
    d = Dialogs(answer=False)
    assert d.run([]) is False and d.torch == 0 and "PyTorch" in d.asked[0]
    d = Dialogs(answer=True)
    assert d.run([]) is True and d.torch == 1 and d.pip == []
