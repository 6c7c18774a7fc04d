"""The pictures and the Slicer scene that ``predict`` writes beside its maps.

:func:`output_writers` is what the CLI, the bench and the demo hand to
:func:`RANOResponseLib.inference.pipeline.run_predict`: with MRML available (slicer-core, or Slicer
itself) the pictures are rendered by Slicer's slice logic from the same scene that is saved as
``scene/RANOResponse.mrml`` (which refers to the input studies, maps and transform instead of
copying them); without MRML ``overlay.png`` is drawn with matplotlib and no scene is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from RANOResponseLib.inference.pipeline import SCENE_FILE, OutputWriter, PairResult, result_title


def scene_support() -> bool:
    """Whether MRML (3D Slicer, or the slicer-core wheel) can be imported here."""
    try:
        import slicer
    except ImportError:
        return False
    return hasattr(slicer, "vtkMRMLScene") and hasattr(slicer, "vtkMRMLSliceLogic")


def scene_writer(pictures: bool = True, scene: bool = True) -> OutputWriter:
    """A writer that builds the result's scene, renders the slice views from it and saves it."""

    def write(result: PairResult, out: Path, files: Mapping[str, Path]) -> dict[str, Path]:
        from RANOResponseLib.mrml.scene import new_scene, populate_scene, quiet_vtk, write_scene
        from RANOResponseLib.mrml.slice_views import render_montage, render_slice_views

        written: dict[str, Path] = {}
        with quiet_vtk():
            mrml = new_scene()
            nodes = populate_scene(mrml, result, files=dict(files))
            if pictures and result.maps:
                written["overlay"] = render_montage(mrml, nodes, out / "overlay.png", result_title(result))
                views = render_slice_views(mrml, out, prefix="slice_")
                written.update({f"slice_{o}": p for o, p in views.items()})
            if scene:
                written["scene"] = write_scene(mrml, out / SCENE_FILE, copy_data=False)
        return written

    return write


def output_writers(pictures: bool = True, scene: bool = True) -> list[OutputWriter]:
    """The writers for ``run_predict``: the scene and slice-logic pictures where MRML is available,
    else the matplotlib overlay (pictures only)."""
    if (scene or pictures) and scene_support():
        return [scene_writer(pictures, scene)]
    if pictures:
        from RANOResponseLib.inference.overlay import overlay_writer

        return [overlay_writer]
    return []
