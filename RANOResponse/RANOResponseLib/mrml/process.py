"""Run a core command in a child process and follow its progress, without Qt.

The Slicer modules use this the way the deep-learning extensions do: inference and training run
in a separate Python process (the GUI stays responsive, a crash in torch cannot take Slicer down,
and cancel is a kill), and a timer in the widget calls :meth:`BackgroundRun.poll` to move the
progress bar. The class knows nothing about Qt, so pytest drives it exactly as the widget does.

Progress lines understood (stdout or stderr):

* ``[ 55.0%] registered``: what ``rano-response predict`` prints;
* one JSON object per line with a ``frac`` key (and any other keys): what
  ``rano-response train --progress-json`` prints;
* a tqdm bar, ``Patient-001:  33%|###  | 2/6 [00:41<...]``: what ``rano-response timeline`` prints
  (the child's output is read in text mode, so each ``\r`` redraw arrives as a line).
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

CORE_CLI = "RANOResponseLib.cli"  # the clinical core's commands (predict, measure, review, report)
_PERCENT = re.compile(r"^\[\s*(?P<pct>[0-9.]+)%\]\s*(?P<stage>.*)$")
_TQDM = re.compile(r"^(?P<desc>[^|]*?):?\s*(?P<pct>\d+)%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)")


@dataclass
class ProgressEvent:
    """One progress report from the child: a fraction in [0, 1], a short text, and raw fields."""

    frac: float
    text: str
    fields: dict = field(default_factory=dict)


def parse_progress(line: str) -> ProgressEvent | None:
    """A progress event from one output line, or ``None`` for any other line."""
    line = line.strip()
    m = _PERCENT.match(line)
    if m:
        return ProgressEvent(min(1.0, float(m["pct"]) / 100.0), m["stage"].strip())
    m = _TQDM.match(line)
    if m and int(m["total"]) > 0:
        text = f"{m['desc'].strip()}: {m['n']} of {m['total']} done".lstrip(": ")
        return ProgressEvent(min(1.0, int(m["n"]) / int(m["total"])), text)
    if line.startswith("{") and line.endswith("}"):
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            return None
        if isinstance(data, dict) and isinstance(data.get("frac"), (int, float)):
            text = str(data.get("text") or data.get("stage") or
                       " ".join(f"{k} {v}" for k, v in data.items() if k != "frac"))
            return ProgressEvent(min(1.0, max(0.0, float(data["frac"]))), text, data)
    return None


def package_folders(packages: Sequence[str]) -> list[str]:
    """The folders that hold the named top-level packages where this Python finds them now.

    A source checkout has them in the module folders (``RANOResponse/``, ``ResponseTraining/``), an
    installed extension in Slicer's ``qt-scripted-modules``, a pip install in ``site-packages``: the
    child gets the same folders on its path. Raises ImportError naming a package that is not found.
    """
    folders: list[str] = []
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"package {name} not found on this Python's path")
        folder = str(Path(next(iter(spec.submodule_search_locations))).resolve().parent)
        if folder not in folders:
            folders.append(folder)
    return folders


def core_command(python: str | None, *args: str, module: str = CORE_CLI,
                 packages: Sequence[str] = ()) -> list[str]:
    """The command line that runs ``<module>.main()`` with ``args`` in ``python``.

    ``module`` is the program: the clinical core's CLI by default, or a program above it (the
    ``rano-response`` command with the training commands is ``RANOResponseCLI``). The folders of
    ``module``'s own package and of ``packages`` (other top-level packages it needs, e.g.
    ``ResponseTrainingLib``) are put first on the child's path, found by :func:`package_folders`.
    Inside Slicer ``python`` is ``PythonSlicer``; None is this Python.
    """
    paths = package_folders([module.split(".")[0], *packages])
    boot = (f"import sys; sys.path[:0] = {paths!r}; "
            f"from importlib import import_module; sys.exit(import_module({module!r}).main())")
    return [python or sys.executable, "-c", boot, *args]


def slicer_python() -> str:
    """``PythonSlicer`` next to the running interpreter when there is one, else this Python."""
    found = shutil.which("PythonSlicer", path=os.path.dirname(sys.executable)) or shutil.which("PythonSlicer")
    return found or sys.executable


class BackgroundRun:
    """A child process whose output is collected by a reader thread and polled without blocking.

    ``cleanup`` lists paths removed when the run is cancelled or fails, so a cancelled run leaves
    nothing behind (the core also writes its outputs atomically, so a killed child never leaves a
    half-written output folder).
    """

    def __init__(self, command: Sequence[str], cwd: str | Path | None = None,
                 env: dict[str, str] | None = None, cleanup: Sequence[str | Path] = ()):
        self.command = list(command)
        self.cleanup = [Path(p) for p in cleanup]
        self.lines: list[str] = []
        self.progress = ProgressEvent(0.0, "starting")
        self.cancelled = False
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._started = time.monotonic()
        child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self._proc = subprocess.Popen(
            self.command, cwd=cwd, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, text=True, bufsize=1,
            start_new_session=(os.name != "nt"),  # its own process group: cancel kills workers too
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.poll()

    @property
    def running(self) -> bool:
        return self._proc.poll() is None

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def poll(self) -> list[ProgressEvent]:
        """New progress events since the last call (never blocks). Other lines go to ``lines``."""
        events = []
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                continue
            event = parse_progress(line)
            if event:
                events.append(event)
                self.progress = event
            else:
                self.lines.append(line)
        if self._proc.poll() not in (None, 0) and not self.cancelled:
            self._remove_outputs()
        return events

    def wait(self, timeout: float | None = None) -> int:
        """Block until the child ends (tests and headless use); returns its exit code."""
        code = self._proc.wait(timeout)
        self._reader.join(timeout=5)
        self.poll()
        return code

    def error_message(self) -> str:
        """The child's last ``error:`` line, or its last output line."""
        for line in reversed(self.lines):
            if line.startswith("error:"):
                return line[len("error:"):].strip()
        return self.lines[-1] if self.lines else f"exited with code {self.returncode}"

    def cancel(self, grace_s: float = 3.0) -> None:
        """Stop the child (and its workers), then remove ``cleanup`` paths."""
        self.cancelled = True
        if self.running:
            try:
                if os.name != "nt":
                    os.killpg(self._proc.pid, signal.SIGTERM)
                else:
                    self._proc.terminate()
                self._proc.wait(grace_s)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                if os.name != "nt":
                    try:
                        os.killpg(self._proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                else:
                    self._proc.kill()
                self._proc.wait()
        self._reader.join(timeout=5)
        self._remove_outputs()

    def _remove_outputs(self) -> None:
        for path in self.cleanup:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()
