"""The three opinions on a case, said the same way by the Slicer panel, the PDF report and the
review station: the network's class, the RANO category measured from the segmentations, and the
suggested category that combines them (issue 12).

Read from ``prediction.json`` (:func:`RANOResponseLib.core.outputs.read_prediction`):

- the network: ``label`` and ``probabilities`` (calibrated when ``calibrated`` is true), the
  ``uncertain`` flag with its ``why`` (:func:`RANOResponseLib.inference.calibration.uncertain`);
- measured: the ``measured`` block (:mod:`RANOResponseLib.inference.measured`), or what the
  display measured itself (a manual mask, lines the reader moved: :class:`Measured`);
- suggested: the ``suggested`` block (:func:`RANOResponseLib.inference.calibration.suggest`),
  marked as the suggestion and named by what it combined ("Suggested: PD (network + measured RANO)").

Predictions written before a field existed still display: an absent ``calibrated``,
``uncertain`` or ``suggested`` is left out, an absent ``measured`` is said to be unavailable. A
present but empty ``measured`` or ``suggested`` says why (predicted without segmentation, a bundle
without a suggestion model). Plain text; the panel escapes it into HTML.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

NETWORK, MEASURED, SUGGESTED = "network", "measured", "suggested"


@dataclass(frozen=True)
class Measured:
    """A measured category that a display shows instead of prediction.json's own ``measured``
    block (a manual mask, diameters the reader moved): RANO, RANO 2.0 and what was measured."""

    rano: str
    rano2: str | None = None
    source: str = ""


@dataclass(frozen=True)
class Opinion:
    """One opinion: who gives it (``role``), its category ('' when there is none), its line, and
    further lines (``notes`` always shown, ``details`` only where there is room: the report's
    second page)."""

    role: str
    category: str
    line: str
    notes: tuple[str, ...] = ()
    details: tuple[str, ...] = ()
    warning: bool = False  # the network flagged its prediction as uncertain


def _probs(probabilities: Mapping[str, Any]) -> str:
    return ", ".join(f"{c} {float(p):.2f}" for c, p in probabilities.items())


def network_opinion(prediction: Mapping[str, Any]) -> Opinion:
    """The network's class with its probability, whether the probabilities are calibrated, and
    the "uncertain" flag with its reason."""
    label = str(prediction["label"])
    how = [f"probability {float(prediction['probabilities'][label]):.2f}"]
    if "calibrated" in prediction:
        how.append("calibrated" if prediction["calibrated"] else "not calibrated")
    notes: list[str] = []
    details: list[str] = []
    flag = prediction.get("uncertain") or {}
    if flag.get("flag"):
        notes.append(f"UNCERTAIN: {flag.get('why') or 'no reason recorded'}")
    elif flag:
        details.append(f"Not flagged uncertain: {flag.get('why', '')}")
    if prediction.get("calibrated") and prediction.get("probabilities_uncalibrated"):
        details.append(f"Network probabilities before calibration: {_probs(prediction['probabilities_uncalibrated'])}")
    return Opinion(NETWORK, label, f"Network: {label} ({', '.join(how)})", tuple(notes), tuple(details),
                   warning=bool(flag.get("flag")))


def _own_measured(prediction: Mapping[str, Any]) -> Measured | None:
    block = prediction.get("measured")
    if not block or not block.get("category"):
        return None
    bundle = (block.get("segmentation_bundle") or {}).get("id", "?")
    return Measured(str(block["category"]), block.get("category_rano2"), f"automatic segmentation, bundle {bundle}")


def measured_opinion(prediction: Mapping[str, Any], measured: Measured | None = None) -> Opinion:
    """The measured RANO (and RANO 2.0) category: ``measured`` when the display measured itself,
    else prediction.json's ``measured`` block; unavailable, with why, when neither exists."""
    shown = measured or _own_measured(prediction)
    if shown is None:
        why = "predicted without segmentation" if "measured" in prediction else "no segmentation in this prediction"
        return Opinion(MEASURED, "", f"Measured: not available ({why})")
    rano2 = f", RANO 2.0 {shown.rano2}" if shown.rano2 else ""
    notes = (f"from {shown.source}",) if shown.source else ()
    return Opinion(MEASURED, shown.rano, f"Measured: RANO {shown.rano}{rano2}", notes)


def _combined_from(used: list[str]) -> str:
    """"network + measured RANO (+ clinical data)" from the suggestion's ``used`` list."""
    parts = []
    for u in used:
        if u.startswith("network"):
            parts.append("network")
        elif u.startswith("measured"):
            parts.append("measured RANO")
        elif u.startswith("clinical") and not u.startswith("clinical: none given"):
            parts.append("clinical data")
    return " + ".join(parts) or "?"


def suggested_opinion(prediction: Mapping[str, Any], measured: Measured | None = None) -> Opinion | None:
    """The suggested category, marked as the suggestion; None for a prediction made before
    suggestions existed (no ``suggested`` field). A suggestion made from another measurement than
    the one shown (``measured``) says so."""
    if "suggested" not in prediction:
        return None
    sug = prediction["suggested"]
    if not sug:
        why = ("needs the measured RANO category; predicted without segmentation" if not _own_measured(prediction)
               else "the bundle has no suggestion model")
        return Opinion(SUGGESTED, "", f"Suggested: none ({why})")
    category, used = str(sug["category"]), [str(u) for u in sug.get("used", [])]
    probs = sug.get("probabilities") or {}
    notes = [f"a suggestion (probability {float(probs[category]):.2f}): the reader decides"
             if category in probs else "a suggestion: the reader decides"]
    own = _own_measured(prediction)
    if measured is not None and own is not None and measured.rano != own.rano:
        notes.append(f"made from the automatic measurement (RANO {own.rano}), not from the one shown here")
    details = [f"Suggested probabilities: {_probs(probs)}"] if probs else []
    if used:
        details.append("Combined from: " + "; ".join(used))
    model = sug.get("model") or {}
    if model:
        method = str(model.get("method", "?")).replace("-", " ")
        fitted = f", fitted on {model['fitted_on']}" if model.get("fitted_on") else ""
        cv = model.get("cv") or {}
        score = cv.get("pooled_balanced_accuracy")
        folds = cv.get("folds")
        figure = (f"; cross-validated balanced accuracy {float(score):.2f}"
                  + (f" ({folds} folds, pooled)" if folds else "")) if score is not None else ""
        details.append(f"Combination model: {method}{fitted}{figure}")
    return Opinion(SUGGESTED, category, f"Suggested: {category} ({_combined_from(used)})", tuple(notes),
                   tuple(details))


def opinions(prediction: Mapping[str, Any], measured: Measured | None = None) -> list[Opinion]:
    """Network, measured, suggested (the last left out for predictions that predate it)."""
    out = [network_opinion(prediction), measured_opinion(prediction, measured)]
    sug = suggested_opinion(prediction, measured)
    return out + ([sug] if sug is not None else [])


def opinion_lines(prediction: Mapping[str, Any], measured: Measured | None = None, details: bool = False,
                  indent: str = "   ") -> list[str]:
    """The opinions as plain lines: each opinion's line, then its notes (and with ``details`` its
    details) indented by ``indent``."""
    lines: list[str] = []
    for o in opinions(prediction, measured):
        lines.append(o.line)
        lines += [indent + n for n in (*o.notes, *(o.details if details else ()))]
    return lines
