"""Radiologist review sessions: a worklist of case pairs, verdicts in SQLite, labels out as CSV.

* A *worklist* is a CSV of case pairs or a LUMIERE folder, read by :mod:`.worklist` (its names
  are importable from here too).
* A :class:`ReviewStore` is one SQLite file shared by every reviewer of a worklist. Verdicts are
  *appended*, never updated: revising a verdict adds a row whose ``supersedes`` names the one it
  replaces, and the ``latest_verdicts`` view gives the newest per case and reviewer, so history
  is kept and two reviewers can never overwrite each other.
* Durability and concurrency: WAL journal, ``synchronous=FULL``, a busy timeout and
  ``BEGIN IMMEDIATE`` write transactions with retries. :meth:`ReviewStore.save` returns only
  after ``COMMIT``, so a verdict it acknowledged survives the process being killed right after.
  (WAL needs a local file system; do not put the database on a network share.)
* :class:`ReviewSession` steps one reviewer through the worklist (next, previous, first
  unreviewed) and saves verdicts with the model's prediction and the rule-based category.

Export format (:data:`EXPORT_COLUMNS`, one row per case and reviewer, latest verdict): ``patient``,
``baseline_week``, ``followup_week`` (the LUMIERE week folder names), ``label`` (the
radiologist's class, CR/PR/SD/PD, the training target), then ``case_id``, ``baseline``,
``followup`` (folders), ``reviewer``, ``confidence`` (1-5), ``agree`` (1/0 with the model,
empty without a prediction), ``model_label``, ``rule_category``, ``bundle_id``, ``reviewed_at``
(UTC ISO 8601), ``note``, ``verdict_id``.
"""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.names import CLASS_NAMES
from RANOResponseLib.review.worklist import (  # noqa: F401 (the worklist's names, imported from here too)
    Case,
    cases_from_lumiere,
    default_case_id,
    load_worklist,
    read_worklist_csv,
)

SCHEMA_VERSION = 1
CONFIDENCE_RANGE = (1, 5)  # 1 = very unsure ... 5 = certain
EXPORT_COLUMNS = (
    "patient", "baseline_week", "followup_week", "label", "case_id", "baseline", "followup", "reviewer",
    "confidence", "agree", "model_label", "rule_category", "bundle_id", "reviewed_at", "note", "verdict_id",
)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cases (
    case_id TEXT PRIMARY KEY,
    position INTEGER NOT NULL,
    patient TEXT NOT NULL DEFAULT '',
    baseline TEXT NOT NULL,
    followup TEXT NOT NULL,
    label TEXT NOT NULL DEFAULT '',
    prediction TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS verdicts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    case_id TEXT NOT NULL,
    reviewer TEXT NOT NULL CHECK (length(reviewer) > 0),
    label TEXT NOT NULL CHECK (label IN ({', '.join(repr(c) for c in CLASS_NAMES)})),
    confidence INTEGER NOT NULL CHECK (confidence BETWEEN {CONFIDENCE_RANGE[0]} AND {CONFIDENCE_RANGE[1]}),
    agree INTEGER CHECK (agree IN (0, 1)),
    note TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    model_label TEXT NOT NULL DEFAULT '',
    model_probabilities TEXT NOT NULL DEFAULT '{{}}',
    bundle_id TEXT NOT NULL DEFAULT '',
    rule_category TEXT NOT NULL DEFAULT '',
    patient TEXT NOT NULL DEFAULT '',
    baseline TEXT NOT NULL DEFAULT '',
    followup TEXT NOT NULL DEFAULT '',
    supersedes INTEGER REFERENCES verdicts(id)
);
CREATE INDEX IF NOT EXISTS verdicts_case_reviewer ON verdicts (case_id, reviewer, id);
CREATE VIEW IF NOT EXISTS latest_verdicts AS
    SELECT v.* FROM verdicts v
    WHERE NOT EXISTS (SELECT 1 FROM verdicts w
                      WHERE w.case_id = v.case_id AND w.reviewer = v.reviewer AND w.id > v.id);
