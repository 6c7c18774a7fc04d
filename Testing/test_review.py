"""Tests of the review store and sessions (RANOResponseLib.review): worklists, navigation,
history of revised verdicts, the label export, two writer processes at once, and a writer killed
with SIGKILL in the middle of its saves."""

from __future__ import annotations

import csv
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from RANOResponseLib.cli import main as cli_main
from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.review.store import (
    EXPORT_COLUMNS,
    Case,
    ReviewSession,
    ReviewStore,
    Verdict,
    cases_from_lumiere,
    load_worklist,
    make_verdict,
    read_worklist_csv,
)

PRED = {"label": "PD", "probabilities": {"CR": 0.1, "PR": 0.1, "SD": 0.2, "PD": 0.6},
        "bundle": {"id": "tiny-test", "path": "/nowhere"}}


def cases(n: int = 4) -> list[Case]:
    return [Case(f"P{i}_week-000_week-0{10 + i}", f"/data/P{i}/week-000", f"/data/P{i}/week-0{10 + i}", f"P{i}")
            for i in range(n)]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------------------ worklists


def test_worklist_csv(tmp_path):
    (tmp_path / "wl.csv").write_text(
        "case_id,baseline,followup,label\n"
        "a,Imaging/Patient-007/week-000-2,Imaging/Patient-007/week-012,PD\n"
        ",/abs/Patient-008/week-003,/abs/Patient-008/week-020,\n")
    got = read_worklist_csv(tmp_path / "wl.csv")
    assert got[0].case_id == "a" and got[0].label == "PD"
    assert got[0].baseline == str((tmp_path / "Imaging/Patient-007/week-000-2").resolve())
    assert got[0].patient == "Patient-007" and got[0].followup_week == "week-012"
    assert got[1].case_id == "Patient-008_week-003_week-020" and got[1].baseline == "/abs/Patient-008/week-003"
    for text, msg in [("baseline,label\nx,PD\n", "lacks column"), ("baseline,followup,label\nx,y,MR\n", "not one of"),
                      ("case_id,baseline,followup\nc,x,y\nc,z,w\n", "repeats case_id"), ("baseline,followup\n", "no cases")]:
        (tmp_path / "bad.csv").write_text(text)
        with pytest.raises(RANOInputError, match=msg) as e:
            read_worklist_csv(tmp_path / "bad.csv")
        assert "bad.csv" in str(e.value)


def test_worklist_from_lumiere_folder(case_pair):
    from RANOResponseLib.datasets.lumiere import build_pairs

    root = case_pair.baseline.parents[2]
    got = load_worklist(root)
    pairs, _ = build_pairs(root, ("CT1", "T1", "T2", "FLAIR"))
    assert [c.case_id for c in got] == [p.id for p in pairs] and got
    assert got[0].followup == str(case_pair.followup) and got[0].label == pairs[0].label
    assert cases_from_lumiere(root) == got


# ------------------------------------------------------------------------------ store and session


def test_session_navigation_and_progress(tmp_path):
    store = ReviewStore(tmp_path / "r.db")
    s = ReviewSession(store, "alice", cases(4))
    assert s.current.case_id.startswith("P0") and s.previous() is None
    assert s.next().case_id.startswith("P1") and s.next().case_id.startswith("P2")
    assert s.previous().case_id.startswith("P1")
    s.go_to(3)
    assert s.next() is None and s.current.case_id.startswith("P3")
    s.go_to(cases(4)[0].case_id)
    s.save("SD", 3)
    s.go_to(2)
    s.save("PR", 4)
    assert s.progress() == (2, 4)
    assert s.first_unreviewed().case_id.startswith("P1") and s.index == 1
    # another reviewer's verdicts do not count as this reviewer's
    bob = ReviewSession(store, "bob")  # cases from the database, in worklist order
    assert [c.case_id for c in bob.cases] == [c.case_id for c in cases(4)]
    assert bob.first_unreviewed().case_id.startswith("P0") and bob.progress() == (0, 4)
    with pytest.raises(RANOInputError, match="not in the worklist"):
        s.go_to("nope")
    with pytest.raises(RANOInputError, match="reviewer"):
        ReviewSession(store, "  ")


