"""Charged once, answered from the cache: a metrics-only answer the ledger paid for is kept at
the site, so the same question asked again gets the very same noisy answer, never a new draw.

``<state_dir>/replies/<run key>@<kind>@round-NNNN.json`` (``:`` in a kind written ``@``; ``@`` is
in neither a run key nor a kind, so two keys never share a file) holds the answer's metrics with
the sha256 of the global arrays and the instruction it answered; asked again with the same arrays
and instruction, the site sends it again; anything else under a charged key is refused
(:class:`ReplayRefusedError`): a second noisy answer for one charge would be unaccounted.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from biofp_core.errors import PrivacyBudgetError
from biofp_core.fsutil import atomic_write_text
from biofp_core.privacy.ledger import PrivacyLedger

REPLIES_DIR = "replies"  # under the site's state folder


class ReplayRefusedError(PrivacyBudgetError):
    """A charged answer is asked for again, but its cached answer cannot be sent (other global
    arrays or instruction, or no valid cache): the site refuses rather than draw new noise."""


class CachedAnswer(BaseModel):
    """A charged metrics-only answer, as cached at the site."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    global_sha256: str
    instruction: str
    metrics: dict[str, int | float]
    ledger_entry: str


def _path(state_dir: Path, run_key: str, kind: str, server_round: int) -> Path:
    name = kind.replace(":", "@")
    return Path(state_dir) / REPLIES_DIR / f"{run_key}@{name}@round-{server_round:04d}.json"


def cached_answer(
    state_dir: Path, *, run_key: str, kind: str, server_round: int, global_sha256: str,
    instruction: str,
) -> CachedAnswer | None:  # fmt: skip
    """The cached answer of a charged key; None when the key is not charged.

    Raises
    ------
    ReplayRefusedError
        The key is charged but its cache is missing, corrupt, or answers another question.
    """
    key = (run_key, server_round, kind)
    if not any(e.key == key for e in PrivacyLedger.at(state_dir).entries):
        return None
    where = f"{kind} of round {server_round} of run {run_key} is already charged"
    path = _path(state_dir, run_key, kind, server_round)
    try:
        cached = CachedAnswer.model_validate_json(path.read_bytes())
    except (OSError, ValidationError):
        raise ReplayRefusedError(
            f"{where} but its answer is not cached ({path.name}); answering again would draw "
            "new noise for one charge; refused"
        ) from None
    if (cached.global_sha256, cached.instruction) != (global_sha256, instruction):
        raise ReplayRefusedError(
            f"{where} for other global arrays or another instruction; answering again would "
            "draw new noise for one charge; refused"
        )
    return cached


def cache_answer(
    state_dir: Path, *, run_key: str, kind: str, server_round: int, answer: CachedAnswer
) -> None:
    """Keep a charged answer (durably) for the same question asked again."""
    path = _path(state_dir, run_key, kind, server_round)
    atomic_write_text(path, answer.model_dump_json())


def instruction_json(config: dict) -> str:
    """An instruction as canonical JSON (what a cached answer answered)."""
    return json.dumps(config, sort_keys=True, default=str)
