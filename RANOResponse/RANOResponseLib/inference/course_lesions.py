"""Lesions followed over a whole course: one id per lesion from the scan it appeared on.

Each timepoint's lesions are matched with the previous timepoint's
(:func:`~RANOResponseLib.rano.measurement.match_lesions`, through the rigid transforms that relate
every timepoint to the baseline). A lesion that overlaps earlier tumour keeps the id of the
earlier lesion it overlaps (the smallest id when two merged; when one lesion split, its largest
part keeps the id and the other parts get fresh ids but are not *new*). A lesion touching no
tumour of the previous timepoint (enhancing or core, within ``margin_mm``) is *new*: it gets a
fresh id and ``first_seen`` is its timepoint. A lesion that vanished and comes back later is new
again: RANO counts new lesions against the previous scan.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from RANOResponseLib.rano.measurement import Lesion, TimepointMeasurement, match_lesions


@dataclass(frozen=True)
class CourseLesion:
    """One lesion of one timepoint, with its course-wide identity."""

    id: int  # stable over the course
    lesion: Lesion  # as measured at this timepoint (its own id is the timepoint's size rank)
    new: bool  # touches no tumour of the previous timepoint
    first_seen: str

    def describe(self) -> str:
        le = self.lesion
        return f"L{self.id} {le.d1_mm:.1f} x {le.d2_mm:.1f} mm ({le.product_mm2:.0f} mm2)"


def between(from_baseline: sitk.Transform, to_baseline: sitk.Transform) -> sitk.AffineTransform:
    """The transform ``a -> b`` from two transforms ``baseline -> a`` and ``baseline -> b`` (rigid or
    affine): ``b ∘ a⁻¹``, as one affine transform (read off four points: exact for linear maps)."""
    inv = from_baseline.GetInverse()

    def f(p: Sequence[float]) -> np.ndarray:
        return np.array(to_baseline.TransformPoint(inv.TransformPoint([float(v) for v in p])))

    o = f((0.0, 0.0, 0.0))
    matrix = np.column_stack([f(e) - o for e in np.eye(3)])
    t = sitk.AffineTransform(3)
    t.SetMatrix(matrix.ravel().tolist())
    t.SetTranslation(o.tolist())
    return t


def _copy(m: TimepointMeasurement) -> TimepointMeasurement:
    """A measurement whose lesions can be matched without changing ``m``'s."""
    return replace(m, lesions=[replace(le) for le in m.lesions])


def track_lesions(names: Sequence[str], measurements: Sequence[TimepointMeasurement],
                  transforms: Sequence[sitk.Transform], margin_mm: float = 2.0) -> list[list[CourseLesion]]:
    """Course ids for every lesion of every timepoint (see the module docstring).

    ``transforms[i]`` maps baseline points to timepoint ``i``'s points (identity at the baseline).
    The first timepoint's lesions are none of them new.
    """
    out: list[list[CourseLesion]] = []
    next_id = 1
    for i, m in enumerate(measurements):
        here: list[CourseLesion] = []
        if i == 0:
            for le in m.lesions:
                here.append(CourseLesion(next_id, le, False, names[0]))
                next_id += 1
            out.append(here)
            continue
        prev, cur = _copy(measurements[i - 1]), _copy(m)
        match_lesions(prev, cur, between(transforms[i - 1], transforms[i]), margin_mm)
        prev_ids = {cl.lesion.id: cl for cl in out[i - 1]}
        taken: set[int] = set()
        for le in cur.lesions:  # largest first: the largest part of a split keeps the id
            earlier = sorted(prev_ids[j].id for j in le.matched if j in prev_ids)
            free = [cid for cid in earlier if cid not in taken]
            if free:
                cid = free[0]
                first = next(cl.first_seen for cl in out[i - 1] if cl.id == cid)
            else:
                cid, first = next_id, names[i]
                next_id += 1
            taken.add(cid)
            here.append(CourseLesion(cid, le, bool(le.new), first))
        out.append(here)
    return out