def test_revisions_keep_history(tmp_path):
    store = ReviewStore(tmp_path / "r.db")
    s = ReviewSession(store, "alice", cases(2))
    first = s.save(None, 4, "agree", prediction=PRED, rule="PD")  # None: agree with the model
    assert first.label == "PD" and first.agree is True and first.model_label == "PD"
    assert first.bundle_id == "tiny-test" and first.model_probabilities == PRED["probabilities"]
    assert first.rule_category == "PD" and first.id is not None and first.created_at.endswith("+00:00")
    second = s.save("SD", 2, "second look: pseudoprogression", prediction=PRED)
    assert second.agree is False and second.supersedes == first.id
    assert s.verdict().id == second.id and s.verdict().label == "SD"
    assert [v.id for v in store.history(s.current.case_id)] == [first.id, second.id]
    assert [v.id for v in store.latest()] == [second.id]
    st = store.status()
    assert st["reviewers"]["alice"] == {"reviewed": 1, "disagree_with_model": 1, "revisions": 1}
    # rows cannot be bent by the schema either
    with pytest.raises(sqlite3.IntegrityError):
        store._connect().execute("INSERT INTO verdicts (case_id, reviewer, label, confidence, created_at) "
                                 "VALUES ('x', 'y', 'MR', 3, 'now')")


def test_verdict_validation(tmp_path):
    store = ReviewStore(tmp_path / "r.db")
    c = cases(1)[0]
    for kwargs, msg in [(dict(label="XX"), "label"), (dict(confidence=6), "confidence"),
                        (dict(reviewer=""), "reviewer")]:
        v = make_verdict(c, kwargs.get("reviewer", "alice"), kwargs.get("label", "PD"), kwargs.get("confidence", 3))
        with pytest.raises(RANOInputError, match=msg):
            store.save(v)
    with pytest.raises(RANOInputError, match="no prediction"):
        make_verdict(c, "alice", None, 3)  # agree, but nothing to agree with
    assert store.history() == []


def test_export_format(tmp_path):
    store = ReviewStore(tmp_path / "r.db")
    cs = cases(3)
    store.add_cases(cs)
    store.save(make_verdict(cs[0], "alice", "PD", 5, "clear growth, new lesion", PRED, "PD"))
    store.save(make_verdict(cs[0], "bob", "SD", 3, "", PRED, "PD"))
    store.save(make_verdict(cs[2], "alice", "CR", 4, "line1, with comma", None, None))
    store.save(make_verdict(cs[2], "alice", "PR", 4, "revised"))
    out = store.export_csv(tmp_path / "labels.csv")
    rows = read_csv(out)
    assert tuple(rows[0]) == EXPORT_COLUMNS
    assert [(r["case_id"], r["reviewer"], r["label"]) for r in rows] == [
        (cs[0].case_id, "alice", "PD"), (cs[0].case_id, "bob", "SD"), (cs[2].case_id, "alice", "PR")]
    a = rows[0]
    assert (a["patient"], a["baseline_week"], a["followup_week"]) == ("P0", "week-000", "week-010")
    assert a["agree"] == "1" and a["model_label"] == "PD" and a["bundle_id"] == "tiny-test"
    assert rows[1]["agree"] == "0" and rows[2]["agree"] == ""
    assert len(read_csv(store.export_csv(tmp_path / "all.csv", history=True))) == 4
    assert [r["reviewer"] for r in read_csv(store.export_csv(tmp_path / "bob.csv", reviewer="bob"))] == ["bob"]


