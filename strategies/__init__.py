"""BioFP strategies: thin extensions of ``flwr.serverapp.strategy``, their mixins and registry."""

from strategies.base import CountedFedAvg, RoundReplies, StrategyState
from strategies.budget_aware import BudgetAware, BudgetAwareFedAvg, EligibleNodesGrid
from strategies.compressed import Compressed, CompressedFedAvg, arrayrecord_to_encoded
from strategies.registry import (
    STRATEGIES,
    build_strategy,
    run_strategy,
    strategy_class,
    strategy_options,
)
from strategies.replies import CheckedReply, check_reply

__all__ = [
    "STRATEGIES",
    "BudgetAware",
    "BudgetAwareFedAvg",
    "CheckedReply",
    "Compressed",
    "CompressedFedAvg",
    "CountedFedAvg",
    "EligibleNodesGrid",
    "RoundReplies",
    "StrategyState",
    "arrayrecord_to_encoded",
    "build_strategy",
    "check_reply",
    "run_strategy",
    "strategy_class",
    "strategy_options",
]
