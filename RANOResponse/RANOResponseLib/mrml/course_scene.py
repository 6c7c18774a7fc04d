"""A patient's course in a Slicer scene: the timepoints' table, the burden plot, and one timepoint
beside the baseline (MRML only, tested on slicer-core).

Input: a ``rano-response timeline`` output folder, read with
:func:`~RANOResponseLib.inference.timeline.read_timeline`. :func:`load_course` puts in

* a table node, one row per timepoint (weeks, SPD, nadir, changes, volumes, RANO with its
  confirmation, RANO 2.0, the network's class), shown by the panel's table view;
* two plot charts over weeks: the sum of products with the running nadir (``spd``), and the
  enhancing and non-enhancing volumes (``volume``); each point is labelled with its timepoint and
  categories (a chart has one y axis: mm² and mL do not share one);
* the baseline's reference image, its tumour segmentation and the diameter lines of its
  measurable lesions, in the "course baseline" slice view.

:func:`show_timepoint` shows one row in the "course timepoint" view next to it: its reference image
and segmentation under its registration onto the baseline (``baseline_to_timepoint.tfm``, read as
Slicer reads predict's transform, so both views show the same anatomy at the same world position)
and its lesions' diameters, each view showing only its own timepoint's segmentation and lines.
:func:`course_layout` describes that layout (both views side by side over the plot); with a
layout node in the scene (Slicer's) it is switched to.

Every node is tagged ``RANOResponse.course = <role>`` so another course (or :func:`clear_course`)
replaces them all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import SimpleITK as sitk
import slicer
from vtkmodules.vtkCommonCore import vtkDoubleArray, vtkStringArray
from vtkmodules.vtkCommonDataModel import vtkTable

from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.styles import DIAMETER_COLORS
from RANOResponseLib.imaging.geometry import lps_to_ras
from RANOResponseLib.mrml.display import slice_logic
from RANOResponseLib.mrml.measurement_scene import new_line
from RANOResponseLib.mrml.panel_state import remove_node
from RANOResponseLib.mrml.transform_roi import add_transform_node
from RANOResponseLib.mrml.tumour_scene import add_tumour_segmentation
from RANOResponseLib.mrml.volumes import load_volume

COURSE = "RANOResponse.course"  # node attribute: the node's role in the loaded course
# (view tag, label, colour): the baseline and the chosen timepoint, side by side
VIEWS = {"baseline": ("CourseBaseline", "B", (0.952941, 0.290196, 0.2)),
         "timepoint": ("CourseTimepoint", "T", (0.929412, 0.835294, 0.298039))}
PLOT_VIEW = "PlotView1"  # Slicer's own plot view tag
LAYOUT_ID = 2601  # the course layout's number among Slicer's layouts (custom ones are above 500)
# table column -> (timeline.json key, numeric)
COLUMNS: dict[str, tuple[str, bool]] = {
    "Timepoint": ("timepoint", False), "Weeks": ("weeks", True), "Role": ("role", False),
    "SPD (mm2)": ("spd_mm2", True), "Nadir (mm2)": ("nadir_mm2", True),
    "vs nadir (%)": ("change_vs_nadir_pct", True), "vs baseline (%)": ("change_vs_baseline_pct", True),
    "Enhancing (mL)": ("enhancing_ml", True), "Non-enhancing (mL)": ("non_enhancing_ml", True),
    "RANO": ("category", False), "Confirmed": ("confirmed", False), "RANO 2.0": ("category_rano2", False),
    "Network": ("network", False),
}
LABEL_COLUMN = "Point"  # what each plotted point says: timepoint and categories
# chart -> (title, y axis, [(series name, y column, dashed)])
CHARTS = {"spd": ("Sum of products of the measurable lesions", "mm2",
                  [("SPD", "SPD (mm2)", False), ("Nadir", "Nadir (mm2)", True)]),
          "volume": ("Tumour volumes", "mL",
                     [("Enhancing", "Enhancing (mL)", False), ("Non-enhancing", "Non-enhancing (mL)", True)])}


@dataclass
class CourseNodes:
    """A course loaded into a scene: its folder, its timeline.json and its nodes' ids."""

    folder: Path
    doc: dict
    table: str
    charts: dict[str, str]  # "spd", "volume" -> plot chart node id
    baseline: dict[str, str] = field(default_factory=dict)  # "volume", "segmentation" -> node id
    shown: int | None = None  # the row beside the baseline

    @property
    def rows(self) -> list[dict]:
        return self.doc["timepoints"]

    @property
    def baseline_row(self) -> int:
        """The row of the baseline timepoint."""
        names = [r["timepoint"] for r in self.rows]
        if self.doc["baseline"] not in names:
            raise RANOInputError(f"{self.folder}: the baseline {self.doc['baseline']} is not one of its timepoints")
        return names.index(self.doc["baseline"])

    def path(self, value: str | None, what: str, row: dict) -> Path:
        """A file timeline.json names (relative to the folder, or absolute), which must exist."""
        if not value:
            raise RANOInputError(f"{self.folder}: timepoint {row['timepoint']} names no {what}")
        p = Path(value)
        p = p if p.is_absolute() else self.folder / p
        if not p.is_file():
            raise RANOInputError(f"{p}: {what} of {row['timepoint']} not found")
        return p


