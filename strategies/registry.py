"""Strategies by name: Flower's own (with BioFP's reply accounting) and BioFP's two extensions.

Every strategy here is a real ``flwr.serverapp.strategy`` object (``isinstance`` of Flower's
class) whose training replies are validated and counted per round (:mod:`strategies.base`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from flwr.serverapp.strategy import FedAdam, FedProx, FedTrimmedAvg, FedYogi, Krum, Strategy

from biofp_core.errors import ConfigError
from strategies.base import CountedFedAvg
from strategies.budget_aware import BudgetAwareFedAvg
from strategies.compressed import CompressedFedAvg


class CountedFedProx(CountedFedAvg, FedProx):
    """Flower's FedProx (sends ``proximal-mu``) with per-round reply accounting."""


class CountedFedAdam(CountedFedAvg, FedAdam):
    """Flower's FedAdam (server-side Adam on the averaged update) with reply accounting."""


class CountedFedYogi(CountedFedAvg, FedYogi):
    """Flower's FedYogi (server-side Yogi on the averaged update) with reply accounting."""


class CountedFedTrimmedAvg(CountedFedAvg, FedTrimmedAvg):
    """Flower's FedTrimmedAvg (coordinate-wise trimmed mean, ``beta``) with reply accounting."""


class CountedKrum(CountedFedAvg, Krum):
    """Flower's Krum (``num_malicious_nodes``) with per-round reply accounting."""


STRATEGIES: dict[str, type[CountedFedAvg]] = {
    "fedavg": CountedFedAvg,
    "fedprox": CountedFedProx,
    "fedadam": CountedFedAdam,
    "fedyogi": CountedFedYogi,
    "trimmed-mean": CountedFedTrimmedAvg,
    "krum": CountedKrum,
    "compressed": CompressedFedAvg,
    "budget-aware": BudgetAwareFedAvg,
}


def strategy_options(cls: type[Strategy]) -> list[str]:
    """Names of the keyword options a strategy class accepts.

    Walks the MRO from `cls` while each ``__init__`` forwards ``**kwargs`` to its parent, so
    it stops at the first constructor that does not (e.g. Krum's, which hides MultiKrum's).
    """
    names: list[str] = []
    for klass in cls.__mro__:
        init: Callable[..., Any] | None = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        for param in params:
            is_named = param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)
            if is_named and param.name != "self" and param.name not in names:
                names.append(param.name)
        if not any(param.kind is param.VAR_KEYWORD for param in params):
            break
    return names


def build_strategy(name: str, **options: Any) -> Strategy:
    """Build the strategy registered under `name` with keyword `options`.

    Parameters
    ----------
    name : str
        One of :data:`STRATEGIES` (e.g. ``"fedavg"``, ``"compressed"``).
    **options : Any
        Constructor options of that strategy (e.g. ``min_train_nodes=3``, ``proximal_mu=0.1``,
        ``scheme="fp16"``).

    Returns
    -------
    Strategy
        The strategy, ready for ``strategy.start(grid=..., initial_arrays=...)``.

    Raises
    ------
    ConfigError
        Unknown name, unknown option, or an option value the strategy rejects.
    """
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; valid: {', '.join(STRATEGIES)}")
    cls = STRATEGIES[name]
    valid = strategy_options(cls)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(
            f"strategy {name!r} has no option(s) {', '.join(unknown)}; valid: {', '.join(valid)}"
        )
    try:
        return cls(**options)
    except ValueError as err:  # e.g. FedTrimmedAvg's beta outside [0, 0.5)
        raise ConfigError(f"strategy {name!r}: {err}") from err
