"""The site's audit log: one JSON line per outgoing message, appended and fsync'ed, never rewritten.

The log lives at ``<state_dir>/audit.jsonl``. Each line is an `AuditEntry`: when, which run
(BioFP's run key, and Flower's run id of the message) and round, what kind of message, how many
bytes, the sha256 of the arrays sent (`arrays_sha256`), the names of the metrics sent (never
their values) and the ε spent at the time. Appends take an exclusive `fcntl.flock` on the log
itself, so two processes never interleave a line; a line torn by a crash stays alone on its line
(and is reported by `AuditLog.entries`), the next entry starts on a fresh one and records the torn
line's length (`after_torn_bytes`). `AuditLog.checked_entries` (what the privacy ledger trusts)
refuses any other unparseable line: only a crash tears a line, and only the last one;
`readable_entries` skips every unparseable line, for display only.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from biofp_core.errors import BioFPError, first_error
from biofp_core.fsutil import fsync_path, write_all_synced

AUDIT_FILENAME = "audit.jsonl"


class AuditLogError(BioFPError):
    """The audit log cannot be read, or one of its lines is corrupt."""


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class AuditEntry(BaseModel):
    """One outgoing message, as the site saw it leave."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    time: str = Field(default_factory=_utc_now, description="UTC ISO 8601")
    run_key: str = Field(
        validation_alias=AliasChoices("run_key", "run_id"),  # "run_id" in logs before 2026-12
        description="BioFP's run key (the coordinator's run.json), or Flower's run id when the "
        "server sent none; the 'run' of the privacy ledger",
    )
    flower_run_id: int | None = Field(
        None, ge=0, description="Flower's run id (flwr ls) of the message answered"
    )
    server_round: int = Field(ge=0)
    message_type: str = Field(min_length=1, description="e.g. 'train', 'evaluate', 'query'")
    payload_bytes: int = Field(ge=0)
    arrays_sha256: str | None = Field(pattern=r"^[0-9a-f]{64}$")
    metric_keys: list[str]
    epsilon: float | None = Field(ge=0, description="ε spent by the site when it was sent")
    note: str | None = None
    ledger_entry: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="hash of the ledger entry that paid for it"
    )
    after_torn_bytes: int | None = Field(
        None, ge=1, description="length of the line a crash tore just before this one"
    )

    @property
    def run_id(self) -> str:
        """The run key (the field's name before it was ``run_key``)."""
        return self.run_key


class AuditLog:
    """The append-only audit log at `path` (JSON lines)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def at(cls, state_dir: Path) -> AuditLog:
        """The audit log in a site's state folder (`SiteConfig.resolved_state_dir()`)."""
        return cls(Path(state_dir) / AUDIT_FILENAME)

    def append(self, entry: AuditEntry) -> None:
        """Append one line and fsync it before returning."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            line = entry.model_dump_json().encode() + b"\n"
            if size and os.pread(fd, 1, size - 1) != b"\n":
                # the last line was torn by a crash: do not glue onto it, and say so
                torn = entry.model_copy(update={"after_torn_bytes": _torn_tail(fd, size)})
                line = b"\n" + torn.model_dump_json().encode() + b"\n"
            write_all_synced(fd, line)
        finally:
            os.close(fd)  # also releases the lock
        if created:
            fsync_path(self.path.parent)

    def entries(self) -> list[AuditEntry]:
        """Every entry, oldest first; [] when nothing was logged yet.

        Raises
        ------
        AuditLogError
            Naming the file and line of the first line that is not a valid entry.
        """
        out = []
        for lineno, line in enumerate(self._read().split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                out.append(AuditEntry.model_validate_json(line))
            except ValidationError as exc:
                reason = first_error(exc, "line")
                raise AuditLogError(
                    f"{self.path}:{lineno}: corrupt audit entry ({reason})"
                ) from None
        return out

    def checked_entries(self) -> list[AuditEntry]:
        """Every entry, for the privacy ledger: an unparseable line is allowed only where a crash
        can leave one (the last line, or a line the next entry says a crash tore).

        Raises
        ------
        AuditLogError
            Naming the file and line of the first unparseable line that no crash explains.
        """
        lines = [line for line in self._read().split(b"\n") if line.strip()]
        out = []
        for number, line in enumerate(lines, start=1):
            try:
                out.append(AuditEntry.model_validate_json(line))
                continue
            except ValueError:
                pass
            last = number == len(lines)
            following = _parsed(lines[number]) if not last else None
            if not last and (following is None or following.after_torn_bytes != len(line)):
                raise AuditLogError(
                    f"{self.path}: line {number} of {len(lines)} is not an audit entry and no "
                    "crash tore it (edited?)"
                )
        return out

    def _read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return b""
        except OSError as exc:
            raise AuditLogError(f"{self.path}: cannot read the audit log: {exc.strerror}") from None

    def readable_entries(self) -> list[AuditEntry]:
        """Every entry that parses, skipping any other line: for display only (the privacy
        ledger trusts :meth:`checked_entries`)."""
        out = []
        for line in self._read().split(b"\n"):
            if line.strip():
                try:
                    out.append(AuditEntry.model_validate_json(line))
                except ValueError:
                    continue
        return out


def _parsed(line: bytes) -> AuditEntry | None:
    try:
        return AuditEntry.model_validate_json(line)
    except ValueError:
        return None


def _torn_tail(fd: int, size: int) -> int:
    """Bytes after the last newline of the file open at `fd` (of `size` bytes)."""
    end, chunk = size, 1 << 16
    while end > 0:
        start = max(0, end - chunk)
        newline = os.pread(fd, end - start, start).rfind(b"\n")
        if newline >= 0:
            return size - (start + newline + 1)
        end = start
    return size


def arrays_sha256(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 of named arrays: names in sorted order, each with its dtype, shape and bytes.

    Stable across processes and insertion order; the memory layout does not matter (C order is
    hashed), byte order does (it is part of the dtype).
    """
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.asarray(arrays[name])
        if array.dtype.hasobject:
            raise ValueError(f"array {name!r} has dtype object: its bytes are not its values")
        header = json.dumps([name, array.dtype.str, list(array.shape), array.nbytes]).encode()
        digest.update(len(header).to_bytes(8, "little") + header)
        digest.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    return digest.hexdigest()


def arrays_nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Total size of the arrays' data in bytes."""
    return sum(int(np.asarray(a).nbytes) for a in arrays.values())
