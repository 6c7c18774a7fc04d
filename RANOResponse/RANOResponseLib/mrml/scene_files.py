"""Scenes as files, and a scene made from nothing: what Slicer's application would otherwise provide.

Owns :func:`new_scene` (the grey table, slice orientation presets, markups storage classes and
selection node a bare ``vtkMRMLScene`` lacks), :func:`write_scene` (``.mrml`` with its data
files, or one ``.mrb``, written atomically), :func:`read_scene`, and :func:`quiet_vtk` (VTK's
messages off while a command line tool works with a scene).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

import slicer
from vtkmodules.vtkCommonCore import vtkObject

from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.files import write_text
from RANOResponseLib.mrml.volumes import _ensure_grey, _nodes

_EXTENSIONS = {"vtkMRMLVolumeArchetypeStorageNode": ".nii.gz", "vtkMRMLTransformStorageNode": ".tfm",
               "vtkMRMLTableStorageNode": ".tsv", "vtkMRMLColorTableStorageNode": ".ctbl"}


def _file_name(node, storage, used: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", node.GetName() or node.GetID()).strip("_") or node.GetID()
    ext = _EXTENSIONS.get(storage.GetClassName())
    if ext is None:
        ext = "." + (storage.GetDefaultWriteFileExtension() or "dat")
    name, n = stem + ext, 1
    while name.lower() in used:
        n += 1
        name = f"{stem}_{n}{ext}"
    used.add(name.lower())
    return name


def write_scene(scene, path: Path | str, copy_data: bool = True) -> Path:
    """Save ``scene`` as a ``.mrml`` file with its data files beside it, or as one ``.mrb``.

    ``.mrml``: every node with data is written next to the file (NIfTI volumes, ``.tfm``
    transforms, ``.tsv`` tables, ``.mrk.json`` markups, ``.ctbl`` colour tables) and referred to
    by a relative file name. With ``copy_data=False`` a node whose storage node already names an
    existing file keeps referring to it (``predict`` uses this for its inputs, maps and
    transform, so saving costs no re-encoding). ``.mrb``: Slicer's self-contained bundle
    (``vtkMRMLScene.WriteToMRB``). The scene file itself appears atomically.
    """
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".mrb":
        # staged under its own name in a private folder (the bundle's inner folder is named
        # after the file, and MRML refuses io.atomic_file's hidden ".name" form), then renamed
        stage = Path(tempfile.mkdtemp(prefix=f".{path.stem}.partial-", dir=path.parent))
        try:
            if not scene.WriteToMRB(str(stage / path.name)):
                raise RANOInputError(f"{path}: could not write the scene bundle")
            os.replace(stage / path.name, path)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return path
    if path.suffix.lower() != ".mrml":
        raise RANOInputError(f"{path}: a scene file must end in .mrml or .mrb")
    register_storage_classes(scene)
    _label_version(scene)
    used: set[str] = {path.name.lower()}
    for node in _nodes(scene, "vtkMRMLStorableNode"):
        if not node.GetSaveWithScene():
            continue
        storage = node.GetStorageNode()
        current = storage.GetFileName() if storage is not None else None
        if current and Path(current).is_file() and not copy_data:
            continue
        if storage is None:
            node.AddDefaultStorageNode()
            storage = node.GetStorageNode()
            if storage is None:  # a node that stores nothing
                continue
        if storage.IsA("vtkMRMLVolumeArchetypeStorageNode"):
            storage.SetUseCompression(1)
        target = path.parent / _file_name(node, storage, used)
        storage.SetFileName(str(target))
        if not storage.WriteData(node):
            raise RANOInputError(f"{target}: could not write {node.GetName()}")
    # The XML is made in memory and written atomically by us: Commit() to a file would also move
    # hidden storable nodes into a "<scene name>_Private" folder (data already written above).
    scene.SetRootDirectory(str(path.parent))
    scene.SetURL(str(path))
    scene.SetSaveToXMLString(1)
    try:
        if not scene.Commit():
            raise RANOInputError(f"{path}: could not write the scene")
        write_text(scene.GetSceneXMLString(), path)
    finally:
        scene.SetSaveToXMLString(0)
    return path


def _label_version(scene) -> None:
    """The slicer-core wheel labels scenes "slicer-core 4.0.0 0", which Slicer reports on loading
    as written by another application that "may not load correctly". The wheel is Slicer's own
    MRML at a known revision (its version 5.13.31053 is Slicer 5.13, revision 31053), so a scene
    it writes is labelled the way that Slicer labels its own. Scenes of Slicer itself are left as
    they are."""
    current = scene.GetVersion() or ""
    if not current.startswith("slicer-core"):
        return
    try:
        from importlib.metadata import version

        major, minor, revision = version("slicer-core").split(".")[:3]
    except Exception:  # noqa: BLE001 - not the wheel, or an unexpected version: keep the label
        return
    scene.SetVersion(f"Slicer {int(major)}.{int(minor)}.0 {int(revision)}")


def register_storage_classes(scene) -> None:
    """Markups storage nodes are registered by Slicer's Markups module, absent in a bare scene:
    without them an ROI would be saved without its box."""
    for cls in ("vtkMRMLMarkupsJsonStorageNode", "vtkMRMLMarkupsROIJsonStorageNode",
                "vtkMRMLMarkupsPlaneJsonStorageNode"):
        probe = scene.CreateNodeByClass(cls)
        if probe is None:
            scene.RegisterNodeClass(getattr(slicer, cls)())
        else:
            probe.UnRegister(None)


def new_scene():
    """An empty scene with what Slicer's application would provide: the grey colour table, the
    slice orientation presets and the markups storage classes (enough to show, render and save)."""
    scene = slicer.vtkMRMLScene()
    _ensure_grey(scene)
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    register_storage_classes(scene)
    selection = slicer.vtkMRMLSelectionNode()  # markups look up their length unit through it
    selection.SetSingletonTag("Singleton")
    selection.SaveWithSceneOff()
    scene.AddNode(selection)
    return scene


@contextlib.contextmanager
def quiet_vtk() -> Iterator[None]:
    """Silence VTK/MRML error and warning messages on stderr for the block (a command line tool's
    stderr carries its progress and its one-line errors; failures are detected by return value)."""
    warn = vtkObject.GetGlobalWarningDisplay()
    vtkObject.GlobalWarningDisplayOff()
    try:
        yield
    finally:
        vtkObject.SetGlobalWarningDisplay(warn)


def read_scene(path: Path | str):
    """Read a ``.mrml`` (with its data files) or ``.mrb`` into a new scene (see :func:`new_scene`).

    A ``.mrb`` is unpacked into a temporary folder that is removed once its data are read (MRML's
    own ReadFromMRB needs the application's cache manager); its nodes hold their data in memory.
    """
    path = Path(path).absolute()
    if not path.is_file():
        raise RANOInputError(f"{path}: scene file not found")
    scene = new_scene()
    if path.suffix.lower() != ".mrb":
        scene.SetURL(str(path))
        if not scene.Import():
            raise RANOInputError(f"{path}: could not read the scene")
        return scene
    with tempfile.TemporaryDirectory(prefix="rano-mrb-") as tmp:
        try:
            with zipfile.ZipFile(path) as bundle:
                bundle.extractall(tmp)
        except (zipfile.BadZipFile, OSError) as e:
            raise RANOInputError(f"{path}: not a readable scene bundle ({e})") from None
        mrml = sorted(Path(tmp).rglob("*.mrml"))
        if not mrml:
            raise RANOInputError(f"{path}: the bundle holds no .mrml scene")
        scene.SetURL(str(mrml[0]))
        if not scene.Import():
            raise RANOInputError(f"{path}: could not read the scene")
    return scene
