"""Atomic writes: files and output folders that appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

from RANOResponseLib.core.errors import RANOInputError


@contextlib.contextmanager
def atomic_file(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffixes, so writers pick the right format);
    once the block succeeds it is renamed onto ``path``, on error it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{''.join(path.suffixes)}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(text: str, path: Path | str) -> Path:
    """Write a text file atomically (temporary name, fsync, rename)."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    return Path(path)


@contextlib.contextmanager
def atomic_output_dir(out: Path | str, owned: Sequence[str] = ()) -> Iterator[Path]:
    """Yield a private staging folder; on success its files move into ``out``.

    On any error the staging folder is removed and ``out`` is left as it was (not created
    if it did not exist), so a failed run leaves no partial output behind. Files named in
    ``owned`` that the new run did not produce are removed from ``out``, so a re-run into the
    same folder never leaves a previous run's outputs beside the new ones.
    """
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not out.is_dir():
        raise RANOInputError(f"{out}: exists and is not a folder")
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield stage
        if not out.exists():
            os.replace(stage, out)
            return
        produced = {p.name for p in stage.iterdir()}
        for p in sorted(stage.iterdir()):
            target = out / p.name
            if p.is_dir() and target.exists():
                _replace_dir(p, target)
                continue
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(p, target)
        for name in set(owned) - produced:
            stale = out / name
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _replace_dir(src: Path, dst: Path) -> None:
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)
