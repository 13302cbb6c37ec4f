"""Atomic file writes: a reader sees the old file or the complete new one, never a partial one; and
the check that a directory can take them."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable


def _umask() -> int:
    """The process's umask, read without changing it where Linux reports it (no window for other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, fsync, then rename over ``path`` (same directory, same filesystem).
    The file gets the permissions of any new file (0666 less the umask), not mkstemp's owner-only 0600,
    so results are as readable as the rest of the user's files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def atomic_write_json(path: str | Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def check_writable(directory: str | Path, key: str = "--out") -> None:
    """Make ``directory`` if missing, then ``nearest_writable``: a one-line ReftLabError unless files
    can be created there."""
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
    except OSError:
        pass  # nearest_writable names the reason
    nearest_writable(directory, key)


def nearest_writable(path: str | Path, key: str) -> None:
    """Raise a one-line ReftLabError unless a file can be created in ``path`` if it exists, else in
    its nearest existing ancestor (a directory that does not exist yet is made later, by whoever
    needs it). A probe, not permission bits: root passes those on read-only or immutable directories."""
    from reft_lab.errors import ReftLabError

    path = Path(path).absolute()
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    if not existing.is_dir():
        raise ReftLabError(f"{key}={path}: cannot write there ({existing} is not a directory): choose a writable directory")
    try:
        probe = tempfile.mkdtemp(prefix=".write-test-", dir=existing)
        os.rmdir(probe)
    except OSError as err:
        raise ReftLabError(f"{key}={path}: cannot write there ({err.strerror or err} in {existing}): choose a writable directory") from err
