"""Every message that leaves a site: built here, checked against the protocol, and audited.

This is the one place where BioFP's rule for what leaves a site is enforced. A reply may carry only
the keys of its message type in :data:`biofp_core.protocol.REPLY_KEYS` (the table of
``docs/privacy.md``), and a reply carrying patient-derived values (arrays, losses, probe scalars)
must come with the ledger entry that paid for them, charged under this message's run key; anything
else raises (a bug, never sent). Each reply, refusal and error is appended to the site's audit log
(time, run key, round, type, bytes, sha256 of the arrays, metric keys, ε, the paying ledger entry)
before it is returned to Flower; the ledger later checks that every entry the audit log names is
still in its chain.

Error replies carry one fixed public reason per kind of failure (the run config or the
instruction is invalid, the site's state is unusable, or "the site cannot answer"), never details:
paths, record names and whether the site's data was usable stay in the audit log.

Refusals: a site that will not answer (budget, a limit it pinned, a replay it cannot resend)
answers with a *content* reply, metrics only, ``refused = 1``; ``budget-exhausted = 1`` only when
what the site has spent is what refuses the round.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from pydantic import ValidationError

from biofp_core.audit import AuditEntry, arrays_nbytes, arrays_sha256
from biofp_core.errors import BioFPError, ConfigError, one_line
from biofp_core.privacy.ledger import LedgerEntry, PrivacyLedgerError
from biofp_core.protocol import (
    ARRAYS_KEY,
    METRICS_KEY,
    arrays_entry,
    reply_key,
)
from client.session import SiteSession, message_run_key

log = logging.getLogger(__name__)


def public_reason(exc: Exception) -> str:
    """What an Error reply may say about `exc`: one fixed sentence per kind, never details.

    Only failures that do not depend on patient data are told apart: an invalid run config or
    instruction (the server's own input) and an unusable ledger (the site's state); anything
    else, data problems included, is "the site cannot answer".
    """
    if isinstance(exc, ConfigError | ValidationError):
        return "the run config or the instruction is invalid at this site"
    if isinstance(exc, PrivacyLedgerError):
        return "the site's privacy ledger refuses every charged action until it is restored"
    return "the site cannot answer this message"


def _check_reply(
    message_type: str, metrics: Mapping[str, int | float], arrays: object, charged: bool
) -> None:
    """Raise ValueError (a bug, not user input) unless every key may leave, and every
    patient-derived value comes with its ledger entry."""
    rows = {k: reply_key(message_type, k) for k in metrics}
    bad = sorted(k for k, row in rows.items() if row is None)
    if bad:
        raise ValueError(f"metric key(s) not allowed in a {message_type} reply: {bad}")
    if arrays is not None:
        row = arrays_entry(message_type)
        if row is None:
            raise ValueError(f"a {message_type} reply carries no arrays")
        rows["<arrays>"] = row
    unpaid = sorted(k for k, row in rows.items() if row is not None and row.charged and not charged)
    if unpaid:
        raise ValueError(f"{message_type} reply: {unpaid} sent without a ledger charge")


@dataclass
class Replies:
    """Builds and audits the replies to one instruction message.

    Parameters
    ----------
    message : Message
        The instruction being answered.
    context : Context
        The ClientApp's context (run id).
    session : SiteSession | None
        The message's site session (config, run key, ledger, audit log), set once the site's
        config is read; before that, replies cannot be audited.
    """

    message: Message
    context: Context
    session: SiteSession | None = field(default=None)

    def _replay_note(self, session: SiteSession, sha256: str) -> str | None:
        """A note when the audit log already holds this very training reply (a replay)."""
        key = (session.run_key, session.server_round, self.message.metadata.message_type)
        for entry in session.audit.readable_entries():
            same = (entry.run_id, entry.server_round, entry.message_type) == key
            if same and entry.arrays_sha256 == sha256:
                return (
                    f"replay: this reply to round {session.server_round} was already sent at "
                    f"{entry.time}; sent again unchanged, nothing new trained or charged"
                )
        return None

    def _audit(
        self, arrays: Mapping[str, np.ndarray] | None, metric_keys: list[str], note: str | None,
        charged: LedgerEntry | None = None,
    ) -> None:  # fmt: skip
        session = self.session
        if session is None:
            log.warning("reply not audited (site unknown): %s", note)
            return
        try:
            epsilon = session.epsilon()
        except BioFPError:  # an unreadable ledger: the line is still written
            epsilon = math.nan
        sha256 = arrays_sha256(arrays) if arrays else None
        if note is None and sha256 is not None:
            note = self._replay_note(session, sha256)
        session.audit.append(
            AuditEntry(
                run_key=session.run_key,
                flower_run_id=self.context.run_id,
                server_round=session.server_round,
                message_type=self.message.metadata.message_type,
                payload_bytes=arrays_nbytes(arrays) if arrays else 0,
                arrays_sha256=sha256,
                metric_keys=sorted(metric_keys),
                epsilon=epsilon if math.isfinite(epsilon) else None,
                note=note,
                ledger_entry=charged.hash if charged is not None else None,
            )
        )

    def content(
        self, metrics: Mapping[str, int | float], arrays: Mapping[str, np.ndarray] | None = None,
        *, charged: LedgerEntry | None = None,
    ) -> Message:  # fmt: skip
        """A reply with `metrics` (and `arrays`) and nothing else; audited.

        `charged` is the ledger entry that paid for the reply's patient-derived values, charged
        under this message's run key (the table in :data:`~biofp_core.protocol.REPLY_KEYS`
        says which keys need one).
        """
        message_type = self.message.metadata.message_type
        run_key = message_run_key(self.message, self.context)
        paid = charged is not None and charged.run_id == run_key
        _check_reply(message_type, metrics, arrays, paid)
        records = RecordDict({METRICS_KEY: MetricRecord(dict(metrics))})
        if arrays is not None:
            records[ARRAYS_KEY] = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
        self._audit(arrays, list(metrics), note=None, charged=charged)
        return Message(records, reply_to=self.message)

    def refusal(self, reason: BioFPError, metrics: Mapping[str, int | float]) -> Message:
        """A metrics-only reply refusing the message (`metrics`: its type's refusal); audited
        with the reason, which stays at the site."""
        assert self.session is not None, "a refusal needs a known site"
        log.warning("%s", reason)
        _check_reply(self.message.metadata.message_type, metrics, None, False)
        self._audit(None, list(metrics), note=one_line(f"refused: {reason}"))
        records = RecordDict({METRICS_KEY: MetricRecord(dict(metrics))})
        return Message(records, reply_to=self.message)

    def error(self, exc: Exception) -> Message:
        """An Error reply with a one-line reason that names the kind of failure only.

        The full message (paths, record names) stays at the site, in its log and audit log:
        an error reply leaves the site like any other message.
        """
        detail = one_line(f"{type(exc).__name__}: {exc}")
        if isinstance(exc, BioFPError):
            log.error("%s", detail)
        else:
            log.exception("unexpected error while handling a %s message", self.message.metadata)
        try:
            self._audit(None, [], note=f"error: {detail}")
        except Exception as audit_exc:  # e.g. a read-only state folder: the reply still goes
            log.error("audit failed: %s", one_line(str(audit_exc)))
        reason = f"{public_reason(exc)}; details in the site's log and audit log"
        code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        return Message(Error(code=code, reason=reason), reply_to=self.message)
