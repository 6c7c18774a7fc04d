"""The background-process runner the Slicer widgets poll: progress, errors, cancel, device choice.

These run the real ``rano-response predict`` in a child process, exactly as the widget does."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import cli_env
from RANOResponseLib.mrml.process import BackgroundRun, core_command, parse_progress


def test_parse_progress_formats():
    assert parse_progress("[ 55.0%] registered").frac == pytest.approx(0.55)
    assert parse_progress("[ 55.0%] registered").text == "registered"
    ev = parse_progress(json.dumps({"frac": 0.25, "fold": 1, "epoch": 3, "loss": 0.7}))
    assert ev.frac == pytest.approx(0.25) and ev.fields["epoch"] == 3
    assert parse_progress("label: PD") is None
    assert parse_progress("{not json}") is None
    assert parse_progress(json.dumps({"loss": 1.0})) is None  # no fraction: not progress


def _predict_cmd(case_pair, bundle, out: Path, *extra: str) -> list[str]:
    return core_command(None, "predict", "--baseline", str(case_pair.baseline), "--followup",
                        str(case_pair.followup), "--out", str(out), "--bundle", str(bundle),
                        "--device", "cpu", *extra)


def test_run_reports_progress_and_finishes(tmp_path, case_pair, tiny_bundle):
    out = tmp_path / "run" / "result"
    run = BackgroundRun(_predict_cmd(case_pair, tiny_bundle, out), env=cli_env(), cleanup=[tmp_path / "run"])
    seen = []
    deadline = time.monotonic() + 240
    while run.running and time.monotonic() < deadline:
        seen += run.poll()
        time.sleep(0.05)
    assert run.wait(10) == 0, run.lines
    seen += run.poll()
    fracs = [e.frac for e in seen]
    assert fracs and fracs == sorted(fracs), fracs
    assert fracs[-1] == pytest.approx(1.0)
    assert any(line.startswith("label:") for line in run.lines)
    summary = json.loads((out / "prediction.json").read_text())
    assert summary["device"] == "cpu"


def test_failed_run_gives_the_cli_error_and_cleans_up(tmp_path, case_pair, tiny_bundle):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cmd = core_command(None, "predict", "--baseline", str(case_pair.baseline), "--followup",
                       str(tmp_path / "no-such-study"), "--out", str(run_dir / "result"),
                       "--bundle", str(tiny_bundle), "--device", "cpu")
    run = BackgroundRun(cmd, env=cli_env(), cleanup=[run_dir])
    assert run.wait(120) == 2
    assert "no-such-study" in run.error_message()
    assert not run_dir.exists()


def test_cancel_kills_the_child_and_leaves_nothing(tmp_path, case_pair, tiny_bundle):
    run_dir = tmp_path / "run"
    out = run_dir / "result"
    run = BackgroundRun(_predict_cmd(case_pair, tiny_bundle, out), env=cli_env(), cleanup=[run_dir])
    deadline = time.monotonic() + 120
    while run.running and not run.poll() and time.monotonic() < deadline:
        time.sleep(0.02)  # wait for the first progress line: the child is mid-run
    assert run.running, "the child finished before it could be cancelled"
    run.cancel()
    assert not run.running and run.returncode != 0
    assert run.cancelled
    assert not run_dir.exists() and not out.exists()

