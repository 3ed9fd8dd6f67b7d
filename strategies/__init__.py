"""BioFP strategies: thin extensions of ``flwr.serverapp.strategy`` and their registry."""

from strategies.base import CountedFedAvg, RoundReplies
from strategies.budget_aware import BudgetAwareFedAvg, EligibleNodesGrid
from strategies.compressed import CompressedFedAvg, arrayrecord_to_encoded, encoded_to_arrayrecord
from strategies.registry import STRATEGIES, build_strategy, strategy_options

__all__ = [
    "STRATEGIES",
    "BudgetAwareFedAvg",
    "CompressedFedAvg",
    "CountedFedAvg",
    "EligibleNodesGrid",
    "RoundReplies",
    "arrayrecord_to_encoded",
    "build_strategy",
    "encoded_to_arrayrecord",
    "strategy_options",
]
