"""The RANO Response panel's Course section without Qt: run or load a patient's course, show a timepoint.

:class:`CoursePanel` is a part of :class:`~RANOResponseLib.mrml.logic.PanelLogic` (which inherits
it): ``rano-response timeline`` in a child process (:func:`~RANOResponseLib.mrml.runner.start_timeline`),
the course folder into the scene (:mod:`~RANOResponseLib.mrml.course_scene`), a timepoint beside
the baseline, and the section's text. Light to import, like the logic.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.mrml.panel_state import given

if TYPE_CHECKING:
    from RANOResponseLib.mrml.panel_state import PanelParameters


class CoursePanel:
    """The Course section of the panel (needs ``self.scene``, ``self.python``; keeps ``self.course``)."""

    scene: Any
    python: str | None
    course: Any = None  # course_scene.CourseNodes of the loaded course

    def start_course(self, p: PanelParameters, requested_device: str | None = "auto") -> tuple[Any, str]:
        """Start ``rano-response timeline`` on the patient into the course folder in a child process;
        returns the job and the device notice ('' if none)."""
        from RANOResponseLib.model.device import choose_device
        from RANOResponseLib.mrml.runner import start_timeline

        patient, folder = given(p.coursePatient), given(p.courseFolder)
        if patient is None:
            raise RANOInputError("choose the patient: a folder of its studies (Patient-XXX/week-*) or a course CSV")
        if folder is None:
            raise RANOInputError("choose the course folder the timeline is written to (kept: a new scan later "
                                 "adds only its own work)")
        device, notice = choose_device(requested_device or "auto")
        return start_timeline(patient, folder, device, given(p.bundle), python=self.python), notice or ""

    def finish_course(self, job: Any) -> Any:
        """Load a finished timeline job's course; returns its table node."""
        from RANOResponseLib.mrml.runner import finish_timeline

        return self.load_course(finish_timeline(job))

    def load_course(self, folder: Any) -> Any:
        """Load a timeline output folder (table, burden plots, the baseline in its view); returns the
        table node. An earlier course is replaced."""
        from RANOResponseLib.mrml.course_scene import load_course

        if given(folder) is None:
            raise RANOInputError("choose a course folder (the output of `rano-response timeline`, or Run timeline)")
        self.course = None
        self.course = load_course(self.scene, Path(folder))
        return self.scene.GetNodeByID(self.course.table)

    def show_course_timepoint(self, row: int) -> str:
        """Show the course's timepoint ``row`` beside the baseline; returns the course text."""
        from RANOResponseLib.mrml.course_scene import show_timepoint

        if self.course is None:
            raise RANOInputError("load a course first")
        show_timepoint(self.scene, self.course, row)
        return self.course_text()

    def course_text(self) -> str:
        """The Course section's text: the patient, its baseline and why, the latest category, and the
        shown timepoint's categories with their reasoning."""
        from html import escape

        if self.course is None:
            return "No course loaded."
        doc, rows = self.course.doc, self.course.rows
        rated = [r for r in rows if r.get("category")]
        text = (f"<b>{escape(str(doc['patient']))}</b>: {len(rows)} timepoints, baseline "
                f"{escape(doc['baseline'])} ({escape(str(doc.get('baseline_reason', '')))}).")
        if rated:
            last = rated[-1]
            text += (f"<br>Latest: <b>{escape(last['timepoint'])} RANO {escape(last['category'])}"
                     f"{' ' + escape(last['confirmed']) if last.get('confirmed') else ''}, RANO 2.0 "
                     f"{escape(last.get('category_rano2') or '-')}</b>")
        if self.course.shown is not None:
            r = rows[self.course.shown]
            network = (r.get("network") or {}).get("label")
            reasons = "".join(f"<li>{escape(s)}</li>" for key in ("reasoning", "reasoning_rano2")
                              for s in str(r.get(key) or "").splitlines() if s)
            text += (f"<p>Shown beside the baseline: <b>{escape(r['timepoint'])}</b> ({r.get('weeks', 0):g} weeks)"
                     + (f"; network (vs {escape(str(r['network'].get('previous', '')))}): {escape(network)}"
                        if network else "") + f"</p><ul>{reasons}</ul>")
        return text + "<i>Research use only, not for clinical use.</i>"
