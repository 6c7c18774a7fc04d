"""Real full-head MRIs for tests, fetched at test time with pip and cached; never committed.

- S1 from the pycortex 1.4.0 source distribution (~70 MB): one subject's full-head T1
  (``filestore/db/S1/anatomicals/raw.nii.gz``, 256^3 at 1 mm, stored LIA) and its pial surfaces
  (``filestore/db/S1/surfaces/pia_{lh,rh}.gii``, in the image's scanner RAS millimetres). The
  licence of the data itself is unconfirmed: it is used in tests only.
- pydeface 2.1.0's mean head (``pydeface/data/mean_reg2mean.nii.gz`` in its wheel, MIT): an
  averaged full-head T1.

Files are cached in ``$RANO_RESPONSE_DATA_CACHE`` (default ``~/.cache/rano-response``), one folder
per package version. Concurrent test processes are safe: fetches of one package are serialised by
a lock file where the platform has ``fcntl``, each download goes to a private temporary folder, and
each extracted file is written under a temporary name and renamed onto its final name, so a reader
never sees a partial file. A failed fetch raises :class:`FetchError`: the test fails, it is not
skipped.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

from RANOResponseLib.core.files import atomic_file

try:  # POSIX; elsewhere the atomic renames alone keep concurrent fetches safe (some work twice)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

CACHE_ENV = "RANO_RESPONSE_DATA_CACHE"
PYCORTEX = ("pycortex", "1.4.0")
PYDEFACE = ("pydeface", "2.1.0")
S1_DIR = "pycortex-1.4.0/filestore/db/S1"
S1_HEAD = f"{S1_DIR}/anatomicals/raw.nii.gz"
S1_PIAL = (f"{S1_DIR}/surfaces/pia_lh.gii", f"{S1_DIR}/surfaces/pia_rh.gii")
PYDEFACE_HEAD = "pydeface/data/mean_reg2mean.nii.gz"
PIP_TIMEOUT_S = 600


class FetchError(RuntimeError):
    """A test data set could not be fetched or unpacked."""


def cache_dir() -> Path:
    """``$RANO_RESPONSE_DATA_CACHE``, else ``~/.cache/rano-response`` (created)."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rano-response")
    root.mkdir(parents=True, exist_ok=True)
    return root


def s1_head() -> Path:
    """S1's full-head T1 (NIfTI, 256^3, 1 mm, LIA)."""
    return _cached(PYCORTEX, [S1_HEAD], sdist=True)[0]


def s1_pial_surfaces() -> tuple[Path, Path]:
    """S1's left and right pial surfaces (GIFTI; vertices in the head image's scanner RAS mm)."""
    lh, rh = _cached(PYCORTEX, list(S1_PIAL), sdist=True)
    return lh, rh


def pydeface_head() -> Path:
    """pydeface's mean full-head T1, ``mean_reg2mean.nii.gz``."""
    return _cached(PYDEFACE, [PYDEFACE_HEAD], sdist=False)[0]


def _cached(package: tuple[str, str], members: list[str], sdist: bool) -> list[Path]:
    """The cached copies of ``members`` of the package's archive, fetching it when one is missing."""
    name, version = package
    folder = cache_dir() / f"{name}-{version}"
    targets = [folder / m for m in members]
    if all(t.is_file() for t in targets):
        return targets
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder / ".fetch.lock"):
        if not all(t.is_file() for t in targets):  # another process may have fetched it meanwhile
            with tempfile.TemporaryDirectory(prefix=".download-", dir=folder) as tmp:
                archive = _pip_download(name, version, Path(tmp), sdist)
                _extract(archive, members, folder)
    return targets


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as fh:
        if fcntl is not None:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _pip_download(name: str, version: str, dest: Path, sdist: bool) -> Path:
    """``pip download --no-deps`` one distribution (the sdist, or the wheel) into ``dest``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--no-input", "--quiet", "-d", str(dest), f"{name}=={version}"]
    cmd += ["--no-binary", name] if sdist else ["--only-binary", ":all:"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FetchError(f"{' '.join(cmd)}: {e}") from None
    files = [p for p in dest.iterdir() if p.is_file() and p.name.lower().startswith(name.lower())]
    if proc.returncode != 0 or len(files) != 1:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise FetchError(f"{' '.join(cmd)} failed (exit {proc.returncode}): {' | '.join(tail)}")
    return files[0]


def _extract(archive: Path, members: list[str], folder: Path) -> None:
    """Copy ``members`` of a .tar.gz or a wheel into ``folder`` (same relative paths), atomically."""
    try:
        if archive.name.endswith(".whl"):
            with zipfile.ZipFile(archive) as zf:
                for m in members:
                    with zf.open(m) as src:
                        _write(src, folder / m)
        else:
            with tarfile.open(archive, "r:gz") as tf:
                for m in members:
                    src = tf.extractfile(m)
                    if src is None:
                        raise KeyError(f"{m} is not a file")
                    with src:
                        _write(src, folder / m)
    except (KeyError, OSError, tarfile.TarError, zipfile.BadZipFile) as e:
        raise FetchError(f"{archive.name}: cannot extract ({e})") from None


def _write(src, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(target) as tmp, open(tmp, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
