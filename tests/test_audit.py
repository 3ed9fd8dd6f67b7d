"""The site's audit log of outgoing messages, array hashing, and `biofp site audit`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from fpkit import BIOFP

from biofp_core.audit import (
    AUDIT_FILENAME,
    AuditEntry,
    AuditLog,
    AuditLogError,
    arrays_nbytes,
    arrays_sha256,
)


def arrays() -> dict[str, np.ndarray]:
    return {
        "encoder.weight": np.arange(12, dtype=np.float32).reshape(4, 3) / 8 - 0.5,
        "encoder.bias": np.arange(4, dtype=np.float32),
        "step": np.array(7, dtype=np.int64),
    }


def entry(server_round: int, **kw: object) -> AuditEntry:
    fields = {
        "run_id": "run-a",
        "server_round": server_round,
        "message_type": "train",
        "payload_bytes": arrays_nbytes(arrays()),
        "arrays_sha256": arrays_sha256(arrays()),
        "metric_keys": ["num-examples", "loss", "epsilon"],
        "epsilon": 0.5 * server_round,
        **kw,
    }
    return AuditEntry.model_validate(fields)


def test_append_then_read_back(tmp_path: Path) -> None:
    log = AuditLog.at(tmp_path / "state")
    assert log.entries() == []
    first, second = entry(1), entry(2, message_type="evaluate", arrays_sha256=None, epsilon=None)
    log.append(first)
    line_1 = log.path.read_bytes()
    log.append(second)
    raw = log.path.read_bytes()
    assert raw.startswith(line_1) and raw.count(b"\n") == 2  # appended, never rewritten
    assert log.path.name == AUDIT_FILENAME
    assert AuditLog.at(tmp_path / "state").entries() == [first, second]
    assert json.loads(raw.splitlines()[0])["metric_keys"] == ["num-examples", "loss", "epsilon"]


def test_sha256_is_stable_and_sees_every_byte() -> None:
    base = arrays()
    digest = arrays_sha256(base)
    assert digest == arrays_sha256(dict(reversed(list(base.items()))))  # insertion order
    assert digest == arrays_sha256({k: v.copy() for k, v in base.items()})
    # pinned: the audit log's hashes must stay comparable across versions
    assert digest == "88ed326af7f027af5681ccc807708434e7b8c2666835a19c352e7cbc6efbfc5d"
    flipped = {k: v.copy() for k, v in base.items()}
    flipped["encoder.weight"].reshape(-1).view(np.uint8)[13] ^= 1
    renamed = {("decoder.bias" if k == "encoder.bias" else k): v for k, v in base.items()}
    reshaped = {**base, "encoder.weight": base["encoder.weight"].reshape(3, 4)}
    retyped = {**base, "encoder.bias": base["encoder.bias"].view(np.int32)}
    for other in (flipped, renamed, reshaped, retyped):
        assert arrays_sha256(other) != digest
    matrix = np.arange(12.0).reshape(3, 4)
    assert arrays_sha256({"m": matrix.T}) == arrays_sha256({"m": np.ascontiguousarray(matrix.T)})
    assert arrays_nbytes(base) == 4 * 3 * 4 + 4 * 4 + 8


def test_corrupt_line_is_named(tmp_path: Path) -> None:
    log = AuditLog.at(tmp_path)
    log.append(entry(1))
    torn = b'{"run_id": "run-a", "server_round": 2, "mess'
    with open(log.path, "ab") as fh:
        fh.write(torn)  # torn by a crash
    assert log.checked_entries() == [entry(1)]  # a torn last line: a crash
    log.append(entry(3))  # starts on its own line, not glued to the torn one, and says so
    lines = log.path.read_bytes().splitlines()
    assert len(lines) == 3
    assert AuditEntry.model_validate_json(lines[2]) == entry(3).model_copy(
        update={"after_torn_bytes": len(torn)}
    )
    assert log.checked_entries() == [entry(1), AuditEntry.model_validate_json(lines[2])]
    with pytest.raises(AuditLogError) as exc:
        log.entries()
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"{log.path}:2: corrupt audit entry")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "160"}
    return subprocess.run(
        [*BIOFP, *args], cwd=cwd, capture_output=True, text=True, timeout=60, env=env
    )


def test_cli_lists_the_audit_log(tmp_path: Path) -> None:
    res = run_cli("site", "audit", "--site-dir", str(tmp_path), cwd=tmp_path)
    assert res.returncode == 0 and "no outgoing message logged yet" in res.stdout
    log = AuditLog.at(tmp_path)
    log.append(entry(1))
    log.append(entry(2, run_id="run-b", note="fingerprint release"))
    res = run_cli("site", "audit", "--site-dir", str(tmp_path), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "run-b" in res.stdout and arrays_sha256(arrays())[:12] in res.stdout
    assert "1.000" in res.stdout  # ε of round 2
    res = run_cli("site", "audit", "--site-dir", str(tmp_path), "--json", cwd=tmp_path)
    assert [AuditEntry.model_validate(e) for e in json.loads(res.stdout)] == log.entries()
    res = run_cli("site", "audit", "--site-dir", str(tmp_path / "nope"), cwd=tmp_path)
    assert (
        res.returncode == 1
        and res.stderr.strip() == f"error: {tmp_path / 'nope'}: site folder not found"
    )


def test_an_unparseable_line_no_crash_explains_is_refused_by_checked_entries(
    tmp_path: Path,
) -> None:
    """Only a crash tears a line: an edited line in the middle (a charged message hidden from the
    ledger's cross-check) is refused; `readable_entries` still shows the rest, for display."""
    log = AuditLog.at(tmp_path)
    for n in (1, 2, 3):
        log.append(entry(n))
    log.path.write_bytes(log.path.read_bytes().replace(b'{"time"', b'x{"time"', 2))
    assert log.readable_entries() == [entry(3)]
    with pytest.raises(AuditLogError) as exc:
        log.checked_entries()
    assert "\n" not in str(exc.value) and "line 1 of 3" in str(exc.value)
