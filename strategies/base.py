"""The strategy base every BioFP strategy extends: Flower's FedAvg plus reply accounting.

Flower's simulation finishes "successfully" with zero results when every ClientApp raised, and a
site that refuses a round (privacy budget spent) still sends a reply. :class:`CountedFedAvg`
checks every training reply with one validator before Flower aggregates: error replies and
malformed replies count as *failed*, refusals as *refused*, sampled sites that never answered as
*missing*; only the rest reaches Flower's aggregation. The counts of each round are kept in
:attr:`CountedFedAvg.round_replies` (for the server's run report) and added to the round's
aggregated train MetricRecord, so they also land in Flower's ``Result``.

To count replies with another Flower strategy, put this class first:
``class CountedFedProx(CountedFedAvg, FedProx)``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from pydantic import ValidationError

from biofp_core.errors import one_line
from biofp_core.protocol import (
    BYTES_RECEIVED,
    NODES_SAMPLED,
    REFUSED,
    REPLIES_FAILED,
    REPLIES_MISSING,
    REPLIES_OK,
    REPLIES_REFUSED,
    TrainReplyMetrics,
)

logger = logging.getLogger(__name__)

_MAX_REASON_CHARS = 200


@dataclass
class RoundReplies:
    """What came back from the sites in one training round.

    Attributes
    ----------
    server_round : int
        The round, from 1.
    sampled : frozenset[int]
        Node ids sent a training instruction (empty if the round was not configured here).
    contributed : list[int]
        Nodes whose update went into the aggregate.
    failed : dict[int, str]
        Nodes whose reply was an error or unusable, with a one-line reason.
    refused : list[int]
        Nodes that refused the round (no update).
    budget_exhausted : list[int]
        Nodes that reported their privacy budget spent (contributing or refusing).
    epsilon : dict[int, float]
        Total ε each replying site reported (inf for a site without DP).
    bytes_received : int
        Array bytes of all replies with content, as Flower counts them.
    """

    server_round: int
    sampled: frozenset[int] = frozenset()
    contributed: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    refused: list[int] = field(default_factory=list)
    budget_exhausted: list[int] = field(default_factory=list)
    epsilon: dict[int, float] = field(default_factory=dict)
    bytes_received: int = 0

    @property
    def missing(self) -> list[int]:
        """Sampled nodes with no reply before the round's timeout."""
        replied = {*self.contributed, *self.failed, *self.refused}
        return sorted(self.sampled - replied)

    def to_metrics(self) -> dict[str, int]:
        """The round's counts under the protocol's metric keys."""
        return {
            NODES_SAMPLED: len(self.sampled),
            REPLIES_OK: len(self.contributed),
            REPLIES_FAILED: len(self.failed),
            REPLIES_REFUSED: len(self.refused),
            REPLIES_MISSING: len(self.missing),
            BYTES_RECEIVED: self.bytes_received,
        }


def _short_reason(err: Exception | str | None, limit: int = _MAX_REASON_CHARS) -> str:
    """A short one-line reason: pydantic errors per field, else the last non-empty line."""
    if isinstance(err, ValidationError):
        text = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'reply'}: {e['msg']}" for e in err.errors()
        )
    else:
        lines = [line.strip() for line in str(err or "no reason given").splitlines()]
        text = next((line for line in reversed(lines) if line), "no reason given")
    return one_line(text, limit)


def _reply_metrics(content: RecordDict) -> TrainReplyMetrics:
    """The validated metrics of a reply holding exactly one MetricRecord."""
    records = list(content.metric_records.values())
    if len(records) != 1:
        raise ValueError(f"expected one MetricRecord, got {len(records)}")
    return TrainReplyMetrics.from_metrics(dict(records[0]))


