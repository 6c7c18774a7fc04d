"""Which Python packages the core needs inside Slicer, and which are missing.

Slicer ships numpy and VTK; torch comes from the PyTorch extension's ``PyTorchUtils`` (it picks
the CUDA build that matches the driver), the rest from ``slicer.util.pip_install``. The module
asks the user before installing anything; this file only says what is missing.
"""

from __future__ import annotations

import importlib.util

# import name -> pip requirement (same pins as constraints.txt, so Slicer and pytest agree)
PACKAGES: dict[str, str] = {
    "SimpleITK": "SimpleITK==2.5.7",
    "nibabel": "nibabel==5.4.2",
    "scipy": "scipy==1.17.1",
    "pandas": "pandas==3.1.1",
    "sklearn": "scikit-learn==1.9.1",
    "matplotlib": "matplotlib==3.11.2",
    "tqdm": "tqdm==4.70.1",
    "monai": "monai==1.6.1",
}
TORCH = "torch"


def missing_packages(packages: dict[str, str] | None = None) -> list[str]:
    """pip requirements of the packages that cannot be imported (torch excluded: see ``torch_missing``)."""
    packages = PACKAGES if packages is None else packages
    return [req for name, req in packages.items() if importlib.util.find_spec(name) is None]


def torch_missing() -> bool:
    return importlib.util.find_spec(TORCH) is None
