"""The per-case report that gets filed: a two-page A4 PDF (and optionally one PNG per page).

Built from a ``rano-response predict`` output folder (``prediction.json``, ``gradcam.nii.gz``,
``followup_to_baseline.tfm``), the lesion measurements (``rano-response measure``'s
``measurements.json``, or measured here: a manual mask next to the studies first, else predict's
own automatic segmentation; the report says which, :func:`measurement_source`), the reviewers'
verdicts (a review database) and the bundle's model card. The study folders are the ones the
prediction's inputs description names (a DICOM series is recorded as its study folder).

Page 1: both timepoints at the same axial level (the follow-up registered onto the baseline),
lesion outlines and RANO diameters on CT1, Grad-CAM iso-contours on FLAIR, the class
probabilities and the result box. Page 2: the measurements table, the rule-based category with
its reasoning, the reviewers' verdicts and the model card summary.

Printed in black and white it stays readable: grey-scale images, outlines drawn as white lines
on a black halo (visible on any grey), diameters solid (d1) and dashed (d2), Grad-CAM as dashed
and solid iso-lines with their levels written on them, probability bars hatched with the values
printed, and nothing said by colour alone.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk

from RANOResponseLib import __version__
from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.outputs import SEGMENTATION_FILES, TRANSFORM_FILE, prediction_studies, read_prediction
from RANOResponseLib.rano.measurement import PairMeasurement

A4 = (8.27, 11.69)
FONT = 11
HATCHES = ("//", "\\\\", "xx", "..", "++", "--")


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


# ------------------------------------------------------------------------------ gathering


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


def _case_paths(prediction: dict) -> tuple[Path | None, Path | None]:
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
    base, fu = _case_paths(pred)
    if db is not None:
        from RANOResponseLib.review.store import ReviewStore, _default_case_id

        with ReviewStore(db) as store:
            if case_id:
                found = store.latest(case_id)
            else:
                found = [v for v in store.latest()
                         if base and fu and Path(v.baseline) == base and Path(v.followup) == fu]
                if not found and base and fu:
                    found = store.latest(_default_case_id(fu.parent.name, str(base), str(fu)))
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


# ------------------------------------------------------------------------------ images


@dataclass
class _Panel:
    image: np.ndarray  # (y, x) slice, LPS-oriented (radiological display)
    window: tuple[float, float]
    title: str
    masks: list[tuple[np.ndarray, str]] = field(default_factory=list)  # (2D bool, label)
    lines: list[tuple[np.ndarray, np.ndarray, str, str]] = field(default_factory=list)  # p, q (x, y), style, label
    cam: np.ndarray | None = None
    zoom: tuple[float, float, float, float] | None = None  # centre x, y and half sizes in pixels
    pixels_per_cm: float = 0.0  # for the 1 cm scale bar


def _halo(lw: float, colour: str = "black") -> list:
    """A wider stroke of ``colour`` under the line: visible on any grey, in print too."""
    import matplotlib.patheffects as pe

    return [pe.Stroke(linewidth=lw + 2.5, foreground=colour), pe.Normal()]


def _load_images(inputs: ReportInputs) -> dict[str, Any]:
    """Reference grid, images of both timepoints on it, Grad-CAM, transform."""
    from RANOResponseLib.core.names import reference_modality
    from RANOResponseLib.imaging.geometry import resample
    from RANOResponseLib.imaging.io import read_image
    from RANOResponseLib.rano.measurement import load_transform

    pred = inputs.prediction
    base_files = pred["inputs"]["baseline"]
    fu_files = pred["inputs"]["followup"]
    ref_mod = reference_modality(base_files)
    reference = input_image(pred, "baseline", ref_mod)
    tfm = inputs.prediction_dir / TRANSFORM_FILE
    transform = load_transform(tfm) if tfm.is_file() else None
    if transform is None:
        inputs.notes.append(f"{tfm}: missing; follow-up shown without registration.")
    shown: dict[str, sitk.Image] = {}
    for mod in ("CT1", "FLAIR"):
        m = mod if mod in base_files and mod in fu_files else None
        if m is None:
            continue
        b = reference if m == ref_mod else resample(input_image(pred, "baseline", m), reference)
        shown[f"{m}:baseline"] = b
        shown[f"{m}:followup"] = resample(input_image(pred, "followup", m), reference, transform)
    cam_file = inputs.prediction_dir / "gradcam.nii.gz"
    cam = read_image(cam_file) if cam_file.is_file() else None
    if cam is None:
        inputs.notes.append("No Grad-CAM map in the prediction folder (predicted with --no-maps).")
    return {"reference": reference, "shown": shown, "cam": cam, "transform": transform, "ref_mod": ref_mod}


def _lesion_masks(inputs: ReportInputs, reference: sitk.Image,
                  transform: sitk.Transform | None) -> dict[str, sitk.Image]:
    """Lesion id maps of both timepoints on the reference grid (native segmentations only). A
    measurement of predict's own segmentations finds them in the prediction folder (it may have
    been written where they were, e.g. a Slicer work folder that is gone)."""
    from RANOResponseLib.rano.measurement import (
        DEEPBRATUMIA,
        HD_GLIO,
        measure_segmentation,
        read_segmentation,
    )

    out = {}
    pair = inputs.pair
    for tp, m in (("baseline", pair.baseline), ("followup", pair.followup)):
        lesion_map = m.lesion_map
        path = Path(m.source) if m.source else None
        if path is not None and not path.is_file() and path.name in SEGMENTATION_FILES.values():
            path = inputs.prediction_dir / path.name
        if lesion_map is None and path is not None and path.is_file():
            scheme = HD_GLIO if m.scheme == HD_GLIO.name else DEEPBRATUMIA
            lesion_map = measure_segmentation(read_segmentation(path), scheme, m.criteria).lesion_map
        if lesion_map is None:
            continue
        t = transform if (tp == "followup" and transform is not None) else sitk.Transform()
        out[tp] = sitk.Resample(lesion_map, reference, t, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)
    return out


def _oriented(image: sitk.Image) -> sitk.Image:
    return sitk.DICOMOrient(image, "LPS")


def _page_images(fig: Any, inputs: ReportInputs, box: tuple[float, float, float, float]) -> None:
    """The 2 x 2 image grid (CT1 with lesions, FLAIR with Grad-CAM) inside ``box`` (figure coords)."""
    from RANOResponseLib.core.styles import display_window
    from RANOResponseLib.inference.overlay import peak_index

    data = _load_images(inputs)
    reference = data["reference"]
    oref = _oriented(reference)
    pair = inputs.pair
    transform = data["transform"]
    to_base = transform.GetInverse() if transform is not None else sitk.Transform()

    masks: dict[str, sitk.Image] = {}  # lesion id maps on the reference grid
    drawable = pair is not None and pair.baseline.space == "native"
    if pair is not None and not drawable:
        inputs.notes.append(f"Segmentations are in {pair.baseline.space} space: outlines and diameters are not "
                            "drawn on the native images (see the table).")
    if drawable:
        masks = _lesion_masks(inputs, reference, transform)

    # Each timepoint is shown at the level where its largest lesion was measured (so its diameters
    # lie on the slice); without lesions at the level of the Grad-CAM peak, else the middle.
    def level_of(p: Sequence[float]) -> float:
        return float(oref.TransformPhysicalPointToContinuousIndex([float(v) for v in p])[2])

    def to_ref(tp: str, p: Sequence[float]) -> np.ndarray:
        return np.array(to_base.TransformPoint(p) if tp == "followup" else p, dtype=float)

    default_z = peak_index(data["cam"])[0] if data["cam"] is not None else oref.GetSize()[2] // 2
    levels: dict[str, tuple[int, str]] = {}
    for tp in ("baseline", "followup"):
        m = None if not drawable else (pair.baseline if tp == "baseline" else pair.followup)
        if m is not None and m.lesions:
            le = max(m.lesions, key=lambda x: x.product_mm2)
            z = level_of(to_ref(tp, np.mean(np.array(le.d1_points), axis=0)))
            levels[tp] = (int(round(z)), f"at {le.name}")
        else:
            levels[tp] = (int(default_z), "Grad-CAM peak" if data["cam"] is not None else "middle")
    nz = oref.GetSize()[2]
    levels = {tp: (int(np.clip(z, 0, nz - 1)), why) for tp, (z, why) in levels.items()}

    def slab(img: sitk.Image, z: int) -> np.ndarray:
        return sitk.GetArrayFromImage(_oriented(img))[z]

    def lines_for(tp: str, z: int) -> list:
        """Diameters of the lesions measured at this level, projected onto it (a rotated
        follow-up slice is not exactly a baseline slice)."""
        if not drawable:
            return []
        m = pair.baseline if tp == "baseline" else pair.followup
        out = []
        for le in m.lesions:
            mid = level_of(to_ref(tp, np.mean(np.array(le.d1_points), axis=0)))
            if abs(mid - z) > 1.5:
                continue
            for seg, style, label in ((le.d1_points, "-", le.name), (le.d2_points, "--", "")):
                a, b = (np.array(oref.TransformPhysicalPointToContinuousIndex([float(v) for v in to_ref(tp, q)]))
                        for q in seg)
                out.append((a[:2], b[:2], style, label))
        return out

    cam_max = float(sitk.GetArrayViewFromImage(data["cam"]).max()) if data["cam"] is not None else 0.0
    sx, sy = oref.GetSpacing()[:2]
    biggest = max([le.d1_mm for m in ((pair.baseline, pair.followup) if drawable else ()) for le in m.lesions],
                  default=0.0)
    fov_mm = max(60.0, 2.2 * biggest)  # zoomed field of view
    panels: list[_Panel] = []
    for mod in ("CT1", "FLAIR"):
        for tp in ("baseline", "followup"):
            key = f"{mod}:{tp}"
            if key not in data["shown"]:
                continue
            z, why = levels[tp]
            full = sitk.GetArrayViewFromImage(data["shown"][key])
            name = "follow-up (registered)" if tp == "followup" else "baseline"
            p = _Panel(slab(data["shown"][key], z), display_window(np.asarray(full)), f"{mod} {name}, slice {z} ({why})")
            if mod == "CT1":
                if tp in masks:
                    lm = slab(masks[tp], z)
                    for lid in [i for i in np.unique(lm) if i]:
                        p.masks.append((lm == lid, f"L{lid}"))
                p.lines = lines_for(tp, z)
                if p.lines:  # zoom onto the lesions (same field of view at both timepoints)
                    ends = np.array([e for a, b, _, _ in p.lines for e in (a, b)])
                    cx, cy = (ends.min(0) + ends.max(0)) / 2
                    p.zoom = (cx, cy, fov_mm / 2 / sx, fov_mm / 2 / sy)
                    p.title = f"{mod} {name} (zoomed), slice {z}"
                p.pixels_per_cm = 10.0 / sx
            elif data["cam"] is not None and cam_max > 0:
                p.cam = slab(data["cam"], z) / cam_max
            panels.append(p)

    left, bottom, width, height = box
    ncol, nrow = 2, max(1, (len(panels) + 1) // 2)
    gap = 0.012
    cw, rh = (width - gap) / ncol, (height - gap * (nrow - 1)) / nrow
    for i, p in enumerate(panels):
        r, c = divmod(i, ncol)
        ax = fig.add_axes([left + c * (cw + gap), bottom + (nrow - 1 - r) * (rh + gap), cw, rh - 0.022])
        _draw_panel(ax, p, sy / sx)
    fig.text(left, bottom + height + 0.004,
             f"Axial slices of the baseline {data['ref_mod']} grid, each timepoint at its largest lesion; patient right "
             "on image left.\nCT1: lesion outline (black on white), longest diameter d1 (solid) and perpendicular d2 (dashed)."
             "\nFLAIR: Grad-CAM iso-lines at 50 % (dashed) and 80 % (solid) of its maximum.",
             fontsize=FONT - 1, va="bottom", linespacing=1.3)


def _draw_panel(ax: Any, p: _Panel, aspect: float) -> None:
    ax.imshow(p.image, cmap="gray", vmin=p.window[0], vmax=p.window[1], aspect=aspect, interpolation="bilinear")
    for mask, label in p.masks:
        # black on a white halo, so the outline is not mistaken for the (white) enhancing rim
        cs = ax.contour(mask.astype(float), levels=[0.5], colors="black", linewidths=1.4)
        cs.set(path_effects=_halo(1.4, "white"))
    for a, b, style, label in p.lines:
        (ln,) = ax.plot([a[0], b[0]], [a[1], b[1]], linestyle=style, color="white", linewidth=2.0)
        ln.set_path_effects(_halo(2.0))
        if label:
            ax.annotate(label, (b[0], b[1]), xytext=(6, -6), textcoords="offset points", color="white",
                        fontsize=FONT + 1, fontweight="bold", path_effects=_halo(1.0))
    if p.cam is not None:
        cs = ax.contour(p.cam, levels=[0.5, 0.8], colors="white", linewidths=[1.4, 2.2],
                        linestyles=["--", "-"])
        cs.set(path_effects=_halo(1.8))
        labels = ax.clabel(cs, fmt={0.5: "50%", 0.8: "80%"}, fontsize=FONT - 1, colors="white")
        for t in labels:
            t.set_path_effects(_halo(1.0))
    if p.zoom is not None:
        cx, cy, hx, hy = p.zoom
        ax.set_xlim(cx - hx, cx + hx)
        ax.set_ylim(cy + hy, cy - hy)
    if p.pixels_per_cm > 0:
        x0, x1 = ax.get_xlim()
        y0, y1 = ax.get_ylim()
        bx, by = x0 + 0.70 * (x1 - x0), y0 + 0.07 * (y1 - y0)
        (bar,) = ax.plot([bx, bx + p.pixels_per_cm], [by, by], color="white", linewidth=3, solid_capstyle="butt")
        bar.set_path_effects(_halo(3))
        ax.text(bx + p.pixels_per_cm / 2, by - 0.02 * (y0 - y1), "1 cm", color="white", fontsize=FONT - 1,
                ha="center", va="bottom", path_effects=_halo(1.0))
    ax.set_title(p.title, fontsize=FONT, pad=3)
    ax.text(0.02, 0.03, "R", color="white", fontsize=FONT, transform=ax.transAxes, fontweight="bold",
            path_effects=_halo(1.0))
    ax.text(0.95, 0.03, "L", color="white", fontsize=FONT, transform=ax.transAxes, fontweight="bold",
            path_effects=_halo(1.0))
    ax.set_xticks([])
    ax.set_yticks([])


# ------------------------------------------------------------------------------ pages


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.fill(t, width, subsequent_indent="   ") for t in text.split("\n"))


def _header(fig: Any, inputs: ReportInputs, page: int) -> None:
    base, fu = _case_paths(inputs.prediction)
    who = f"{fu.parent.name}:  {base.name}  ->  {fu.name}" if base and fu else inputs.case_id
    fig.text(0.05, 0.972, f"RANO response review   {who}", fontsize=FONT + 4, fontweight="bold", va="top")
    fig.text(0.05, 0.945, "Research software - NOT FOR CLINICAL USE.   Case " + inputs.case_id
             + f"   page {page}/2", fontsize=FONT - 1, va="top")


def _probabilities(fig: Any, inputs: ReportInputs, box: tuple[float, float, float, float]) -> None:
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
        ax.text(min(v, 1.0) + 0.02, yy, f"{v * 100:.0f} %" + ("  <- model" if n == label else ""),
                va="center", fontsize=FONT + 1, fontweight="bold" if n == label else "normal")
    ax.set_yticks(y, names, fontsize=FONT + 2)
    ax.set_xlim(0, 1.35)
    ax.set_xticks([0, 0.5, 1.0], ["0", "50 %", "100 %"], fontsize=FONT - 1)
    for s in ("top", "right"):
        ax.spines[s].set_visible(False)
    ax.set_title("Model probabilities", fontsize=FONT + 2, loc="left")


def _result_box(fig: Any, inputs: ReportInputs, x: float, y: float) -> None:
    pred = inputs.prediction
    lines = [f"Network ({(pred.get('bundle') or {}).get('id', '?')}):  {pred['label']}"]
    if inputs.rule is not None:
        lines.append(f"Measured:  RANO {inputs.rule.bidimensional},  RANO 2.0 {inputs.rule.volumetric}")
        lines.append(f"   from {inputs.measured_from}")
    else:
        lines.append("Measured:  not available (no segmentation)")
    if inputs.comparison is not None:
        lines.append(f"Network and measured {inputs.rule.criteria}:  "
                     + ("AGREE" if inputs.comparison.agree else "DISAGREE - see page 2"))
    for v in inputs.verdicts:
        how = "agrees with model" if v.agree else ("overrides model" if v.agree is not None else "no model shown")
        lines.append(f"Reviewer {v.reviewer}:  {v.label}  ({how}, confidence {v.confidence}/5)")
    if not inputs.verdicts:
        lines.append("Reviewer:  no verdict recorded")
    fig.text(x, y, "\n".join(lines), fontsize=FONT + 1, va="top", linespacing=1.6,
             bbox=dict(boxstyle="square,pad=0.6", facecolor="white", edgecolor="black", linewidth=1.5))


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
    t = ax.table(cellText=cells, colLabels=cols, loc="upper left", cellLoc="left", colLoc="left",
                 colWidths=[0.11, 0.08, 0.07, 0.07, 0.09, 0.10, 0.07, 0.145, 0.265])
    t.auto_set_font_size(False)
    t.set_fontsize(FONT - 1)
    t.scale(1, 1.45)
    for (r, _), cell in t.get_celld().items():
        cell.set_edgecolor("0.4")
        if r == 0:
            cell.set_text_props(fontweight="bold")
            cell.set_facecolor("0.88")


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
    _page_images(f1, inputs, (0.05, 0.36, 0.90, 0.52))
    _result_box(f1, inputs, 0.06, 0.315)
    _probabilities(f1, inputs, (0.14, 0.04, 0.62, 0.15))
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
    for title, lines in blocks:
        f2.text(0.05, y, title, fontsize=FONT + 2, fontweight="bold", va="top")
        body = "\n".join(_wrap(t, 98) for t in lines)
        f2.text(0.05, y - 0.022, body, fontsize=FONT - 1, va="top", linespacing=1.35)
        y -= 0.022 + 0.0155 * (body.count("\n") + 1) + 0.018
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
