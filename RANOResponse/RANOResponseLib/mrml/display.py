"""How predictions are shown: map colours and styling, map nodes, the slice views and the overlay.

Owns the heat colour tables of the maps (:func:`heat_color_node`, :func:`style_map`,
:func:`add_map_node`), Slicer's three standard slice views in a scene that may have none
(:func:`ensure_slice_views`), a map over the anatomy in every view (:func:`show_overlay`),
moving and fitting the views (:func:`jump_slices`, :func:`fit_slice_views`) and a temporary
slice logic (:class:`slice_logic`, also used to render pictures and the course's views).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import SimpleITK as sitk
import slicer

from RANOResponseLib.core.styles import MAP_KINDS, MAP_THRESHOLD
from RANOResponseLib.mrml.volumes import ROLE, _nodes, image_to_node, load_volume

# Slicer's three standard slice views: (layout name, orientation, label, colour)
VIEWS = (("Red", "Axial", "R", (0.952941, 0.290196, 0.2)),
         ("Yellow", "Sagittal", "Y", (0.929412, 0.835294, 0.298039)),
         ("Green", "Coronal", "G", (0.431373, 0.690196, 0.294118)))


# ----------------------------------------------------------------------------------- maps


def heat_color_node(scene, kind: str):
    """The colour table for a map kind (Grad-CAM: inferno, saliency: viridis, from matplotlib:
    perceptually uniform), transparent below :data:`MAP_THRESHOLD`.

    (Slicer's slice views blend a layer by its threshold and the view's opacity, not by table
    alpha; the threshold set by :func:`style_map` is what hides weak attribution there.)
    Built once per scene (found again by name); saved with the scene as a ``.ctbl``.
    """
    import matplotlib

    label, cmap_name = MAP_KINDS[kind]
    name = f"RANOResponse {label} ({cmap_name})"
    found = scene.GetFirstNodeByName(name)
    if found is not None and found.IsA("vtkMRMLColorTableNode"):
        return found
    cmap = matplotlib.colormaps[cmap_name]
    node = slicer.vtkMRMLColorTableNode()
    node.SetName(name)
    node.SetTypeToUser()
    node.SetNumberOfColors(256)
    for i in range(256):
        x = i / 255
        r, g, b, _ = cmap(x)
        node.SetColor(i, f"{x:.3f}", r, g, b, 1.0 if x >= MAP_THRESHOLD else 0.0)
    node.SetAttribute(ROLE, f"colors:{kind}")
    node.HideFromEditorsOff()  # listed in the Colors module like any table a user made
    scene.AddNode(node)
    return node


def style_map(scene, node, kind: str) -> None:
    """Display a 0..1 map so a radiologist can read it over the anatomy: the kind's heat colours
    over 0..1 and values below :data:`MAP_THRESHOLD` hidden (lower threshold)."""
    colors = heat_color_node(scene, kind)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    d = node.GetDisplayNode()
    d.SetAndObserveColorNodeID(colors.GetID())
    d.AutoWindowLevelOff()
    d.SetWindowLevelMinMax(0.0, 1.0)
    d.AutoThresholdOff()
    d.SetLowerThreshold(MAP_THRESHOLD)
    d.SetUpperThreshold(1e6)
    d.ApplyThresholdOn()
    d.SetInterpolate(1)


def add_map_node(scene, image: sitk.Image | Path | str, name: str, kind: str = "gradcam",
                 file: Path | str | None = None, node=None, share: bool = False):
    """A map (``predict``'s saliency or Grad-CAM, on the baseline reference grid) as a volume
    node styled by :func:`style_map`; ``image`` is the map or its file (``file``, ``share``: see
    :func:`image_to_node`)."""
    if kind not in MAP_KINDS:
        raise ValueError(f"unknown map kind {kind!r}; expected one of {', '.join(MAP_KINDS)}")
    if isinstance(image, (str, Path)):
        node = load_volume(scene, image, name, node=node)
    else:
        node = image_to_node(scene, image, name, file=file, node=node, share=share, window=(0.0, 1.0))
    style_map(scene, node, kind)
    node.SetAttribute("RANOResponse.map", kind)
    return node


# ---------------------------------------------------------------------------------- views


def ensure_slice_views(scene) -> list[str]:
    """Make sure the scene has Slicer's Red (axial), Yellow (sagittal) and Green (coronal) slice
    views with their composite nodes; returns the layout names that had to be created (none in
    Slicer itself; all three in a bare scene, e.g. one about to be saved by ``predict``)."""
    default = scene.GetDefaultNodeByClass("vtkMRMLSliceNode")
    if default is None or not default.HasSliceOrientationPreset("Axial"):
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    created = []
    for layout, orientation, label, colour in VIEWS:
        if _slice_node(scene, layout) is None:
            node = scene.AddNewNodeByClass("vtkMRMLSliceNode", layout)
            node.SetLayoutName(layout)
            node.SetLayoutLabel(label)
            node.SetLayoutColor(colour)
            node.SetSingletonTag(layout)
            node.SetOrientation(orientation)
            node.SetDefaultOrientation(orientation)
            node.SetDimensions(512, 512, 1)
            created.append(layout)
        if _composite_node(scene, layout) is None:
            composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
            composite.SetLayoutName(layout)
            composite.SetSingletonTag(layout)
    return created


def _slice_node(scene, layout: str):
    for node in _nodes(scene, "vtkMRMLSliceNode"):
        if node.GetLayoutName() == layout:
            return node
    return None


def _composite_node(scene, layout: str):
    for node in _nodes(scene, "vtkMRMLSliceCompositeNode"):
        if node.GetLayoutName() == layout:
            return node
    return None


def _id(node) -> str | None:
    if node is None:
        return None
    return node if isinstance(node, str) else node.GetID()


def show_overlay(scene, background_node, foreground_node, opacity: float = 0.4) -> list:
    """Show ``foreground_node`` (a map) at ``opacity`` over ``background_node`` in every slice
    view of the scene (the three standard views are created if the scene has none).
    Returns the composite nodes. ``foreground_node`` may be None (anatomy only)."""
    ensure_slice_views(scene)
    composites = _nodes(scene, "vtkMRMLSliceCompositeNode")
    for c in composites:
        c.SetBackgroundVolumeID(_id(background_node))
        c.SetForegroundVolumeID(_id(foreground_node))
        c.SetForegroundOpacity(float(opacity))
    return composites


def jump_slices(scene, ras: Sequence[float]) -> None:
    """Move every slice view to the planes through ``ras`` (in-plane position unchanged)."""
    for node in _nodes(scene, "vtkMRMLSliceNode"):
        node.JumpSliceByOffsetting(*[float(v) for v in ras])


class slice_logic:
    """Context manager: a ``vtkMRMLSliceLogic`` for one slice node; on exit the helper nodes
    the logic adds to the scene (slice model, its display and transform) are removed again."""

    def __init__(self, scene, slice_node):
        self.scene, self.slice_node = scene, slice_node

    def __enter__(self):
        self.before = {self.scene.GetNthNode(i).GetID() for i in range(self.scene.GetNumberOfNodes())}
        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLScene(self.scene)
        self.logic.SetSliceNode(self.slice_node)
        return self.logic

    def __exit__(self, *exc) -> None:
        self.logic.SetSliceNode(None)
        self.logic.SetMRMLScene(None)
        added = [self.scene.GetNthNode(i) for i in range(self.scene.GetNumberOfNodes())]
        for node in added:
            if node.GetID() not in self.before and not node.GetSaveWithScene():
                self.scene.RemoveNode(node)


def fit_slice_views(scene, layouts: Sequence[str] | None = None) -> None:
    """Fit the slice views' field of view to their background volume (Slicer's "reset view")."""
    for layout, *_ in VIEWS:
        node = _slice_node(scene, layout)
        if node is not None and (layouts is None or layout in layouts):
            with slice_logic(scene, node) as logic:
                logic.FitSliceToBackground()
