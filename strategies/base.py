"""The strategy base every BioFP strategy extends: Flower's FedAvg plus reply accounting and state.

Flower's simulation finishes "successfully" with zero results when every ClientApp raised, and a
site that refuses a round (privacy budget spent) still sends a reply. :class:`CountedFedAvg`
checks every training and evaluation reply with the one validator of :mod:`strategies.replies`
before Flower aggregates: error replies and malformed replies count as *failed*, refusals as
*refused*, sampled sites that never answered as *missing*; only the rest reaches Flower's
aggregation. Each reply is parsed once: the verdicts and the parsed metrics of each round are
kept in :attr:`CountedFedAvg.round_replies` (what the server's run report needs), and the counts
are added to the round's aggregated train MetricRecord, so they also land in Flower's ``Result``.

The state a strategy carries across rounds (FedAdam's moments, the budget-aware exclusions) is
the strategy's own: :meth:`CountedFedAvg.state_dict` and :meth:`CountedFedAvg.load_state_dict`
(cooperative: each class in the MRO adds and takes back its own entries; an entry no class
takes is an error).

To count replies with another Flower strategy, put this class first:
``class CountedFedProx(CountedFedAvg, FedProx)``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from biofp_core.protocol import (
    BYTES_RECEIVED,
    NODES_SAMPLED,
    REPLIES_FAILED,
    REPLIES_MISSING,
    REPLIES_OK,
    REPLIES_REFUSED,
    EvaluateReplyMetrics,
    TrainReplyMetrics,
)
from strategies.replies import check_reply, short_reason

logger = logging.getLogger(__name__)

JSONValue = Any  # what json.dumps accepts


@dataclass
class StrategyState:
    """A strategy's state across rounds, as :meth:`CountedFedAvg.state_dict` returns it.

    Attributes
    ----------
    arrays : dict[str, dict[str, np.ndarray]]
        Array state by entry (e.g. ``"m_t"`` -> tensor name -> array).
    values : dict[str, JSONValue]
        JSON-able state by entry (e.g. ``"excluded_node_ids"`` -> sorted node ids).
    """

    arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    values: dict[str, JSONValue] = field(default_factory=dict)

    def without(self, *entries: str) -> StrategyState:
        """A copy without `entries` (what a class hands on after taking its own)."""
        return StrategyState(
            arrays={k: v for k, v in self.arrays.items() if k not in entries},
            values={k: v for k, v in self.values.items() if k not in entries},
        )


@dataclass
class RoundReplies:
    """What came back from the sites in one round, each reply parsed once.

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
    metrics : dict[int, TrainReplyMetrics]
        The valid training metrics of every node that sent some, in reply order.
    bytes_received : int
        Array bytes of all replies with content, as Flower counts them.
    excluded : frozenset[int]
        Nodes no longer sampled for training after this round (budget-aware strategies).
    evaluated : dict[int, EvaluateReplyMetrics]
        The evaluation answers (held-out losses) of the round, by node.
    eval_failed : dict[int, str]
        Nodes whose evaluation reply was an error or malformed, with a one-line reason.
    """

    server_round: int
    sampled: frozenset[int] = frozenset()
    contributed: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    refused: list[int] = field(default_factory=list)
    metrics: dict[int, TrainReplyMetrics] = field(default_factory=dict)
    bytes_received: int = 0
    excluded: frozenset[int] = frozenset()
    evaluated: dict[int, EvaluateReplyMetrics] = field(default_factory=dict)
    eval_failed: dict[int, str] = field(default_factory=dict)

    @property
    def missing(self) -> list[int]:
        """Sampled nodes with no reply before the round's timeout."""
        replied = {*self.contributed, *self.failed, *self.refused}
        return sorted(self.sampled - replied)

    @property
    def budget_exhausted(self) -> list[int]:
        """Nodes that reported their privacy budget spent (contributing or refusing)."""
        return [n for n, m in self.metrics.items() if m.budget_exhausted]

    @property
    def epsilon(self) -> dict[int, float]:
        """Total ε each replying site reported (inf for a site without DP)."""
        return {n: m.epsilon for n, m in self.metrics.items()}

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


class CountedFedAvg(FedAvg):
    """Flower's FedAvg that validates, counts and reports training replies per round.

    Takes exactly the parameters of :class:`flwr.serverapp.strategy.FedAvg`.

    Attributes
    ----------
    round_replies : dict[int, RoundReplies]
        One record per round, filled by ``configure_train``, ``aggregate_train`` and
        ``aggregate_evaluate``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.round_replies: dict[int, RoundReplies] = {}

    # --- state across rounds -----------------------------------------------------------------

    def state_dict(self) -> StrategyState:
        """The state this strategy carries across rounds (none for FedAvg itself)."""
        return StrategyState()

    def load_state_dict(self, state: StrategyState) -> None:
        """Restore what :meth:`state_dict` returned, into a strategy built the same way.

        Raises
        ------
        ValueError
            `state` holds entries this strategy does not have (another kind of strategy).
        """
        unknown = sorted({*state.arrays, *state.values})
        if unknown:
            raise ValueError(
                f"strategy state {', '.join(unknown)} does not belong to {type(self).__name__}"
            )

    # --- training ----------------------------------------------------------------------------

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

        Errors, malformed replies and unusable arrays count as failed; refusals as refused. A
        contributing reply's content is replaced by its decoded form (full weights).
        """
        if not reply.has_error():
            arrays = reply.content.array_records.values()
            report.bytes_received += sum(r.count_bytes() for r in arrays)
        checked = check_reply(reply, TrainReplyMetrics)
        node_id = checked.node_id
        if checked.metrics is not None:
            report.metrics[node_id] = checked.metrics
        if checked.status == "failed":
            report.failed[node_id] = checked.reason or "invalid reply"
            return False
        if checked.status == "refused":
            report.refused.append(node_id)
            return False
        try:
            reply.content = self._decoded_content(reply.content)
        except ValueError as err:
            report.failed[node_id] = f"invalid arrays: {short_reason(err)}"
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

    # --- evaluation --------------------------------------------------------------------------

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Aggregate the answered evaluation replies; keep each answer in ``round_replies``.

        Refusals (``refused = 1``, no loss), errors and malformed replies are left out, so one
        refusing site never spoils the round's evaluation; failures are logged and kept.
        """
        report = self.round_replies.setdefault(server_round, RoundReplies(server_round))
        answered = []
        for reply in replies:
            checked = check_reply(reply, EvaluateReplyMetrics)
            if checked.status == "ok" and checked.metrics is not None:
                report.evaluated[checked.node_id] = checked.metrics
                answered.append(reply)
            elif checked.status == "failed":
                report.eval_failed[checked.node_id] = checked.reason or "invalid reply"
                logger.warning("round %d: node %d evaluation failed: %s", server_round,
                               checked.node_id, checked.reason)  # fmt: skip
        return super().aggregate_evaluate(server_round, answered)
