"""The per-case report that gets filed: a two-page A4 PDF (and optionally one PNG per page).

Built from a ``rano-response predict`` output folder (``prediction.json``, ``gradcam.nii.gz``,
``followup_to_baseline.tfm``), the lesion measurements (``rano-response measure``'s
``measurements.json``, or measured here: a manual mask next to the studies first, else predict's
own automatic segmentation; the report says which, :func:`measurement_source`), the reviewers'
verdicts (a review database) and the bundle's model card. The study folders are the ones the
prediction's inputs description names (a DICOM series is recorded as its study folder).

Page 1: both timepoints at the same axial level (the follow-up registered onto the baseline),
lesion outlines and RANO diameters on CT1, Grad-CAM iso-contours on FLAIR, the result box (the
three opinions: network with "calibrated" and "uncertain", measured, the suggested category; worded
by :mod:`.opinions`) and the network's probabilities. Page 2: the measurements table, the
rule-based category with its reasoning, what lies behind the opinions (the network before
calibration, the suggestion's probabilities, inputs and model), the reviewers' verdicts and the
model card summary. Page 2's text shrinks (to 70 % at most) when it would run into the footer.

Printed in black and white it stays readable: grey-scale images, outlines drawn as white lines
on a black halo (visible on any grey), diameters solid (d1) and dashed (d2), Grad-CAM as dashed
and solid iso-lines with their levels written on them, probability bars hatched with the values
printed, and nothing said by colour alone.

This module lays out the pages (:func:`render_report`) and is the report's import point
(:func:`write_report`, :func:`gather`); the content is collected in :mod:`.report_inputs`, page 1's
images are drawn in :mod:`.report_images`.
"""

from __future__ import annotations

import textwrap
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from RANOResponseLib import __version__
from RANOResponseLib.review.opinions import opinion_lines, opinions
# _Panel, _draw_panel, _halo, _oriented: the course report draws with them, imported from here
from RANOResponseLib.review.report_images import (  # noqa: F401
    FONT,
    draw_table,
    _draw_panel,
    _halo,
    _oriented,
    _page_images,
    _Panel,
)
# the content's names, imported from here by the CLI, the web station and the tests
from RANOResponseLib.review.report_inputs import (  # noqa: F401
    ReportInputs,
    case_paths,
    gather,
    input_image,
    measurement_source,
    model_card_summary,
)

A4 = (8.27, 11.69)
HATCHES = ("//", "\\\\", "xx", "..", "++", "--")


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.fill(t, width, subsequent_indent="   ") for t in text.split("\n"))


def _header(fig: Any, inputs: ReportInputs, page: int) -> None:
    base, fu = case_paths(inputs.prediction)
    who = f"{fu.parent.name}:  {base.name}  ->  {fu.name}" if base and fu else inputs.case_id
    fig.text(0.05, 0.972, f"RANO response review   {who}", fontsize=FONT + 4, fontweight="bold", va="top")
    fig.text(0.05, 0.945, "Research software - NOT FOR CLINICAL USE.   Case " + inputs.case_id
             + f"   page {page}/2", fontsize=FONT - 1, va="top")


def _probabilities(fig: Any, inputs: ReportInputs, box: tuple[float, float, float, float]) -> None:
    """The network's probabilities as hatched bars, its class marked."""
    probs = inputs.prediction["probabilities"]
    names = list(probs)
    vals = [float(probs[n]) for n in names]
    ax = fig.add_axes(box)
    y = np.arange(len(names))[::-1]
    label = inputs.prediction["label"]
    bars = ax.barh(y, vals, color="0.85", edgecolor="black", linewidth=1.2)
    for b, n, h in zip(bars, names, HATCHES):
        b.set_hatch(h)
        if n == label:
            b.set_linewidth(3.0)
    for yy, v, n in zip(y, vals, names):
        ax.text(min(v, 1.0) + 0.02, yy, f"{v * 100:.0f} %" + ("  <- network" if n == label else ""),
                va="center", fontsize=FONT + 1, fontweight="bold" if n == label else "normal")
    ax.set_yticks(y, names, fontsize=FONT + 2)
    ax.set_xlim(0, 1.35)
    ax.set_xticks([0, 0.5, 1.0], ["0", "50 %", "100 %"], fontsize=FONT - 1)
    for s in ("top", "right"):
        ax.spines[s].set_visible(False)
    calibrated = inputs.prediction.get("calibrated")
    how = "" if calibrated is None else (" (calibrated)" if calibrated else " (not calibrated)")
    ax.set_title(f"Network probabilities{how}", fontsize=FONT + 2, loc="left")


