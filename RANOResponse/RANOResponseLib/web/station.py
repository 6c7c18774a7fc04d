"""One reviewer's review station: a trame page over a real MRML scene (trame-slicer).

Started by the router (:mod:`.router`), one process per browser session, listening on 127.0.0.1.
The page shows the worklist with each case's status, four of Slicer's slice views (baseline and
follow-up CT1 and FLAIR, the follow-up under the registration) with the Grad-CAM or saliency map
over them, the brain mask as a segmentation, the network's, the measured and the suggested category
(:mod:`RANOResponseLib.review.opinions`) and the probabilities, the rule-based RANO category with
its lesion table (when segmentations are present) and the model card; the reviewer saves agree or
override verdicts into the shared review store. Cases without a prediction are predicted by the
router's service (models loaded once there); the page shows the progress.

The controls carry stable element ids (:data:`ELEMENT_IDS`) for scripts and browser tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import urllib.request
from pathlib import Path
from typing import Any

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")  # render headless, no X server

from trame.app import get_server  # noqa: E402
from trame.ui.vuetify3 import SinglePageLayout  # noqa: E402
from trame.widgets import html  # noqa: E402
from trame.widgets import vuetify3 as v3  # noqa: E402
from trame_server.utils.asynchronous import create_task  # noqa: E402
from trame_slicer import module as trame_slicer_module  # noqa: E402
from trame_slicer.core import LayoutManager, SlicerApp  # noqa: E402
from trame_slicer.rca_view import register_rca_factories  # noqa: E402
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition  # noqa: E402

from RANOResponseLib.core.errors import RANOInputError  # noqa: E402
from RANOResponseLib.core.names import CLASS_NAMES  # noqa: E402
from RANOResponseLib.review.store import CONFIDENCE_RANGE, ReviewSession, ReviewStore, load_worklist  # noqa: E402
from RANOResponseLib.web.predictions import FAILED, PREDICTED  # noqa: E402
from RANOResponseLib.web.router import INTERNAL_HEADER, SECRET_ENV  # noqa: E402

ELEMENT_IDS = ("reviewer", "agree", "override-class", "confidence", "note", "save", "next", "previous",
               "first-unreviewed", "probabilities", "case-title", "status", "worklist", "map", "opacity", "slice",
               "prediction-progress", "rule", "model-card")
# (view tag, label, timepoint, modality): the 2 x 2 grid, baseline on the left
# (tags name state variables in the page: letters and digits only)
VIEWS = (("BaselineCT1", "Baseline CT1", "baseline", "CT1"), ("FollowupCT1", "Follow-up CT1", "followup", "CT1"),
         ("BaselineFLAIR", "Baseline FLAIR", "baseline", "FLAIR"),
         ("FollowupFLAIR", "Follow-up FLAIR", "followup", "FLAIR"))


def _view(tag: str, label: str) -> ViewLayoutDefinition:
    view = ViewLayoutDefinition.slice_view("Axial", label=label, color="#F34A33")
    view.singleton_tag = tag
    return view


class Station:
    """The page and scene of one browser session."""

    def __init__(self, db: Path, worklist: Path, router: str, secret: str) -> None:
        self.store = ReviewStore(db)
        self.cases = load_worklist(worklist)
        self.router, self.secret = router.rstrip("/"), secret
        self.index = 0
        self.sessions: dict[str, ReviewSession] = {}
        self.summary: dict[str, Any] | None = None
        self.rule_category = ""
        self.server = get_server(client_type="vue3")
        self.server.enable_module(trame_slicer_module)
        self.app = SlicerApp()
        register_rca_factories(self.app.view_manager, self.server)
        self.layout_manager = LayoutManager(self.app.scene, self.app.view_manager, self.server)
        views = [_view(tag, label) for tag, label, *_ in VIEWS]
        grid = Layout(LayoutDirection.Vertical, [Layout(LayoutDirection.Horizontal, views[:2]),
                                                 Layout(LayoutDirection.Horizontal, views[2:])])
        self.layout_manager.register_layout("review", grid)
        self.layout_manager.set_layout("review")
        scene = self.app.scene
        self._base_nodes = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
        self._nodes: Any = None  # mrml.scene.SceneNodes of the case shown
        self._poll: asyncio.Task | None = None
        self._build_ui()
        state = self.server.state
        state.change("map_kind")(self._show_map)
        state.change("opacity")(self._show_map)
        state.change("slice_offset")(self._set_slice)
        self.server.controller.on_server_ready.add(self._ready)

    # ----------------------------------------------------------------------------- router calls
    def _call(self, path: str, method: str = "GET") -> Any:
        req = urllib.request.Request(self.router + path, method=method, headers={INTERNAL_HEADER: self.secret},
                                     data=b"" if method == "POST" else None)
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read().decode("utf-8"))

    # ------------------------------------------------------------------------------------- page
    def _build_ui(self) -> None:
        state, ctrl = self.server.state, self.server.controller
        state.update({
            "reviewer": "", "agree": False, "override_class": CLASS_NAMES[0], "confidence": CONFIDENCE_RANGE[1],
            "note": "", "case_title": "", "status": "starting", "probabilities": [], "worklist": [],
            "map_kind": "gradcam", "opacity": 0.5, "slice_offset": 0.0, "slice_range": [0.0, 1.0],
            "progress": 0.0, "rule": "", "lesions": [], "model_card": [], "classes": list(CLASS_NAMES),
            "confidences": list(range(CONFIDENCE_RANGE[0], CONFIDENCE_RANGE[1] + 1)), "model_label": "",
            "opinions": [],
        })
        ctrl.save, ctrl.next_case, ctrl.previous_case = self.save, self.next_case, self.previous_case
        ctrl.first_unreviewed, ctrl.open_case = self.first_unreviewed, self.open_case
        with SinglePageLayout(self.server, full_height=True) as ui:
            ui.title.set_text("RANO Response review")
            with ui.toolbar:
                v3.VSpacer()
                html.Div("research use only, not for clinical use", style="font-size: 12px; margin-right: 12px")
            with ui.content:
                with html.Div(style="display: flex; height: 100%;"):
                    with html.Div(style="width: 380px; padding: 8px; overflow-y: auto; font-size: 14px;"):
                        html.H3("{{ case_title }}", id="case-title")
                        html.Div("{{ status }}", id="status", style="min-height: 2.5em;")
                        html.Progress(id="prediction-progress", value=("progress",), max=1,
                                      v_show="progress > 0 && progress < 1", style="width: 100%;")
                        with html.Div(style="margin: 6px 0;"):
                            html.Button("Previous", id="previous", click=ctrl.previous_case)
                            html.Button("Next", id="next", click=ctrl.next_case)
                            html.Button("First unreviewed", id="first-unreviewed", click=ctrl.first_unreviewed)
                        with html.Div(id="probabilities"):
                            html.Div("no prediction yet", v_show="!opinions.length")
                            # network (calibrated, uncertain), measured, suggested: review.opinions
                            html.Div("{{ o.text }}", v_for="o in opinions", key="o.key", style="white-space: pre-wrap;")
                            html.Div("{{ p.name }}: {{ p.value }}", v_for="p in probabilities", key="p.name")
                        html.Div("{{ rule }}", id="rule")
                        with html.Table(v_show="lesions.length", style="font-size: 12px;"):
                            html.Tr("<th>time</th><th>lesion</th><th>d1 x d2 mm</th><th>measurable</th>")
                            with html.Tr(v_for="r in lesions", key="r.key"):
                                html.Td("{{ r.timepoint }}")
                                html.Td("{{ r.lesion }}")
                                html.Td("{{ r.size }}")
                                html.Td("{{ r.measurable }}")
                        html.Hr()
                        html.Label("Reviewer ")
                        html.Input(id="reviewer", v_model=("reviewer",), placeholder="your name")
                        with html.Div():
                            html.Input(id="agree", type="checkbox", v_model=("agree",),
                                       change="agree && model_label && (override_class = model_label)")
                            html.Label(" agree with the network")
                        with html.Div():
                            html.Label("Class ")
                            with html.Select(id="override-class", v_model=("override_class",),
                                             change="agree = (override_class === model_label)"):
                                html.Option("{{ c }}", v_for="c in classes", key="c", value=("c",))
                            html.Label(" confidence ")
                            with html.Select(id="confidence", v_model=("confidence",)):
                                html.Option("{{ c }}", v_for="c in confidences", key="c", value=("c",))
                        html.Textarea(id="note", v_model=("note",), placeholder="note", rows=2, style="width: 100%;")
                        html.Button("Save verdict", id="save", click=ctrl.save)
                        html.Hr()
                        with html.Div():
                            html.Label("Map ")
                            with html.Select(id="map", v_model=("map_kind",)):
                                html.Option("Grad-CAM", value="gradcam")
                                html.Option("Saliency", value="saliency")
                                html.Option("none", value="none")
                            html.Label(" opacity ")
                            html.Input(id="opacity", type="range", min=0, max=1, step=0.05,
                                       v_model=("opacity",))
                        with html.Div():
                            html.Label("Slice ")
                            html.Input(id="slice", type="range", min=("slice_range[0]",), max=("slice_range[1]",),
                                       step=1, v_model=("slice_offset",), style="width: 250px;")
                        html.Hr()
                        with html.Table(id="worklist", style="font-size: 12px;"):
                            with html.Tr(v_for="(row, i) in worklist", key="row.case_id",
                                         click=(ctrl.open_case, "[i]"), style="cursor: pointer;"):
                                html.Td("{{ row.case_id }}")
                                html.Td("{{ row.prediction }}")
                                html.Td("{{ row.reviewed_by.length ? 'reviewed by ' + row.reviewed_by.join(', ') : '' }}")
                        html.Hr()
                        html.Div("{{ line }}", v_for="line in model_card", key="line", id="model-card",
                                 style="font-size: 11px;")
                    with html.Div(style="flex: 1; position: relative;"):
                        self.layout_manager.initialize_layout_grid(ui)

    # ------------------------------------------------------------------------------------ cases
    def _ready(self, **_: Any) -> None:
        create_task(self._refresh_worklist_loop())
        self.open_case(0)

    async def _refresh_worklist_loop(self) -> None:
        """Keep the worklist's status fresh; exit when the router has gone (it owns this process)."""
        failures = 0
        while True:
            try:
                rows = await asyncio.to_thread(self._call, "/internal/status")
                failures = 0
                with self.server.state as state:
                    state.worklist = rows
            except OSError:
                failures += 1
                if failures >= 10:
                    os._exit(0)
            await asyncio.sleep(2.0)

    def _session(self) -> ReviewSession | None:
        name = (self.server.state.reviewer or "").strip()
        if not name:
            return None
        if name not in self.sessions:
            self.sessions[name] = ReviewSession(self.store, name, self.cases)
        session = self.sessions[name]
        session.go_to(self.index)
        return session

    def open_case(self, index: int) -> None:
        """Show case ``index`` of the worklist (predicting it first when it has no outputs)."""
        self.index = max(0, min(int(index), len(self.cases) - 1))
        case = self.cases[self.index]
        state = self.server.state
        state.case_title = f"{self.index + 1}/{len(self.cases)}  {case.case_id}"
        state.update({"probabilities": [], "model_label": "", "rule": "", "lesions": [], "opinions": [],
                      "agree": False, "note": "", "progress": 0.0})
        self.summary = None
        self._clear_case()
        session = self._session()
        verdict = session.verdict() if session else None
        if verdict is not None:
            state.update({"override_class": verdict.label, "confidence": verdict.confidence, "note": verdict.note,
                          "agree": bool(verdict.agree)})
        if self._poll is not None:
            self._poll.cancel()
        self._poll = create_task(self._predict_and_show(case.case_id, self.index))

    async def _predict_and_show(self, case_id: str, index: int) -> None:
        state = self.server.state
        progress = await asyncio.to_thread(self._call, f"/internal/predict/{case_id}", "POST")
        while progress["state"] not in (PREDICTED, FAILED):
            with state:
                state.status = f"predicting on the server: {progress['stage']} ({progress['fraction'] * 100:.0f}%)"
                state.progress = max(progress["fraction"], 0.01)
            await asyncio.sleep(0.5)
            progress = await asyncio.to_thread(self._call, f"/internal/predict/{case_id}")
        if index != self.index:
            return
        with state:
            state.progress = 1.0
            if progress["state"] == FAILED:
                state.status = f"prediction failed: {progress['error']}"
                return
            try:
                self._show(Path(progress["folder"]))
            except RANOInputError as e:
                state.status = f"error: {e}"
                return
            state.status = "predicted; " + self._verdict_text()

    def _clear_case(self) -> None:
        scene = self.app.scene
        for i in reversed(range(scene.GetNumberOfNodes())):
            node = scene.GetNthNode(i)
            if node is not None and node.GetID() not in self._base_nodes and scene.IsNodePresent(node):
                scene.RemoveNode(node)
        self._nodes = None

    def _show(self, folder: Path) -> None:
        """Load a predict output folder into the scene and fill the page's panels."""
        from RANOResponseLib.mrml.scene import load_outputs, peak_ras
        from RANOResponseLib.review.opinions import opinion_lines
        from RANOResponseLib.review.report import gather

        self._nodes = load_outputs(self.app.scene, folder)
        info = gather(folder)
        pred = info.prediction
        self.summary = pred
        state = self.server.state
        state.model_label = pred["label"]
        state.probabilities = [{"name": c, "value": f"{p:.3f}"} for c, p in pred["probabilities"].items()]
        state.opinions = [{"key": i, "text": t} for i, t in enumerate(opinion_lines(pred, info.shown_measurement()))]
        session = self._session()
        if session is None or session.verdict() is None:  # no verdict of this reviewer: start from the network's
            state.override_class = pred["label"]
        self.rule_category = info.rule.category if info.rule is not None else ""
        if info.rule is not None:
            from RANOResponseLib.rano.measurement import lesion_table

            state.rule = f"Measured RANO category: {info.rule.category} ({info.rule.criteria})"
            state.lesions = [{"key": f"{r['timepoint']}{r['lesion']}", "timepoint": r["timepoint"],
                              "lesion": r["lesion"], "size": f"{r['d1_mm']:.1f} x {r['d2_mm']:.1f}",
                              "measurable": r["measurable"]} for r in lesion_table(info.pair)]
        else:
            state.rule = "; ".join(info.notes) or "no lesion measurements"
        state.model_card = info.model_card
        scene = self.app.scene
        roi = scene.GetNodeByID(self._nodes.roi or "")
        if roi is not None and roi.GetDisplayNode() is not None:  # its filled box would hide the anatomy
            roi.GetDisplayNode().SetVisibility(False)
        for tag, _, timepoint, modality in VIEWS:
            view = self.app.view_manager.get_view(tag)
            ids = getattr(self._nodes, timepoint)
            view.set_background_volume_id(ids.get(modality) or next(iter(ids.values())))
            view.fit_view_to_content()
        self._show_map()
        shown = scene.GetNodeByID(self._nodes.gradcam or self._nodes.saliency or "")
        first = self.app.view_manager.get_view(VIEWS[0][0])
        low, high = first.get_slice_range()
        state.slice_range = [round(low), round(high)]
        state.slice_offset = round(peak_ras(shown)[2]) if shown is not None else round((low + high) / 2)
        self._set_slice()

    def _show_map(self, **_: Any) -> None:
        if self._nodes is None:
            return
        state = self.server.state
        node_id = self._nodes.maps.get(state.map_kind) if state.map_kind != "none" else None
        for tag, *_ in VIEWS:
            view = self.app.view_manager.get_view(tag)
            view.set_foreground_volume_id(node_id)
            view.set_foreground_opacity(float(state.opacity))

    def _set_slice(self, **_: Any) -> None:
        if self._nodes is None:
            return
        for tag, *_ in VIEWS:
            self.app.view_manager.get_view(tag).set_slice_value(float(self.server.state.slice_offset))

    # --------------------------------------------------------------------------------- verdicts
    def _verdict_text(self) -> str:
        session = self._session()
        if session is None:
            return "enter your name to review"
        verdict = session.verdict()
        done, total = session.progress()
        text = f"{done} of {total} reviewed by {session.reviewer}"
        return text + (f"; your verdict: {verdict.label} (confidence {verdict.confidence})" if verdict else "")

    def save(self) -> None:
        """Save the reviewer's verdict on the case shown (agree: the network's class)."""
        state = self.server.state
        try:
            session = self._session()
            if session is None:
                raise RANOInputError("enter your name before saving")
            label = None if state.agree else state.override_class
            v = session.save(label, int(state.confidence), state.note or "", prediction=self.summary,
                             rule=self.rule_category)
        except RANOInputError as e:
            state.status = f"not saved: {e}"
            return
        state.status = f"saved verdict {v.id}: {v.case_id} {v.label} by {v.reviewer}" \
                       + (" (agrees with the network)" if v.agree else "")

    def next_case(self) -> None:
        if self.index + 1 < len(self.cases):
            self.open_case(self.index + 1)
        else:
            self.server.state.status = "this is the last case"

    def previous_case(self) -> None:
        if self.index > 0:
            self.open_case(self.index - 1)
        else:
            self.server.state.status = "this is the first case"

    def first_unreviewed(self) -> None:
        session = self._session()
        if session is None:
            self.server.state.status = "enter your name to find your first unreviewed case"
            return
        case = session.first_unreviewed()
        if case is None:
            self.server.state.status = f"all {len(self.cases)} cases are reviewed by {session.reviewer}"
            return
        self.open_case(session.index)


def main(argv: list[str] | None = None) -> int:
    """Run one station (the router starts it; not meant to be run by hand)."""
    p = argparse.ArgumentParser(prog="python -m RANOResponseLib.web.station")
    p.add_argument("--db", type=Path, required=True)
    p.add_argument("--worklist", type=Path, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--router", required=True)
    args = p.parse_args(argv)
    station = Station(args.db, args.worklist, args.router, os.environ.get(SECRET_ENV, ""))
    station.server.start(host="127.0.0.1", port=args.port, open_browser=False, show_connection_info=False,
                         disable_logging=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
