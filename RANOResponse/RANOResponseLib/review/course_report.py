"""The course of a patient on paper: the burden plot and a multi-page PDF, from ``timeline.json``.

``burden.png``: the sum of products (left axis) and the enhancing and non-enhancing volumes (right
axis) over the weeks; the RANO category written at every follow-up (a check mark: confirmed,
``?``: pending, a cross: not confirmed), the nadir each follow-up was compared with drawn as a step line,
the baseline marked and the post-radiotherapy window (pseudoprogression possible) hatched.

``timeline_report.pdf``: page 1 the summary (the plot, one table row per timepoint, how the
baseline and the criteria were chosen); then one page per timepoint: its reference image (CT1) at
the level of its largest lesion with the lesion outlines and RANO diameters (course lesion ids),
the baseline brought onto the same slice through the registration, the whole slice with every
tumour label, the lesion table and the reasoning of both readings. Same style as the case report
(:mod:`.report`): grey-scale images, outlines and lines drawn black and white, readable in print.

:func:`course_writers` gives the writers :func:`RANOResponseLib.inference.timeline.run_timeline`
calls; :func:`write_course_report` re-renders the PDF of an existing timeline folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import SimpleITK as sitk

from RANOResponseLib import __version__
from RANOResponseLib.core.names import LABEL_CORE, LABEL_EDEMA, LABEL_ENHANCING
from RANOResponseLib.rano.course import NOT_ASSESSED
from RANOResponseLib.review.report import A4, FONT, _draw_panel, _halo, _oriented, _Panel, _wrap
from RANOResponseLib.review.report_images import draw_table

MARK = {"yes": " \u2713", "pending": " ?", "no": " \u2717", "": ""}  # check mark, question mark, cross
LABEL_STYLES = {LABEL_ENHANCING: ("-", "enhancing"), LABEL_CORE: ("--", "necrotic / non-enhancing"),
                LABEL_EDEMA: (":", "edema")}


def _weeks(doc: dict) -> np.ndarray:
    return np.array([float(r["weeks"]) for r in doc["timepoints"]])


def _category_text(r: dict) -> str:
    return f"{r['category']}{MARK.get(r['confirmed'], '')}" if r["category"] else ""


# ------------------------------------------------------------------------------ the plot


def plot_burden(doc: dict, ax: Any) -> None:
    """Draw the burden curve of a timeline document on ``ax`` (see the module docstring)."""
    rows = doc["timepoints"]
    w = _weeks(doc)
    # a scan every week apart is drawn apart: same-week scans (pre-op, post-op) get a small offset
    x = w + np.array([0.4 * sum(1 for v in w[:i] if v == w[i]) for i in range(len(w))])
    spd = np.array([r["spd_mm2"] for r in rows], float)
    base = next(i for i, r in enumerate(rows) if r["role"] == "baseline")
    ax.plot(x, spd, "-o", color="black", linewidth=2, markersize=6, label="sum of products (mm2)", zorder=3)
    ax.plot(x[:base], spd[:base], "o", color="0.6", markersize=6, zorder=4)
    fu = [i for i, r in enumerate(rows) if r["role"] == "follow-up"]
    if fu:  # each follow-up's nadir, drawn over the interval that leads to it
        nadir = [rows[i]["nadir_mm2"] for i in fu]
        ax.step([x[base]] + [x[i] for i in fu], nadir[:1] + nadir, where="pre", linestyle="-.", color="0.35",
                linewidth=1.4, label="nadir each scan is compared with")
    top = max(float(spd.max()) if len(spd) else 0.0, 1.0)
    for i, r in enumerate(rows):
        text = _category_text(r) or ("baseline" if r["role"] == "baseline" else ("pre-op" if r["role"] == "pre-op" else ""))
        if text:
            ax.annotate(text, (x[i], spd[i]), xytext=(0, 9), textcoords="offset points", ha="center",
                        fontsize=FONT - 1, fontweight="bold" if r["category"] == "PD" else "normal",
                        path_effects=_halo(1.0, "white"))
    ax.axvline(x[base], color="0.3", linewidth=1, linestyle=":")
    crit = doc["criteria"]
    rt_end = crit.get("rt_end_weeks")
    rt_end = float(rows[base]["weeks"]) if rt_end is None else float(rt_end)
    ax.axvspan(rt_end, rt_end + float(crit.get("pseudoprogression_weeks", 12.0)), facecolor="none", edgecolor="0.6",
               hatch="//", linewidth=0, label="post-radiotherapy window")
    ax.set_ylim(0, top * 1.25)
    ax.set_xlabel("weeks (since the first scan)")
    ax.set_ylabel("sum of products (mm2)")
    vol = ax.twinx()
    vol.plot(x, [r["enhancing_ml"] for r in rows], "--s", color="0.25", markersize=4, linewidth=1.2,
             label="enhancing volume (mL)")
    vol.plot(x, [r["non_enhancing_ml"] for r in rows], ":^", color="0.45", markersize=4, linewidth=1.2,
             label="necrotic / non-enhancing volume (mL)")
    vol.set_ylabel("volume (mL)")
    vol.set_ylim(0, max([r["enhancing_ml"] for r in rows] + [r["non_enhancing_ml"] for r in rows] + [1.0]) * 1.25)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = vol.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=FONT - 3, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3,
              frameon=False)
    ax.set_title(f"{doc['patient']}: tumour burden; RANO category (\u2713 confirmed, ? pending, \u2717 not confirmed)",
                 fontsize=FONT - 1, loc="left")


def write_burden_plot(doc: dict, out: Path | str) -> Path:
    """``burden.png`` (atomically)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from RANOResponseLib.core.files import atomic_file

    fig = plt.figure(figsize=(9, 4.8))
    ax = fig.add_axes((0.08, 0.25, 0.82, 0.67))
    plot_burden(doc, ax)
    with atomic_file(out) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return Path(out)


