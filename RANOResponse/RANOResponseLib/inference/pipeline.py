"""The one data path from two study folders to a prediction with maps.

``predict_pair`` does the work in memory and is what the Slicer module, the CLI and evaluation
call: it loads the studies (NIfTI/NRRD files or DICOM, :func:`~RANOResponseLib.imaging.studies.load_study`),
prepares the network input (brain masks, alignment, registration, model grid:
:func:`~RANOResponseLib.inference.inputs.prepare_inputs`), checks it against what the bundle was
trained on (:mod:`~RANOResponseLib.inference.guard`), runs the ensemble and masks the maps by the
brain, and segments the tumour at both timepoints to measure RANO beside the network
(:mod:`~RANOResponseLib.inference.segmentation`, :mod:`~RANOResponseLib.inference.measured`).
``write_outputs`` writes its result; ``run_predict`` is both, atomically;
``read_prediction`` is the one reader of the ``prediction.json`` it writes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from RANOResponseLib import __version__
from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.outputs import (  # noqa: F401  (re-exported: the pipeline's output names)
    BRAIN_MASK_FILE,
    OUTPUT_NAMES,
    PREDICTION_JSON,
    SCENE_FILE,
    SEGMENTATION_FILES,
    SLICE_VIEWS,
    TRANSFORM_FILE,
    read_prediction,
)
from RANOResponseLib.core.files import atomic_output_dir, write_text
from RANOResponseLib.imaging.geometry import grid_center, lps_to_ras, ras_to_lps
from RANOResponseLib.imaging.dicom import Rules
from RANOResponseLib.imaging.io import EXTENSIONS, Study, check_distinct_studies, write_image
from RANOResponseLib.imaging.preprocessing import PreparedPair, to_reference
from RANOResponseLib.imaging.registration import RegistrationParams, RegistrationResult
from RANOResponseLib.imaging.studies import SeriesOverrides, check_pair, load_study
from RANOResponseLib.inference import guard
from RANOResponseLib.inference.attributions import Prediction, predict, predict_with_maps
from RANOResponseLib.inference.calibration import apply_calibration, summary_fields  # issue 12
from RANOResponseLib.inference.explanations import explain_result  # issue 12
from RANOResponseLib.inference.inputs import BrainMask, prepare_inputs
from RANOResponseLib.inference.measured import measure_automatic
from RANOResponseLib.inference.segmentation import Segmentation, bundle_segmenter
from RANOResponseLib.model.bundle import Bundle, load_models, read_bundle
from RANOResponseLib.model.device import resolve_device
from RANOResponseLib.model.segmentation import SegBundle, preload_networks, read_seg_bundle
from RANOResponseLib.rano.measurement import PairMeasurement

Progress = Callable[[str, float], None]


@dataclass
class PairResult:
    """Everything a caller may want to show or save from one prediction."""

    bundle: Bundle
    device: str
    baseline: Study  # every sequence on the baseline reference image's grid
    followup: Study  # every sequence on the follow-up reference image's grid
    registration: RegistrationResult
    prepared: PreparedPair
    prediction: Prediction
    maps: dict[str, sitk.Image] = field(default_factory=dict)  # on the baseline reference grid
    timings: dict[str, float] = field(default_factory=dict)
    roi_center: tuple[float, float, float] | None = None  # RAS mm, when the crop was placed by hand
    brains: dict[str, BrainMask] = field(default_factory=dict)  # timepoint -> brain mask
    description: dict = field(default_factory=dict)  # the inputs described (inference.inputs)
    input_check: dict = field(default_factory=dict)  # the guard's verdict and reasons
    segmentations: dict[str, Segmentation] = field(default_factory=dict)  # timepoint -> its tumour labels
    measured: dict | None = None  # prediction.json's "measured" block (None: not segmented)
    pair_measurement: PairMeasurement | None = None  # the lesions of both timepoints, matched
    explanations: dict | None = None  # maps vs tumour + edema (inference.explanations; needs maps and segmentations)
    segmentation_skipped: str | None = None  # why the default segmentation did not run (a study lacks its sequences)

    @property
    def label(self) -> str:
        return self.bundle.class_names[int(np.argmax(self.prediction.probabilities))]

    @property
    def probabilities(self) -> dict[str, float]:
        return {c: float(p) for c, p in zip(self.bundle.class_names, self.prediction.probabilities)}

    def model_grid(self) -> dict:
        """Where the network looked: the crop's centre (RAS mm, as Slicer shows it) and size."""
        grid = self.prepared.grid
        return {
            "center_ras": [round(v, 4) for v in lps_to_ras(grid_center(grid))],
            "fov_mm": [float(n * s) for n, s in zip(grid.GetSize(), grid.GetSpacing())],
            "size": list(grid.GetSize()),
            "spacing_mm": list(grid.GetSpacing()),
            "placed": "roi" if self.roi_center is not None else "brain",
        }

    def input_files(self, timepoint: str) -> dict[str, str]:
        """What each modality was read from: its file, or for DICOM its series folder."""
        study = self.baseline if timepoint == "baseline" else self.followup
        return {m: str(study.files.get(m) or study.sources.get(m, {}).get("path", study.folder))
                for m in study.images}

    def image_files(self, timepoint: str) -> dict[str, Path]:
        """The modalities whose image here is exactly an image file (NIfTI/NRRD read as it is, not
        resampled onto the reference grid): a scene may refer to those files instead of copies."""
        study = self.baseline if timepoint == "baseline" else self.followup
        sequences = self.description.get("studies", {}).get(timepoint, {}).get("sequences", {})
        return {m: Path(p) for m, p in study.files.items()
                if str(p).lower().endswith(EXTENSIONS)
                and sequences.get(m, {}).get("alignment", {}).get("method") != "registered"}

    def summary(self) -> dict:
        spread = {c: float(s) for c, s in zip(self.bundle.class_names, self.prediction.spread)}
        return {
            "label": self.label,
            "probabilities": self.probabilities,
            **summary_fields(self),  # network's own probabilities, uncertain, suggested (inference.calibration)
            "explanations": self.explanations,
            "ensemble_spread": spread,
            "ensemble_size": len(self.bundle.weights),
            "maps_explain": self.bundle.class_names[self.prediction.target] if self.maps else None,
            "bundle": {"id": self.bundle.id, "path": str(self.bundle.path),
                       "sha256": [w["sha256"] for w in self.bundle.weights]},
            "device": self.device,
            "inputs": {"baseline": self.input_files("baseline"), "followup": self.input_files("followup"),
                       **self.description},
            "input_check": self.input_check,
            "registration": self.registration.as_dict(),
            "model_grid": self.model_grid(),
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
            "map_scale": self.prediction.raw_max,
            "measured": self.measured,
            **({"segmentation_skipped": self.segmentation_skipped} if self.segmentation_skipped else {}),
            "rano_response_version": __version__,
            "note": "Research software, not for clinical use.",
        }


