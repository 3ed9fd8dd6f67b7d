"""Atomic file writes (a reader sees the old file or the new one, never half of either) and an
exclusive lock file for work that must not run twice at once."""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` durably: a temporary file in the same folder, fsync, os.replace,
    then fsync of the folder, so after a crash the file is the old one or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on `path` (created if needed) for the ``with`` block.

    Processes (and threads, each opening its own file) wait for each other; the lock goes with
    the file handle, so a crashed holder never leaves it taken.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _file_in_the_way(path: Path) -> Path | None:
    """The first existing ancestor of `path` that is not a folder, if any."""
    for parent in reversed(Path(path).absolute().parents):
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def check_output_file(path: Path, *, what: str = "output file") -> Path:
    """`path` if a file can be written there; ConfigError (one line) naming the problem.

    Checked before any work, so a command that would charge privacy or run for minutes fails
    first and writes nothing.
    """
    from biofp_core.errors import ConfigError

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; give the path of the {what}")
    blocker = _file_in_the_way(path)
    if blocker is not None:
        raise ConfigError(f"{path}: {blocker} is a file, not a folder")
    return path


def check_output_dir(path: Path, *, what: str = "output folder") -> Path:
    """`path` if it is, or can become, a folder; ConfigError (one line) naming the problem."""
    from biofp_core.errors import ConfigError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path}: exists and is not a folder; give a path for the {what}")
    blocker = _file_in_the_way(path)
    if blocker is not None:
        raise ConfigError(f"{path}: {blocker} is a file, not a folder")
    return path
