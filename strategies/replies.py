"""The one validator of every reply a site sends the server: training, evaluation and queries.

A reply is checked against the typed reply models of :mod:`biofp_core.protocol.replies` and the
wire table of what each message type may carry:

- an error reply (the ClientApp raised, the node went away) is *failed*, with Flower's reason;
- the content must hold exactly one MetricRecord under ``"metrics"`` (``protocol.METRICS_KEY``)
  that the reply type's model accepts (unknown keys, missing or non-finite values fail);
- besides it, an ArrayRecord under ``"arrays"`` exactly when the reply type carries arrays
  (:func:`biofp_core.protocol.arrays_entry`) and the site did not refuse; nothing else;
- a valid refusal is *refused*, anything else valid is *ok*.

What the arrays hold (decodable weights, a fingerprint file) is the caller's to check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from flwr.app import Message
from pydantic import ValidationError

from biofp_core.errors import one_line
from biofp_core.protocol import (
    ARRAYS_KEY,
    METRICS_KEY,
    QUERY_FINGERPRINT,
    QUERY_PROBE,
    EvaluateReplyMetrics,
    FingerprintReplyMetrics,
    ProbeReplyMetrics,
    TrainReplyMetrics,
    arrays_entry,
)

M = TypeVar(
    "M", TrainReplyMetrics, EvaluateReplyMetrics, FingerprintReplyMetrics, ProbeReplyMetrics
)
ReplyStatus = Literal["ok", "refused", "failed"]

_MAX_REASON_CHARS = 200
# The message type whose row of the wire table each reply model follows.
_MESSAGE_TYPE: dict[type, str] = {
    TrainReplyMetrics: "train",
    EvaluateReplyMetrics: "evaluate",
    FingerprintReplyMetrics: QUERY_FINGERPRINT,
    ProbeReplyMetrics: QUERY_PROBE,
}


def short_reason(err: Exception | str | None, limit: int = _MAX_REASON_CHARS) -> str:
    """A short one-line reason: pydantic errors per field, else the last non-empty line."""
    if isinstance(err, ValidationError):
        text = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'reply'}: {e['msg']}" for e in err.errors()
        )
    else:
        lines = [line.strip() for line in str(err or "no reason given").splitlines()]
        text = next((line for line in reversed(lines) if line), "no reason given")
    return one_line(text, limit)


@dataclass(frozen=True)
class CheckedReply(Generic[M]):
    """The verdict on one reply.

    Attributes
    ----------
    node_id : int
        The node that sent it.
    status : {"ok", "refused", "failed"}
        An answer, a valid refusal, or an error or malformed reply.
    metrics : M | None
        The parsed metrics, whenever they were valid (also for a reply failed for its records).
    reason : str | None
        One line, for a failed reply.
    """

    node_id: int
    status: ReplyStatus
    metrics: M | None = None
    reason: str | None = None


def check_reply(reply: Message, model: type[M]) -> CheckedReply[M]:
    """Validate one reply against `model` (one of the four reply models) and its records."""
    node_id = reply.metadata.src_node_id
    if reply.has_error():
        reason = f"error {reply.error.code}: {short_reason(reply.error.reason)}"
        return CheckedReply(node_id, "failed", reason=reason)
    content = reply.content
    records = list(content.metric_records.items())
    try:
        if len(records) != 1 or records[0][0] != METRICS_KEY:
            names = [name for name, _ in records]
            raise ValueError(f"expected one MetricRecord {METRICS_KEY!r}, got {names}")
        metrics = model.from_metrics(dict(records[0][1]))
    except ValueError as err:
        return CheckedReply(node_id, "failed", reason=f"invalid metrics: {short_reason(err)}")
    expected = {METRICS_KEY}
    if arrays_entry(_MESSAGE_TYPE[model]) is not None and not metrics.refused:
        expected.add(ARRAYS_KEY)
    if set(content.keys()) != expected or (
        ARRAYS_KEY in expected and ARRAYS_KEY not in content.array_records
    ):
        reason = f"invalid reply: records {sorted(content.keys())}, expected {sorted(expected)}"
        return CheckedReply(node_id, "failed", metrics, reason)
    return CheckedReply(node_id, "refused" if metrics.refused else "ok", metrics)
