"""The background-process runner the Slicer widgets poll: progress, errors, cancel, device choice.

These run the real ``rano-response predict`` in a child process, exactly as the widget does."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from RANOResponseLib.process import BackgroundRun, choose_device, core_command, parse_progress

from conftest import cli_env


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


def test_choose_device_falls_back_to_cpu(monkeypatch):
    import torch

    assert choose_device("cpu") == ("cpu", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device("auto") == ("cpu", None)
    device, warning = choose_device("cuda:0")
    assert device == "cpu" and "no CUDA" in warning
    # a GPU with too little free memory: fall back with a warning that says how much is free
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (int(0.5 * 2**30), 8 * 2**30))
    device, warning = choose_device("auto", needed_gib=2.0)
    assert device == "cpu" and "0.5 GiB free" in warning
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (6 * 2**30, 8 * 2**30))
    assert choose_device("cuda:0", needed_gib=2.0) == ("cuda:0", None)