# ------------------------------------------------------------------------------ the pages


def _header(fig: Any, doc: dict, page: int, pages: int, title: str) -> None:
    fig.text(0.05, 0.972, f"RANO course   {doc['patient']}   {title}", fontsize=FONT + 4, fontweight="bold", va="top")
    fig.text(0.05, 0.945, f"Research software - NOT FOR CLINICAL USE.   page {page}/{pages}", fontsize=FONT - 1, va="top")


def _fmt(v: Any, spec: str = ".0f", suffix: str = "") -> str:
    return "" if v is None or v == "" else f"{v:{spec}}{suffix}"


def _pct_cell(r: dict, key: str) -> str:
    """A change in percent; ``from 0`` where the reference had no measurable disease."""
    if r["role"] != "follow-up":
        return ""
    return _fmt(r[key], "+.0f", " %") or "from 0"


def _summary_table(fig: Any, doc: dict, box: tuple[float, float, float, float]) -> None:
    ax = fig.add_axes(box)
    ax.axis("off")
    cols = ["timepoint", "week", "role", "SPD", "nadir", "vs nadir", "vs base", "RANO", "conf.", "RANO 2", "conf.",
            "network"]
    cells = []
    for r in doc["timepoints"][:26]:
        net = r.get("network") or {}
        cells.append([r["timepoint"], _fmt(r["weeks"], "g"), r["role"], _fmt(r["spd_mm2"]), _fmt(r["nadir_mm2"]),
                      _pct_cell(r, "change_vs_nadir_pct"), _pct_cell(r, "change_vs_baseline_pct"),
                      r["category"], r["confirmed"], r["category_rano2"], r["confirmed_rano2"],
                      net.get("label", "-" if r["role"] == "follow-up" else "")])
    draw_table(ax, cells, cols, [0.11, 0.055, 0.09, 0.07, 0.07, 0.08, 0.08, 0.065, 0.07, 0.075, 0.07, 0.075],
               FONT - 2, 1.35)


def _text_block(fig: Any, x: float, y: float, title: str, lines: list[str], width: int = 112) -> float:
    fig.text(x, y, title, fontsize=FONT + 1, fontweight="bold", va="top")
    body = "\n".join(_wrap(t, width) for t in lines)
    fig.text(x, y - 0.02, body, fontsize=FONT - 2, va="top", linespacing=1.3)
    return y - 0.02 - 0.0142 * (body.count("\n") + 1) - 0.014


