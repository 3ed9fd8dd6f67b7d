"""Budget-aware sampling: stop sending training rounds to sites whose privacy budget is spent.

A site reports ``budget-exhausted = 1`` with its last affordable update, or refuses a round
(``refused = 1``) when it can no longer afford one (docs/privacy.md). :class:`BudgetAwareFedAvg`
excludes such sites (by node id) from every later training round, logs it, and lets the others
carry on. It samples through a view of the Grid that hides the excluded nodes, so Flower's own
sampling (fraction and minimum number of nodes) applies to the eligible sites only: once
exclusions leave fewer eligible sites than ``max(min_available_nodes, min_train_nodes)``, training
rounds are skipped with a warning (and count zero sampled sites) instead of waiting forever.
Evaluation rounds still reach every site: evaluating spends no training budget.

:class:`BudgetAware` is a mixin over any counted strategy: list it first, e.g.
``class BudgetAwareFedAdam(BudgetAware, CountedFedAdam)`` (:func:`strategies.registry.
strategy_class` composes them by name). :class:`BudgetAwareFedAvg` is the one over FedAvg (the
run config's shorthand ``strategy = "budget-aware"``). The exclusions are the strategy's state
across rounds (:meth:`BudgetAware.state_dict`), so a resumed run keeps them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from biofp_core.protocol import NODES_EXCLUDED
from strategies.base import CountedFedAvg, RoundReplies, StrategyState

logger = logging.getLogger(__name__)


class EligibleNodesGrid(Grid):
    """A view of a Grid that hides some node ids from sampling; everything else delegates.

    Parameters
    ----------
    grid : Grid
        The run's real Grid.
    excluded_node_ids : Iterable[int]
        Nodes that :meth:`get_node_ids` and :meth:`get_nodes` leave out.
    """

    def __init__(self, grid: Grid, excluded_node_ids: Iterable[int]) -> None:
        self._grid = grid
        self.excluded_node_ids = frozenset(excluded_node_ids)

    def set_run(self, run: Run) -> None:
        """Set the run of the underlying Grid."""
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        """Run information of the underlying Grid."""
        return self._grid.run

    def create_message(  # pylint: disable=too-many-arguments,R0917
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Create a message through the underlying Grid."""
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Node ids of the underlying Grid, less the excluded ones."""
        return [n for n in self._grid.get_node_ids() if n not in self.excluded_node_ids]

    def get_nodes(self) -> Iterable[NodeInfo]:
        """Node infos of the underlying Grid, less the excluded ones."""
        return [n for n in self._grid.get_nodes() if n.node_id not in self.excluded_node_ids]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push through the underlying Grid."""
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull through the underlying Grid."""
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send and receive through the underlying Grid."""
        return self._grid.send_and_receive(messages, timeout=timeout)


class BudgetAware(CountedFedAvg):
    """Mixin over a counted strategy: stop sampling sites which refused a round or spent their
    privacy budget.

    Takes the parameters of the strategy it is mixed into.

    Attributes
    ----------
    excluded_node_ids : set[int]
        Nodes no longer sent training rounds.
    """

    _STATE = "excluded_node_ids"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.excluded_node_ids: set[int] = set()

    def state_dict(self) -> StrategyState:
        """The parent's state plus the excluded node ids (sorted)."""
        state = super().state_dict()
        state.values[self._STATE] = sorted(self.excluded_node_ids)
        return state

    def load_state_dict(self, state: StrategyState) -> None:
        """Take back the excluded node ids; hand the rest to the parent."""
        node_ids = state.values.get(self._STATE, [])
        if not isinstance(node_ids, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) for n in node_ids
        ):
            raise ValueError(f"strategy state {self._STATE} is not a list of node ids")
        self.excluded_node_ids = set(node_ids)
        super().load_state_dict(state.without(self._STATE))

    def _enough_eligible(self, grid: Grid, eligible: Grid) -> bool:
        """False when the exclusions alone leave fewer sites than the minimums require.

        While nodes are still connecting (too few in the real Grid too), Flower's own sampling
        waits for them as usual.
        """
        needed = max(self.min_available_nodes, self.min_train_nodes)
        num_eligible = len(list(eligible.get_node_ids()))
        return num_eligible >= needed or len(list(grid.get_node_ids())) < needed

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure the round as the parent strategy does, over the eligible sites only."""
        eligible = EligibleNodesGrid(grid, self.excluded_node_ids)
        if self.excluded_node_ids and not self._enough_eligible(grid, eligible):
            logger.warning(
                "round %d: only %d sites have privacy budget left, fewer than the minimum "
                "(min_train_nodes=%d, min_available_nodes=%d); skipping training",
                server_round,
                len(list(eligible.get_node_ids())),
                self.min_train_nodes,
                self.min_available_nodes,
            )
            self.round_replies[server_round] = RoundReplies(
                server_round, excluded=frozenset(self.excluded_node_ids)
            )
            return []
        return super().configure_train(server_round, arrays, config, eligible)

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate as the parent strategy does; exclude exhausted and refusing sites."""
        arrays, metrics = super().aggregate_train(server_round, replies)
        report = self.round_replies[server_round]
        for node_id in sorted({*report.budget_exhausted, *report.refused}):
            if node_id not in self.excluded_node_ids:
                logger.info(
                    "round %d: node %d refused or spent its privacy budget; "
                    "it is no longer sampled for training",
                    server_round,
                    node_id,
                )
                self.excluded_node_ids.add(node_id)
        report.excluded = frozenset(self.excluded_node_ids)
        metrics = MetricRecord() if metrics is None else metrics
        metrics[NODES_EXCLUDED] = len(self.excluded_node_ids)
        return arrays, metrics


class BudgetAwareFedAvg(BudgetAware):
    """FedAvg that stops sampling sites which refused a round or spent their privacy budget.

    Takes exactly the parameters of :class:`flwr.serverapp.strategy.FedAvg`.
    """
