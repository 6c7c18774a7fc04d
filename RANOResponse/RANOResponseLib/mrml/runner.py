"""What the RANOResponse module does when Apply is pressed, without Qt.

Studies are volume nodes in a scene. They reach the core as study folders: the folder the nodes
were read from when every node still matches its file, otherwise the nodes are exported to a
private work folder first. ``rano-response predict`` then runs in a child process
(:class:`~RANOResponseLib.mrml.process.BackgroundRun`) and writes only what the scene needs
(``--no-scene --no-pictures``: prediction.json, the maps, the transform and, unless the request
turns it off, the tumour segmentations and their measurement), and its output folder
is loaded back into the scene with the same scene logic the CLI uses to write its ``.mrml``
(``scene.load_outputs``).

The Course section runs ``rano-response timeline`` the same way (:func:`start_timeline`), into the
user's course folder, which is then loaded by :mod:`~RANOResponseLib.mrml.course_scene`.

The work folder never outlives the job: cancel and failure remove it, and so does success once
the outputs are in the scene. Loading reads every file at once (storage nodes' ``ReadData``;
nothing is read lazily), and the nodes that came from the folder are then detached from their
files, so they hold their data in memory and a saved scene writes them anew instead of
referring to deleted files.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.imaging.io import find_modality_file
from RANOResponseLib.mrml.process import BackgroundRun, core_command


@dataclass
class PredictRequest:
    """The inputs of one prediction, as the module's parameter node holds them."""

    baseline: Mapping[str, object]  # modality -> vtkMRMLScalarVolumeNode
    followup: Mapping[str, object]
    modalities: tuple[str, ...]  # what the bundle needs
    bundle: Path | None = None
    device: str = "cpu"
    roi: object | None = None  # vtkMRMLMarkupsROINode; its centre is the crop centre
    maps: bool = True
    segmentation: bool = True  # segment both studies and measure RANO (off: ``--no-segmentation``)


@dataclass
class PredictJob:
    """A running prediction: the child process and where its outputs will appear."""

    request: PredictRequest
    run: BackgroundRun
    workdir: Path
    out: Path
    inputs: dict[str, Path] = field(default_factory=dict)


def _node_file(node) -> Path | None:
    storage = node.GetStorageNode() if hasattr(node, "GetStorageNode") else None
    if storage is None or not storage.GetFileName():
        return None
    if node.GetModifiedSinceRead():
        return None  # edited since it was read: the file no longer is the node
    # A parent transform (e.g. the last prediction's registration) leaves the node's own image as
    # it is, and that image is what predict reads either way (an export ignores it too).
    return Path(storage.GetFileName())


def study_folder(nodes: Mapping[str, object], modalities: tuple[str, ...], label: str, stage: Path) -> Path:
    """A folder with the study's files for ``modalities``.

    The folder the nodes came from when each node is the unmodified file the core would pick
    there; otherwise the nodes are written into ``stage/label`` (NIfTI, through storage nodes).
    """
    missing = [m for m in modalities if nodes.get(m) is None]
    if missing:
        raise RANOInputError(f"{label}: no volume chosen for {', '.join(missing)} (the model needs "
                             f"{', '.join(modalities)})")
    files = {m: _node_file(nodes[m]) for m in modalities}
    folders = {f.parent for f in files.values() if f is not None}
    if None not in files.values() and len(folders) == 1:
        folder = folders.pop()
        try:
            if all(find_modality_file(folder, m).resolve() == files[m].resolve() for m in modalities):
                return folder
        except RANOInputError:
            pass
    from RANOResponseLib.mrml.scene import export_study_nodes

    target = stage / label
    export_study_nodes({m: nodes[m] for m in modalities}, target)
    return target


