"""Every message that leaves a site: built here, checked against the protocol, and audited.

A training reply holds exactly one ArrayRecord (weights or encoded update) and one MetricRecord
whose keys are all allowed by :mod:`biofp_core.protocol`; an evaluation or probe reply holds only
the MetricRecord; a fingerprint reply one ArrayRecord (the released file's bytes) and the
MetricRecord. Nothing else can be sent: :class:`Replies` refuses to build a reply with any other
key. Each reply, error and refusal is appended to the site's audit log (time, run, round, type,
bytes, sha256 of the arrays, metric keys, ε) before it is returned to Flower. The run is the
server's run key (``protocol.RUN_KEY``, stable across a server restart), the key the ledger charges
under, or Flower's run id when the server sends none. A training reply the log already records as
sent (same run, round and arrays: a replayed round answered from the site's cache) is noted as a
replay.

Error replies say what kind of failure it was (no usable data, bad config...) but not its details:
paths and record names stay in the site's log and audit note.

Refusals: a site that cannot afford a round answers with a *content* reply, metrics only, with
``refused = 1`` and ``budget-exhausted = 1`` and no arrays. A content reply (rather than a
Message carrying an ``Error``) lets the site tell the server its ε and that its budget is spent,
which the budget-aware strategy uses to stop sampling it (a replay refusal,
``client.task.ReplayRefusedError``, says ``budget-exhausted = 0``); Flower's strategies aggregate
only the replies BioFP's counted strategies pass on, so a refusal never reaches the average. Real
failures (no usable data, a broken config, a bug) are ``Error`` replies with a one-line reason,
which Flower's strategies log and skip; the run goes on with the other sites.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from biofp_core.audit import AuditEntry, AuditLog, arrays_nbytes, arrays_sha256
from biofp_core.errors import ArtifactError, BioFPError, ConfigError, DataError
from biofp_core.privacy.ledger import PrivacyLedger, PrivacyLedgerError
from biofp_core.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    RUN_KEY,
    RUN_KEY_PATTERN,
    SERVER_ROUND,
    TrainReplyMetrics,
    is_allowed_reply_key,
)
from biofp_core.site import SiteConfig
from client.task import ReplayRefusedError

log = logging.getLogger(__name__)

_MAX_REASON = 300


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= _MAX_REASON else line[: _MAX_REASON - 3] + "..."


_PUBLIC_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (DataError, "the site has no usable data for this round"),
    (ConfigError, "the site's configuration or the run config is invalid"),
    (ArtifactError, "the global arrays or a site artifact are unusable"),
    (PrivacyLedgerError, "the site's privacy ledger is unreadable"),
    (BioFPError, "the site cannot take part in this round"),
)


def public_reason(exc: Exception) -> str:
    """What an Error reply may say about `exc`: its kind, never its details."""
    for kind, reason in _PUBLIC_REASONS:
        if isinstance(exc, kind):
            return f"{type(exc).__name__} at the site: {reason}"
    return f"internal error at the site ({type(exc).__name__})"


def _check_metric_keys(message_type: str, metrics: Mapping[str, int | float]) -> None:
    """Raise ValueError (a bug, not user input) if a metric key is not allowed to leave."""
    bad = [k for k in metrics if not is_allowed_reply_key(message_type, k)]
    if bad:
        raise ValueError(f"metric key(s) not allowed in a {message_type} reply: {bad}")


@dataclass
class Replies:
    """Builds and audits the replies to one instruction message.

    Parameters
    ----------
    message : Message
        The instruction being answered.
    context : Context
        The ClientApp's context (run id).
    site : SiteConfig | None
        The site's config, set once it is read; before that, replies cannot be audited.
    """

    message: Message
    context: Context
    site: SiteConfig | None = field(default=None)

    def _epsilon(self) -> float:
        """ε the site's whole ledger has spent, at the site's δ."""
        assert self.site is not None
        ledger = PrivacyLedger.at(self.site.resolved_state_dir())
        return ledger.epsilon(delta=self.site.privacy.delta)

    @property
    def server_round(self) -> int:
        config = self.message.content.config_records.get(CONFIG_KEY)
        value = config.get(SERVER_ROUND, 0) if config is not None else 0
        return int(value) if isinstance(value, int | float) else 0

    @property
    def run_key(self) -> str:
        """The run the ledger charges under: the server's run key, else Flower's run id."""
        config = self.message.content.config_records.get(CONFIG_KEY)
        value = config.get(RUN_KEY) if config is not None else None
        if isinstance(value, str) and re.match(RUN_KEY_PATTERN, value):
            return value
        return str(self.context.run_id)

    def _replay_note(self, sha256: str) -> str | None:
        """A note when the audit log already holds this very training reply (a replay)."""
        assert self.site is not None
        key = (self.run_key, self.server_round, self.message.metadata.message_type)
        for entry in _readable_entries(AuditLog.at(self.site.resolved_state_dir())):
            same = (entry.run_id, entry.server_round, entry.message_type) == key
            if same and entry.arrays_sha256 == sha256:
                return (
                    f"replay: this reply to round {self.server_round} was already sent at "
                    f"{entry.time}; sent again unchanged, nothing new trained or charged"
                )
        return None

    def _audit(
        self, arrays: Mapping[str, np.ndarray] | None, metric_keys: list[str], note: str | None
    ) -> None:
        if self.site is None:
            log.warning("reply not audited (site unknown): %s", note)
            return
        epsilon = self._epsilon()
        sha256 = arrays_sha256(arrays) if arrays else None
        if note is None and sha256 is not None:
            note = self._replay_note(sha256)
        AuditLog.at(self.site.resolved_state_dir()).append(
            AuditEntry(
                run_key=self.run_key,
                flower_run_id=self.context.run_id,
                server_round=self.server_round,
                message_type=self.message.metadata.message_type,
                payload_bytes=arrays_nbytes(arrays) if arrays else 0,
                arrays_sha256=sha256,
                metric_keys=sorted(metric_keys),
                epsilon=epsilon if math.isfinite(epsilon) else None,
                note=note,
            )
        )

    def content(
        self, metrics: Mapping[str, int | float], arrays: Mapping[str, np.ndarray] | None = None
    ) -> Message:
        """A reply with `metrics` (and `arrays`, for training) and nothing else; audited."""
        message_type = self.message.metadata.message_type
        _check_metric_keys(message_type, metrics)
        records = RecordDict({METRICS_KEY: MetricRecord(dict(metrics))})
        if arrays is not None:
            records[ARRAYS_KEY] = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
        self._audit(arrays, list(metrics), note=None)
        return Message(records, reply_to=self.message)

    def refusal(
        self, reason: BioFPError, metrics: Mapping[str, int | float] | None = None
    ) -> Message:
        """A metrics-only reply refusing the round (privacy budget, or a replay whose cached
        reply does not fit) or a query (`metrics`: the query's refusal); audited with the
        reason."""
        assert self.site is not None, "a refusal needs a known site"
        log.warning("%s", reason)
        if metrics is None:
            metrics = TrainReplyMetrics.refusal(
                budget_exhausted=not isinstance(reason, ReplayRefusedError),
                epsilon=self._epsilon(),
                delta=self.site.privacy.delta,
            ).to_metrics()
        _check_metric_keys(self.message.metadata.message_type, metrics)
        self._audit(None, list(metrics), note=_one_line(f"refused: {reason}"))
        records = RecordDict({METRICS_KEY: MetricRecord(dict(metrics))})
        return Message(records, reply_to=self.message)

    def error(self, exc: Exception) -> Message:
        """An Error reply with a one-line reason that names the kind of failure only.

        The full message (paths, record names) stays at the site, in its log and audit log:
        an error reply leaves the site like any other message.
        """
        detail = _one_line(f"{type(exc).__name__}: {exc}")
        if isinstance(exc, BioFPError):
            log.error("%s", detail)
        else:
            log.exception("unexpected error while handling a %s message", self.message.metadata)
        try:
            self._audit(None, [], note=f"error: {detail}")
        except BioFPError as audit_exc:
            log.error("audit failed: %s", audit_exc)
        reason = f"{public_reason(exc)}; details in the site's log and audit log"
        code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        return Message(Error(code=code, reason=reason), reply_to=self.message)


def _readable_entries(audit: AuditLog) -> list[AuditEntry]:
    """The entries of the audit log, skipping lines a crash tore (they are reported elsewhere)."""
    try:
        raw = audit.path.read_bytes()
    except FileNotFoundError:
        return []
    entries = []
    for line in raw.split(b"\n"):
        if line.strip():
            try:
                entries.append(AuditEntry.model_validate_json(line))
            except ValueError:
                continue
    return entries
