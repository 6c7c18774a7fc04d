"""The background-process runner the Slicer widgets poll: progress, errors, cancel, device choice.

These run the real ``rano-response predict`` in a child process, exactly as the widget does."""

from __future__ import annotations

import json
import subprocess
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



# ------------------------------------------------------------------------------ core_command


def _write_package(root: Path, name: str, files: dict[str, str]) -> None:
    (root / name).mkdir(parents=True)
    for file, text in {"__init__.py": "", **files}.items():
        (root / name / file).write_text(text)


def _bare_env() -> dict[str, str]:
    """This environment without PYTHONPATH: the child finds packages only where the command says."""
    env = cli_env()
    env.pop("PYTHONPATH", None)
    return env


def test_core_command_puts_the_packages_own_folders_on_the_path():
    import RANOResponseLib

    cmd = core_command("/opt/PythonSlicer", "predict", "--help")
    assert cmd[0] == "/opt/PythonSlicer" and cmd[-2:] == ["predict", "--help"]
    assert repr([str(Path(RANOResponseLib.__file__).resolve().parents[1])]) in cmd[2]
    assert "import_module('RANOResponseLib.cli').main()" in cmd[2]


def test_core_command_runs_a_named_program_from_wherever_its_packages_are(tmp_path, monkeypatch):
    """Two packages in two unrelated folders (an installed extension's layout is not a checkout's):
    the child, started elsewhere with no PYTHONPATH, finds both because the command names them."""
    _write_package(tmp_path / "ext", "toolpkg_xq", {"cli.py": (
        "import sys\n"
        "def main():\n"
        "    from helperpkg_xq import answer\n"
        "    print('args', sys.argv[1:], 'answer', answer)\n"
        "    return 3\n")})
    _write_package(tmp_path / "other", "helperpkg_xq", {"__init__.py": "answer = 42\n"})
    monkeypatch.syspath_prepend(str(tmp_path / "ext"))
    monkeypatch.syspath_prepend(str(tmp_path / "other"))
    cmd = core_command(None, "a", "b", module="toolpkg_xq.cli", packages=("helperpkg_xq",))
    out = subprocess.run(cmd, cwd=tmp_path, env=_bare_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 3, out.stderr
    assert out.stdout.strip() == "args ['a', 'b'] answer 42"
    without = subprocess.run(core_command(None, module="toolpkg_xq.cli"), cwd=tmp_path, env=_bare_env(),
                             capture_output=True, text=True, timeout=60)
    assert without.returncode == 1 and "No module named 'helperpkg_xq'" in without.stderr


def test_core_command_names_a_package_it_cannot_find():
    with pytest.raises(ImportError, match="package no_such_pkg_xq not found"):
        core_command(None, "predict", module="no_such_pkg_xq.cli")


def test_the_training_commands_run_through_the_program_above_both_libs():
    """The training module starts ``train`` through RANOResponseCLI (the core's CLI has no train)."""
    cmd = core_command(None, "train", "--help", module="RANOResponseCLI", packages=("ResponseTrainingLib",))
    out = subprocess.run(cmd, env=_bare_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--progress-json" in out.stdout
    core = subprocess.run(core_command(None, "train", "--help"), env=_bare_env(), capture_output=True,
                          text=True, timeout=120)
    assert core.returncode == 2 and "invalid choice: 'train'" in core.stderr
