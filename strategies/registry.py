"""Strategies by name: Flower's own (with BioFP's reply accounting), composed with BioFP's two
mixins (compression, budget-aware sampling) on request.

Every strategy here is a real ``flwr.serverapp.strategy`` object (``isinstance`` of Flower's
class) whose training replies are validated and counted per round (:mod:`strategies.base`) and
whose state across rounds is :meth:`~strategies.base.CountedFedAvg.state_dict`.
:func:`strategy_class` composes any base with :class:`~strategies.compressed.Compressed` and
:class:`~strategies.budget_aware.BudgetAware` (e.g. budget-aware FedAdam over int8 updates); the
names ``"compressed"`` and ``"budget-aware"`` are shorthands for FedAvg with one of them.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.serverapp.strategy import FedAdam, FedProx, FedTrimmedAvg, FedYogi, Krum, Strategy

from biofp_core.errors import ConfigError
from biofp_core.protocol import RunConfig
from strategies.base import CountedFedAvg, StrategyState
from strategies.budget_aware import BudgetAware, BudgetAwareFedAvg
from strategies.compressed import Compressed, CompressedFedAvg


class FedOptMoments(CountedFedAvg):
    """Mixin for Flower's FedOpt family: its moments ``m_t`` and ``v_t`` are the state."""

    _MOMENTS = ("m_t", "v_t")  # dict[str, np.ndarray] | None, set by FedOpt's aggregate_train

    def state_dict(self) -> StrategyState:
        """The parent's state plus the moments that exist so far (copies)."""
        state = super().state_dict()
        for name in self._MOMENTS:
            moments = getattr(self, name, None)
            if moments:
                state.arrays[name] = {k: np.array(v, copy=True) for k, v in moments.items()}
        return state

    def load_state_dict(self, state: StrategyState) -> None:
        """Take back the moments (None where the state has none); hand the rest on."""
        for name in self._MOMENTS:
            moments = state.arrays.get(name)
            setattr(self, name, {k: v.copy() for k, v in moments.items()} if moments else None)
        super().load_state_dict(state.without(*self._MOMENTS))


class CountedFedProx(CountedFedAvg, FedProx):
    """Flower's FedProx (sends ``proximal-mu``) with per-round reply accounting."""


class CountedFedAdam(FedOptMoments, FedAdam):
    """Flower's FedAdam (server-side Adam on the averaged update) with reply accounting."""


class CountedFedYogi(FedOptMoments, FedYogi):
    """Flower's FedYogi (server-side Yogi on the averaged update) with reply accounting."""


class CountedFedTrimmedAvg(CountedFedAvg, FedTrimmedAvg):
    """Flower's FedTrimmedAvg (coordinate-wise trimmed mean, ``beta``) with reply accounting."""


class CountedKrum(CountedFedAvg, Krum):
    """Flower's Krum (``num_malicious_nodes``) with per-round reply accounting."""


# The base strategies, and the shorthands: name -> (base, compressed, budget-aware).
BASES: dict[str, type[CountedFedAvg]] = {
    "fedavg": CountedFedAvg,
    "fedprox": CountedFedProx,
    "fedadam": CountedFedAdam,
    "fedyogi": CountedFedYogi,
    "trimmed-mean": CountedFedTrimmedAvg,
    "krum": CountedKrum,
}
SHORTHANDS: dict[str, tuple[str, bool, bool]] = {
    "compressed": ("fedavg", True, False),
    "budget-aware": ("fedavg", False, True),
}
STRATEGIES: dict[str, type[CountedFedAvg]] = {
    **BASES,
    "compressed": CompressedFedAvg,
    "budget-aware": BudgetAwareFedAvg,
}


@functools.cache
def _compose(base: type[CountedFedAvg], compressed: bool, budget_aware: bool) -> type:
    """`base` with the mixins asked for (the same class object for the same request)."""
    if (base, compressed, budget_aware) == (CountedFedAvg, True, False):
        return CompressedFedAvg
    if (base, compressed, budget_aware) == (CountedFedAvg, False, True):
        return BudgetAwareFedAvg
    mixins = (BudgetAware,) * budget_aware + (Compressed,) * compressed
    if not mixins:
        return base
    name = "".join(m.__name__ for m in mixins) + base.__name__.removeprefix("Counted")
    doc = f"{base.__name__} with {', '.join(m.__name__ for m in mixins)} (composed by name)."
    return type(name, (*mixins, base), {"__doc__": doc, "__module__": __name__})


def strategy_class(
    name: str, *, compressed: bool = False, budget_aware: bool = False
) -> type[CountedFedAvg]:
    """The class of strategy `name`, with compression and budget-aware sampling if asked.

    Raises
    ------
    ConfigError
        Unknown name.
    """
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; valid: {', '.join(STRATEGIES)}")
    base, short_compressed, short_budget_aware = SHORTHANDS.get(name, (name, False, False))
    return _compose(BASES[base], compressed or short_compressed, budget_aware or short_budget_aware)


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


def build_strategy(
    name: str, *, compressed: bool = False, budget_aware: bool = False, **options: Any
) -> CountedFedAvg:
    """Build the strategy registered under `name`, composed as asked, with keyword `options`.

    Parameters
    ----------
    name : str
        One of :data:`STRATEGIES` (e.g. ``"fedavg"``, ``"fedadam"``, ``"compressed"``).
    compressed : bool
        Sites send compressed deltas (option ``scheme``); implied by ``"compressed"``.
    budget_aware : bool
        Stop sampling sites whose budget is spent; implied by ``"budget-aware"``.
    **options : Any
        Constructor options of that strategy (e.g. ``min_train_nodes=3``, ``proximal_mu=0.1``,
        ``scheme="fp16"``).

    Returns
    -------
    CountedFedAvg
        The strategy, ready for ``strategy.start(grid=..., initial_arrays=...)``.

    Raises
    ------
    ConfigError
        Unknown name, unknown option, or an option value the strategy rejects.
    """
    cls = strategy_class(name, compressed=compressed, budget_aware=budget_aware)
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


def run_strategy(run: RunConfig) -> CountedFedAvg:
    """The strategy of a run: ``strategy``, composed with ``compression`` and ``budget-aware``,
    with the run's sampling options and ``strategy-options``."""
    return build_strategy(
        run.strategy,
        compressed=run.compressed,
        budget_aware=run.budget_aware,
        **run.strategy_kwargs(),
    )
