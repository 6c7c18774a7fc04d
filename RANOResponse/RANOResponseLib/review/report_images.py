"""Page 1's images of the case report, and the drawing primitives the course report shares.

Both timepoints at the same axial level (the follow-up registered onto the baseline): lesion
outlines and RANO diameters on CT1, Grad-CAM iso-contours on FLAIR (:func:`_page_images`). Each
image is a :class:`_Panel` drawn by :func:`_draw_panel` in black and white that survives print:
grey-scale images, outlines and lines on a halo (:func:`_halo`), diameters solid (d1) and dashed
(d2), Grad-CAM as dashed and solid iso-lines with their levels written on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk

from RANOResponseLib.core.outputs import SEGMENTATION_FILES, TRANSFORM_FILE
from RANOResponseLib.review.report_inputs import ReportInputs, input_image

FONT = 11  # the reports' base font size (points)


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


def draw_table(ax: Any, cells: list[list[str]], columns: Sequence[str], widths: Sequence[float],
               fontsize: float, row_scale: float) -> Any:
    """The reports' table style: left-aligned cells, grey rules, a bold shaded header row."""
    t = ax.table(cellText=cells, colLabels=list(columns), loc="upper left", cellLoc="left", colLoc="left",
                 colWidths=list(widths))
    t.auto_set_font_size(False)
    t.set_fontsize(fontsize)
    t.scale(1, row_scale)
    for (row, _), cell in t.get_celld().items():
        cell.set_edgecolor("0.4")
        if row == 0:
            cell.set_text_props(fontweight="bold")
            cell.set_facecolor("0.88")
    return t


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
