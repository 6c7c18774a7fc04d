"""A prediction into a scene: from ``predict``'s in-memory result or from its output folder.

:func:`populate_scene` takes a finished :class:`~RANOResponseLib.inference.pipeline.PairResult`
(what ``predict`` uses to write its scene), :func:`load_outputs` a ``predict`` output folder (what
the Slicer module and the web station use after ``predict`` ran elsewhere); both end in
:func:`~RANOResponseLib.mrml.assembly.assemble`, so the two scenes are the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import SimpleITK as sitk

from RANOResponseLib.core.outputs import read_prediction
from RANOResponseLib.core.styles import MAP_KINDS
from RANOResponseLib.imaging.io import Study
from RANOResponseLib.imaging.studies import load_study
from RANOResponseLib.mrml.assembly import SceneNodes, assemble
from RANOResponseLib.mrml.tumour_scene import SEGMENTATION_ROLES, measured_pair
from RANOResponseLib.mrml.volumes import _present, image_to_node, load_volume


def populate_scene(scene, result, baseline_nodes: Mapping[str, Any] | None = None,
                   followup_nodes: Mapping[str, Any] | None = None, files: Mapping[str, Path] | None = None,
                   roi=None) -> SceneNodes:
    """Put a finished in-memory prediction (:class:`~RANOResponseLib.inference.pipeline.PairResult`) into
    ``scene``. Study volumes are created from ``result``'s images unless nodes are given (named
    ``"baseline <modality>"`` and ``"follow-up <modality>"``, referring to their study files).
    ``files``: files already written for ``"transform"``, ``"gradcam"``, ``"saliency"``, so a
    saved scene refers to them instead of writing copies (so do study volumes read from a file as
    they are; sequences resampled onto the reference grid are new images). The baseline brain
    mask becomes a segmentation node, and so do both tumour segmentations, with the measured
    lesions' diameters as lines."""
    files = dict(files or {})

    def volumes(timepoint: str, label: str) -> dict[str, Any]:
        study: Study = getattr(result, timepoint)
        same = result.image_files(timepoint)
        return {m: image_to_node(scene, img if m in same else _display_copy(img), f"{label} {m}", file=same.get(m),
                                 share=True)
                for m, img in study.images.items()}

    base = _present(baseline_nodes) or volumes("baseline", "baseline")
    fu = _present(followup_nodes) or volumes("followup", "follow-up")
    brain = result.brains["baseline"].image if "baseline" in result.brains else None
    segmentations = {tp: s.image for tp, s in result.segmentations.items()}
    return assemble(scene, result.summary(), base, fu, result.registration.transform, result.maps,
                    files=files, roi=roi, brain_mask=brain, segmentations=segmentations,
                    measured=result.pair_measurement)


def _display_copy(image: sitk.Image) -> sitk.Image:
    """The scene's own copy of a study image that no file holds (a DICOM series, a sequence
    resampled onto its study's reference grid): 16-bit integers when its values span at least
    MR's usual range of hundreds of levels and fit (rounding then changes them by under 0.2 %),
    else as it is. A saved scene compresses a quarter of the bytes (0.6 s instead of 2.1 s for a
    1 mm head on 2 cores, eight of them in a DICOM pair's scene)."""
    arr = sitk.GetArrayViewFromImage(image)
    lo, hi = float(arr.min()), float(arr.max())
    if max(abs(lo), abs(hi)) < 255 or lo < -32768 or hi > 32767:
        return image
    return sitk.Cast(sitk.Round(image), sitk.sitkInt16)


def load_outputs(scene, out_dir: Path | str, baseline_nodes: Mapping[str, Any] | None = None,
                 followup_nodes: Mapping[str, Any] | None = None, roi=None) -> SceneNodes:
    """Put a ``rano-response predict`` output folder (prediction.json, maps, transform, brain
    mask, tumour segmentations and their measurement) into ``scene`` — what the Slicer module does
    after running ``predict`` in a child process. The segmentations are read into memory (the
    nodes keep no link to the folder's files).

    Without nodes, the studies are loaded from the inputs named in prediction.json: files as
    they are, DICOM series (``inputs.studies.<timepoint>.sequences``) by their series UID. Each
    volume appears in its own acquisition space.
    """
    out = Path(out_dir)
    summary = read_prediction(out)
    outputs = summary.get("outputs", {})
    inputs = summary.get("inputs", {})

    def volumes(key: str, label: str) -> dict[str, Any]:
        sources = inputs.get("studies", {}).get(key, {}).get("sequences", {})
        nodes = {}
        for m, path in inputs.get(key, {}).items():
            src = sources.get(m, {}).get("source", {})
            if src.get("kind") == "dicom":
                image = load_study(src["path"], [m], series={m: src["series_uid"]}).images[m]
                nodes[m] = image_to_node(scene, image, f"{label} {m}")
            else:
                nodes[m] = load_volume(scene, path, f"{label} {m}")
        return nodes

    base = _present(baseline_nodes) or volumes("baseline", "baseline")
    fu = _present(followup_nodes) or volumes("followup", "follow-up")
    transform = out / outputs.get("transform", "followup_to_baseline.tfm")
    maps = {k: out / outputs[k] for k in MAP_KINDS if k in outputs}
    brain = out / outputs["brain_mask"] if "brain_mask" in outputs else None
    segmentations = {tp: sitk.ReadImage(str(out / outputs[key])) for tp, key in SEGMENTATION_ROLES.items()
                     if key in outputs}
    return assemble(scene, summary, base, fu, transform, maps, roi=roi, brain_mask=brain,
                    segmentations=segmentations, measured=measured_pair(summary))