def _load_models_cached(bundle: Bundle, device: torch.device) -> list[torch.nn.Module]:
    key = (str(bundle.path), tuple(w["sha256"] for w in bundle.weights), str(device))
    if _MODEL_CACHE.get("key") != key:
        _MODEL_CACHE["key"], _MODEL_CACHE["models"] = key, load_models(bundle, device)
    return _MODEL_CACHE["models"]


# One bundle kept loaded, so a Slicer session or a batch does not reload weights per case (the
# segmentation bundle's: inference.segmentation.cached_seg_models).
_MODEL_CACHE: dict[str, object] = {}


def _folder(study: Path | str | Study) -> Path:
    return study.folder if isinstance(study, Study) else Path(study)


def _as_study(study: Path | str | Study, bundle: Bundle, series: SeriesOverrides | None,
              rules: Rules | Mapping | Path | str | None, seg: SegBundle | None = None) -> Study:
    """A loaded study as is; a folder (NIfTI/NRRD files or DICOM) is loaded with the modalities
    of the bundle and of the segmentation bundle."""
    if isinstance(study, Study):
        return study
    modalities = tuple(dict.fromkeys((*bundle.spec.modalities, *(seg.modalities if seg else ()))))
    required_by = f"bundle '{bundle.id}'" + (f" or segmentation bundle '{seg.id}'" if seg else "")
    return load_study(study, modalities, series=series, rules=rules, required_by=required_by)


# Progress fractions of the stages predict_pair reports (each when it completes).
_PROGRESS = {"read": 0.1, "brain masks": 0.3, "aligned": 0.4, "segmented inputs": 0.5, "registered": 0.55, "resampled": 0.65,
             "predicted": 0.8, "segmented": 0.95}


