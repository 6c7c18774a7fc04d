"""Sample cases shipped with the extension (``Resources/Samples/<name>/``), for self-tests and demos.

Each sample is a baseline and a follow-up study folder (CT1, T1, T2, FLAIR and a DeepBraTumIA
native segmentation, in LUMIERE's layout) and a ``sample.json`` that says what it is, the command
that made it and its known truth. They are made once by the phantom generator at a coarse
spacing and shipped, so a clean Slicer runs the module's self-test without generating anything
(the phantom needs nilearn, which the runtime does not install).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.resources import find_resource

DEFAULT_SAMPLE = "phantom-pd-3mm"


@dataclass(frozen=True)
class SampleCase:
    """A shipped case pair: its two study folders and what ``sample.json`` says about it."""

    name: str
    folder: Path
    baseline: Path
    followup: Path
    modalities: tuple[str, ...]
    truth: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def sample_names() -> list[str]:
    """The names of the shipped samples (folders of ``Resources/Samples`` with a sample.json)."""
    root = find_resource("Samples")
    return sorted(p.parent.name for p in root.glob("*/sample.json")) if root.is_dir() else []


def sample_case(name: str = DEFAULT_SAMPLE) -> SampleCase:
    """The shipped sample ``name``; RANOInputError naming the folder when it is absent or broken."""
    folder = find_resource("Samples", name)
    meta = folder / "sample.json"
    if not meta.is_file():
        raise RANOInputError(f"{meta}: sample case not found (shipped samples: {', '.join(sample_names()) or 'none'})")
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
        baseline, followup = folder / info["baseline"], folder / info["followup"]
        modalities = tuple(info["modalities"])
    except (ValueError, KeyError, TypeError) as e:
        raise RANOInputError(f"{meta}: not a sample description ({e})") from None
    for study in (baseline, followup):
        if not study.is_dir():
            raise RANOInputError(f"{study}: study folder of sample {name} missing")
    return SampleCase(name, folder, baseline, followup, modalities, dict(info.get("truth", {})), info)
