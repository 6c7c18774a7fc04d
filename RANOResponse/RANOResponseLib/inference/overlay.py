"""A montage a radiologist can read: baseline and follow-up CT1 and FLAIR through the
attribution peak, plain and with Grad-CAM and saliency overlaid, each overlay with a colour bar.

Slices are shown in radiological convention (patient right on the image left, anterior up).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from RANOResponseLib.core.styles import MAP_KINDS, display_window


def _lps(image: sitk.Image) -> np.ndarray:
    """Array (z, y, x) with x -> patient left, y -> posterior, z -> superior."""
    return sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS"))


def peak_index(gradcam: sitk.Image) -> tuple[int, int, int]:
    """(z, y, x) index, in the LPS-oriented array, of the Grad-CAM maximum."""
    arr = _lps(gradcam)
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(arr)), arr.shape))  # type: ignore[return-value]


def render_overlay(
    path: Path | str,
    images: Mapping[str, sitk.Image],
    maps: Mapping[str, sitk.Image],
    title: str,
    columns: Sequence[str] = ("CT1:baseline", "CT1:followup", "FLAIR:baseline", "FLAIR:followup"),
    threshold: float = 0.2,
) -> Path:
    """Write the montage PNG. ``images`` and ``maps`` must share one grid (the baseline's).

    Columns that are not in ``images`` are skipped (a bundle without FLAIR, say).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    cols = [c for c in columns if c in images] or list(images)[:4]
    arrays = {c: _lps(images[c]) for c in cols}
    map_arrays = {k: _lps(v) for k, v in maps.items()}
    ref = next(iter(maps.values())) if maps else images[cols[0]]
    z, y, x = peak_index(maps["gradcam"]) if "gradcam" in maps else tuple(s // 2 for s in arrays[cols[0]].shape)
    sx, sy, _ = sitk.DICOMOrient(ref, "LPS").GetSpacing()

    rows = ["plain", *[k for k in ("gradcam", "saliency") if k in map_arrays]]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(3.2 * len(cols) + 1.2, 3.4 * len(rows) + 0.8),
                             squeeze=False, facecolor="black")
    for r, row in enumerate(rows):
        mappable = None
        for c, col in enumerate(cols):
            ax = axes[r][c]
            ax.set_facecolor("black")
            sl = arrays[col][z]
            lo, hi = display_window(arrays[col])
            ax.imshow(sl, cmap="gray", vmin=lo, vmax=hi, aspect=sy / sx, interpolation="bilinear")
            if row != "plain":
                m = map_arrays[row][z]
                name, cmap = MAP_KINDS[row]
                mappable = ax.imshow(np.ma.masked_less(m, threshold), cmap=cmap, vmin=0, vmax=1,
                                     alpha=0.6, aspect=sy / sx, interpolation="bilinear")
            ax.plot([x], [y], marker="+", color="cyan", markersize=14, mew=1.5)
            ax.set_axis_off()  # no ticks to lay out: a third faster to render
            if r == 0:
                mod, _, tp = col.partition(":")
                ax.set_title(f"{mod} {tp}", color="white", fontsize=12)
            if c == 0:
                label = "no overlay" if row == "plain" else MAP_KINDS[row][0]
                ax.text(-0.06, 0.5, label, color="white", fontsize=12, rotation=90, ha="right", va="center",
                        transform=ax.transAxes)
            ax.text(0.02, 0.02, "R", color="white", transform=ax.transAxes, fontsize=10)
            ax.text(0.95, 0.02, "L", color="white", transform=ax.transAxes, fontsize=10)
        if mappable is not None:
            cb = fig.colorbar(mappable, ax=list(axes[r]), fraction=0.02, pad=0.01)
            cb.set_label(f"{MAP_KINDS[row][0]} (relative)", color="white")
            cb.ax.yaxis.set_tick_params(color="white", labelcolor="white")
    fig.suptitle(f"{title}\naxial slice {z} through the Grad-CAM peak (+)", color="white", fontsize=13)
    path = Path(path)
    fig.savefig(path, dpi=100, facecolor="black", format="png")
    plt.close(fig)
    return path


def overlay_writer(result, out: Path, files: Mapping[str, Path]) -> dict[str, Path]:
    """A :data:`~RANOResponseLib.inference.pipeline.OutputWriter` for when no MRML is at hand:
    ``overlay.png`` with matplotlib (baseline and registered follow-up CT1 and FLAIR)."""
    from RANOResponseLib.imaging.geometry import resample
    from RANOResponseLib.inference.pipeline import result_title

    if not result.maps:
        return {}
    reference = result.baseline.images[result.bundle.spec.reference_modality]
    shown = {}
    for mod in ("CT1", "FLAIR"):
        if mod in result.baseline.images:
            shown[f"{mod}:baseline"] = result.baseline.images[mod]
            shown[f"{mod}:followup"] = resample(result.followup.images[mod], reference,
                                                result.registration.transform)
    return {"overlay": render_overlay(out / "overlay.png", shown, result.maps,
                                      result_title(result).replace("\n", "   — "))}