"""


# ------------------------------------------------------------------------------ verdicts


@dataclass
class Verdict:
    """One reviewer's verdict on one case. ``label`` is the radiologist's class (the model's own
    class when agreeing); ``agree`` is None when no model prediction was shown."""

    case_id: str
    reviewer: str
    label: str
    confidence: int
    note: str = ""
    agree: bool | None = None
    model_label: str = ""
    model_probabilities: dict[str, float] = field(default_factory=dict)
    bundle_id: str = ""
    rule_category: str = ""
    patient: str = ""
    baseline: str = ""
    followup: str = ""
    id: int | None = None  # set by the store
    created_at: str = ""  # UTC ISO 8601, set by the store
    supersedes: int | None = None  # id of the verdict this one revises

    def validate(self) -> None:
        if not self.case_id:
            raise RANOInputError("verdict needs a case id")
        if not self.reviewer or not self.reviewer.strip():
            raise RANOInputError("verdict needs a reviewer name")
        if self.label not in CLASS_NAMES:
            raise RANOInputError(f"label {self.label!r}: choose one of {', '.join(CLASS_NAMES)}")
        lo, hi = CONFIDENCE_RANGE
        if not isinstance(self.confidence, int) or not lo <= self.confidence <= hi:
            raise RANOInputError(f"confidence {self.confidence!r}: an integer from {lo} (unsure) to {hi} (certain)")


def make_verdict(
    case: Case,
    reviewer: str,
    label: str | None,
    confidence: int,
    note: str = "",
    prediction: Mapping[str, Any] | None = None,
    rule: Any = None,
) -> Verdict:
    """A verdict on ``case``; ``label=None`` means "agree with the model" (needs ``prediction``).

    ``prediction``: a ``prediction.json`` summary (or ``PairResult.summary()``); ``rule``: a
    :class:`~RANOResponseLib.rano.rules.RuleResult` or a category string.
    """
    model_label, probs, bundle_id = "", {}, ""
    if prediction is not None:
        model_label = str(prediction.get("label", ""))
        probs = {str(k): float(v) for k, v in (prediction.get("probabilities") or {}).items()}
        bundle = prediction.get("bundle") or {}
        bundle_id = str(bundle.get("id", "")) if isinstance(bundle, Mapping) else str(bundle)
    if label is None:
        if not model_label:
            raise RANOInputError(f"{case.case_id}: cannot agree with the model: no prediction for this case")
        label = model_label
    rule_category = getattr(rule, "category", rule) or ""
    agree = (label == model_label) if model_label else None
    return Verdict(case.case_id, reviewer, label, int(confidence), note, agree, model_label, probs, bundle_id,
                   str(rule_category), case.patient, case.baseline, case.followup)


def _row_to_verdict(row: sqlite3.Row) -> Verdict:
    d = dict(row)
    d["model_probabilities"] = json.loads(d["model_probabilities"] or "{}")
    d["agree"] = None if d["agree"] is None else bool(d["agree"])
    return Verdict(**d)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class ReviewStore:
    """The shared verdict database (one SQLite file per worklist).

    Safe for several processes at once. A store object belongs to one process: after a fork
    it reconnects on first use.
    """

    def __init__(self, path: Path | str, timeout_s: float = 30.0, create: bool = True) -> None:
        self.path = Path(path)
        self.timeout_s = float(timeout_s)
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        if self.path.exists() and not self.path.is_file():
            raise RANOInputError(f"{self.path}: exists and is not a file")
        if not create and not self.path.is_file():
            raise RANOInputError(f"{self.path}: review database not found")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._init_schema()

    # -- connection
    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        try:
            conn = sqlite3.connect(str(self.path), timeout=self.timeout_s, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout_s * 1000)}")
            # journal_mode=WAL persists in the file; setting it needs a moment of exclusive access
            self._retry(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone())
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.DatabaseError as e:
            raise RANOInputError(f"{self.path}: not a review database ({e})") from None
        self._conn, self._pid = conn, os.getpid()
        return conn

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None

    def __enter__(self) -> "ReviewStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _retry(self, fn: Any) -> Any:
        """Run ``fn`` again while SQLite reports busy/locked, until ``timeout_s`` has passed
        (the busy timeout covers most waits; this covers the cases SQLite does not retry)."""
        deadline = time.monotonic() + self.timeout_s
        delay = 0.01
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as e:
                msg = str(e).lower()
                if ("locked" not in msg and "busy" not in msg) or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.5)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A ``BEGIN IMMEDIATE`` transaction: the write lock is taken up front, so two writers
        never deadlock upgrading read locks; COMMIT before the block's caller returns."""
        conn = self._connect()
        self._retry(lambda: conn.execute("BEGIN IMMEDIATE"))
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _init_schema(self) -> None:
        def run() -> None:
            with self._write() as conn:
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
                row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                if row is None:
                    conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                elif int(row[0]) > SCHEMA_VERSION:
                    raise RANOInputError(f"{self.path}: review database schema {row[0]} is newer than this "
                                         f"software ({SCHEMA_VERSION})")

        try:
            self._retry(run)
        except sqlite3.DatabaseError as e:
            raise RANOInputError(f"{self.path}: not a review database ({e})") from None

    # -- cases
    def add_cases(self, cases: Sequence[Case]) -> int:
        """Register worklist cases (new ones appended in order; known ones updated). Returns the
        number of new cases."""
        def run() -> int:
            with self._write() as conn:
                known = {r[0] for r in conn.execute("SELECT case_id FROM cases")}
                pos = conn.execute("SELECT COALESCE(MAX(position), -1) FROM cases").fetchone()[0]
                added = 0
                for c in cases:
                    if c.case_id in known:
                        conn.execute("UPDATE cases SET patient=?, baseline=?, followup=?, label=?, prediction=? "
                                     "WHERE case_id=?", (c.patient, c.baseline, c.followup, c.label, c.prediction,
                                                         c.case_id))
                        continue
                    pos += 1
                    added += 1
                    known.add(c.case_id)
                    conn.execute("INSERT INTO cases VALUES (?, ?, ?, ?, ?, ?, ?)",
                                 (c.case_id, pos, c.patient, c.baseline, c.followup, c.label, c.prediction))
                return added

        return self._retry(run)

    def case(self, case_id: str) -> Case | None:
        row = self._connect().execute("SELECT case_id, baseline, followup, patient, label, prediction FROM cases "
                                      "WHERE case_id = ?", (case_id,)).fetchone()
        return Case(**dict(row)) if row else None

    def cases(self) -> list[Case]:
        rows = self._connect().execute(
            "SELECT case_id, baseline, followup, patient, label, prediction FROM cases ORDER BY position").fetchall()
        return [Case(**dict(r)) for r in rows]

    # -- verdicts
    def save(self, verdict: Verdict) -> Verdict:
        """Append a verdict; returns it with ``id``, ``created_at`` and ``supersedes`` set, only
        once it is committed to disk."""
        verdict.validate()

        def run() -> Verdict:
            with self._write() as conn:
                prev = conn.execute("SELECT MAX(id) FROM verdicts WHERE case_id = ? AND reviewer = ?",
                                    (verdict.case_id, verdict.reviewer)).fetchone()[0]
                created = utc_now()
                cur = conn.execute(
                    "INSERT INTO verdicts (case_id, reviewer, label, confidence, agree, note, created_at, "
                    "model_label, model_probabilities, bundle_id, rule_category, patient, baseline, followup, "
                    "supersedes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (verdict.case_id, verdict.reviewer, verdict.label, verdict.confidence,
                     None if verdict.agree is None else int(verdict.agree), verdict.note, created,
                     verdict.model_label, json.dumps(verdict.model_probabilities), verdict.bundle_id,
                     verdict.rule_category, verdict.patient, verdict.baseline, verdict.followup, prev))
                new_id = cur.lastrowid
            saved = Verdict(**{**asdict(verdict), "id": new_id, "created_at": created, "supersedes": prev})
            return saved

        return self._retry(run)

    def latest(self, case_id: str | None = None, reviewer: str | None = None) -> list[Verdict]:
        """The newest verdict per case and reviewer (optionally of one case / one reviewer)."""
        sql, args = "SELECT * FROM latest_verdicts WHERE 1=1", []
        if case_id is not None:
            sql, args = sql + " AND case_id = ?", args + [case_id]
        if reviewer is not None:
            sql, args = sql + " AND reviewer = ?", args + [reviewer]
        rows = self._connect().execute(sql + " ORDER BY case_id, reviewer", args).fetchall()
        return [_row_to_verdict(r) for r in rows]

    def history(self, case_id: str | None = None, reviewer: str | None = None) -> list[Verdict]:
        """Every verdict ever saved (oldest first), optionally of one case / reviewer."""
        sql, args = "SELECT * FROM verdicts WHERE 1=1", []
        if case_id is not None:
            sql, args = sql + " AND case_id = ?", args + [case_id]
        if reviewer is not None:
            sql, args = sql + " AND reviewer = ?", args + [reviewer]
        return [_row_to_verdict(r) for r in self._connect().execute(sql + " ORDER BY id", args).fetchall()]

    def reviewed(self, reviewer: str) -> set[str]:
        """Case ids this reviewer has a verdict for."""
        rows = self._connect().execute("SELECT DISTINCT case_id FROM verdicts WHERE reviewer = ?", (reviewer,))
        return {r[0] for r in rows}

    def status(self) -> dict[str, Any]:
        """Counts for ``rano-response review status``."""
        conn = self._connect()
        n_cases = conn.execute("SELECT COUNT(*) FROM cases").fetchone()[0]
        per_reviewer = {r[0]: {"reviewed": r[1], "disagree_with_model": r[2] or 0, "revisions": 0}
                        for r in conn.execute("SELECT reviewer, COUNT(*), SUM(agree = 0) FROM latest_verdicts "
                                              "GROUP BY reviewer")}
        for r in conn.execute("SELECT reviewer, COUNT(*) FROM verdicts WHERE supersedes IS NOT NULL "
                              "GROUP BY reviewer"):
            per_reviewer.setdefault(r[0], {"reviewed": 0, "disagree_with_model": 0})["revisions"] = r[1]
        labels = {r[0]: r[1] for r in conn.execute("SELECT label, COUNT(*) FROM latest_verdicts GROUP BY label")}
        total = conn.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]
        return {"database": str(self.path), "cases": n_cases, "verdicts": total, "reviewers": per_reviewer,
                "labels": labels}

    def export_csv(self, out: Path | str, reviewer: str | None = None, history: bool = False) -> Path:
        """Write the verdicts as a label CSV (:data:`EXPORT_COLUMNS`), atomically.

        Latest verdict per case and reviewer by default; ``history`` writes every verdict.
        """
        from RANOResponseLib.core.files import atomic_file

        verdicts = self.history(reviewer=reviewer) if history else self.latest(reviewer=reviewer)
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=list(EXPORT_COLUMNS))
            w.writeheader()
            for v in verdicts:
                w.writerow({
                    "patient": v.patient, "baseline_week": Path(v.baseline).name if v.baseline else "",
                    "followup_week": Path(v.followup).name if v.followup else "", "label": v.label,
                    "case_id": v.case_id, "baseline": v.baseline, "followup": v.followup, "reviewer": v.reviewer,
                    "confidence": v.confidence, "agree": "" if v.agree is None else int(v.agree),
                    "model_label": v.model_label, "rule_category": v.rule_category, "bundle_id": v.bundle_id,
                    "reviewed_at": v.created_at, "note": v.note, "verdict_id": v.id,
                })
            fh.flush()
            os.fsync(fh.fileno())
        return out