# ------------------------------------------------------------------------------ tagged nodes


def _tagged(scene: Any, role: str | None = None) -> list:
    nodes = []
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        value = node.GetAttribute(COURSE)
        if value and (role is None or value == role or value.startswith(role + ":")):
            nodes.append(node)
    return nodes


def _remove(scene: Any, nodes: Sequence) -> None:
    for node in nodes:
        remove_node(scene, node)


def _tag(node: Any, role: str) -> Any:
    node.SetAttribute(COURSE, role)
    return node


def clear_course(scene: Any) -> None:
    """Remove every node of the loaded course (the course views stay, emptied)."""
    _remove(scene, _tagged(scene))
    for tag, *_ in VIEWS.values():
        composite = scene.GetSingletonNode(tag, "vtkMRMLSliceCompositeNode")
        if composite is not None:
            composite.SetBackgroundVolumeID(None)


# ------------------------------------------------------------------------------ table and plots


def _value(row: dict, key: str) -> Any:
    if key == "network":
        return (row.get("network") or {}).get("label", "")
    return row.get(key)


def point_label(row: dict) -> str:
    """What a plotted timepoint says: ``week-026 (26 w): PD confirmed; RANO 2.0 PD``."""
    text = f"{row['timepoint']} ({float(row.get('weeks') or 0):g} w)"
    if row.get("category"):
        text += f": {row['category']}" + (f" {row['confirmed']}" if row.get("confirmed") else "")
        text += f"; RANO 2.0 {row.get('category_rano2') or '-'}"
    elif row.get("role"):
        text += f": {row['role']}"
    return text


def course_table(doc: dict) -> vtkTable:
    """One row per timepoint of a timeline (:data:`COLUMNS`, plus :data:`LABEL_COLUMN`); a missing
    number is NaN (a gap in the plot)."""
    table = vtkTable()
    for column, (key, numeric) in COLUMNS.items():
        arr = vtkDoubleArray() if numeric else vtkStringArray()
        arr.SetName(column)
        for row in doc["timepoints"]:
            v = _value(row, key)
            if numeric:
                arr.InsertNextValue(math.nan if v is None else float(v))
            else:
                arr.InsertNextValue("" if v is None else str(v))
        table.AddColumn(arr)
    labels = vtkStringArray()
    labels.SetName(LABEL_COLUMN)
    for row in doc["timepoints"]:
        labels.InsertNextValue(point_label(row))
    table.AddColumn(labels)
    return table


def _chart(scene: Any, table_node: Any, kind: str, patient: str) -> Any:
    title, unit, series = CHARTS[kind]
    chart = _tag(scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"RANO course {kind}"), f"chart:{kind}")
    chart.SetTitle(f"{patient}: {title}")
    chart.SetXAxisTitle("weeks")
    chart.SetYAxisTitle(unit)
    plot = slicer.vtkMRMLPlotSeriesNode
    for name, column, dashed in series:
        s = _tag(scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"RANO course {name}"), f"series:{kind}")
        s.SetAndObserveTableNodeID(table_node.GetID())
        s.SetXColumnName("Weeks")
        s.SetYColumnName(column)
        s.SetLabelColumnName(LABEL_COLUMN)
        s.SetPlotType(plot.PlotTypeScatter)  # markers joined by lines
        s.SetMarkerStyle(plot.MarkerStyleCircle)
        s.SetLineStyle(plot.LineStyleDash if dashed else plot.LineStyleSolid)
        s.SetUniqueColor()
        chart.AddAndObservePlotSeriesNodeID(s.GetID())
    return chart