def result_lines(inputs: ReportInputs) -> list[str]:
    """Page 1's result box: the three opinions (network, measured, suggested), whether network
    and measurement agree, and the reviewers' verdicts."""
    pred = inputs.prediction
    lines = opinion_lines(pred, inputs.shown_measurement())
    lines[0] += f"  - bundle {(pred.get('bundle') or {}).get('id', '?')}"
    if inputs.comparison is not None:
        lines.append(f"Network and measured {inputs.rule.criteria}:  "
                     + ("AGREE" if inputs.comparison.agree else "DISAGREE - see page 2"))
    for v in inputs.verdicts:
        how = "agrees with model" if v.agree else ("overrides model" if v.agree is not None else "no model shown")
        lines.append(f"Reviewer {v.reviewer}:  {v.label}  ({how}, confidence {v.confidence}/5)")
    if not inputs.verdicts:
        lines.append("Reviewer:  no verdict recorded")
    return lines


def _result_box(fig: Any, inputs: ReportInputs, x: float, y: float) -> float:
    """Draw the result box with its top at ``y``; returns its bottom (figure coordinates)."""
    text = fig.text(x, y, _wrap("\n".join(result_lines(inputs)), 92), fontsize=FONT, va="top", linespacing=1.45,
                    bbox=dict(boxstyle="square,pad=0.6", facecolor="white", edgecolor="black", linewidth=1.5))
    extent = text.get_window_extent(fig.canvas.get_renderer())
    return float(fig.transFigure.inverted().transform((0.0, extent.y0))[1]) - 0.012  # less the box's padding


def _table(fig: Any, rows: list[dict], box: tuple[float, float, float, float]) -> None:
    ax = fig.add_axes(box)
    ax.axis("off")
    if not rows:
        ax.text(0, 1, "No enhancing lesion at either timepoint.", fontsize=FONT, va="top")
        return
    cols = ["time", "lesion", "d1", "d2", "d1 x d2", "enh. vol", "slices", "measurable", "status"]
    cells = [[r["timepoint"], r["lesion"] + (" *" if r["edited"] else ""), f"{r['d1_mm']:.1f}", f"{r['d2_mm']:.1f}",
              f"{r['product_mm2']:.0f}", f"{r['enhancing_ml']:.2f}", str(r["slices"]),
              "yes" if r["measurable"] == "yes" else "no", r["status"]] for r in rows[:18]]
    draw_table(ax, cells, cols, [0.11, 0.08, 0.07, 0.07, 0.09, 0.10, 0.07, 0.145, 0.265], FONT - 1, 1.45)