def test_not_a_database(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(RANOInputError, match="junk.db"):
        ReviewStore(junk)
    with pytest.raises(RANOInputError, match="not found"):
        ReviewStore(tmp_path / "missing.db", create=False)


# ------------------------------------------------------------------------------ processes

WRITER = textwrap.dedent("""
    import sys
    from RANOResponseLib.review.store import ReviewStore, Verdict
    db, reviewer, n, ack, ncases = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    store = ReviewStore(db)
    labels = ("CR", "PR", "SD", "PD")
    with open(ack, "a", buffering=1) as fh:  # one line per acknowledged (committed) verdict
        i = 0
        while n < 0 or i < n:
            case = f"case-{i % ncases:03d}"
            v = store.save(Verdict(case, reviewer, labels[i % 4], 1 + i % 5, note=f"{reviewer} #{i}"))
            fh.write(f"{v.id}\\t{case}\\t{reviewer}\\t{v.label}\\t{v.note}\\n")
            i += 1
""")


def start_writer(tmp_path: Path, db: Path, reviewer: str, n: int, ncases: int = 50) -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    ack = tmp_path / f"ack-{reviewer}.tsv"
    proc = subprocess.Popen([sys.executable, str(script), str(db), reviewer, str(n), str(ack), str(ncases)],
                            stderr=subprocess.PIPE, text=True)
    return proc, ack


def acks(path: Path) -> list[tuple[str, ...]]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [tuple(line.split("\t")) for line in lines if line.count("\t") == 4]


def test_two_writers_at_once_lose_nothing(tmp_path):
    db = tmp_path / "shared.db"
    ReviewStore(db).close()
    procs = [start_writer(tmp_path, db, who, 100) for who in ("alice", "bob")]
    for proc, _ in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    acked = acks(procs[0][1]) + acks(procs[1][1])
    assert len(acked) == 200
    store = ReviewStore(db)
    history = {str(v.id): v for v in store.history()}
    assert len(history) == 200
    for vid, case, who, label, note in acked:
        v = history[vid]
        assert (v.case_id, v.reviewer, v.label, v.note) == (case, who, label, note)
    # each writer revised each of its 50 cases once: the export has its latest verdicts only
    rows = read_csv(store.export_csv(tmp_path / "labels.csv"))
    assert len(rows) == 100
    last = {}
    for vid, case, who, label, _ in acked:
        last[(case, who)] = (vid, label)
    assert {(r["case_id"], r["reviewer"]): (r["verdict_id"], r["label"]) for r in rows} == last
    assert all(v.supersedes is not None for v in history.values() if int(v.note.split("#")[1]) >= 50)


def test_killed_writer_loses_no_acknowledged_verdict(tmp_path):
    db = tmp_path / "shared.db"
    ReviewStore(db).close()
    victim, victim_ack = start_writer(tmp_path, db, "victim", -1)  # writes until killed
    other, other_ack = start_writer(tmp_path, db, "other", 60)
    deadline = time.monotonic() + 60
    while len(acks(victim_ack)) < 40 and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)  # mid-stream: likely inside a transaction
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    _, err = other.communicate(timeout=120)
    assert other.returncode == 0, err  # the killed writer left no lock behind
    acked = acks(victim_ack) + acks(other_ack)
    assert len(acks(victim_ack)) >= 40 and len(acks(other_ack)) == 60
    store = ReviewStore(db)
    assert store._connect().execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    exported = {r["verdict_id"]: r for r in read_csv(store.export_csv(tmp_path / "all.csv", history=True))}
    for vid, case, who, label, _ in acked:
        assert vid in exported, f"acknowledged verdict {vid} lost"
        assert (exported[vid]["case_id"], exported[vid]["reviewer"], exported[vid]["label"]) == (case, who, label)
    # and the database takes new verdicts
    assert store.save(Verdict("case-000", "victim", "SD", 3)).supersedes is not None


def test_wal_and_full_sync(tmp_path):
    store = ReviewStore(tmp_path / "r.db")
    conn = store._connect()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000


# ------------------------------------------------------------------------------ CLI


def test_cli_review(tmp_path, capsys):
    db = tmp_path / "r.db"
    (tmp_path / "wl.csv").write_text("baseline,followup\nP1/week-000,P1/week-010\n")
    pred = tmp_path / "pred"
    pred.mkdir()
    (pred / "prediction.json").write_text(__import__("json").dumps(PRED))
    assert cli_main(["review", "import", "--db", str(db), "--worklist", str(tmp_path / "wl.csv")]) == 0
    cid = "P1_week-000_week-010"
    assert cli_main(["review", "add", "--db", str(db), "--case-id", cid, "--reviewer", "alice", "--agree",
                     "--confidence", "4", "--prediction", str(pred), "--rule-category", "SD"]) == 0
    assert cli_main(["review", "add", "--db", str(db), "--case-id", cid, "--reviewer", "alice", "--label", "SD",
                     "--confidence", "2", "--note", "revised"]) == 0
    assert "revises" in capsys.readouterr().out
    assert cli_main(["review", "status", "--db", str(db)]) == 0
    assert "alice: 1 reviewed" in capsys.readouterr().out
    out = tmp_path / "labels.csv"
    assert cli_main(["review", "export", "--db", str(db), "--out", str(out)]) == 0
    rows = read_csv(out)
    assert [(r["case_id"], r["label"], r["note"]) for r in rows] == [(cid, "SD", "revised")]
    assert cli_main(["review", "add", "--db", str(db), "--case-id", "unknown", "--reviewer", "a", "--label", "PD",
                     "--confidence", "3"]) == 2
    assert "unknown" in capsys.readouterr().err
    assert cli_main(["review", "export", "--db", str(tmp_path / "none.db"), "--out", str(out)]) == 2
    assert "none.db: review database not found" in capsys.readouterr().err
