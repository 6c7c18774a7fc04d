"""Predictions for the review station, done once per case on the server.

A :class:`PredictionService` lives in the router process (:mod:`.router`): the bundle's models
are loaded there once and stay loaded (:func:`~RANOResponseLib.inference.pipeline.predict_pair`
keeps them cached), predictions run one at a time on the server's device, and a case asked for
twice, by two reviewers or two clicks, shares one run (one future per case). Outputs are
``rano-response predict`` folders: the worklist's own ``prediction`` folder when it names one,
else ``<outputs>/<case id>``.
"""

from __future__ import annotations

import re
import threading
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.inference.pipeline import PREDICTION_JSON, run_predict
from RANOResponseLib.review.store import Case, ReviewStore

NOT_PREDICTED, RUNNING, PREDICTED, FAILED = "not predicted", "predicting", "predicted", "failed"


def output_folder(case: Case, outputs: Path) -> Path:
    """Where ``case``'s prediction is (or will be): the worklist's folder, else one under ``outputs``."""
    if case.prediction:
        return Path(case.prediction)
    return outputs / (re.sub(r"[^A-Za-z0-9._-]+", "_", case.case_id).strip("._") or "case")


@dataclass
class Progress:
    """Where one case's prediction stands (what the page shows)."""

    state: str = NOT_PREDICTED
    stage: str = ""
    fraction: float = 0.0
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "stage": self.stage, "fraction": round(self.fraction, 3), "error": self.error}


class PredictionService:
    """Runs ``rano-response predict`` for worklist cases, at most once per case at a time.

    Args:
        cases: the worklist; only these cases can be predicted (a request names a case id, never a path).
        outputs: folder for the predictions of cases whose worklist row names none.
        bundle, device: as for ``rano-response predict``.
    """

    def __init__(self, cases: Sequence[Case], outputs: Path | str, bundle: Path | str | None = None,
                 device: str = "auto") -> None:
        self.cases = {c.case_id: c for c in cases}
        self.outputs = Path(outputs)
        self.bundle, self.device = bundle, device
        self._lock = threading.Lock()
        self._futures: dict[str, Future] = {}
        self._progress: dict[str, Progress] = {}
        self.runs: dict[str, int] = {}  # case id -> predictions started (tests check: never twice)
        # one worker: a GPU (or the CPUs) serves one prediction at a time, in request order
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict")

    def folder(self, case_id: str) -> Path:
        return output_folder(self._case(case_id), self.outputs)

    def _case(self, case_id: str) -> Case:
        case = self.cases.get(case_id)
        if case is None:
            raise RANOInputError(f"case {case_id!r} is not in the worklist")
        return case

    def progress(self, case_id: str) -> Progress:
        """The state of ``case_id``: predicted (outputs on disk), running, failed, or not predicted."""
        with self._lock:
            p = self._progress.get(case_id)
            if p is not None and p.state in (RUNNING, FAILED):
                return Progress(**vars(p))
        return Progress(PREDICTED, "done", 1.0) if (self.folder(case_id) / PREDICTION_JSON).is_file() else Progress()

    def request(self, case_id: str) -> Progress:
        """Start predicting ``case_id`` unless it is predicted or already running; returns its progress."""
        case = self._case(case_id)
        with self._lock:
            running = self._futures.get(case_id)
            if running is not None and not running.done():
                return Progress(**vars(self._progress[case_id]))
            if (self.folder(case_id) / PREDICTION_JSON).is_file():
                return Progress(PREDICTED, "done", 1.0)
            self._progress[case_id] = Progress(RUNNING, "queued", 0.0)
            self.runs[case_id] = self.runs.get(case_id, 0) + 1
            self._futures[case_id] = self._pool.submit(self._run, case)
            return Progress(**vars(self._progress[case_id]))

    def _run(self, case: Case) -> None:
        def report(stage: str, fraction: float) -> None:
            with self._lock:
                self._progress[case.case_id] = Progress(RUNNING, stage, float(fraction))

        try:
            run_predict(case.baseline, case.followup, self.folder(case.case_id), bundle=self.bundle,
                        device=self.device, progress=report)
        except RANOInputError as e:
            with self._lock:
                self._progress[case.case_id] = Progress(FAILED, "failed", 0.0, str(e))
            return
        except Exception as e:  # the page shows it; the server keeps serving the other cases
            traceback.print_exc()
            with self._lock:
                self._progress[case.case_id] = Progress(FAILED, "failed", 0.0, f"{type(e).__name__}: {e}")
            return
        with self._lock:
            self._progress.pop(case.case_id, None)

    def wait(self, case_id: str, timeout: float | None = None) -> Progress:
        """Block until ``case_id``'s running prediction ends (tests and the command line)."""
        with self._lock:
            future = self._futures.get(case_id)
        if future is not None:
            future.result(timeout)
        return self.progress(case_id)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def worklist_status(store: ReviewStore, service: PredictionService) -> list[dict[str, Any]]:
    """One row per worklist case: id, prediction state, and who has reviewed it (the page's worklist)."""
    reviewers: dict[str, list[str]] = {}
    for v in store.latest():
        reviewers.setdefault(v.case_id, []).append(v.reviewer)
    return [{"case_id": cid, "prediction": service.progress(cid).state,
             "reviewed_by": sorted(reviewers.get(cid, []))} for cid in service.cases]
