"""Slicer scene logic: studies, registration, crop region, maps and results as MRML nodes.

Every function takes a ``vtkMRMLScene`` and uses MRML classes only, so the same code runs inside
3D Slicer (``slicer.mrmlScene``), in ``rano-response predict`` (which writes a scene beside its
outputs) and in plain pytest against the real MRML of the ``slicer-core`` wheel.

This module is the scene code's one import point (``from RANOResponseLib.mrml.scene import ...``);
the code lives in modules by responsibility, lowest first:

- :mod:`.volumes`          images and study folders <-> volume nodes (LPS <-> RAS), node attributes
- :mod:`.display`          map colours and styling, map nodes, slice views, the overlay
- :mod:`.transform_roi`    the registration as a transform node, the crop ROI
- :mod:`.scene_files`      a new scene, writing and reading ``.mrml`` / ``.mrb``
- :mod:`.assembly`         brain mask, results table, :class:`SceneNodes`, :func:`assemble`
- :mod:`.prediction_scene` a prediction from memory (:func:`populate_scene`) or a predict folder
  (:func:`load_outputs`)

Coordinates. MRML is RAS, the core (SimpleITK, ITK) is LPS: points differ by the sign of x and y
(:func:`~RANOResponseLib.imaging.geometry.ras_to_lps`). The registration transform maps baseline
(fixed) points to follow-up (moving) points, the ITK *resampling* direction; Slicer reads such a
transform (a ``.tfm`` file) as the follow-up's *from parent* transform, so a follow-up volume placed
under it is drawn on the baseline anatomy in world (RAS) coordinates. :func:`add_transform_node`
does the same conversion for an in-memory transform (and the tests check both against each other
and against a known motion).

The one way a prediction enters a scene is :func:`assemble` (transform, ROI, maps, table, views),
fed by :func:`populate_scene` from an in-memory :class:`~RANOResponseLib.inference.pipeline.PairResult`
(what ``predict`` uses to write its scene) or by :func:`load_outputs` from a ``predict`` output
folder (what the Slicer module uses after running ``predict`` in a child process).
"""

from __future__ import annotations

from RANOResponseLib.core.styles import MAP_KINDS, MAP_THRESHOLD
from RANOResponseLib.mrml.assembly import (
    SceneNodes,
    add_brain_segmentation,
    add_results_table,
    assemble,
    reference_node,
)
from RANOResponseLib.mrml.display import (
    VIEWS,
    add_map_node,
    ensure_slice_views,
    fit_slice_views,
    heat_color_node,
    jump_slices,
    show_overlay,
    slice_logic,
    style_map,
)
from RANOResponseLib.mrml.prediction_scene import _display_copy, load_outputs, populate_scene  # noqa: F401 (tests)
from RANOResponseLib.mrml.scene_files import new_scene, quiet_vtk, read_scene, register_storage_classes, write_scene
from RANOResponseLib.mrml.transform_roi import (
    add_roi,
    add_transform_node,
    fit_roi,
    harden,
    roi_center,
    transform_to_ras_matrix,
)
from RANOResponseLib.mrml.volumes import (
    CASE,
    FLIP,
    GREY_ID,
    ROLE,
    STUDY,
    _nodes,  # noqa: F401 (tests reach it here)
    export_study_nodes,
    find_study_node,
    ijk_to_ras,
    image_to_node,
    load_study_nodes,
    load_volume,
    node_to_image,
    peak_ras,
    study_from_nodes,
)

__all__ = [  # the scene code's names, as imported from here by the CLI, the modules, the web station
    "CASE", "FLIP", "GREY_ID", "MAP_KINDS", "MAP_THRESHOLD", "ROLE", "STUDY", "VIEWS", "SceneNodes",
    "add_brain_segmentation", "add_map_node", "add_results_table", "add_roi", "add_transform_node", "assemble",
    "ensure_slice_views", "export_study_nodes", "find_study_node", "fit_roi", "fit_slice_views", "harden",
    "heat_color_node", "ijk_to_ras", "image_to_node", "jump_slices", "load_outputs", "load_study_nodes",
    "load_volume", "new_scene", "node_to_image", "peak_ras", "populate_scene", "quiet_vtk", "read_scene",
    "reference_node", "register_storage_classes", "roi_center", "show_overlay", "slice_logic", "study_from_nodes",
    "style_map", "transform_to_ras_matrix", "write_scene",
]