def _summary_page(fig: Any, doc: dict, pages: int) -> None:
    _header(fig, doc, 1, pages, "summary")
    plot_burden(doc, fig.add_axes((0.09, 0.64, 0.80, 0.26)))
    n = min(len(doc["timepoints"]), 26) + 1
    h = 0.0205 * n
    _summary_table(fig, doc, (0.05, 0.535 - h, 0.90, h))
    crit = doc["criteria"]
    seg = doc.get("segmentation") or {}
    seg_text = seg.get("source", "")
    if seg.get("bundle"):
        seg_text += f", bundle {seg['bundle']['id']}"
    lines = [f"Baseline {doc['baseline']}: {doc['baseline_reason']}.",
             f"RANO: progression (PD) is >= {crit['pd_percent']:+g} % sum of products against the nadir (the smallest "
             f"since the baseline) or a new measurable lesion; response against the baseline: PR <= {crit['pr_percent']:+g} %, "
             "CR no enhancing disease. RANO 2.0 volumetric: enhancing volume of the measurable lesions, PR <= "
             f"{crit['pr_volume_percent']:+g} %, PD >= {crit['pd_volume_percent']:+g} %.",
             f"CR and PR are confirmed by the first scan at least {crit['confirmation_weeks']:g} weeks later. "
             f"Radiotherapy's end: {crit['rt_end']}"
             + (f" (week {crit['rt_end_weeks']:g})" if crit.get("rt_end_weeks") is not None else "")
             + f"; PD within {crit['pseudoprogression_weeks']:g} weeks of it may be pseudoprogression (RANO 2.0: "
               "preliminary, to be confirmed).",
             f"Segmentation: {seg_text}. Brain masks: {doc.get('brain_mask', '')}. Network: "
             + (f"bundle {doc['network_bundle']['id']}, each follow-up against the scan before it."
                if doc.get("network_bundle") else "not run."),
             "Not assessed from images: T2/FLAIR non-enhancing progression, corticosteroids, clinical status."]
    _text_block(fig, 0.05, 0.525 - h - 0.02, "How this course was read", lines)


def _image(path: Path) -> sitk.Image:
    from RANOResponseLib.imaging.io import read_image

    return read_image(path)


@dataclass
class _Baseline:
    """The baseline's images, read once for every page."""

    row: dict
    image: sitk.Image
    window: tuple[float, float]
    lesion_map: sitk.Image  # values: the baseline lesions' map_id
    labels: sitk.Image


def _read_baseline(doc: dict, root: Path) -> _Baseline:
    from RANOResponseLib.core.styles import display_window
    from RANOResponseLib.rano.measurement import read_segmentation

    b = next(r for r in doc["timepoints"] if r["role"] == "baseline")
    image = _image(root / b["reference_image"])
    return _Baseline(b, image, display_window(sitk.GetArrayViewFromImage(image)),
                     read_segmentation(root / b["lesion_map"]), read_segmentation(root / b["segmentation"]))


