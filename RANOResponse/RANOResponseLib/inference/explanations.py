"""Do the maps point at the tumour? Two cheap, pass-free measures per map.

- **Energy inside**: the share of a map's total (non-negative) attribution that falls inside
  tumour + edema, next to the share of the brain that region covers (what a map spread evenly over
  the brain would score).
- **Pointing game**: whether the map's peak voxel lies inside tumour + edema.

The region is the union of tumour + edema (labels 1-3) of **both** timepoints on the baseline
reference grid, where the maps live: the baseline's segmentation as it is, and the follow-up's
mapped onto the baseline grid through the registration (which maps baseline points to follow-up
points, so each baseline voxel takes the follow-up label found there). A response is a change
between the scans: a lesion that vanished (CR) is only in the baseline's mask, a new one (PD) only
in the follow-up's, and a map that looks at either looks at the tumour.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import SimpleITK as sitk

from RANOResponseLib.imaging.geometry import lps_to_ras

REGION = ("tumour + edema (labels 1-3): the baseline's segmentation and the follow-up's mapped onto the "
          "baseline grid by the registration, united")


def _labels(seg: Any) -> sitk.Image:
    """A label image from an :class:`~RANOResponseLib.inference.segmentation.Segmentation` or an image."""
    return seg.image if hasattr(seg, "image") else seg


def region_on_baseline(reference: sitk.Image, baseline: Any | None = None, followup: Any | None = None,
                       transform: sitk.Transform | None = None) -> sitk.Image:
    """Tumour + edema of either timepoint on ``reference`` (the baseline grid) as a uint8 0/1
    image: ``baseline`` resampled as it is, ``followup`` through ``transform`` (baseline point ->
    follow-up point; identity when None), nearest neighbour, united."""
    region = np.zeros(sitk.GetArrayViewFromImage(reference).shape, dtype=bool)
    for seg, tfm in ((baseline, None), (followup, transform)):
        if seg is None:
            continue
        on_ref = sitk.Resample(_labels(seg), reference, tfm or sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                               sitk.sitkUInt8)
        region |= sitk.GetArrayViewFromImage(on_ref) > 0
    out = sitk.GetImageFromArray(region.astype(np.uint8))
    out.CopyInformation(reference)
    return out


def measure_map(attribution: sitk.Image, region: sitk.Image) -> dict[str, Any]:
    """Energy share inside ``region`` and the pointing game for one map (same grid as ``region``).

    ``energy_inside``: sum of the map inside / sum of the map (None for an all-zero map);
    ``peak_inside``: the maximum voxel (the first, on ties) lies in the region; ``peak_ras``: its
    position in RAS mm."""
    a = np.clip(sitk.GetArrayFromImage(attribution).astype(np.float64), 0.0, None)
    inside = sitk.GetArrayViewFromImage(region) > 0
    if a.shape != inside.shape:
        raise ValueError(f"map {a.shape} and region {inside.shape} are not on one grid")
    total = float(a.sum())
    peak = np.unravel_index(int(np.argmax(a)), a.shape)
    point = attribution.TransformIndexToPhysicalPoint([int(i) for i in peak[::-1]])
    return {"energy_inside": float(a[inside].sum() / total) if total > 0 else None,
            "peak_inside": bool(inside[peak]) if total > 0 else False,
            "peak_ras": [round(v, 2) for v in lps_to_ras(point)]}


def measure_maps(maps: Mapping[str, sitk.Image], region: sitk.Image, brain: sitk.Image | None = None) -> dict[str, Any]:
    """``prediction.json["explanations"]``: the region, its volume and share of the brain, and
    :func:`measure_map` per map."""
    inside = sitk.GetArrayViewFromImage(region) > 0
    voxel_ml = float(np.prod(region.GetSpacing())) / 1000.0
    share = None
    if brain is not None:
        b = sitk.GetArrayViewFromImage(brain) > 0
        share = float((inside & b).sum() / b.sum()) if b.any() else None
    return {"region": REGION, "region_ml": round(float(inside.sum()) * voxel_ml, 3),
            "region_share_of_brain": share,
            "maps": {name: measure_map(img, region) for name, img in maps.items()}}


def explain_result(result: Any) -> dict[str, Any] | None:
    """The explanations block of a predict result (:class:`~RANOResponseLib.inference.pipeline.PairResult`):
    None without maps or without segmentations."""
    segs = getattr(result, "segmentations", None) or {}
    if not result.maps or not segs:
        return None
    reference = next(iter(result.maps.values()))
    brain = result.brains["baseline"].image if "baseline" in getattr(result, "brains", {}) else None
    region = region_on_baseline(reference, segs.get("baseline"), segs.get("followup"),
                                result.registration.transform)
    return measure_maps(result.maps, region, brain)
