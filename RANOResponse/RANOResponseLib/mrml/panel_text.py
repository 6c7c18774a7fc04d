"""What the RANO Response panel's results section says, without Qt (the widget only displays it).

* :class:`ClassComparison` / :func:`compare_classes`: the network's class beside the class
  measured from the segmentations, RANO and RANO 2.0, and whether they disagree;
* :func:`result_html`: the results text: the three opinions (network, measured, the suggested
  category; worded by :mod:`RANOResponseLib.review.opinions`), probabilities, input check, the
  comparison with a disagreement in red.

Light to import (the module file imports the panel's logic when Slicer starts): what measuring
needs is imported where it is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass
class ClassComparison:
    """The network's class beside the class measured from the segmentations (RANO and RANO 2.0)."""

    network: str
    rano: str  # measured, RANO (bidimensional)
    rano2: str  # measured, RANO 2.0 (volumetric)
    source: str  # what was measured ("automatic segmentation, bundle ...", "manual mask (...)")
    edited: list[str] = field(default_factory=list)  # lesions whose diameters the reader moved

    @property
    def disagreements(self) -> list[str]:
        """The criteria whose measured class is not the network's ([] when both agree)."""
        return [name for name, c in (("RANO", self.rano), ("RANO 2.0", self.rano2)) if c != self.network]

    def message(self) -> str:
        """One sentence: agreement, or the disagreement spelled out."""
        if not self.disagreements:
            return f"Network and measurement agree: {self.network} (RANO and RANO 2.0)."
        return (f"DISAGREEMENT: the network predicts {self.network}; measured RANO gives {self.rano}, "
                f"RANO 2.0 gives {self.rano2}. Review the measurements and the images.")


def compare_classes(summary: Mapping[str, Any], assessment: Any = None) -> ClassComparison | None:
    """The network's class beside the measured one: from ``assessment`` (a
    :class:`~RANOResponseLib.mrml.measurement_scene.CaseAssessment`, with the reader's moved lines)
    when given, else from prediction.json's ``measured`` block; None when neither exists."""
    from RANOResponseLib.review.report import measurement_source

    network = str(summary["label"])
    if assessment is not None:
        edited = [f"{tp} {le.name}" for tp, m in (("baseline", assessment.pair.baseline),
                                                  ("follow-up", assessment.pair.followup))
                  for le in m.lesions if le.edited]
        return ClassComparison(network, assessment.rule.bidimensional, assessment.rule.volumetric,
                               assessment.source, edited)
    measured = summary.get("measured")
    if not measured:
        return None
    from RANOResponseLib.mrml.tumour_scene import measured_pair

    return ClassComparison(network, str(measured["category"]), str(measured["category_rano2"]),
                           measurement_source(measured_pair(summary), dict(summary)))


def result_html(summary: Mapping[str, Any], comparison: ClassComparison | None = None) -> str:
    """The panel's result text: the three opinions (:mod:`RANOResponseLib.review.opinions`): the
    network's class with "calibrated" and, in red, "uncertain" and why; each class's probability
    and spread; with ``comparison`` the measured classes beside the network's, a disagreement in
    red (else why there is no measurement); the suggested category, marked as the suggestion; and
    the input guard's verdict with its reasons (e.g. "outside what the model was trained on")."""
    from html import escape

    from RANOResponseLib.review.opinions import Measured, opinions

    shown = Measured(comparison.rano, comparison.rano2, comparison.source) if comparison is not None else None
    network, measured_op, *suggested = opinions(summary, shown)
    uncertain = "".join(f"<p style='color:#b00000'><b>{escape(n)}</b></p>" for n in network.notes)
    spread = summary.get("ensemble_spread", {})
    rows = "".join(f"<tr><td>{c}</td><td align='right'>{v:.2f}</td>"
                   f"<td align='right'>± {spread.get(c, 0):.2f}</td></tr>"
                   for c, v in summary["probabilities"].items())
    check = summary.get("input_check") or {}
    reasons = "".join(f"<li>{escape(r)}</li>" for r in check.get("reasons", []))
    verdict = (f"<p><b>Input check: {escape(check['verdict'])}</b>" + (f"<ul>{reasons}</ul>" if reasons else "")
               + "</p>") if check else ""
    measured = "<p>" + "<br>".join(escape(t) for t in (measured_op.line, *measured_op.notes)) + "</p>"
    if comparison is not None:
        c = comparison
        cells = "".join(f"<td align='center'><b>{escape(v)}</b></td>" for v in (c.network, c.rano, c.rano2))
        colour = "#b00000" if c.disagreements else "black"
        edited = f" Diameters moved by the reader: {escape(', '.join(c.edited))}." if c.edited else ""
        measured = ("<table border='1' cellspacing='0' cellpadding='3'><tr><th>Network</th><th>Measured RANO</th>"
                    f"<th>Measured RANO 2.0</th></tr><tr>{cells}</tr></table>"
                    f"<p style='color:{colour}'><b>{escape(c.message())}</b></p>"
                    f"<p>Measured from {escape(c.source)}.{edited}</p>")
    suggestion = "".join(f"<p style='background-color:#e8eef8'><b>{escape(s.line)}</b>"
                         + "".join(f"<br>{escape(n)}" for n in s.notes) + "</p>" for s in suggested)
    return (f"<b>{escape(network.line)}</b> &nbsp; (model {escape(str(summary['bundle']['id']))})"
            f"{uncertain}<table>{rows}</table>{measured}{suggestion}{verdict}"
            "<i>Research use only, not for clinical use.</i>")