def predict_pair(
    baseline: Path | str | Study,
    followup: Path | str | Study,
    bundle: Bundle | Path | str | None = None,
    device: str = "auto",
    attributions: bool = True,
    registration: RegistrationParams | None = None,
    progress: Progress | None = None,
    notice: Callable[[str], None] | None = None,
    roi_center: Sequence[float] | None = None,
    brain_mask: str | Sequence[str | Path] = "auto",
    series: SeriesOverrides | None = None,
    series_rules: Rules | Mapping | Path | str | None = None,
    allow_different: bool = False,
    segmentation: bool = True,
    seg_bundle: SegBundle | Path | str | None = None,
    segmenter: Callable[[Study, sitk.Image], Segmentation] | None = None,
) -> PairResult:
    """Load, find the brains, align, register, resample, check, run the model and (optionally)
    the maps, then segment both timepoints and measure RANO from them, for one case pair.

    ``roi_center``: centre of the crop in RAS mm (a Slicer ROI's centre, ``--roi-center``);
    by default the crop is centred on the baseline brain. ``brain_mask``: ``--brain-mask``
    (``auto``, ``model``, ``none``, a file name inside each study folder, or ``BASE,FOLLOW``;
    see :func:`~RANOResponseLib.inference.inputs.brain_sources`). ``series``, ``series_rules``:
    which DICOM series is which modality (``--series``, ``--series-rules``);
    ``allow_different``: accept two DICOM studies of different PatientIDs. ``segmentation``:
    segment both timepoints with ``seg_bundle`` (default: the shipped segmentation bundle;
    ``--no-segmentation`` turns it off) and measure RANO (``PairResult.measured``). A bundle
    whose network reads segmentation channels (``InputSpec.reads_segmentation``) always segments
    both timepoints, before the network runs (the segmentations are then part of its input and
    written with the outputs); ``segmentation=False`` then turns off only the measured RANO.
    ``segmenter``: ``(aligned study, brain) -> Segmentation`` giving those input segmentations
    instead of ``seg_bundle`` (the course reuses the labels it made with the same bundle).
    A pair that is not a brain MRI pair is refused (:class:`RANOInputError`) before the network runs.
    """
    report = progress or (lambda stage, frac: None)

    def stage(name: str) -> None:
        report(name, _PROGRESS[name])

    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    bundle = bundle if isinstance(bundle, Bundle) else read_bundle(bundle)
    seg = None
    reads_segmentation = bundle.spec.reads_segmentation
    if segmentation or reads_segmentation:
        seg = seg_bundle if isinstance(seg_bundle, SegBundle) else read_seg_bundle(seg_bundle)
        preload_networks()  # MONAI's import overlaps reading and registration
    dev = resolve_device(device, notice)

    t = time.perf_counter()
    check_distinct_studies(_folder(baseline), _folder(followup))
    skipped = None
    try:
        base = _as_study(baseline, bundle, series, series_rules, seg)
        fu = _as_study(followup, bundle, series, series_rules, seg)
    except RANOInputError as e:
        if seg is None or seg_bundle is not None or reads_segmentation:
            raise
        # The default segmentation needs sequences the classifier does not: a study without them
        # still gets the network's answer (a study lacking the classifier's own is refused below).
        base = _as_study(baseline, bundle, series, series_rules)
        fu = _as_study(followup, bundle, series, series_rules)
        seg, skipped = None, f"segmentation skipped: {e}"
        (notice or (lambda msg: None))(skipped)
    check_pair(base, fu, allow_different)
    models = _load_models_cached(bundle, dev)
    timings["read"] = time.perf_counter() - t
    stage("read")

    centre = None if roi_center is None else ras_to_lps(roi_center)
    if reads_segmentation and segmenter is None:
        assert seg is not None
        segmenter = bundle_segmenter(seg, dev)
    inputs = prepare_inputs(base, fu, bundle.spec, brain_mask, dev, registration, centre, progress=stage,
                            segmenter=segmenter)
    timings.update(inputs.timings)
    input_check = guard.check(inputs.description, bundle.input_statistics)
    prepared = inputs.prepared
    x = torch.from_numpy(prepared.array[None]).to(dev)

    maps: dict[str, sitk.Image] = {}
    if attributions:
        pred = predict_with_maps(models, x, bundle.gradcam_layer)
        t = time.perf_counter()
        reference = inputs.baseline.images[bundle.spec.reference_modality]
        brain = inputs.brains["baseline"].image
        maps = {name: to_reference(getattr(pred, name), prepared.grid, reference, brain=brain)
                for name in ("saliency", "gradcam")}
        pred.timings["attributions"] += time.perf_counter() - t
    else:
        pred = predict(models, x)
    timings.update(pred.timings)
    apply_calibration(pred, bundle.calibration, bundle.class_names)  # calibrated probabilities, "uncertain"
    stage("predicted")
    roi = None if roi_center is None else tuple(float(v) for v in roi_center)
    result = PairResult(bundle, str(dev), inputs.baseline, inputs.followup, inputs.registration, prepared,  # type: ignore[arg-type]
                        pred, maps, timings, roi, inputs.brains, inputs.description, input_check)
    result.segmentation_skipped = skipped
    result.segmentations = dict(inputs.segmentations)
    if seg is not None and segmentation:
        _segment_and_measure(result, seg, dev)
        stage("segmented")
        result.explanations = explain_result(result)  # energy inside tumour + edema, pointing game
    timings["total"] = time.perf_counter() - t_start
    return result


