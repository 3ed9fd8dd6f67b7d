"""Differential privacy for BioFP: per-subject DP-SGD (Opacus) and the site's privacy ledger.

The DP-SGD names are loaded on first use, so importing the ledger does not import Opacus.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "DPConfig",
    "HistoryEntry",
    "PrivacyReport",
    "PrivateTraining",
    "poisson_rate",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("biofp_core.privacy.dp"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
