"""Pictures of a scene's slice views, rendered offscreen by Slicer's own slice logic.

``vtkMRMLSliceLogic`` reslices each layer (a follow-up volume through its transform), maps it
through its display node (window/level, colour table, threshold) and blends the foreground over
the background exactly as Slicer's slice views do, with no OpenGL. This module only places the
slices, adds labels (FreeType text, as VTK draws it) and writes PNGs.

Orientation is Slicer's default, radiological: patient right on the image left; anterior (axial,
sagittal) or superior (coronal) up. Edge labels are read off each slice's own slice-to-RAS matrix,
so they are right whatever the convention.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonDataModel import vtkImageData
from vtkmodules.vtkIOImage import vtkPNGWriter
from vtkmodules.vtkRenderingCore import vtkTextProperty
from vtkmodules.vtkRenderingFreeType import vtkFreeTypeTools

from RANOResponseLib.core.files import atomic_file
from RANOResponseLib.core.styles import MAP_KINDS
from RANOResponseLib.mrml.display import _composite_node, _id, ensure_slice_views, slice_logic
from RANOResponseLib.mrml.volumes import peak_ras

ORIENTATIONS = ("Axial", "Coronal", "Sagittal")
_LETTERS = ("L", "R", "P", "A", "I", "S")  # -x, +x, -y, +y, -z, +z in RAS
_LAYOUT = "RANOResponseRender"


def _letter(direction: np.ndarray) -> str:
    axis = int(np.argmax(np.abs(direction)))
    return _LETTERS[2 * axis + (1 if direction[axis] > 0 else 0)]


class SliceRenderer:
    """A private slice view in ``scene`` (slice node, composite node, slice logic) for offscreen
    renders of ``size`` x ``size`` pixels; use as a context manager, its nodes are removed on exit
    so the scene's own views are never touched."""

    def __init__(self, scene, size: int = 256):
        self.scene, self.size = scene, int(size)

    def __enter__(self) -> "SliceRenderer":
        ensure_slice_views(self.scene)  # also the orientation presets
        self.node = self.scene.AddNewNodeByClass("vtkMRMLSliceNode", _LAYOUT)
        self.node.SetLayoutName(_LAYOUT)
        self.node.SetDimensions(self.size, self.size, 1)
        self.composite = self.scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        self.composite.SetLayoutName(_LAYOUT)
        self._logic = slice_logic(self.scene, self.node)
        self.logic = self._logic.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._logic.__exit__(*exc)
        self.scene.RemoveNode(self.composite)
        self.scene.RemoveNode(self.node)

    def render(self, orientation: str, background, foreground=None, opacity: float = 0.4,
               center_ras: Sequence[float] | None = None, fit: bool = True) -> np.ndarray:
        """The blended view as an (H, W, 3) uint8 array, top row first, as the slice view shows it.

        ``fit``: fit the field of view to the background (else keep the previous render's, so a
        row of pictures of different volumes frames the same anatomy); ``center_ras``: the point
        the slice passes through (default: the field's centre).
        """
        self.node.SetOrientation(orientation)
        self.composite.SetBackgroundVolumeID(_id(background))
        self.composite.SetForegroundVolumeID(_id(foreground))
        self.composite.SetForegroundOpacity(float(opacity))
        if fit:
            self.logic.FitSliceToBackground()
        if center_ras is not None:
            self.node.JumpSliceByOffsetting(*[float(v) for v in center_ras])
        producer = self.logic.GetImageDataConnection().GetProducer()
        producer.Update()
        image = producer.GetOutputDataObject(0)
        w, h, _ = image.GetDimensions()
        rgba = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, -1)
        return np.ascontiguousarray(rgba[::-1, :, :3])  # VTK rows run bottom-up

    def to_pixel(self, ras: Sequence[float]) -> tuple[int, int]:
        """(row, column) in the last render of a RAS point's projection onto the slice."""
        m = self.node.GetXYToRAS()
        xy_to_ras = np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])
        x, y = (np.linalg.inv(xy_to_ras) @ [*[float(v) for v in ras], 1.0])[:2]
        return int(round(self.size - 1 - y)), int(round(x))

    def edge_labels(self) -> dict[str, str]:
        """Anatomical direction at each image edge of the last render: left/right/top/bottom."""
        m = self.node.GetSliceToRAS()
        x = np.array([m.GetElement(i, 0) for i in range(3)])
        y = np.array([m.GetElement(i, 1) for i in range(3)])
        return {"left": _letter(-x), "right": _letter(x), "top": _letter(y), "bottom": _letter(-y)}


# ---------------------------------------------------------------------------------- drawing