def _timepoint_page(fig: Any, doc: dict, root: Path, i: int, page: int, pages: int, base: _Baseline) -> None:
    """One timepoint: images with outlines and diameters, lesion table, reasoning."""
    from RANOResponseLib.core.styles import display_window
    from RANOResponseLib.rano.measurement import load_transform, read_segmentation

    r = doc["timepoints"][i]
    _header(fig, doc, page, pages, f"{r['timepoint']} ({r['role']}, week {r['weeks']:g})")
    oref = _oriented(_image(root / r["reference_image"]))
    labels = sitk.GetArrayFromImage(_oriented(read_segmentation(root / r["segmentation"])))
    lesion_map = sitk.GetArrayFromImage(_oriented(read_segmentation(root / r["lesion_map"])))
    lesions = r["lesions"]

    def index_of(p: Any) -> np.ndarray:
        return np.array(oref.TransformPhysicalPointToContinuousIndex([float(v) for v in p]))

    if lesions:
        biggest = max(lesions, key=lambda le: le["product_mm2"])
        z = int(round(index_of(np.mean(np.array(biggest["d1_points"]), axis=0))[2]))
        why = f"at L{biggest['id']}"
    elif labels.any():
        z, why = int(np.argmax((labels > 0).sum(axis=(1, 2)))), "most tumour labels"
    else:
        z, why = oref.GetSize()[2] // 2, "middle"
    z = int(np.clip(z, 0, oref.GetSize()[2] - 1))
    arr = sitk.GetArrayViewFromImage(oref)
    window = display_window(np.asarray(arr))
    lm = lesion_map[z]
    lines = []
    for le in lesions:
        mid = index_of(np.mean(np.array(le["d1_points"]), axis=0))[2]
        if abs(mid - z) > 1.5:
            continue
        for pts, style, label in ((le["d1_points"], "-", f"L{le['id']}"), (le["d2_points"], "--", "")):
            a, b = (index_of(p) for p in pts)
            lines.append((a[:2], b[:2], style, label))
    sx, sy = oref.GetSpacing()[:2]
    fov = max(60.0, 2.2 * max([le["d1_mm"] for le in lesions], default=0.0))
    zoom = None
    if lines:
        ends = np.array([e for a, b, _, _ in lines for e in (a, b)])
        cx, cy = (ends.min(0) + ends.max(0)) / 2
        zoom = (cx, cy, fov / 2 / sx, fov / 2 / sy)
    zoomed = _Panel(np.asarray(arr[z]), window, f"{r['timepoint']} {r['reference_modality'] or ''}, slice {z} ({why})",
                    masks=[(lm == le["map_id"], f"L{le['id']}") for le in lesions if (lm == le["map_id"]).any()],
                    lines=lines, zoom=zoom, pixels_per_cm=10.0 / sx)
    full = _Panel(np.asarray(arr[z]), window, f"{r['timepoint']}: tumour labels")
    grid: list[tuple[_Panel, np.ndarray | None]] = [(zoomed, None), (full, labels[z])]
    if r is not base.row:  # the baseline on this slice only, through the registration
        back = load_transform(root / r["to_baseline_transform"]).GetInverse()  # this timepoint -> baseline
        here = oref[:, :, z:z + 1]

        def on_slice(image: sitk.Image, interpolator: int) -> np.ndarray:
            return sitk.GetArrayFromImage(sitk.Resample(image, here, back, interpolator, 0.0))[0]

        b_img = on_slice(base.image, sitk.sitkLinear)
        b_map = on_slice(base.lesion_map, sitk.sitkNearestNeighbor)
        name = f"baseline {base.row['timepoint']}"
        grid.insert(1, (_Panel(b_img, base.window, f"{name} (registered), same slice",
                               masks=[(b_map == le["map_id"], f"L{le['id']}") for le in base.row["lesions"]
                                      if (b_map == le["map_id"]).any()], zoom=zoom, pixels_per_cm=10.0 / sx), None))
        grid.append((_Panel(b_img, base.window, f"{name}: tumour labels"),
                     on_slice(base.labels, sitk.sitkNearestNeighbor)))

    gap, left, width, top, height = 0.02, 0.05, 0.90, 0.915, 0.50
    cw, rh = (width - gap) / 2, (height - gap) / 2
    for k, (p, labels) in enumerate(grid):
        row, col = divmod(k, 2)
        ax = fig.add_axes((left + col * (cw + gap), top - (row + 1) * rh - row * gap, cw, rh - 0.022))
        _draw_panel(ax, p, sy / sx)
        for value, (style, _) in LABEL_STYLES.items() if labels is not None else ():
            mask = (labels == value).astype(float)
            if mask.any():
                cs = ax.contour(mask, levels=[0.5], colors="white", linewidths=1.3, linestyles=style)
                cs.set(path_effects=_halo(1.3))
    fig.text(left, top - height - 0.008, _wrap("Top: lesion outlines (black on white), d1 solid and d2 dashed, course "
             "lesion ids. Bottom: enhancing solid, necrotic / non-enhancing dashed, edema dotted. Patient right on "
             "image left.", 110), fontsize=FONT - 2, va="top")
    y = top - height - 0.05
    y = _lesion_table(fig, lesions, y)
    net = r.get("network")
    summary = [f"Sum of products {r['spd_mm2']:.0f} mm2; enhancing {r['enhancing_ml']:.2f} mL (measurable "
               f"{r['measurable_enhancing_ml']:.2f} mL); necrotic / non-enhancing {r['non_enhancing_ml']:.2f} mL; "
               f"edema {r['edema_ml']:.2f} mL."]
    if r["role"] == "follow-up":
        change = {k: _fmt(r[k], "+.1f", " %") or "not defined (0 before)"
                  for k in ("change_vs_nadir_pct", "change_vs_baseline_pct")}
        summary.append(f"Nadir {r['nadir_mm2']:.0f} mm2 at {r['nadir_timepoint']}: change {change['change_vs_nadir_pct']}; "
                       f"against the baseline: {change['change_vs_baseline_pct']}.")
        summary.append(f"Network ({r['timepoint']} against {net['previous']}): {net['label']} ("
                       + ", ".join(f"{c} {p:.2f}" for c, p in net["probabilities"].items()) + ")."
                       if net else f"Network: {r.get('network_note') or 'not run'}.")
    y = _text_block(fig, 0.05, y, "Burden", summary)

    def said(text: str) -> list[str]:  # the reasoning without the closing "not assessed" line (said once below)
        return [t for t in text.split("\n") if t and t != NOT_ASSESSED]

    if r["role"] == "follow-up":
        conf = f", confirmation {r['confirmed']}" if r["confirmed"] else ""
        y = _text_block(fig, 0.05, y, f"RANO: {r['category']}{conf}", said(r["reasoning"]))
        conf2 = f", confirmation {r['confirmed_rano2']}" if r["confirmed_rano2"] else ""
        y = _text_block(fig, 0.05, y, f"RANO 2.0 volumetric: {r['category_rano2']}{conf2}", said(r["reasoning_rano2"]))
        fig.text(0.05, y, NOT_ASSESSED, fontsize=FONT - 2, va="top", style="italic")
    else:
        _text_block(fig, 0.05, y, "RANO", said(r["reasoning"]))


