"""The wire contract between server and sites: every key, the run config, every instruction and
every reply, as plain data and pydantic models that both sides import (never ``flwr``).

- :mod:`~biofp_core.protocol.keys`: every key of a Flower record, ours and Flower's;
- :mod:`~biofp_core.protocol.instructions`: what a server message asks of a site;
- :mod:`~biofp_core.protocol.replies`: what may leave a site (the table of every reply key, with
  its source and the ledger kind that pays for it) and the typed reply metrics;
- :mod:`~biofp_core.protocol.run_config`: :class:`RunConfig`, what the server decides for a run.

Each public name of these modules can be imported from the package itself
(``from biofp_core.protocol import EPSILON, RunConfig``). The package loads a module when one of
its names is first asked for, so code that needs only keys (the SuperNode launcher) never loads
``run_config``, which builds models and so imports torch.
"""

from __future__ import annotations

import importlib
from types import FunctionType, ModuleType

SUBMODULES = ("keys", "instructions", "replies", "run_config")  # searched in this order


def _defines(module: ModuleType, name: str) -> bool:
    """Whether `name` is a public name of `module`: a value it assigns, or a class or function
    it defines (not a module, class or function it merely imports)."""
    if name.startswith("_") or name == "annotations" or not hasattr(module, name):
        return False
    value = getattr(module, name)
    if isinstance(value, ModuleType):
        return False
    if isinstance(value, type | FunctionType) or callable(value):
        return getattr(value, "__module__", None) == module.__name__
    return True


def __getattr__(name: str) -> object:
    for sub in SUBMODULES:
        module = importlib.import_module(f"{__name__}.{sub}")
        if _defines(module, name):
            globals()[name] = value = getattr(module, name)
            return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
