"""Where the extension's shared ``Resources`` folder is (model bundles, sample studies).

In a source checkout it is the repository's ``Resources/`` (two levels above this package's
folder); in an installed Slicer extension, CMake copies it beside the scripted modules, one level
above. Nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path

_LIB = Path(__file__).resolve().parents[1]  # .../RANOResponseLib


def resource_candidates(*parts: str) -> list[Path]:
    """``Resources/<parts>`` in a checkout, then in an installed extension."""
    return [root / "Resources" / Path(*parts) for root in (_LIB.parents[1], _LIB.parent)]


def find_resource(*parts: str) -> Path:
    """The first existing ``Resources/<parts>``, else the checkout's path (for the error message)."""
    candidates = resource_candidates(*parts)
    return next((c for c in candidates if c.exists()), candidates[0])
