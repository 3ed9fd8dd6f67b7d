"""Durable file writes, the only place BioFP calls ``os.fsync``: atomic replacement (a reader
sees the old file or the new one, never half of either), fsync'ed appends, and an exclusive lock
file for work that must not run twice at once."""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from biofp_core.errors import BioFPError


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all_synced(fd: int, data: bytes) -> None:
    """Write all of `data` to the open descriptor `fd` and fsync it (an append-only log, a file
    created exclusively); the caller opens and closes `fd`."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def write_temp(target: Path, data: bytes, *, mode: int = 0o600) -> Path:
    """`data` in a fsync'ed temporary file next to `target` (same folder, so a rename onto
    `target` is atomic), created with mode 0600 and then given `mode`; its path."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}-", suffix=".tmp", dir=target.parent)
    try:
        try:
            write_all_synced(fd, data)
        finally:
            os.close(fd)
        if mode != 0o600:
            os.chmod(tmp, mode)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write `data` to `path` durably: a temporary file in the same folder, fsync, os.replace,
    then fsync of the folder, so after a crash the file is the old one or the new one. The file
    never has a wider mode than `mode`, not even briefly."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = write_temp(path, data, mode=mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
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


def read_if_present(path: Path, what: str, error: type[BioFPError]) -> bytes | None:
    """The bytes of `path` (a `what`, e.g. 'run key'); None when there is no such file; `error`
    in one line naming the file when it exists but cannot be read."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise error(f"{path}: cannot read the {what}: {exc.strerror}") from None
