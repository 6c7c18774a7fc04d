"""The one device policy, used by the CLI, the Slicer module, the web station and training.

- ``cpu`` is always the CPU.
- ``auto`` picks a CUDA device when one is present with enough free memory, and otherwise
  falls back to the CPU with a notice (never silently).
- An explicit device (``cuda``, ``cuda:N``) that is absent, or a spec that is malformed, is an
  error (:class:`DeviceError`), never a silent switch to the CPU.

torch is imported lazily so that the Slicer module can show the device menu before PyTorch is
installed.
"""

from __future__ import annotations

import re
import sys
from typing import Any, Callable

from RANOResponseLib.core.errors import DeviceError

AUTO, CPU = "auto", "cpu"
_SPEC = re.compile(r"^(auto|cpu|cuda(?::(\d+))?)$")
_USAGE = "use auto, cpu, cuda or cuda:N"
NEEDED_GIB = 2.0  # one prediction with maps on the shipped grid needs well under this


def parse_device(spec: str | None) -> tuple[str, int | None]:
    """``spec`` -> ``(kind, index)``; kind is auto, cpu or cuda. Malformed -> DeviceError."""
    text = (spec or AUTO).strip().lower()
    m = _SPEC.match(text)
    if not m:
        raise DeviceError(f"--device {spec}: unknown device ({_USAGE})")
    kind = m.group(1).partition(":")[0]
    return kind, (int(m.group(2)) if m.group(2) is not None else None)


def _cuda() -> Any | None:
    """torch.cuda when torch is importable and CUDA usable, else None."""
    try:
        import torch

        return torch.cuda if torch.cuda.is_available() else None
    except Exception:  # no torch yet, or a broken CUDA install: the CPU still works
        return None


def choose_device(requested: str | None = AUTO, needed_gib: float = NEEDED_GIB) -> tuple[str, str | None]:
    """The device to run on as text (``cpu`` or ``cuda:N``) and a notice for the user, or None.

    The notice explains an ``auto`` fallback to the CPU, or warns that an explicitly chosen GPU
    has less free memory than one prediction needs (it is used anyway: the user asked for it).
    """
    kind, index = parse_device(requested)
    if kind == CPU:
        return CPU, None
    cuda = _cuda()
    if cuda is None:
        if kind == AUTO:
            return CPU, "notice: no CUDA device available; running on the CPU"
        raise DeviceError(f"--device {requested}: CUDA was requested but no CUDA device is available")
    if index is None:
        index = cuda.current_device()
    elif index >= cuda.device_count():
        raise DeviceError(f"--device {requested}: no such CUDA device ({cuda.device_count()} available)")
    try:
        free_gib = cuda.mem_get_info(index)[0] / 2**30
    except RuntimeError as e:  # a device that cannot even report its memory cannot run the model
        if kind == AUTO:
            return CPU, f"notice: cuda:{index} unusable ({e}); running on the CPU"
        raise DeviceError(f"--device {requested}: CUDA unusable ({e})") from e
    if free_gib < needed_gib:
        if kind == AUTO:
            return CPU, (f"notice: cuda:{index} has only {free_gib:.1f} GiB free (needs about "
                         f"{needed_gib:.1f}); running on the CPU")
        return f"cuda:{index}", (f"warning: cuda:{index} has only {free_gib:.1f} GiB free (needs about "
                                 f"{needed_gib:.1f}); it may run out of memory")
    return f"cuda:{index}", None


def resolve_device(spec: str | None = AUTO, notice: Callable[[str], None] | None = None,
                   needed_gib: float = NEEDED_GIB):
    """:func:`choose_device` as a ``torch.device``; the notice goes to ``notice`` (stderr)."""
    import torch

    device, message = choose_device(spec, needed_gib)
    if message:
        (notice or (lambda msg: print(msg, file=sys.stderr)))(message)
    return torch.device(device)


def gpu_choices() -> list[tuple[str, str]]:
    """``(device, label)`` pairs for a device menu: auto, each CUDA device with its free memory, cpu."""
    choices = [(AUTO, "auto (GPU if available)")]
    cuda = _cuda()
    if cuda is not None:
        try:
            for i in range(cuda.device_count()):
                free, total = cuda.mem_get_info(i)
                choices.append((f"cuda:{i}", f"cuda:{i}  {cuda.get_device_name(i)}  "
                                             f"({free / 2**30:.1f} of {total / 2**30:.1f} GiB free)"))
        except RuntimeError:  # a broken CUDA install must not break the menu; auto/cpu still work
            pass
    choices.append((CPU, CPU))
    return choices