def _text(text: str, size: int = 14, color=(1.0, 1.0, 1.0), bold: bool = False) -> np.ndarray:
    """RGBA uint8 array (top row first) of ``text`` drawn by VTK's FreeType renderer."""
    prop = vtkTextProperty()
    prop.SetFontSize(size)
    prop.SetColor(*color)
    prop.SetBold(bold)
    image = vtkImageData()
    if not text or not vtkFreeTypeTools.GetInstance().RenderString(prop, text, 72, image):
        return np.zeros((1, 1, 4), np.uint8)
    w, h, _ = image.GetDimensions()
    arr = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, 4)
    return arr[::-1]


def _paste(canvas: np.ndarray, rgba: np.ndarray, x: int, y: int, anchor: str = "nw") -> None:
    """Alpha-blend ``rgba`` onto the RGB ``canvas`` at (x, y) (anchor: n/s + w/e/c)."""
    h, w = rgba.shape[:2]
    if "s" in anchor:
        y -= h
    if "e" in anchor:
        x -= w
    elif "c" in anchor:
        x -= w // 2
    y0, x0 = max(y, 0), max(x, 0)
    y1, x1 = min(y + h, canvas.shape[0]), min(x + w, canvas.shape[1])
    if y1 <= y0 or x1 <= x0:
        return
    src = rgba[y0 - y:y1 - y, x0 - x:x1 - x].astype(np.float32)
    a = src[..., 3:4] / 255.0
    dst = canvas[y0:y1, x0:x1].astype(np.float32)
    canvas[y0:y1, x0:x1] = (src[..., :3] * a + dst * (1 - a)).astype(np.uint8)