class CountedFedAvg(FedAvg):
    """Flower's FedAvg that validates, counts and reports training replies per round.

    Takes exactly the parameters of :class:`flwr.serverapp.strategy.FedAvg`.

    Attributes
    ----------
    round_replies : dict[int, RoundReplies]
        One record per training round, filled by ``configure_train`` and ``aggregate_train``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.round_replies: dict[int, RoundReplies] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure the round as the parent strategy does and remember who was sampled."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        sampled = frozenset(msg.metadata.dst_node_id for msg in messages)
        self.round_replies[server_round] = RoundReplies(server_round, sampled=sampled)
        return messages

    def _decode_reply_arrays(self, arrays: ArrayRecord) -> ArrayRecord:
        """Full model weights from a reply's arrays; raise ValueError if they are unusable.

        The base expects full weights and returns them as they are; subclasses that receive
        encoded updates decode them here.
        """
        if not arrays:
            raise ValueError("empty ArrayRecord")
        return arrays

    def _decoded_content(self, content: RecordDict) -> RecordDict:
        """The reply's content with its single ArrayRecord decoded into full weights."""
        array_records = list(content.array_records.items())
        if len(array_records) != 1:
            raise ValueError(f"expected one ArrayRecord, got {len(array_records)}")
        key, arrays = array_records[0]
        decoded = self._decode_reply_arrays(arrays)
        if decoded is arrays:
            return content
        return RecordDict({**dict(content.items()), key: decoded})

    def _check_reply(self, reply: Message, report: RoundReplies) -> bool:
        """Record one training reply in `report`; True if it goes into the aggregate.

        The one validator of replies: errors, malformed metrics and unusable arrays count as
        failed; refusals as refused. A contributing reply's content is replaced by its decoded
        form (full weights).
        """
        node_id = reply.metadata.src_node_id
        if reply.has_error():
            report.failed[node_id] = (
                f"error {reply.error.code}: {_short_reason(reply.error.reason)}"
            )
            return False
        content = reply.content
        report.bytes_received += sum(r.count_bytes() for r in content.array_records.values())
        try:
            metrics = _reply_metrics(content)
        except ValueError as err:
            report.failed[node_id] = f"invalid metrics: {_short_reason(err)}"
            return False
        report.epsilon[node_id] = metrics.epsilon
        if metrics.budget_exhausted:
            report.budget_exhausted.append(node_id)
        if metrics.refused:
            report.refused.append(node_id)
            return False
        try:
            reply.content = self._decoded_content(content)
        except ValueError as err:
            report.failed[node_id] = f"invalid arrays: {_short_reason(err)}"
            return False
        report.contributed.append(node_id)
        return True

    def _log_round(self, report: RoundReplies) -> None:
        """Log the round's counts; every failure and an empty round at WARNING."""
        logger.info(
            "round %d: %d of %d sampled sites contributed, %d failed, %d refused, %d missing",
            report.server_round,
            len(report.contributed),
            len(report.sampled),
            len(report.failed),
            len(report.refused),
            len(report.missing),
        )
        for node_id, reason in report.failed.items():
            logger.warning("round %d: node %d failed: %s", report.server_round, node_id, reason)
        for node_id in report.missing:
            logger.warning("round %d: node %d did not reply", report.server_round, node_id)
        if not report.contributed:
            logger.warning("round %d: no site contributed an update", report.server_round)

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the contributing replies as the parent strategy does; add the counts.

        Returns
        -------
        tuple[ArrayRecord | None, MetricRecord]
            The aggregate (None when no site contributed) and the aggregated metrics, which
            always include the round's reply counts.
        """
        report = self.round_replies.setdefault(server_round, RoundReplies(server_round))
        contributing = [reply for reply in replies if self._check_reply(reply, report)]
        self._log_round(report)
        arrays, metrics = super().aggregate_train(server_round, contributing)
        metrics = MetricRecord() if metrics is None else metrics
        for key, value in report.to_metrics().items():
            metrics[key] = value
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Aggregate the answered evaluation replies; refusals (``refused = 1``, no loss) and
        errors are left out, so one refusing site never spoils the round's evaluation."""
        answered = [
            reply for reply in replies
            if not reply.has_error()
            and all(not r.get(REFUSED) for r in reply.content.metric_records.values())
        ]  # fmt: skip
        return super().aggregate_evaluate(server_round, answered)
