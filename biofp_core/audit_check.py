"""The five consistency checks of a site's audit log against its privacy ledger.

``biofp site audit --check`` runs them (docs/hospital-it.md lists the same five):

1. ``ledger``: every training reply with arrays has a ledger entry of the same run and round, and
   every training charge in the ledger has its audit line;
2. ``metric-keys``: every line names only metric keys its message type may send
   (:func:`biofp_core.protocol.is_allowed_reply_key`);
3. ``payload``: within one run, every training reply with arrays has the same payload size;
4. ``epsilon``: ε never decreases from line to line, and the last one equals the ledger's ε;
5. ``notes``: refusals and errors (training replies without arrays, replies without metrics)
   carry a note with the reason.

Each violation is one line naming the check and the audit line (1-based, as in the file).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict

from biofp_core.audit import AuditEntry
from biofp_core.fingerprints.release import RELEASE_MESSAGE
from biofp_core.privacy.ledger import LedgerEntry
from biofp_core.protocol import is_allowed_reply_key

CHECKS = ("ledger", "metric-keys", "payload", "epsilon", "notes")
EPSILON_TOLERANCE = 1e-6  # relative: ε is recomputed, not copied


class Violation(BaseModel):
    """One failed check."""

    model_config = ConfigDict(frozen=True)

    check: str
    line: int | None  # audit line (1-based), None for a ledger entry without its audit line
    problem: str

    def __str__(self) -> str:
        where = f"audit line {self.line}" if self.line is not None else "ledger"
        return f"{self.check}: {where}: {self.problem}"


def _is_train(entry: AuditEntry) -> bool:
    return entry.message_type.partition(".")[0] == "train"


def _each_line(
    audit: list[AuditEntry], check: str, problem: Callable[[AuditEntry], str | None]
) -> list[Violation]:
    """A violation of `check` for each audit line whose `problem` is not None."""
    lines = ((i, problem(e)) for i, e in enumerate(audit, start=1))
    return [Violation(check=check, line=i, problem=p) for i, p in lines if p is not None]


def check_ledger_links(audit: list[AuditEntry], ledger: list[LedgerEntry]) -> list[Violation]:
    """Check 1: training replies with arrays and training charges match one to one."""
    charged = {(e.run_id, e.server_round) for e in ledger if e.kind == "train"}
    sent: set[tuple[str, int]] = set()
    out = []
    for i, e in enumerate(audit, start=1):
        if _is_train(e) and e.arrays_sha256:
            sent.add((e.run_key, e.server_round))
            if (e.run_key, e.server_round) not in charged:
                out.append(Violation(check="ledger", line=i, problem=(
                    f"update of run {e.run_key} round {e.server_round} has no ledger entry"
                )))  # fmt: skip
    for run, rnd in sorted(charged - sent):
        out.append(Violation(check="ledger", line=None, problem=(
            f"charge of run {run} round {rnd} has no audit line with an update"
        )))  # fmt: skip
    return out


def check_metric_keys(audit: list[AuditEntry]) -> list[Violation]:
    """Check 2: only allowed metric keys per message type."""

    def problem(e: AuditEntry) -> str | None:
        if e.message_type == RELEASE_MESSAGE:  # a file written at the site: its keys are columns
            return None
        bad = [k for k in e.metric_keys if not is_allowed_reply_key(e.message_type, k)]
        return f"{e.message_type} reply named key(s) not allowed: {', '.join(bad)}" if bad else None

    return _each_line(audit, "metric-keys", problem)


def check_payload(audit: list[AuditEntry]) -> list[Violation]:
    """Check 3: one payload size per run for training replies with arrays."""
    first: dict[str, int] = {}
    out = []
    for i, e in enumerate(audit, start=1):
        if not (_is_train(e) and e.arrays_sha256):
            continue
        size = first.setdefault(e.run_key, e.payload_bytes)
        if e.payload_bytes != size:
            out.append(Violation(check="payload", line=i, problem=(
                f"run {e.run_key}: {e.payload_bytes} bytes, earlier updates {size}"
            )))  # fmt: skip
    return out


def check_epsilon(audit: list[AuditEntry], ledger_epsilon: float) -> list[Violation]:
    """Check 4: ε never decreases; the last ε logged equals the ledger's."""
    out = []
    previous, last_line = 0.0, None
    for i, e in enumerate(audit, start=1):
        if e.epsilon is None:
            continue
        if e.epsilon < previous * (1 - EPSILON_TOLERANCE):
            out.append(Violation(check="epsilon", line=i, problem=(
                f"ε {e.epsilon:.6g} is below the {previous:.6g} of an earlier line"
            )))  # fmt: skip
        previous, last_line = max(previous, e.epsilon), i
    finite = last_line is not None and math.isfinite(ledger_epsilon)
    if finite and not math.isclose(previous, ledger_epsilon, rel_tol=1e-3, abs_tol=1e-9):
        out.append(Violation(check="epsilon", line=last_line, problem=(
            f"last ε logged {previous:.6g} differs from the ledger's {ledger_epsilon:.6g}"
        )))  # fmt: skip
    return out


def check_notes(audit: list[AuditEntry]) -> list[Violation]:
    """Check 5: refusals and errors carry their reason."""

    def problem(e: AuditEntry) -> str | None:
        refusal_or_error = (_is_train(e) and not e.arrays_sha256) or not e.metric_keys
        if refusal_or_error and not (e.note and e.note.strip()):
            return f"{e.message_type} reply without arrays or metrics has no note (reason)"
        return None

    return _each_line(audit, "notes", problem)


def check_audit(
    audit: list[AuditEntry], ledger: list[LedgerEntry], *, ledger_epsilon: float
) -> list[Violation]:
    """All five checks, in the order of :data:`CHECKS`."""
    return [
        *check_ledger_links(audit, ledger),
        *check_metric_keys(audit),
        *check_payload(audit),
        *check_epsilon(audit, ledger_epsilon),
        *check_notes(audit),
    ]