def start_predict(request: PredictRequest, python: str | None = None, workdir: Path | None = None) -> PredictJob:
    """Start ``rano-response predict`` on the request in a child process; returns at once."""
    workdir = Path(workdir or tempfile.mkdtemp(prefix="RANOResponse-"))
    try:
        inputs = {"baseline": study_folder(request.baseline, request.modalities, "baseline", workdir),
                  "followup": study_folder(request.followup, request.modalities, "followup", workdir)}
        out = workdir / "result"
        args = ["predict", "--baseline", str(inputs["baseline"]), "--followup", str(inputs["followup"]),
                "--out", str(out), "--device", request.device, "--no-scene", "--no-pictures"]
        if request.bundle:
            args += ["--bundle", str(request.bundle)]
        if not request.maps:
            args.append("--no-maps")
        if not request.segmentation:
            args.append("--no-segmentation")
        if request.roi is not None:
            from RANOResponseLib.mrml.scene import roi_center

            args += ["--roi-center", ",".join(f"{v:.3f}" for v in roi_center(request.roi))]
        run = BackgroundRun(core_command(python, *args), cleanup=[workdir])
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return PredictJob(request, run, workdir, out, inputs)


def finish_predict(scene, job: PredictJob):
    """Load a finished job's outputs into ``scene`` over the request's nodes; returns the scene nodes.

    The work folder is removed in every case: the loaded nodes are detached from its files first
    (see the module docstring). Raises :class:`RANOInputError` with the child's own message when
    it failed.
    """
    try:
        code = job.run.wait()
        if code != 0:
            raise RANOInputError(f"prediction failed: {job.run.error_message()}")
        from RANOResponseLib.mrml.scene import load_outputs

        nodes = load_outputs(scene, job.out, baseline_nodes=dict(job.request.baseline),
                             followup_nodes=dict(job.request.followup), roi=job.request.roi)
        for node_id in (nodes.transform, *nodes.maps.values()):
            detach_from_folder(scene, scene.GetNodeByID(node_id), job.workdir)
        return nodes
    finally:
        shutil.rmtree(job.workdir, ignore_errors=True)


def detach_from_folder(scene, node, folder: Path) -> bool:
    """Remove ``node``'s storage node when its file lies in ``folder`` (about to be deleted).

    The node keeps its data in memory, like a node made in Slicer and not saved yet; saving the
    scene (Slicer's Save, or :func:`~RANOResponseLib.mrml.scene.write_scene`) writes it anew.
    Returns whether the node was detached.
    """
    storage = node.GetStorageNode() if node is not None else None
    if storage is None or not storage.GetFileName():
        return False
    if not Path(storage.GetFileName()).resolve().is_relative_to(Path(folder).resolve()):
        return False
    node.SetAndObserveStorageNodeID(None)
    scene.RemoveNode(storage)
    return True


def discard(job: PredictJob | TimelineJob) -> None:
    """Cancel a job (if still running); a prediction's private folder is removed (a course folder
    is the user's, and the child writes it atomically)."""
    job.run.cancel()
    if isinstance(job, PredictJob):
        shutil.rmtree(job.workdir, ignore_errors=True)


# ------------------------------------------------------------------------------ the course


@dataclass
class TimelineJob:
    """A running ``rano-response timeline``: the child process and the folder it writes."""

    run: BackgroundRun
    patient: Path
    out: Path


def start_timeline(patient: Path | str, out: Path | str, device: str = "cpu", bundle: Path | None = None,
                   python: str | None = None, options: Sequence[str] = ()) -> TimelineJob:
    """Start ``rano-response timeline`` on a patient (folder or course CSV) into ``out`` in a child
    process; returns at once. ``out`` is the user's course folder, kept: it caches every
    timepoint, so running again after a new scan costs only that scan (the child writes it
    atomically, so a cancelled run leaves the previous course as it was). ``options``: more
    ``timeline`` options (e.g. ``--segmentation cohort`` for a research cohort's own masks)."""
    patient, out = Path(patient), Path(out)
    if not patient.exists():
        raise RANOInputError(f"{patient}: patient folder or course CSV not found")
    args = ["timeline", "--patient", str(patient), "--out", str(out), "--device", device]
    if bundle:
        args += ["--bundle", str(bundle)]
    args += list(options)
    return TimelineJob(BackgroundRun(core_command(python, *args)), patient, out)


def finish_timeline(job: TimelineJob) -> Path:
    """Wait for a timeline job; returns its output folder. Raises :class:`RANOInputError` with the
    child's own message when it failed."""
    if job.run.wait() != 0:
        raise RANOInputError(f"timeline failed: {job.run.error_message()}")
    return job.out