def _lesion_table(fig: Any, lesions: list[dict], y: float) -> float:
    if not lesions:
        fig.text(0.05, y, "No enhancing lesion.", fontsize=FONT - 1, va="top")
        return y - 0.03
    cols = ["lesion", "d1 (mm)", "d2 (mm)", "d1 x d2", "enh. mL", "measurable", "first seen"]
    cells = [[f"L{le['id']}" + (" NEW" if le["new"] else ""), f"{le['d1_mm']:.1f}", f"{le['d2_mm']:.1f}",
              f"{le['product_mm2']:.0f}", f"{le['enhancing_ml']:.2f}", "yes" if le["measurable"] else "no",
              le["first_seen"]] for le in lesions[:8]]
    h = 0.021 * (len(cells) + 1)
    ax = fig.add_axes((0.05, y - h, 0.90, h))
    ax.axis("off")
    draw_table(ax, cells, cols, [0.14, 0.12, 0.12, 0.12, 0.12, 0.14, 0.24], FONT - 2, 1.3)
    return y - h - 0.02


def write_course_report(doc: dict, root: Path | str, out: Path | str) -> Path:
    """The multi-page PDF of a timeline document whose relative paths lie under ``root`` (atomically)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages

    from RANOResponseLib.core.files import atomic_file

    root = Path(root)
    pages = 1 + len(doc["timepoints"])
    plt.rcParams.update({"font.size": FONT, "hatch.linewidth": 1.0})
    with atomic_file(out) as tmp, PdfPages(tmp) as pdf:
        fig = plt.figure(figsize=A4)
        _summary_page(fig, doc, pages)
        fig.text(0.05, 0.015, f"Generated {datetime.now(timezone.utc).isoformat(timespec='seconds')} by rano-response "
                 f"{__version__} from {doc['source']}", fontsize=FONT - 3, va="bottom")
        pdf.savefig(fig)
        plt.close(fig)
        base = _read_baseline(doc, root)
        for i in range(len(doc["timepoints"])):
            fig = plt.figure(figsize=A4)
            _timepoint_page(fig, doc, root, i, i + 2, pages, base)
            pdf.savefig(fig)
            plt.close(fig)
    return Path(out)


def course_lines(doc: dict, timepoint: str) -> list[str]:
    """What the course says about one timepoint, in sentences (for the case report or a panel that
    shows a pair: the same course rules, against the nadir and the baseline). ``[]`` if the
    timepoint is not in the course."""
    r = next((x for x in doc["timepoints"] if x["timepoint"] == timepoint), None)
    if r is None:
        return []
    if r["role"] != "follow-up":
        return [f"{timepoint} is the course's {r['role']} scan (baseline {doc['baseline']}: {doc['baseline_reason']})."]
    conf = f", confirmation {r['confirmed']}" if r["confirmed"] else ""
    conf2 = f", confirmation {r['confirmed_rano2']}" if r["confirmed_rano2"] else ""
    head = (f"Course of {doc['patient']} (baseline {doc['baseline']}): RANO {r['category']}{conf}; RANO 2.0 "
            f"volumetric {r['category_rano2']}{conf2}; nadir {r['nadir_mm2']:.0f} mm2 at {r['nadir_timepoint']}.")
    return [head] + [t for t in r["reasoning"].split("\n") if t and t != NOT_ASSESSED]


def course_writers(plot: bool = True, report: bool = True) -> list[Callable[[dict, Path], Mapping[str, Path]]]:
    """The writers :func:`~RANOResponseLib.inference.timeline.run_timeline` calls for ``burden.png``
    and ``timeline_report.pdf``."""
    from RANOResponseLib.inference.timeline import BURDEN_PNG, REPORT_PDF

    writers = []
    if plot:
        writers.append(lambda doc, out: {"plot": write_burden_plot(doc, Path(out) / BURDEN_PNG)})
    if report:
        writers.append(lambda doc, out: {"report": write_course_report(doc, out, Path(out) / REPORT_PDF)})
    return writers