def label_view(view: np.ndarray, title: str, edges: Mapping[str, str] | None,
               mark: tuple[int, int] | None = None) -> np.ndarray:
    """A copy of ``view`` with a title at the top left, the anatomical letter at each edge
    (``edges``: left/right/top/bottom) and a small cyan cross at pixel ``mark`` (row, column)."""
    out = view.copy()
    h, w = out.shape[:2]
    if mark is not None:
        r, c = mark
        for d in range(-6, 7):
            if abs(d) > 1:
                for rr, cc in ((r + d, c), (r, c + d)):
                    if 0 <= rr < h and 0 <= cc < w:
                        out[rr, cc] = (0, 255, 255)
    yellow = (1.0, 0.85, 0.2)
    _paste(out, _text(title, 13), 4, 3)
    if edges:
        _paste(out, _text(edges["left"], 14, yellow, True), 4, h // 2 - 7)
        _paste(out, _text(edges["right"], 14, yellow, True), w - 4, h // 2 - 7, "ne")
        _paste(out, _text(edges["top"], 14, yellow, True), w // 2, 3, "nc")
        _paste(out, _text(edges["bottom"], 14, yellow, True), w // 2, h - 3, "sc")
    return out


def colour_bar(scene, map_node, height: int, width: int = 14) -> np.ndarray:
    """A vertical bar of a map node's colour table over 0..1 (top = 1), RGB."""
    lut = scene.GetNodeByID(map_node.GetDisplayNode().GetColorNodeID()).GetLookupTable()
    n = lut.GetNumberOfTableValues()
    rows = [lut.GetTableValue(int(round((1 - i / max(height - 1, 1)) * (n - 1))))[:3] for i in range(height)]
    bar = (np.array(rows) * 255).astype(np.uint8)[:, None, :]
    return np.repeat(bar, width, axis=1)


def write_png(image: np.ndarray, path: Path | str) -> Path:
    """Write an (H, W, 3) uint8 array, top row first, as a PNG (atomically)."""
    h, w = image.shape[:2]
    data = vtkImageData()
    data.SetDimensions(w, h, 1)
    flat = np.ascontiguousarray(image[::-1]).reshape(-1, image.shape[2])
    data.GetPointData().SetScalars(numpy_support.numpy_to_vtk(flat, deep=True))
    path = Path(path)
    with atomic_file(path) as tmp:
        writer = vtkPNGWriter()
        writer.SetFileName(str(tmp))
        writer.SetInputData(data)
        writer.Write()
        if writer.GetErrorCode():
            raise OSError(f"{path}: could not write PNG")
    return path


# ----------------------------------------------------------------------------------- views


def _layers(scene, background, foreground, opacity):
    """Default layers: what the scene's axial (Red) view shows."""
    red = _composite_node(scene, "Red")
    if background is None and red is not None:
        background = red.GetBackgroundVolumeID()
        foreground = foreground if foreground is not None else red.GetForegroundVolumeID()
        opacity = opacity if opacity is not None else red.GetForegroundOpacity()
    background = scene.GetNodeByID(background) if isinstance(background, str) else background
    foreground = scene.GetNodeByID(foreground) if isinstance(foreground, str) else foreground
    if background is None:
        raise ValueError("no background volume to render (pass one, or call scene.show_overlay first)")
    return background, foreground, 0.4 if opacity is None else float(opacity)


def render_slice_views(scene, out: Path | str, center_ras: Sequence[float] | None = None, size: int = 256,
                       background=None, foreground=None, opacity: float | None = None,
                       orientations: Sequence[str] = ORIENTATIONS, prefix: str = "slice_") -> dict[str, Path]:
    """Render axial, coronal and sagittal views of ``foreground`` over ``background`` (default:
    the layers the scene's Red view shows), each through ``center_ras`` (default: the foreground's
    peak, e.g. the Grad-CAM maximum), labelled, as PNGs.

    ``out`` a folder: one ``<prefix><orientation>.png`` per view; ``out`` a ``.png`` path: the
    views side by side in that one file. Returns {orientation (lower case): path}.
    """
    background, foreground, opacity = _layers(scene, background, foreground, opacity)
    if center_ras is None:
        center_ras = peak_ras(foreground) if foreground is not None else None
    views = {}
    with SliceRenderer(scene, size) as r:
        for o in orientations:
            img = r.render(o, background, foreground, opacity, center_ras)
            views[o.lower()] = label_view(img, o, r.edge_labels())
    out = Path(out)
    if out.suffix.lower() == ".png":
        gap = np.zeros((size, 4, 3), np.uint8)
        strip = np.concatenate([x for v in views.values() for x in (v, gap)][:-1], axis=1)
        path = write_png(strip, out)
        return {o: path for o in views}
    out.mkdir(parents=True, exist_ok=True)
    return {o: write_png(img, out / f"{prefix}{o}.png") for o, img in views.items()}


def render_montage(scene, nodes, path: Path | str, title: str = "", size: int = 256,
                   columns: Sequence[str] = ("CT1:baseline", "CT1:followup", "FLAIR:baseline", "FLAIR:followup"),
                   center_ras: Sequence[float] | None = None, opacity: float = 0.5) -> Path:
    """One PNG a radiologist can read: axial slices through the Grad-CAM peak of the baseline and
    follow-up (registered through its transform) CT1 and FLAIR, plain and with each map, with
    colour bars and a title. ``nodes``: the :class:`~RANOResponseLib.scene.SceneNodes` of a
    prediction. Columns whose volume is absent are skipped."""
    volumes = {f"{m}:baseline": i for m, i in nodes.baseline.items()}
    volumes.update({f"{m}:followup": i for m, i in nodes.followup.items()})
    cols = [c for c in columns if c in volumes] or list(volumes)[:4]
    maps = {k: scene.GetNodeByID(i) for k, i in nodes.maps.items()}
    rows: list[tuple[str, Any]] = [("no overlay", None)] + [(MAP_KINDS[k][0], maps[k]) for k in ("gradcam", "saliency")
                                                              if k in maps]
    if center_ras is None:
        center_ras = peak_ras(maps["gradcam"]) if "gradcam" in maps else None
    pad, head, side, bar = 6, 70, 26, 60
    width = side + len(cols) * (size + pad) + bar
    height = head + len(rows) * (size + pad) + 18
    canvas = np.zeros((height, width, 3), np.uint8)
    with SliceRenderer(scene, size) as r:
        for ri, (row, fg) in enumerate(rows):
            y = head + ri * (size + pad)
            for ci, col in enumerate(cols):
                first = ri == 0 and ci == 0
                img = r.render("Axial", scene.GetNodeByID(volumes[col]), fg, opacity, center_ras, fit=first)
                mod, _, tp = col.partition(":")
                x = side + ci * (size + pad)
                mark = None if center_ras is None else r.to_pixel(center_ras)
                canvas[y:y + size, x:x + size] = label_view(img, "", r.edge_labels() if ci == 0 else None, mark)
                if ri == 0:
                    _paste(canvas, _text(f"{mod} {'follow-up' if tp == 'followup' else tp}", 15), x + size // 2,
                           head - 20, "nc")
            label = _text(row, 15)
            _paste(canvas, np.ascontiguousarray(np.rot90(label)), 4, y + size // 2 + label.shape[1] // 2, "sw")
            if fg is not None:
                x = side + len(cols) * (size + pad) + 4
                canvas[y + 10:y + size - 10, x:x + 14] = colour_bar(scene, fg, size - 20)
                _paste(canvas, _text("1", 12), x + 18, y + 8)
                _paste(canvas, _text("0", 12), x + 18, y + size - 24)
    for i, line in enumerate(title.split("\n")[:2]):
        _paste(canvas, _text(line, 14), width // 2, 6 + 18 * i, "nc")
    where = "" if center_ras is None else " through the Grad-CAM peak (+)"
    _paste(canvas, _text(f"axial slices{where}; radiological view (patient right on the left)", 12),
           width // 2, height - 16, "nc")
    return write_png(canvas, path)
