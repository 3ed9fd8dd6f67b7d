"""Charged once, answered from the cache: every answer the ledger paid for (a training round's
update, a held-out loss, a fingerprint release, a probe) is kept at the site, so the same question
asked again (a resumed server, a replayed message) gets the very same answer, never a second noisy
draw for one charge.

``<state_dir>/replies/<run key>@<kind>@round-NNNN.safetensors`` (``:`` in a kind written ``@``;
``@`` is in neither a run key nor a kind, so two keys never share a file) is a sha256-checked
safetensors file (:mod:`biofp_core.checked_tensors`): the answer's arrays (none for a metrics-only
answer), and in its header the metrics, the sha256 of the global arrays and the instruction it
answered, and the ledger entry that paid for it. Asked again with the same global arrays and
instruction, the site sends it again; anything else under a charged key, or a charged key whose
answer is missing or corrupt, is refused (:class:`ReplayRefusedError`). Only the latest
:data:`ROUNDS_KEPT` training updates of a run are kept (a model each).

Checking, answering and caching happen under one lock per site (:func:`charging`), so the same
question asked twice at once is answered once and charged once.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from biofp_core.audit import arrays_sha256
from biofp_core.checked_tensors import read_checked, write_checked
from biofp_core.errors import ArtifactError, PrivacyBudgetError
from biofp_core.fsutil import exclusive_lock
from biofp_core.privacy.ledger import LedgerEntry
from client.session import SiteSession

log = logging.getLogger(__name__)

REPLIES_DIR = "replies"  # under the site's state folder
ROUNDS_KEPT = 4  # training updates kept per run key (the latest rounds)
_FORMAT = "biofp-charged-answer"
_NAME = re.compile(r"^(?P<key>.+)@(?P<kind>[^@]+)@round-(?P<round>\d{4,})\.safetensors$")


class ReplayRefusedError(PrivacyBudgetError):
    """A charged answer is asked for again, but its cached answer cannot be sent (other global
    arrays or instruction, or no valid cache): the site refuses rather than draw new noise."""


class _Header(BaseModel):
    """What a cached answer says about itself (its safetensors header)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["biofp-charged-answer"] = _FORMAT
    run_key: str
    kind: str
    server_round: int
    global_sha256: str = Field(description="sha256 of the global arrays it answered")
    instruction: str = Field(description="the instruction it answered, as canonical JSON")
    metrics: dict[str, int | float]
    ledger_entry: str = Field(description="hash of the ledger entry that paid for it")
    sha256: str = Field(description="sha256 of the answer's arrays")


@dataclass(frozen=True)
class Answer:
    """A charged answer: its metrics, its arrays (maybe none) and the entry that paid for it."""

    metrics: dict[str, int | float]
    arrays: dict[str, np.ndarray]
    charged: LedgerEntry


def instruction_json(config: Mapping) -> str:
    """An instruction as canonical JSON (what a cached answer answered)."""
    return json.dumps(dict(config), sort_keys=True, default=str)


def cache_path(state_dir: Path, run_key: str, kind: str, server_round: int) -> Path:
    """Where the answer charged under (run key, round, kind) is kept at a site."""
    name = kind.replace(":", "@")
    return Path(state_dir) / REPLIES_DIR / f"{run_key}@{name}@round-{server_round:04d}.safetensors"


@contextmanager
def charging(session: SiteSession) -> Iterator[None]:
    """Hold the site's lock for checking, answering and caching a charged question; the
    session's ledger is re-read inside it (another process may have charged meanwhile)."""
    with exclusive_lock(session.state_dir / REPLIES_DIR / ".lock"):
        session.ledger.reload()
        yield


def _changed(now: str, then: str) -> str:
    a, b = json.loads(now), json.loads(then)
    return ", ".join(
        f"{k} {a.get(k)!r}, charged for {b.get(k)!r}"
        for k in sorted({*a, *b})
        if a.get(k) != b.get(k)
    )


def answered_before(
    session: SiteSession, kind: str, *, global_arrays: Mapping[str, np.ndarray], instruction: str
) -> Answer | None:
    """The cached answer when (run key, round, `kind`) is already charged; None when it is not.
    Call it inside :func:`charging`.

    Raises
    ------
    ReplayRefusedError
        The key is charged but its answer is missing or corrupt, or answered other global
        arrays or another instruction.
    """
    run_key, server_round = session.run_key, session.server_round
    key = (run_key, server_round, kind)
    entry = next((e for e in session.ledger.entries if e.key == key), None)
    if entry is None:
        return None
    where = (
        f"site {session.site.name}: {kind} of round {server_round} of run {run_key} is already "
        "charged"
    )
    again = "answering again would draw new noise for one charge; refused"
    path = cache_path(session.state_dir, run_key, kind, server_round)
    header, arrays = None, {}
    if path.exists():
        try:
            header, arrays = read_checked(path, _Header, what="cached answer")
        except ArtifactError as exc:
            log.error("%s", exc)
    found = None if header is None else (header.run_key, header.server_round, header.kind)
    if found != key or header is None or header.ledger_entry != entry.hash:
        raise ReplayRefusedError(f"{where} but its answer is not cached ({path}); {again}")
    sha = arrays_sha256(global_arrays)
    if header.global_sha256 != sha:
        raise ReplayRefusedError(
            f"{where} and this asks again with other global weights (global arrays sha256 "
            f"{sha[:12]}, charged for {header.global_sha256[:12]}); {again}"
        )
    if header.instruction != instruction:
        changed = _changed(instruction, header.instruction)
        raise ReplayRefusedError(f"{where} and this asks again with another instruction "
                                 f"({changed}); {again}")  # fmt: skip
    log.info("%s: answered from the cache (sha256 %s), nothing charged", where, header.sha256[:12])
    return Answer(metrics=dict(header.metrics), arrays=arrays, charged=entry)


def keep_answer(
    session: SiteSession, kind: str, *, global_arrays: Mapping[str, np.ndarray], instruction: str,
    answer: Answer,
) -> Path:  # fmt: skip
    """Keep a charged answer (durably) for the same question asked again; a training update
    also drops the run's updates older than :data:`ROUNDS_KEPT` rounds."""
    run_key, server_round = session.run_key, session.server_round
    path = cache_path(session.state_dir, run_key, kind, server_round)
    header = _Header(
        run_key=run_key, kind=kind, server_round=server_round,
        global_sha256=arrays_sha256(global_arrays), instruction=instruction,
        metrics=dict(answer.metrics), ledger_entry=answer.charged.hash,
        sha256=arrays_sha256(answer.arrays),
    )  # fmt: skip
    write_checked(path, dict(answer.arrays), header)
    if kind == "train":
        for old in path.parent.glob(f"{run_key}@train@round-*.safetensors"):
            match = _NAME.match(old.name)
            if match is None or (match["key"], match["kind"]) != (run_key, "train"):
                continue
            if int(match["round"]) <= server_round - ROUNDS_KEPT:
                old.unlink(missing_ok=True)
    return path
