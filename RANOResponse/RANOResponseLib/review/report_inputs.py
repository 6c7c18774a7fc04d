"""What the case report shows, collected from files (:func:`gather` -> :class:`ReportInputs`).

The prediction (a ``predict`` output folder), the lesion measurements (``measurements.json``, or
measured here: a manual mask next to the studies first, else predict's own automatic
segmentation; :func:`measurement_source` says which), the rule-based category and its comparison
with the network, the reviewers' verdicts (a review database) and the bundle's model card
(:func:`model_card_summary`). Missing optional parts become notes, not errors. Drawing is in
:mod:`.report_images` and :mod:`.report`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.outputs import SEGMENTATION_FILES, prediction_studies, read_prediction
from RANOResponseLib.rano.measurement import PairMeasurement
from RANOResponseLib.review.opinions import Measured


@dataclass
class ReportInputs:
    """Everything the report shows; :func:`gather` fills it from files."""

    prediction_dir: Path
    prediction: dict
    pair: PairMeasurement | None = None
    rule: Any = None  # rano.rules.RuleResult
    comparison: Any = None  # rano.rules.Comparison
    verdicts: list = field(default_factory=list)  # review.Verdict, latest per reviewer
    revisions: int = 0
    model_card: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what could not be shown, and why
    case_id: str = ""
    measured_from: str = ""  # "automatic segmentation, bundle ..." or "manual mask (...)": see measurement_source

    def shown_measurement(self) -> Measured | None:
        """The measured categories the report shows (a manual mask, measurements.json or
        predict's own segmentation), for :mod:`.opinions`; None without a measurement."""
        if self.rule is None:
            return None
        return Measured(self.rule.bidimensional, self.rule.volumetric, self.measured_from)


def model_card_summary(bundle_dir: Path | str, max_items: int = 9) -> list[str]:
    """A few lines about the model: bundle.json facts, then MODEL_CARD.md's intro statements,
    headline hold-out metrics and limits (Markdown hard wraps joined, commands left out)."""
    bundle_dir = Path(bundle_dir)
    lines: list[str] = []
    meta_file = bundle_dir / "bundle.json"
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
            train = meta.get("training", {}) if isinstance(meta, dict) else {}
            sha = str((meta.get("weights") or [{}])[0].get("sha256", ""))[:12]
            lines.append(f"Bundle {meta.get('id', '?')} ({meta.get('architecture', {}).get('name', '?')} network; "
                         f"inputs {', '.join(meta.get('modalities', []))}; {len(meta.get('weights', []))} weight "
                         f"file(s), sha256 {sha}...)" + (f", trained {train['date'][:10]}." if train.get("date") else "."))
        except (OSError, ValueError, AttributeError):
            lines.append(f"{meta_file}: unreadable")
    card = bundle_dir / "MODEL_CARD.md"
    if not card.is_file():
        return lines + [f"{card}: no model card"]
    items: list[str] = []  # one entry per paragraph or bullet, hard wraps joined
    metrics: list[str] = []
    section, fresh = "intro", True
    for raw in card.read_text(encoding="utf-8", errors="replace").splitlines():
        line = raw.strip().replace("**", "").replace("`", "")
        if line.startswith("# "):
            continue
        if line.startswith("## "):
            section, fresh = line[3:].strip().lower(), True
            continue
        if not line:
            fresh = True
            continue
        if section.startswith("hold-out"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if line.startswith("|") and len(cells) == 2 and cells[0] in ("balanced accuracy", "macro F1"):
                metrics.append(f"{cells[0]} {cells[1]}")
            continue
        if section != "intro" and not section.startswith("limits"):
            continue
        if line.startswith("- ") or fresh:
            items.append(("Limits: " if section.startswith("limits") and fresh else "") + line)
            fresh = False
        elif items:
            items[-1] += " " + line
    items = [i for i in items if not i.startswith(("- Command", "- Trained on"))]
    if metrics:  # before the limits
        at = next((i for i, t in enumerate(items) if t.startswith("Limits: ")), len(items))
        items.insert(at, "Hold-out test: " + ", ".join(metrics) + ".")
    return lines + items[:max_items]


def case_paths(prediction: dict) -> tuple[Path | None, Path | None]:
    """The baseline and follow-up study folders the prediction was made on (None where unknown)."""
    folders = prediction_studies(prediction)
    return folders.get("baseline"), folders.get("followup")


def input_image(prediction: dict, timepoint: str, modality: str) -> sitk.Image:
    """One input image of a prediction as predict read it: its file, or its DICOM series (by UID)."""
    from RANOResponseLib.imaging.io import read_image
    from RANOResponseLib.imaging.studies import load_study

    inputs = prediction["inputs"]
    source = (inputs.get("studies", {}).get(timepoint, {}).get("sequences", {}).get(modality, {})
              .get("source", {}))
    if source.get("kind") == "dicom":
        return load_study(source["path"], [modality], series={modality: source["series_uid"]}).images[modality]
    return read_image(inputs[timepoint][modality])


def measurement_source(pair: PairMeasurement | None, prediction: dict | None = None) -> str:
    """What a measurement was made from, as the panel and the report say it: ``automatic
    segmentation, bundle <id>`` when it measured predict's own segmentations, else ``manual mask
    (<scheme>: <file>)``; '' without a measurement."""
    if pair is None:
        return ""
    prediction = prediction or {}
    name = Path(pair.baseline.source).name
    if name in SEGMENTATION_FILES.values():
        bundle = ((prediction.get("measured") or {}).get("segmentation_bundle") or {}).get("id", "?")
        return f"automatic segmentation, bundle {bundle}"
    return f"manual mask ({pair.baseline.scheme}: {name or 'not a file'})"


def gather(
    prediction_dir: Path | str,
    measurements: Path | str | None = None,
    db: Path | str | None = None,
    case_id: str | None = None,
    source: str = "auto",
    criteria: str = "RANO",
) -> ReportInputs:
    """Collect the report's content. Missing optional parts become notes, not errors."""
    from RANOResponseLib.rano.rules import compare_with_prediction, decide, read_assessment

    outdir = Path(prediction_dir)
    pred = read_prediction(outdir)
    inputs = ReportInputs(outdir if outdir.is_dir() else outdir.parent, pred)
    if measurements is not None:
        inputs.pair, inputs.rule, inputs.comparison = read_assessment(measurements)
    else:
        from RANOResponseLib.rano.measurement import measure_prediction

        try:
            inputs.pair = measure_prediction(inputs.prediction_dir, source)
        except RANOInputError as e:
            inputs.notes.append(f"No lesion measurements: {e}")
    inputs.measured_from = measurement_source(inputs.pair, pred)
    if inputs.pair is not None and inputs.rule is None:
        inputs.rule = decide(inputs.pair, criteria=criteria)
    if inputs.rule is not None:
        inputs.comparison = compare_with_prediction(inputs.rule, pred)
    base, fu = case_paths(pred)
    if db is not None:
        from RANOResponseLib.review.store import ReviewStore
        from RANOResponseLib.review.worklist import default_case_id

        with ReviewStore(db) as store:
            if case_id:
                found = store.latest(case_id)
            else:
                found = [v for v in store.latest()
                         if base and fu and Path(v.baseline) == base and Path(v.followup) == fu]
                if not found and base and fu:
                    found = store.latest(default_case_id(fu.parent.name, str(base), str(fu)))
            inputs.verdicts = found
            ids = {v.case_id for v in found}
            inputs.revisions = sum(1 for cid in ids for v in store.history(cid) if v.supersedes is not None)
        if not found:
            inputs.notes.append(f"No reviewer verdict for this case in {db}.")
    inputs.case_id = case_id or (inputs.verdicts[0].case_id if inputs.verdicts else
                                 (f"{fu.parent.name}_{base.name}_{fu.name}" if base and fu else outdir.name))
    bundle_path = (pred.get("bundle") or {}).get("path")
    inputs.model_card = model_card_summary(bundle_path) if bundle_path else ["(bundle path not recorded)"]
    return inputs
