"""How images and maps are shown, defined once for the Slicer scene, the PNG pictures and the PDF.

Maps are relative (0..1): attribution below :data:`MAP_THRESHOLD` is not drawn. Colour maps are
matplotlib's perceptually uniform ones, whose tables the scene code rebuilds as MRML colour nodes.
"""

from __future__ import annotations

import numpy as np

from RANOResponseLib.core.names import LABEL_CORE, LABEL_EDEMA, LABEL_ENHANCING

# map kind -> (display name, matplotlib colour map)
MAP_KINDS: dict[str, tuple[str, str]] = {"gradcam": ("Grad-CAM", "inferno"), "saliency": ("Saliency", "viridis")}
MAP_THRESHOLD = 0.2
# the brain mask as a segment: its name and colour (RGB 0..1); slice views draw its outline only
BRAIN_SEGMENT: tuple[str, tuple[float, float, float]] = ("Brain", (0.35, 0.75, 0.95))
WINDOW_PERCENTILES = (0.5, 99.9)
# tumour segments (label value -> RGB 0..1; names in core.names.LABEL_NAMES): enhancing red, necrotic /
# non-enhancing purple, edema green (none of them the diameter lines' yellow and cyan)
TUMOUR_COLORS: dict[int, tuple[float, float, float]] = {
    LABEL_ENHANCING: (0.90, 0.20, 0.20), LABEL_CORE: (0.60, 0.40, 0.90), LABEL_EDEMA: (0.35, 0.80, 0.40)}
TUMOUR_FILL_OPACITY = 0.3  # slice views: segments filled this much, outlined fully
# RANO diameter lines per timepoint (RGB 0..1)
DIAMETER_COLORS: dict[str, tuple[float, float, float]] = {"baseline": (1.0, 0.85, 0.1), "followup": (0.1, 0.85, 1.0)}


def display_window(arr: np.ndarray, stride: int = 7) -> tuple[float, float]:
    """Display range of an MR volume: the 0.5 and 99.9 percentiles of its non-zero voxels.

    A strided subsample gives the same window several times faster (Slicer's automatic
    window/level histograms the whole volume, 0.1 s per 1 mm study).
    """
    vals = np.asarray(arr).reshape(-1)[::stride]
    vals = vals[vals != 0]
    if vals.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(vals, WINDOW_PERCENTILES))
    return lo, hi if hi > lo else lo + 1.0