def render_report(inputs: ReportInputs, out: Path | str, png_prefix: Path | str | None = None) -> Path:
    """Write the PDF (atomically); with ``png_prefix`` also ``<prefix>-page1.png``, ``-page2.png``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages

    from RANOResponseLib.core.files import atomic_file
    from RANOResponseLib.rano.measurement import lesion_table

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figs = []
    plt.rcParams.update({"font.size": FONT, "hatch.linewidth": 1.0})

    # page 1
    f1 = plt.figure(figsize=A4)
    _header(f1, inputs, 1)
    _page_images(f1, inputs, (0.05, 0.385, 0.90, 0.495))
    bottom = _result_box(f1, inputs, 0.06, 0.34)
    # the bars fill what the box leaves (their title and tick labels need about 0.055)
    _probabilities(f1, inputs, (0.14, 0.035, 0.62, float(np.clip(bottom - 0.035 - 0.045, 0.07, 0.15))))
    figs.append(f1)

    # page 2
    f2 = plt.figure(figsize=A4)
    _header(f2, inputs, 2)
    y = 0.92
    f2.text(0.05, y, "Enhancing lesions", fontsize=FONT + 2, fontweight="bold", va="top")
    f2.text(0.05, y - 0.024, "Diameters in mm, products in mm2, enhancing volume in mL; * = diameters edited by "
            "a reader.", fontsize=FONT - 1, va="top")
    y -= 0.024
    rows = lesion_table(inputs.pair) if inputs.pair is not None else []
    n_rows = min(len(rows), 18) + 1
    table_h = 0.024 * max(n_rows, 2)
    _table(f2, rows, (0.05, y - 0.02 - table_h, 0.90, table_h))
    y = y - 0.04 - table_h
    blocks: list[tuple[str, list[str]]] = []
    if inputs.pair is not None:
        p = inputs.pair
        blocks.append(("Sums", [
            f"Sum of products (measurable): baseline {p.baseline.spd_mm2:.0f} mm2, follow-up {p.followup.spd_mm2:.0f} mm2"
            + (f" ({inputs.rule.spd_change_percent:+.1f} %)" if inputs.rule and inputs.rule.spd_change_percent is not None else ""),
            f"Enhancing volume (measurable): baseline {p.baseline.measurable_volume_ml:.2f} mL, follow-up "
            f"{p.followup.measurable_volume_ml:.2f} mL"
            + (f" ({inputs.rule.volume_change_percent:+.1f} %)" if inputs.rule and inputs.rule.volume_change_percent is not None else ""),
            f"Measured from {inputs.measured_from} ({p.baseline.space} space); follow-up related by {p.transform}.",
        ]))
    if inputs.rule is not None:
        blocks.append((f"Rule-based category: {inputs.rule.category}  ({inputs.rule.criteria})",
                       [f"- {r}" for r in inputs.rule.reasoning]))
    if inputs.comparison is not None:
        blocks.append(("Model vs rules", [inputs.comparison.message]))
    details = [f"- {d}" for o in opinions(inputs.prediction, inputs.shown_measurement()) for d in o.details]
    if details:  # page 1 says the three opinions; here what lies behind them
        blocks.append(("Network calibration and the suggested category", details))
    verdict_lines = []
    for v in inputs.verdicts:
        how = "agrees with the model" if v.agree else ("overrides the model" if v.agree is not None else "no model shown")
        verdict_lines.append(f"{v.reviewer}: {v.label} ({how}; confidence {v.confidence}/5; {v.created_at} UTC)"
                             + (f"  Note: {v.note}" if v.note else ""))
    if inputs.revisions:
        verdict_lines.append(f"({inputs.revisions} earlier verdict(s) revised; full history in the review database)")
    blocks.append(("Reviewer verdict", verdict_lines or ["No verdict recorded."]))
    blocks.append(("Model card", inputs.model_card))
    if inputs.notes:
        blocks.append(("Notes", inputs.notes))
    # the blocks fill the page down to the footer: a long model card or reasoning makes the text smaller
    # (wrapped wider), down to 70 %
    def height(scale: float) -> float:
        return sum(0.04 + 0.0155 * scale * (1 + "\n".join(_wrap(t, int(98 / scale)) for t in lines).count("\n"))
                   for _, lines in blocks)

    scale = next((s for s in np.arange(1.0, 0.7, -0.05) if height(s) <= y - 0.035), 0.7)
    for title, lines in blocks:
        f2.text(0.05, y, title, fontsize=FONT + 2, fontweight="bold", va="top")
        body = "\n".join(_wrap(t, int(98 / scale)) for t in lines)
        f2.text(0.05, y - 0.022, body, fontsize=(FONT - 1) * scale, va="top", linespacing=1.35)
        y -= 0.022 + 0.0155 * scale * (body.count("\n") + 1) + 0.018
    f2.text(0.05, 0.015, f"Generated {datetime.now(timezone.utc).isoformat(timespec='seconds')} by rano-response "
            f"{__version__} from {inputs.prediction_dir}", fontsize=FONT - 3, va="bottom")
    figs.append(f2)

    with atomic_file(out) as tmp:
        with PdfPages(tmp) as pdf:
            for f in figs:
                pdf.savefig(f)
    if png_prefix is not None:
        for i, f in enumerate(figs, start=1):
            with atomic_file(Path(f"{png_prefix}-page{i}.png")) as tmp:
                f.savefig(tmp, dpi=110, format="png")
    for f in figs:
        plt.close(f)
    return out


def write_report(
    prediction_dir: Path | str,
    out: Path | str,
    measurements: Path | str | None = None,
    db: Path | str | None = None,
    case_id: str | None = None,
    source: str = "auto",
    criteria: str = "RANO",
    png_prefix: Path | str | None = None,
) -> Path:
    """``rano-response report``: gather the content, then render the PDF."""
    return render_report(gather(prediction_dir, measurements, db, case_id, source, criteria), out, png_prefix)