# ------------------------------------------------------------------------------ session


class ReviewSession:
    """One reviewer stepping through a worklist.

    Args:
        store: the shared database; ``cases`` are registered in it (default: the cases it has).
        reviewer: the name saved with every verdict.
    """

    def __init__(self, store: ReviewStore, reviewer: str, cases: Sequence[Case] | None = None) -> None:
        if not reviewer or not reviewer.strip():
            raise RANOInputError("a review session needs a reviewer name")
        self.store = store
        self.reviewer = reviewer.strip()
        if cases is not None:
            store.add_cases(cases)
            self.cases = list(cases)
        else:
            self.cases = store.cases()
        if not self.cases:
            raise RANOInputError(f"{store.path}: the worklist is empty (import cases first)")
        self.index = 0

    @property
    def current(self) -> Case:
        return self.cases[self.index]

    def __len__(self) -> int:
        return len(self.cases)

    def next(self) -> Case | None:
        """Move to the next case; None (and stay) at the end."""
        if self.index + 1 >= len(self.cases):
            return None
        self.index += 1
        return self.current

    def previous(self) -> Case | None:
        """Move to the previous case; None (and stay) at the start."""
        if self.index == 0:
            return None
        self.index -= 1
        return self.current

    def go_to(self, case: str | int) -> Case:
        """Jump to a case by id or position."""
        if isinstance(case, int):
            if not 0 <= case < len(self.cases):
                raise RANOInputError(f"case number {case} is outside the worklist (0..{len(self.cases) - 1})")
            self.index = case
            return self.current
        for i, c in enumerate(self.cases):
            if c.case_id == case:
                self.index = i
                return c
        raise RANOInputError(f"case {case!r} is not in the worklist")

    def first_unreviewed(self) -> Case | None:
        """Jump to the first case this reviewer has no verdict for; None if all are done."""
        done = self.store.reviewed(self.reviewer)
        for i, c in enumerate(self.cases):
            if c.case_id not in done:
                self.index = i
                return c
        return None

    def progress(self) -> tuple[int, int]:
        """(cases reviewed by this reviewer, cases in the worklist)."""
        done = self.store.reviewed(self.reviewer)
        return sum(c.case_id in done for c in self.cases), len(self.cases)

    def verdict(self) -> Verdict | None:
        """This reviewer's latest verdict on the current case."""
        v = self.store.latest(self.current.case_id, self.reviewer)
        return v[0] if v else None

    def prediction(self) -> dict | None:
        """The current case's ``prediction.json`` if the worklist names a predict output folder."""
        if not self.current.prediction:
            return None
        from RANOResponseLib.core.outputs import read_prediction

        return read_prediction(self.current.prediction)

    def save(self, label: str | None, confidence: int, note: str = "",
             prediction: Mapping[str, Any] | None = None, rule: Any = None) -> Verdict:
        """Save a verdict on the current case (``label=None``: agree with the model).

        ``prediction`` defaults to the case's own ``prediction.json`` when the worklist has one.
        Returns after the verdict is committed.
        """
        if prediction is None:
            prediction = self.prediction()
        return self.store.save(make_verdict(self.current, self.reviewer, label, confidence, note, prediction, rule))


def open_session(worklist: Path | str, database: Path | str, reviewer: str) -> ReviewSession:
    """The review panel's entry: register a worklist (CSV or LUMIERE folder) in the shared database
    and start at this reviewer's first unreviewed case."""
    if not str(database).strip() or str(database) == ".":
        raise RANOInputError("choose a review database file (it is shared by all reviewers of the worklist)")
    session = ReviewSession(ReviewStore(database), reviewer, load_worklist(worklist))
    session.first_unreviewed()
    return session


def session_text(session: ReviewSession) -> str:
    """One line for the panel: where the reviewer is, and their verdict on this case if any."""
    done, total = session.progress()
    case = session.current
    text = (f"Case {session.index + 1} of {total} ({done} reviewed by {session.reviewer}): "
            f"{case.case_id}")
    verdict = session.verdict()
    if verdict is not None:
        text += f"  [your verdict: {verdict.label}, confidence {verdict.confidence}]"
    return text