def _segment_and_measure(result: PairResult, seg: SegBundle, device: torch.device) -> None:
    """Segment both (aligned) studies inside their brains, measure and decide RANO from the labels
    (lesions matched through the registration) and set the result's ``segmentations``,
    ``pair_measurement`` and ``measured`` (segmentations the network's input already holds are reused)."""
    if not result.segmentations:  # (a network reading segmentation channels has them already)
        t = time.perf_counter()
        segment = bundle_segmenter(seg, device)
        studies = {"baseline": result.baseline, "followup": result.followup}
        result.segmentations = {tp: segment(s, result.brains[tp].image) for tp, s in studies.items()}
        result.timings["segmentation"] = time.perf_counter() - t
    t = time.perf_counter()
    result.pair_measurement, result.measured = measure_automatic(
        result.segmentations["baseline"].image, result.segmentations["followup"].image,
        result.registration.transform, {"label": result.label, "probabilities": result.probabilities},
        {"id": seg.id, "path": str(seg.path), "sha256": [d for d in seg.sha256 if d]},
        {tp: {"file": SEGMENTATION_FILES[tp], **s.as_dict()} for tp, s in result.segmentations.items()})
    result.timings["measure"] = time.perf_counter() - t


def result_title(result: PairResult) -> str:
    """The caption of every picture of a result: label, probabilities, bundle, research use."""
    probs = "  ".join(f"{c} {p:.2f}" for c, p in result.probabilities.items())
    return (f"Predicted {result.label}   ({probs})   bundle {result.bundle.id}\n"
            f"research use only, not for clinical use")


# A writer adds files to an output folder from a result: (result, out, files so far) -> new files.
# The headless pipeline writes the maps, the transform and prediction.json itself; pictures and
# the Slicer scene come from writers the caller injects (RANOResponseLib.mrml.outputs), so that
# this layer never imports the scene code.
OutputWriter = Callable[[PairResult, Path, Mapping[str, Path]], Mapping[str, Path]]


def write_outputs(result: PairResult, out: Path, writers: Sequence[OutputWriter] = ()) -> dict[str, Path]:
    """Write the maps, the transform, the baseline brain mask, whatever ``writers`` add, and last
    prediction.json into ``out``."""
    t = time.perf_counter()
    out = Path(out)
    files: dict[str, Path] = {}
    for name, img in result.maps.items():
        files[name] = write_image(img, out / f"{name}.nii.gz")
    tfm = out / TRANSFORM_FILE
    sitk.WriteTransform(result.registration.transform, str(tfm))
    files["transform"] = tfm
    if "baseline" in result.brains:
        files["brain_mask"] = write_image(result.brains["baseline"].image, out / BRAIN_MASK_FILE)
    for tp, seg in result.segmentations.items():
        files[f"segmentation_{tp}"] = write_image(seg.image, out / SEGMENTATION_FILES[tp])
    for writer in writers:
        files.update(writer(result, out, dict(files)))
    result.timings["write"] = time.perf_counter() - t
    summary = result.summary()
    summary["outputs"] = {k: p.relative_to(out).as_posix() for k, p in files.items()}
    files["prediction"] = write_text(json.dumps(summary, indent=2) + "\n", out / PREDICTION_JSON)
    return files


def run_predict(
    baseline: Path | str,
    followup: Path | str,
    out: Path | str,
    bundle: Path | str | None = None,
    device: str = "auto",
    attributions: bool = True,
    progress: Progress | None = None,
    notice: Callable[[str], None] | None = None,
    roi_center: Sequence[float] | None = None,
    writers: Sequence[OutputWriter] = (),
    brain_mask: str | Sequence[str | Path] = "auto",
    series: SeriesOverrides | None = None,
    series_rules: Rules | Mapping | Path | str | None = None,
    allow_different: bool = False,
    segmentation: bool = True,
    seg_bundle: SegBundle | Path | str | None = None,
) -> tuple[PairResult, dict[str, Path]]:
    """``rano-response predict``: all outputs appear in ``out`` together, or none do.

    ``writers`` add pictures and the Slicer scene (see :func:`RANOResponseLib.mrml.outputs.output_writers`);
    the other arguments are :func:`predict_pair`'s.
    """
    result = predict_pair(baseline, followup, bundle, device, attributions, progress=progress, notice=notice,
                          roi_center=roi_center, brain_mask=brain_mask, series=series, series_rules=series_rules,
                          allow_different=allow_different, segmentation=segmentation, seg_bundle=seg_bundle)
    with atomic_output_dir(out, owned=OUTPUT_NAMES) as stage:
        files = write_outputs(result, stage, writers)
        rel = {k: p.relative_to(stage) for k, p in files.items()}
    if progress:
        progress("written", 1.0)
    out = Path(out)
    return result, {k: out / p for k, p in rel.items()}