# ------------------------------------------------------------------------------ views and layout


def course_layout() -> str:
    """The course layout (Slicer's layout XML): both course slice views side by side (axial), the
    plot view under them."""
    def slice_view(tag: str, label: str, colour: tuple[float, float, float]) -> str:
        hex_colour = "#" + "".join(f"{round(c * 255):02X}" for c in colour)
        return (f'<item><view class="vtkMRMLSliceNode" singletontag="{tag}">'
                '<property name="orientation" action="default">Axial</property>'
                f'<property name="viewlabel" action="default">{label}</property>'
                f'<property name="viewcolor" action="default">{hex_colour}</property></view></item>')

    views = "".join(slice_view(*v) for v in VIEWS.values())
    return ('<layout type="vertical" split="true"><item splitSize="600"><layout type="horizontal">'
            f'{views}</layout></item><item splitSize="400">'
            f'<view class="vtkMRMLPlotViewNode" singletontag="{PLOT_VIEW}">'
            '<property name="viewlabel" action="default">P</property></view></item></layout>')


def _views(scene: Any) -> dict[str, tuple[Any, Any]]:
    """The course slice views (slice node, composite node) and the plot view, made where the
    scene lacks them (a bare scene; in Slicer the layout makes them)."""
    layout = scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    if layout is not None:
        if not layout.IsLayoutDescription(LAYOUT_ID):
            layout.AddLayoutDescription(LAYOUT_ID, course_layout())
        layout.SetViewArrangement(LAYOUT_ID)
    out = {}
    for key, (tag, label, colour) in VIEWS.items():
        node = scene.GetSingletonNode(tag, "vtkMRMLSliceNode")
        if node is None:
            default = scene.GetDefaultNodeByClass("vtkMRMLSliceNode")
            if default is None or not default.HasSliceOrientationPreset("Axial"):
                slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
            node = scene.AddNewNodeByClass("vtkMRMLSliceNode", tag)
            node.SetLayoutName(tag)
            node.SetSingletonTag(tag)
            node.SetLayoutLabel(label)
            node.SetLayoutColor(colour)
            node.SetDimensions(512, 512, 1)
        node.SetOrientation("Axial")
        composite = scene.GetSingletonNode(tag, "vtkMRMLSliceCompositeNode")
        if composite is None:
            composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
            composite.SetLayoutName(tag)
            composite.SetSingletonTag(tag)
        out[key] = (node, composite)
    return out


def _plot_view(scene: Any) -> Any:
    view = scene.GetSingletonNode(PLOT_VIEW, "vtkMRMLPlotViewNode")
    if view is None:
        view = scene.AddNewNodeByClass("vtkMRMLPlotViewNode")
        view.SetLayoutName(PLOT_VIEW)
        view.SetSingletonTag(PLOT_VIEW)
    return view


def _only_in(node: Any, view: Any) -> None:
    """Show ``node`` (its display nodes) in ``view`` only."""
    for i in range(node.GetNumberOfDisplayNodes()):
        display = node.GetNthDisplayNode(i)
        if display is not None:
            display.RemoveAllViewNodeIDs()
            display.AddViewNodeID(view.GetID())


# ------------------------------------------------------------------------------ timepoints


