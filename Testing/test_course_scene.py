"""A patient's course in Slicer (RANOResponseLib.mrml.course_scene) on the real MRML of slicer-core.

The course is a real ``rano-response timeline`` run (the conftest phantom patient at 4 mm: pre-op,
post-op baseline, one follow-up; the cohort's own masks, no network), so what the scene must hold
comes from the files that run wrote (timeline.csv, the segmentations, the transforms), not from
the scene code under test.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import slicer
from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.names import LABEL_NAMES
from RANOResponseLib.imaging.geometry import lps_to_ras
from RANOResponseLib.mrml.course_scene import (
    COURSE,
    LAYOUT_ID,
    VIEWS,
    clear_course,
    load_course,
    show_timepoint,
)
from RANOResponseLib.mrml.measurement_scene import line_length
from RANOResponseLib.mrml.scene import new_scene, read_scene, transform_to_ras_matrix, write_scene
from RANOResponseLib.mrml.tumour_scene import tumour_labels
from vtkmodules.vtkCommonMath import vtkMatrix4x4


@pytest.fixture(scope="module")
def course_folder(tmp_path_factory, case_pair) -> Path:
    from RANOResponseLib.inference.timeline import run_timeline

    out = tmp_path_factory.mktemp("course") / "timeline"
    run_timeline(case_pair.baseline.parent, out, network=False, segmentation="cohort", device="cpu",
                 show_progress=False)
    return out


def _csv(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "timeline.csv", dtype={"timepoint": str})


def _counts(image: sitk.Image) -> dict[int, int]:
    arr = sitk.GetArrayViewFromImage(image)
    return {v: int((arr == v).sum()) for v in LABEL_NAMES}


def _lines(scene, role: str) -> dict[str, float]:
    found = {}
    nodes = scene.GetNodesByClass("vtkMRMLMarkupsLineNode")
    for i in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(i)
        if node.GetAttribute(COURSE) == role:
            found[node.GetName()] = node
    return found


def _view(scene, key: str):
    tag = VIEWS[key][0]
    return scene.GetSingletonNode(tag, "vtkMRMLSliceNode"), scene.GetSingletonNode(tag, "vtkMRMLSliceCompositeNode")


def _expected_lines(row: dict) -> dict[str, float]:
    return {f"{row['timepoint']} L{le['id']} {k}": le[f"{k}_mm"]
            for le in row["lesions"] if le["measurable"] for k in ("d1", "d2")}


def test_the_course_table_plots_and_baseline(course_folder):
    scene = new_scene()
    course = load_course(scene, course_folder)
    truth = _csv(course_folder)
    assert list(truth["timepoint"]) == [r["timepoint"] for r in course.rows]
    table = scene.GetNodeByID(course.table).GetTable()
    assert table.GetNumberOfRows() == len(truth) == 3

    def column(name):
        arr = table.GetColumnByName(name)
        return [arr.GetValue(i) for i in range(arr.GetNumberOfTuples())]

    for name, key in (("Weeks", "weeks"), ("SPD (mm2)", "spd_mm2"), ("Nadir (mm2)", "nadir_mm2"),
                      ("vs nadir (%)", "change_vs_nadir_pct")):
        got, want = column(name), truth[key].tolist()
        assert all((math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-3)
                   for a, b in zip(got, want)), name
    assert column("RANO") == truth["category"].fillna("").tolist()
    assert column("RANO 2.0") == truth["category_rano2"].fillna("").tolist()
    assert column("Point")[2].startswith(f"{truth['timepoint'][2]} (15 w): {truth['category'][2]}")

    spd = scene.GetNodeByID(course.charts["spd"])
    series = [spd.GetNthPlotSeriesNode(i) for i in range(spd.GetNumberOfPlotSeriesNodes())]
    assert [(s.GetXColumnName(), s.GetYColumnName()) for s in series] == [("Weeks", "SPD (mm2)"),
                                                                          ("Weeks", "Nadir (mm2)")]
    assert all(s.GetTableNodeID() == course.table for s in series)
    volume = scene.GetNodeByID(course.charts["volume"])
    assert {volume.GetNthPlotSeriesNode(i).GetYColumnName() for i in range(2)} == {"Enhancing (mL)",
                                                                                  "Non-enhancing (mL)"}
    plot = scene.GetSingletonNode("PlotView1", "vtkMRMLPlotViewNode")
    assert plot.GetPlotChartNodeID() == course.charts["spd"]

    row = course.rows[course.baseline_row]
    assert row["timepoint"] == course.doc["baseline"] == "week-000-2"
    base = scene.GetNodeByID(course.baseline["volume"])
    assert base.GetImageData().GetDimensions() == sitk.ReadImage(row["reference_image"]).GetSize()
    assert _view(scene, "baseline")[1].GetBackgroundVolumeID() == base.GetID()
    seg = scene.GetNodeByID(course.baseline["segmentation"])
    assert _counts(tumour_labels(seg, base)) == _counts(sitk.ReadImage(str(course_folder / row["segmentation"])))
    lines = _lines(scene, "baseline:line")
    assert {n: line_length(node) for n, node in lines.items()} == pytest.approx(_expected_lines(row), abs=1e-3)
    assert lines, "the phantom's baseline has a measurable lesion"


def test_a_timepoint_beside_the_baseline(course_folder):
    scene = new_scene()
    course = load_course(scene, course_folder)
    row = course.rows[2]
    assert row["role"] == "follow-up"
    before = scene.GetNumberOfNodes()
    nodes = show_timepoint(scene, course, 2)
    tfm = sitk.ReadTransform(str(course_folder / row["to_baseline_transform"]))
    m = vtkMatrix4x4()
    nodes["transform"].GetMatrixTransformFromParent(m)
    np.testing.assert_allclose([[m.GetElement(i, j) for j in range(4)] for i in range(4)],
                               transform_to_ras_matrix(tfm), atol=1e-6)
    assert nodes["volume"].GetTransformNodeID() == nodes["transform"].GetID()
    assert nodes["segmentation"].GetTransformNodeID() == nodes["transform"].GetID()
    assert _counts(tumour_labels(nodes["segmentation"], nodes["volume"])) == _counts(
        sitk.ReadImage(str(course_folder / row["segmentation"])))
    assert {ln.GetName(): line_length(ln) for ln in nodes["lines"]} == pytest.approx(_expected_lines(row), abs=1e-3)
    # the timepoint's line lies on the baseline anatomy: its point brought back through the registration
    le = next(le for le in row["lesions"] if le["measurable"])
    d1 = next(ln for ln in nodes["lines"] if ln.GetName() == f"{row['timepoint']} L{le['id']} d1")
    world = [0.0, 0.0, 0.0]
    d1.GetNthControlPointPositionWorld(0, world)
    np.testing.assert_allclose(world, lps_to_ras(tfm.GetInverse().TransformPoint(le["d1_points"][0])), atol=1e-3)
    # each view shows its own timepoint: background, segmentation and lines
    (base_view, base_comp), (tp_view, tp_comp) = _view(scene, "baseline"), _view(scene, "timepoint")
    assert tp_comp.GetBackgroundVolumeID() == nodes["volume"].GetID()
    assert base_comp.GetBackgroundVolumeID() == course.baseline["volume"]
    for node, view in ((nodes["segmentation"], tp_view), (d1, tp_view),
                       (scene.GetNodeByID(course.baseline["segmentation"]), base_view)):
        display = node.GetDisplayNode()
        assert [display.GetNthViewNodeID(i) for i in range(display.GetNumberOfViewNodeIDs())] == [view.GetID()]
    # both views cut the same axial plane through the largest lesion's centre (world coordinates)
    largest = max((le for le in row["lesions"] if le["measurable"]), key=lambda x: x["d1_mm"] * x["d2_mm"])
    centre = lps_to_ras(tfm.GetInverse().TransformPoint(np.mean(largest["d1_points"], axis=0).tolist()))
    assert base_view.GetOrientation() == tp_view.GetOrientation() == "Axial"
    planes = [v.GetSliceToRAS().GetElement(2, 3) for v in (base_view, tp_view)]
    assert planes == pytest.approx([centre[2], centre[2]], abs=1e-3)

    added = scene.GetNumberOfNodes() - before
    show_timepoint(scene, course, 0)  # another row replaces this one's nodes
    show_timepoint(scene, course, 2)
    assert scene.GetNumberOfNodes() - before == added
    with pytest.raises(RANOInputError, match="no timepoint row 3"):
        show_timepoint(scene, course, 3)


def test_a_saved_course_reads_back_and_clears(course_folder, tmp_path):
    scene = new_scene()
    empty = scene.GetNumberOfNodes()
    course = load_course(scene, course_folder)
    show_timepoint(scene, course, 2)
    back = read_scene(write_scene(scene, tmp_path / "course" / "course.mrml", copy_data=False))
    table = back.GetFirstNodeByName(scene.GetNodeByID(course.table).GetName())
    assert table.GetTable().GetNumberOfRows() == 3
    chart = back.GetFirstNodeByName("RANO course spd")
    assert chart.GetNthPlotSeriesNode(0).GetTableNodeID() == table.GetID()
    again = load_course(scene, course_folder)  # a second load replaces the first
    assert len([n for n in (scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes()))
                if n.GetAttribute(COURSE) == "table"]) == 1
    assert again.shown is None
    clear_course(scene)
    left = [scene.GetNthNode(i).GetClassName() for i in range(empty, scene.GetNumberOfNodes())]
    # only the views stay (the two course slice views, their composites, the plot view), and empty
    assert sorted(left) == sorted(["vtkMRMLSliceNode", "vtkMRMLSliceCompositeNode"] * len(VIEWS)
                                  + ["vtkMRMLPlotViewNode"]), left
    assert all(_view(scene, key)[1].GetBackgroundVolumeID() is None for key in VIEWS)


def test_the_layout_is_switched_to_when_the_scene_has_one(course_folder):
    scene = new_scene()
    layout = slicer.vtkMRMLLayoutNode()
    layout.SetSingletonTag("vtkMRMLLayoutNode")
    scene.AddNode(layout)
    load_course(scene, course_folder)
    assert layout.GetViewArrangement() == LAYOUT_ID
    described = layout.GetLayoutDescription(LAYOUT_ID)
    assert slicer.vtkMRMLLayoutNode.ParseLayout(described) is not None  # Slicer's own parser reads it
    assert all(f'singletontag="{tag}"' in described for tag, *_ in VIEWS.values()) and "PlotView1" in described


def test_bad_course_folders_are_one_line_errors(tmp_path):
    with pytest.raises(RANOInputError, match="timeline file not found"):
        load_course(new_scene(), tmp_path)


# ------------------------------------------------------------------------------------ the panel


def test_tqdm_progress_lines_are_progress_events():
    """``rano-response timeline`` reports with a tqdm bar; each redraw is a progress event."""
    from RANOResponseLib.mrml.process import parse_progress

    event = parse_progress("Patient-001:  33%|###3      | 1/3 [00:02<00:04,  2.20s/timepoint]")
    assert event is not None and event.frac == pytest.approx(1 / 3) and event.text == "Patient-001: 1 of 3 done"
    assert parse_progress(" 50%|#####     | 2/4 [00:01<00:01, 1.9it/s]").frac == 0.5
    assert parse_progress("loading 5%|") is None


def test_the_course_section_loads_a_course_and_shows_a_row(course_folder, tmp_path):
    from types import SimpleNamespace

    from RANOResponseLib.mrml.logic import PanelLogic

    logic = PanelLogic(new_scene())
    assert logic.course_text() == "No course loaded."
    with pytest.raises(RANOInputError, match="choose a course folder"):
        logic.load_course(Path("."))
    p = SimpleNamespace(coursePatient=Path("."), courseFolder=tmp_path / "course", bundle=Path("."))
    with pytest.raises(RANOInputError, match="choose the patient"):
        logic.start_course(p, "cpu")
    table = logic.load_course(course_folder)
    assert table.GetTable().GetNumberOfRows() == 3
    truth = _csv(course_folder)
    last = truth.iloc[-1]
    text = logic.course_text()
    assert f"baseline {truth['timepoint'][1]}" in text and f"{last['timepoint']} RANO {last['category']}" in text
    text = logic.show_course_timepoint(2)
    assert f"Shown beside the baseline: <b>{last['timepoint']}</b>" in text
    row = logic.course.rows[2]
    assert all(line in text for line in row["reasoning"].splitlines())
    logic.reset()
    assert logic.course is None


@pytest.mark.slow
def test_run_timeline_in_the_child_process_then_load(case_pair, tmp_path):
    """The Course section's Run: ``rano-response timeline`` in a child (as Apply runs predict),
    progress read from its bar, its folder loaded; a failing child is its own one-line error."""
    from RANOResponseLib.mrml.logic import PanelLogic
    from RANOResponseLib.mrml.runner import finish_timeline, start_timeline

    out = tmp_path / "course"
    job = start_timeline(case_pair.baseline.parent, out, "cpu",
                         options=("--segmentation", "cohort", "--no-network"))
    assert job.run.wait() == 0, job.run.lines[-5:]
    events = job.run.poll() or [job.run.progress]
    assert job.run.progress.frac == 1.0 and job.run.progress.text.endswith("3 of 3 done"), events
    logic = PanelLogic(new_scene())
    table = logic.finish_course(job)
    assert finish_timeline(job) == out and table.GetTable().GetNumberOfRows() == 3
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(RANOInputError, match="timeline failed: .*empty.csv"):
        finish_timeline(start_timeline(empty, tmp_path / "bad", "cpu"))
    assert not (tmp_path / "bad").exists()
