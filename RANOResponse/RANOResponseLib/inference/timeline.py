"""``rano-response timeline``: RANO over every timepoint of one patient, cached per timepoint.

:func:`run_timeline` reads a course (:func:`~.course_inputs.list_course`: a LUMIERE patient folder
or a CSV of study folders with dates), picks the baseline
(:func:`~RANOResponseLib.rano.course.choose_baseline`) and, for every timepoint: loads it
(:func:`~RANOResponseLib.imaging.studies.load_study`), finds its brain
(:func:`~.inputs.find_brain`), aligns its sequences
(:func:`~RANOResponseLib.imaging.registration.align_study`), registers it rigidly onto the
baseline (brains only, :func:`~RANOResponseLib.imaging.registration.register_rigid`), segments it
(:func:`~.segmentation.segment_study` with the segmentation bundle, or the cohort's own masks with
``segmentation="cohort"``) and measures it (:func:`~RANOResponseLib.rano.measurement.measure_segmentation`).
Lesions are followed over the course (:mod:`.course_lesions`), the course rules read every
timepoint (:func:`~RANOResponseLib.rano.course.assess_course`), and the network classifies each
follow-up against the scan before it (:func:`~.pipeline.predict_pair`, without maps).

Everything a timepoint costs is cached in ``OUT/timepoints/<timepoint>/`` (brain mask,
segmentation, transform, measurement, the network's answer), keyed by what it depends on: the
study files' names, sizes and modification times, the baseline's (for the transform), the
previous timepoint's and the bundle's sha256 (for the network), the segmentation bundle's
sha256 or the mask file (for the segmentation). Re-running with one new scan computes only that
scan and its pair with the previous one. The output folder appears whole or not at all
(:func:`~RANOResponseLib.core.files.atomic_output_dir`); pictures and the PDF are written by
``writers`` the caller injects (:mod:`RANOResponseLib.review.course_report`), as predict's are.
:func:`read_timeline` is the one reader of ``timeline.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import SimpleITK as sitk

from RANOResponseLib import __version__
from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.files import atomic_output_dir, write_text
from RANOResponseLib.core.names import (
    LABEL_CORE,
    LABEL_EDEMA,
    LABEL_ENHANCING,
    LABEL_NAMES,
    MODALITIES,
    reference_modality,
)
from RANOResponseLib.imaging.io import Study, write_image
from RANOResponseLib.imaging.registration import align_study, overlap, register_rigid
from RANOResponseLib.imaging.studies import load_study
from RANOResponseLib.inference.course_inputs import (
    CohortMasks,
    CourseListing,
    CourseStudy,
    ModelSegmenter,
    cache_key,
    folder_fingerprint,
    list_course,
)
from RANOResponseLib.inference.course_lesions import CourseLesion, track_lesions
from RANOResponseLib.inference.inputs import BRAIN_MODES, find_brain
from RANOResponseLib.inference.segmentation import Segmentation, label_volumes
from RANOResponseLib.model.segmentation import default_seg_bundle_path
from RANOResponseLib.rano.course import Burden, assess_course, choose_baseline, criteria_dict
from RANOResponseLib.rano.measurement import (
    DEEPBRATUMIA,
    TimepointMeasurement,
    load_transform,
    measure_segmentation,
    read_segmentation,
)

TIMELINE_JSON = "timeline.json"
TIMELINE_CSV = "timeline.csv"
BURDEN_PNG = "burden.png"
REPORT_PDF = "timeline_report.pdf"
TIMEPOINTS_DIR = "timepoints"
OUTPUT_NAMES = (TIMELINE_JSON, TIMELINE_CSV, BURDEN_PNG, REPORT_PDF, TIMEPOINTS_DIR)
# inside OUT/timepoints/<timepoint>/
SEGMENTATION_FILE = "segmentation.nii.gz"
BRAIN_FILE = "brain_mask.nii.gz"
TRANSFORM_FILE = "baseline_to_timepoint.tfm"
MEASUREMENT_FILE = "measurement.json"
LESION_MAP_FILE = "lesion_map.nii.gz"  # each voxel: the "map_id" of its lesion in timeline.json (0: none)
REFERENCE_FILE = "reference.nii.gz"  # DICOM studies only: the reference image as NIfTI
CACHE_FILE = "cache.json"
SEGMENTATIONS = ("auto", "cohort")
CSV_COLUMNS = (
    "timepoint", "weeks", "date", "role", "expert_rating", "spd_mm2", "nadir_mm2", "nadir_timepoint",
    "change_vs_nadir_pct", "change_vs_baseline_pct", "category", "confirmed", "category_rano2", "confirmed_rano2",
    "measurable_enhancing_ml", "nadir_ml", "change_vs_nadir_volume_pct", "change_vs_baseline_volume_pct",
    "pseudoprogression_window", "enhancing_ml", "non_enhancing_ml", "edema_ml", "lesions", "measurable_lesions",
    "new_lesions", "network_label", "network_previous", "cached", "seconds", "study",
)
VOLUME_NAMES = {LABEL_ENHANCING: "enhancing", LABEL_CORE: "non_enhancing", LABEL_EDEMA: "edema"}
NOTE = "Research software, not for clinical use."

# A writer adds files from the finished document: (timeline dict, output folder) -> {name: path}.
TimelineWriter = Callable[[dict, Path], Mapping[str, Path]]


def _read_measurement(folder: Path) -> TimepointMeasurement:
    """A cached measurement with the maps lesion matching needs (lesion ids; enhancing or core)."""
    m = TimepointMeasurement.from_dict(json.loads((folder / MEASUREMENT_FILE).read_text(encoding="utf-8")))
    m.lesion_map = read_segmentation(folder / LESION_MAP_FILE)
    seg = read_segmentation(folder / SEGMENTATION_FILE)
    # the tumour as rano.measurement.lesion_components defines it: enhancing or core labels
    tumour = sitk.GetImageFromArray(np.isin(sitk.GetArrayViewFromImage(seg),
                                            DEEPBRATUMIA.enhancing + DEEPBRATUMIA.core).astype(np.uint8))
    tumour.CopyInformation(seg)
    m.tumour_mask = tumour
    return m


# ------------------------------------------------------------------------------ the run


@dataclass
class _Loaded:
    study: Study  # aligned: every sequence on the reference grid
    brain: sitk.Image
    brain_info: dict


@dataclass
class _Timepoint:
    cs: CourseStudy
    folder: Path  # OUT staging/timepoints/<name>
    keys: dict[str, str]
    old: dict  # the previous run's cache.json ({} if none)
    old_folder: Path
    computed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    measurement: TimepointMeasurement | None = None
    transform: sitk.Transform | None = None
    info: dict = field(default_factory=dict)  # what goes into cache.json besides the keys


def _link(src: Path, dst: Path) -> None:
    """Reuse a cached file: a hard link (same inode, same mtime), else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class _CourseRun:
    def __init__(self, listing: CourseListing, baseline: int, stage: Path, old_root: Path, segmenter: Any,
                 bundle: Any, device: Any, brain_mode: str, margin_mm: float, show_progress: bool) -> None:
        self.listing, self.base, self.stage = listing, baseline, stage
        self.segmenter, self.bundle, self.device, self.brain_mode = segmenter, bundle, device, brain_mode
        self.margin_mm, self.show_progress = margin_mm, show_progress
        self.loaded: dict[int, _Loaded] = {}
        self.timings: dict[str, float] = {}
        self.modalities = tuple(MODALITIES)
        fps = [folder_fingerprint(s.folder) for s in listing.studies]
        self.tps: list[_Timepoint] = []
        for i, cs in enumerate(listing.studies):
            brain = cache_key("brain", fps[i], brain_mode)
            keys = {"brain": brain, "segmentation": cache_key("seg", brain, segmenter.key(cs)),
                    "registration": cache_key("reg", fps[i], fps[baseline], brain_mode) if i != baseline else "identity"}
            if bundle is not None and i > baseline:
                keys["network"] = cache_key("net", fps[i - 1], fps[i], brain_mode, bundle.id,
                                            [w["sha256"] for w in bundle.weights],
                                            segmenter.key(cs) if bundle.spec.reads_segmentation else None)
            old_folder = old_root / cs.name
            old = {}
            if (old_folder / CACHE_FILE).is_file():
                try:
                    old = json.loads((old_folder / CACHE_FILE).read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    old = {}
            self.tps.append(_Timepoint(cs, stage / TIMEPOINTS_DIR / cs.name, keys, old, old_folder))

    # -------------------------------------------------------------- helpers

    def _time(self, stage: str, t: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - t

    def _reuse(self, tp: _Timepoint, what: str, files: Sequence[str]) -> bool:
        """Link the previous run's files for ``what`` into the new folder when its key still holds."""
        if tp.old.get("keys", {}).get(what) != tp.keys[what]:
            return False
        if not all((tp.old_folder / f).is_file() for f in files):
            return False
        for f in files:
            _link(tp.old_folder / f, tp.folder / f)
        return True

    def _load(self, i: int) -> _Loaded:
        """Timepoint ``i`` read, its brain found (or the cached mask read) and its sequences aligned."""
        if i in self.loaded:
            return self.loaded[i]
        tp = self.tps[i]
        t = time.perf_counter()
        study = load_study(tp.cs.folder, self.modalities, missing_ok=True)
        if not study.images:
            raise RANOInputError(f"{tp.cs.folder}: none of {', '.join(self.modalities)} found")
        ref = reference_modality(study.images)
        self._time("load", t)
        t = time.perf_counter()
        cached_brain = tp.folder / BRAIN_FILE
        source: Any = cached_brain if cached_brain.is_file() else self.brain_mode
        brain = find_brain(study, ref, source, self.device)
        if source is not cached_brain:
            write_image(brain.image, cached_brain)
            tp.computed.append("brain")
            tp.info["brain"] = brain.as_dict()
        self._time("brain", t)
        t = time.perf_counter()
        aligned, _ = align_study(study, brain.image, ref)
        self._time("align", t)
        if study.files.get(ref) is not None:
            tp.info["reference_image"] = str(Path(study.files[ref]).absolute())
        else:  # DICOM: keep the reference image as a file beside the segmentation
            write_image(aligned.images[ref], tp.folder / REFERENCE_FILE)
            tp.info["reference_image"] = f"{TIMEPOINTS_DIR}/{tp.cs.name}/{REFERENCE_FILE}"
        tp.info["reference_modality"] = ref
        self.loaded[i] = _Loaded(aligned, brain.image, tp.info.get("brain", {}))
        return self.loaded[i]

    def _keep_only(self, keep: set[int]) -> None:
        for i in [i for i in self.loaded if i not in keep]:
            del self.loaded[i]

    # -------------------------------------------------------------- per timepoint

    def _brain_and_segmentation(self, i: int) -> None:
        tp = self.tps[i]
        tp.folder.mkdir(parents=True, exist_ok=True)
        extra = [REFERENCE_FILE] if (tp.old_folder / REFERENCE_FILE).is_file() else []
        if self._reuse(tp, "brain", [BRAIN_FILE, *extra]):
            tp.info.update({k: tp.old[k] for k in ("brain", "reference_image", "reference_modality") if k in tp.old})
        if self._reuse(tp, "segmentation", [SEGMENTATION_FILE, MEASUREMENT_FILE, LESION_MAP_FILE]):
            t = time.perf_counter()
            tp.measurement = _read_measurement(tp.folder)
            self._time("measure", t)
        else:
            loaded = self._load(i)
            t = time.perf_counter()
            seg = self.segmenter(tp.cs, loaded.study, loaded.brain)
            write_image(seg, tp.folder / SEGMENTATION_FILE)
            tp.computed.append("segmentation")
            self._time("segmentation", t)
            t = time.perf_counter()
            tp.measurement = measure_segmentation(seg, DEEPBRATUMIA, source=str(tp.cs.folder))
            write_text(json.dumps(tp.measurement.to_dict(), indent=1) + "\n", tp.folder / MEASUREMENT_FILE)
            write_image(tp.measurement.lesion_map, tp.folder / LESION_MAP_FILE)
            self._time("measure", t)
        if "reference_image" not in tp.info:  # brain cached but its record incomplete
            self._load(i)

    def _registration(self, i: int) -> None:
        tp = self.tps[i]
        if i == self.base:
            tp.transform = sitk.Euler3DTransform()
            if not self._reuse(tp, "registration", [TRANSFORM_FILE]):
                sitk.WriteTransform(tp.transform, str(tp.folder / TRANSFORM_FILE))
            tp.info["registration"] = {"method": "identity (the baseline)"}
            return
        if self._reuse(tp, "registration", [TRANSFORM_FILE]):
            tp.transform = load_transform(tp.folder / TRANSFORM_FILE)
            tp.info["registration"] = tp.old.get("registration", {})
            return
        base, cur = self._load(self.base), self._load(i)
        t = time.perf_counter()
        reg = register_rigid(base.study, cur.study, masks=(base.brain, cur.brain))
        tp.transform = reg.transform
        sitk.WriteTransform(reg.transform, str(tp.folder / TRANSFORM_FILE))
        tp.info["registration"] = {**reg.as_dict(),
                                   "brain_overlap": round(overlap(base.brain, cur.brain, reg.transform), 4)}
        tp.computed.append("registration")
        self._time("registration", t)

    def _network(self, i: int) -> None:
        tp = self.tps[i]
        if "network" not in tp.keys:
            return
        if tp.old.get("keys", {}).get("network") == tp.keys["network"] and "network" in tp.old:
            tp.info["network"], tp.info["network_note"] = tp.old["network"], tp.old.get("network_note", "")
            return
        from RANOResponseLib.inference.pipeline import predict_pair

        prev, cur = self._load(i - 1), self._load(i)
        need = self.bundle.spec.modalities
        lacking = [f"{self.tps[j].cs.name} lacks {m}" for j, s in ((i - 1, prev), (i, cur))
                   for m in need if m not in s.study.images]
        t = time.perf_counter()
        tp.info["network"], tp.info["network_note"] = None, ""
        if lacking:
            tp.info["network_note"] = f"network not run: {'; '.join(lacking)}"
        else:
            masks = (self.tps[i - 1].folder / BRAIN_FILE, tp.folder / BRAIN_FILE)
            try:
                result = predict_pair(prev.study, cur.study, self.bundle, str(self.device), attributions=False,
                                      brain_mask=masks, segmentation=False,  # measured here already
                                      segmenter=self._input_segmenter(i - 1, i))
                tp.info["network"] = {"label": result.label, "probabilities": result.probabilities,
                                      "previous": self.tps[i - 1].cs.name}
            except RANOInputError as e:  # the input guard refused this pair: say so, keep the course
                tp.info["network_note"] = f"network refused the pair: {e}"
        tp.computed.append("network")
        self._time("network", t)

    def _input_segmenter(self, *indices: int) -> Callable | None:
        """For a classifier that reads segmentation channels: the labels this course already made
        for those timepoints, when the default segmentation bundle (predict's) made them; None
        (predict segments itself) otherwise, e.g. with the cohort's own masks."""
        if not self.bundle.spec.reads_segmentation or not isinstance(self.segmenter, ModelSegmenter):
            return None
        default = default_seg_bundle_path().resolve()
        if Path(self.segmenter.bundle.path).resolve() != default:
            return None
        files = {self.tps[j].cs.folder: self.tps[j].folder / SEGMENTATION_FILE for j in indices}
        bundle_id = self.segmenter.bundle.id

        def labels(study: Study, brain: sitk.Image) -> Segmentation:
            image = sitk.Cast(sitk.ReadImage(str(files[study.folder])), sitk.sitkUInt8)
            return Segmentation(image, 0.0, bundle_id, label_volumes(image, LABEL_NAMES))

        return labels

    def run(self) -> None:
        from tqdm import tqdm

        order = [self.base] + [i for i in range(len(self.tps)) if i != self.base]
        bar = tqdm(total=len(order), desc=self.listing.patient, unit="timepoint", file=sys.stderr,
                   disable=not self.show_progress)
        try:
            for i in order:
                tp = self.tps[i]
                t = time.perf_counter()
                bar.set_postfix_str(tp.cs.name)
                self._brain_and_segmentation(i)
                self._registration(i)
                self._network(i)
                tp.seconds = time.perf_counter() - t
                write_text(json.dumps({"keys": tp.keys, **tp.info}, indent=1) + "\n", tp.folder / CACHE_FILE)
                self._keep_only({self.base, i})  # the next timepoint pairs with this one
                bar.update(1)
        finally:
            bar.close()


# ------------------------------------------------------------------------------ the document


def _round(v: float | None, n: int = 3) -> float | None:
    return None if v is None else round(float(v), n)


def _lesion_dict(cl: CourseLesion) -> dict:
    le = cl.lesion
    return {"id": cl.id, "map_id": le.id, "d1_mm": _round(le.d1_mm), "d2_mm": _round(le.d2_mm), "product_mm2": _round(le.product_mm2),
            "volume_ml": _round(le.volume_ml, 4), "enhancing_ml": _round(le.enhancing_ml, 4),
            "measurable": le.measurable, "why_not_measurable": le.why_not_measurable, "new": cl.new,
            "first_seen": cl.first_seen, "slices": le.n_slices,
            "d1_points": [[round(v, 3) for v in p] for p in le.d1_points],
            "d2_points": [[round(v, 3) for v in p] for p in le.d2_points]}


def _volumes(seg_file: Path) -> dict[str, float]:
    from RANOResponseLib.inference.segmentation import label_volumes

    return {f"{k}_ml": round(v, 4) for k, v in label_volumes(read_segmentation(seg_file), VOLUME_NAMES).items()}


def _document(run: _CourseRun, listing: CourseListing, choice: Any, rt_end_weeks: float | None) -> dict:
    tps = run.tps
    names = [tp.cs.name for tp in tps]
    tracks = track_lesions(names, [tp.measurement for tp in tps], [tp.transform for tp in tps], run.margin_mm)
    burdens = [Burden.of(tp.cs.name, tp.cs.weeks, tp.measurement,
                         [cl.describe() for cl in tr if cl.new and cl.lesion.measurable] if i > 0 else ())
               for i, (tp, tr) in enumerate(zip(tps, tracks))]
    course = assess_course(burdens, choice.index, choice.pre_op, rt_end_weeks=rt_end_weeks)
    rows = []
    for tp, tr, a in zip(tps, tracks, course):
        rel = f"{TIMEPOINTS_DIR}/{tp.cs.name}"
        m = tp.measurement
        rows.append({
            "timepoint": tp.cs.name, "weeks": tp.cs.weeks, "date": tp.cs.date, "role": a.role,
            "expert_rating": tp.cs.rating, "study": str(tp.cs.folder),
            "reference_image": tp.info.get("reference_image"), "reference_modality": tp.info.get("reference_modality"),
            "segmentation": f"{rel}/{SEGMENTATION_FILE}", "brain_mask": f"{rel}/{BRAIN_FILE}",
            "to_baseline_transform": f"{rel}/{TRANSFORM_FILE}", "measurement": f"{rel}/{MEASUREMENT_FILE}",
            "lesion_map": f"{rel}/{LESION_MAP_FILE}",
            "spd_mm2": _round(m.spd_mm2), "measurable_enhancing_ml": _round(m.measurable_volume_ml, 4),
            **_volumes(run.stage / rel / SEGMENTATION_FILE),
            "nadir_mm2": _round(a.rano.nadir), "nadir_timepoint": a.rano.nadir_timepoint,
            "change_vs_nadir_pct": _round(a.rano.change_vs_nadir_pct, 2),
            "change_vs_baseline_pct": _round(a.rano.change_vs_baseline_pct, 2),
            "category": a.rano.category, "confirmed": a.rano.confirmed, "reasoning": "\n".join(a.rano.reasoning),
            "nadir_ml": _round(a.rano2.nadir, 4), "nadir_ml_timepoint": a.rano2.nadir_timepoint,
            "change_vs_nadir_volume_pct": _round(a.rano2.change_vs_nadir_pct, 2),
            "change_vs_baseline_volume_pct": _round(a.rano2.change_vs_baseline_pct, 2),
            "category_rano2": a.rano2.category, "confirmed_rano2": a.rano2.confirmed,
            "reasoning_rano2": "\n".join(a.rano2.reasoning), "pseudoprogression_window": a.pseudoprogression_window,
            "network": tp.info.get("network"), "network_note": tp.info.get("network_note", ""),
            "registration": tp.info.get("registration", {}), "brain": tp.info.get("brain", {}),
            "lesions": [_lesion_dict(cl) for cl in tr],
            "seconds": round(tp.seconds, 3), "cached": not tp.computed, "computed": list(tp.computed),
        })
    seen: dict[int, dict] = {}
    for tp, tr in zip(tps, tracks):
        for cl in tr:
            seen.setdefault(cl.id, {"id": cl.id, "first_seen": cl.first_seen})["last_seen"] = tp.cs.name
    return {
        "patient": listing.patient, "source": str(listing.source), "ratings": listing.ratings_source or None,
        "baseline": names[choice.index], "baseline_reason": choice.reason,
        "pre_op": names[choice.pre_op] if choice.pre_op is not None else None,
        "criteria": criteria_dict(rt_end_weeks=rt_end_weeks), "segmentation": run.segmenter.describe(),
        "network_bundle": None if run.bundle is None else {
            "id": run.bundle.id, "path": str(run.bundle.path), "sha256": [w["sha256"] for w in run.bundle.weights]},
        "brain_mask": run.brain_mode, "timepoints": rows, "lesions": sorted(seen.values(), key=lambda d: d["id"]),
        "computed": {s: [tp.cs.name for tp in tps if s in tp.computed]
                     for s in ("brain", "segmentation", "registration", "network")},
        "timings_s": {k: round(v, 3) for k, v in run.timings.items()}, "rano_response_version": __version__,
        "note": NOTE,
    }


def _csv_rows(doc: dict) -> pd.DataFrame:
    rows = []
    for r in doc["timepoints"]:
        net = r["network"] or {}
        rows.append({**{k: r.get(k) for k in CSV_COLUMNS}, "lesions": len(r["lesions"]),
                     "measurable_lesions": sum(1 for le in r["lesions"] if le["measurable"]),
                     "new_lesions": ";".join(f"L{le['id']}" for le in r["lesions"] if le["new"]),
                     "network_label": net.get("label", ""), "network_previous": net.get("previous", "")})
    return pd.DataFrame(rows, columns=list(CSV_COLUMNS))


# ------------------------------------------------------------------------------ entry points


def run_timeline(
    patient: Path | str,
    out: Path | str,
    baseline_timepoint: str | None = None,
    bundle: Path | str | None = None,
    seg_bundle: Path | str | None = None,
    device: str = "auto",
    network: bool = True,
    segmentation: str = "auto",
    brain_mask: str = "auto",
    rt_end_weeks: float | None = None,
    writers: Sequence[TimelineWriter] = (),
    show_progress: bool = True,
    margin_mm: float = 2.0,
) -> dict:
    """``rano-response timeline``: the course of one patient into ``out`` (see the module docstring).

    ``patient``: a LUMIERE patient folder or a course CSV (:func:`~.course_inputs.list_course`);
    ``baseline_timepoint`` overrides the baseline; ``bundle`` the network (``network=False``: none);
    ``segmentation``: ``auto`` (the segmentation bundle ``seg_bundle``, default the shipped one) or
    ``cohort`` (the cohort's own masks); ``brain_mask``: ``auto``, ``model`` or ``none``;
    ``rt_end_weeks``: when radiotherapy ended (default: assumed at the baseline);
    ``writers``: add the plot and the report (:func:`RANOResponseLib.review.course_report.course_writers`).
    Returns the ``timeline.json`` document. Bad input raises :class:`RANOInputError` before ``out``
    is touched.
    """
    from RANOResponseLib.model.device import resolve_device

    t0 = time.perf_counter()
    if segmentation not in SEGMENTATIONS:
        raise RANOInputError(f"--segmentation {segmentation}: use {' or '.join(SEGMENTATIONS)}")
    if brain_mask not in BRAIN_MODES:
        raise RANOInputError(f"--brain-mask {brain_mask}: use {', '.join(BRAIN_MODES)}")
    listing = list_course(patient)
    for s in listing.studies:
        if not s.folder.is_dir():
            raise RANOInputError(f"{s.folder}: study folder not found")
    dev = resolve_device(device)
    net_bundle = None
    if network:
        from RANOResponseLib.model.bundle import read_bundle

        net_bundle = read_bundle(bundle)
    if segmentation == "cohort":
        segmenter: Any = CohortMasks()
    else:
        from RANOResponseLib.model.segmentation import read_seg_bundle

        segmenter = ModelSegmenter(read_seg_bundle(seg_bundle), dev)
    # a timepoint that cannot be segmented (LUMIERE: a sequence or a mask missing) is left out, and said so
    skipped = [{"timepoint": s.name, "study": str(s.folder), "reason": why}
               for s in listing.studies if (why := segmenter.missing(s))]
    listing.studies = [s for s in listing.studies if s.name not in {x["timepoint"] for x in skipped}]
    if not listing.studies:
        raise RANOInputError(f"{listing.source}: no timepoint can be segmented ({skipped[0]['reason']})")
    choice = choose_baseline(listing.names, listing.ratings, baseline_timepoint)
    old_root = Path(out).absolute() / TIMEPOINTS_DIR
    with atomic_output_dir(out, owned=OUTPUT_NAMES) as stage:
        run = _CourseRun(listing, choice.index, stage, old_root, segmenter, net_bundle, dev, brain_mask, margin_mm,
                         show_progress)
        run.run()
        t = time.perf_counter()
        doc = _document(run, listing, choice, rt_end_weeks)
        doc["timings_s"]["course"] = round(time.perf_counter() - t, 3)  # lesions followed, rules, volumes
        doc["skipped"] = skipped
        doc["outputs"] = {"csv": TIMELINE_CSV}
        write_text(_csv_rows(doc).to_csv(index=False), stage / TIMELINE_CSV)
        t = time.perf_counter()
        for writer in writers:
            doc["outputs"].update({k: Path(p).relative_to(stage).as_posix() for k, p in writer(doc, stage).items()})
        doc["timings_s"]["report"] = round(time.perf_counter() - t, 3)
        doc["timings_s"]["total"] = round(time.perf_counter() - t0, 3)
        write_text(json.dumps(doc, indent=2) + "\n", stage / TIMELINE_JSON)
    return doc


REQUIRED_KEYS = ("patient", "baseline", "timepoints", "criteria")


def read_timeline(out: Path | str) -> dict:
    """The ``timeline.json`` of a timeline output folder (or the file itself), checked.

    Relative paths in it (``segmentation``, ``to_baseline_transform``...) are relative to the folder.
    Raises :class:`RANOInputError` naming the file.
    """
    p = Path(out)
    f = p / TIMELINE_JSON if p.is_dir() else p
    if not f.is_file():
        raise RANOInputError(f"{f}: timeline file not found (run `rano-response timeline` first)")
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RANOInputError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(d, dict) or any(k not in d for k in REQUIRED_KEYS) or not isinstance(d["timepoints"], list):
        raise RANOInputError(f"{f}: not a timeline written by `rano-response timeline` "
                             f"(needs {', '.join(REQUIRED_KEYS)})")
    for r in d["timepoints"]:
        if not isinstance(r, dict) or "timepoint" not in r or "category" not in r:
            raise RANOInputError(f"{f}: a timepoint entry lacks 'timepoint' or 'category'")
    return d