def _add_timepoint(scene: Any, course: CourseNodes, row: dict, side: str, view: Any, composite: Any,
                   transform_id: str | None) -> dict[str, Any]:
    """One timepoint's reference image, segmentation and measurable lesions' lines in one view."""
    name = f"RANO course {row['timepoint']}"
    volume = _tag(load_volume(scene, course.path(row.get("reference_image"), "reference image", row),
                              f"{name} {row.get('reference_modality') or 'reference'}"), f"{side}:volume")
    volume.SetAndObserveTransformNodeID(transform_id)
    segmentation = _tag(add_tumour_segmentation(scene, course.path(row.get("segmentation"), "segmentation", row),
                                                f"{name} tumour", reference=volume, transform_node_id=transform_id),
                        f"{side}:segmentation")
    _only_in(segmentation, view)
    colour = DIAMETER_COLORS["baseline" if side == "baseline" else "followup"]
    lines = []
    for le in row.get("lesions", []):
        if not le.get("measurable"):
            continue
        for kind, points in (("d1", le["d1_points"]), ("d2", le["d2_points"])):
            line = new_line(scene, f"{row['timepoint']} L{le['id']} {kind}", *points, f"{side}:line",
                            colour, transform_id, attribute=COURSE)
            _only_in(line, view)
            lines.append(line)
    composite.SetBackgroundVolumeID(volume.GetID())
    composite.SetForegroundVolumeID(None)
    return {"volume": volume, "segmentation": segmentation, "lines": lines}


def _fit(scene: Any, slice_node: Any) -> None:
    with slice_logic(scene, slice_node) as logic:
        logic.FitSliceToBackground()


def load_course(scene: Any, folder: Path | str) -> CourseNodes:
    """Put a timeline output folder into ``scene`` (see the module docstring); an earlier course
    is removed first. Raises :class:`RANOInputError` naming the file for a missing or bad one."""
    from RANOResponseLib.inference.timeline import read_timeline

    folder = Path(folder)
    doc = read_timeline(folder)
    if not doc["timepoints"]:
        raise RANOInputError(f"{folder}: the timeline has no timepoints")
    clear_course(scene)
    table = _tag(scene.AddNewNodeByClass("vtkMRMLTableNode", f"RANO course {doc['patient']}"), "table")
    table.SetAndObserveTable(course_table(doc))
    table.SetDescription(f"{doc['patient']}: RANO over the course, baseline {doc['baseline']} "
                         f"({doc.get('baseline_reason', '')}). Research use only, not for clinical use.")
    charts = {kind: _chart(scene, table, kind, doc["patient"]).GetID() for kind in CHARTS}
    course = CourseNodes(folder, doc, table.GetID(), charts)
    views = _views(scene)  # (switches Slicer's layout first: its plot view is made then)
    _plot_view(scene).SetPlotChartNodeID(charts["spd"])
    row = course.rows[course.baseline_row]
    nodes = _add_timepoint(scene, course, row, "baseline", *views["baseline"], None)
    course.baseline = {"volume": nodes["volume"].GetID(), "segmentation": nodes["segmentation"].GetID()}
    _fit(scene, views["baseline"][0])
    return course


def show_timepoint(scene: Any, course: CourseNodes, row: int) -> dict[str, Any]:
    """Show timepoint ``row`` of the course beside the baseline: its reference image, segmentation
    and diameters under its registration onto the baseline, both views at its largest lesion (or
    the baseline's). Returns its nodes (``volume``, ``segmentation``, ``lines``, ``transform``)."""
    if not 0 <= row < len(course.rows):
        raise RANOInputError(f"{course.folder}: no timepoint row {row} (the course has {len(course.rows)})")
    r = course.rows[row]
    _remove(scene, _tagged(scene, "timepoint"))
    views = _views(scene)
    tfm = course.path(r.get("to_baseline_transform"), "registration onto the baseline", r)
    transform = _tag(add_transform_node(scene, tfm, f"RANO course {r['timepoint']} to baseline"),
                     "timepoint:transform")
    nodes = _add_timepoint(scene, course, r, "timepoint", *views["timepoint"], transform.GetID())
    nodes["transform"] = transform
    # the views follow each other: same plane through the largest lesion, in world (baseline) space
    lesions = [le for le in r.get("lesions", []) if le.get("measurable")]
    if lesions:
        le = max(lesions, key=lambda x: x["d1_mm"] * x["d2_mm"])
        centre = [(a + b) / 2 for a, b in zip(*le["d1_points"])]
        world = sitk.ReadTransform(str(tfm)).GetInverse().TransformPoint(centre)
    else:
        base = course.rows[course.baseline_row].get("lesions", [])
        world = [(a + b) / 2 for a, b in zip(*base[0]["d1_points"])] if base else None
    for slice_node, composite in views.values():
        composite.SetLinkedControl(1)
        _fit(scene, slice_node)
        if world is not None:
            slice_node.JumpSliceByOffsetting(*lps_to_ras(world))
    course.shown = row
    return nodes
