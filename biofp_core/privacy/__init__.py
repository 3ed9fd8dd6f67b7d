"""Differential privacy for BioFP: per-subject DP-SGD (Opacus) and ledger arithmetic (RDP)."""

from biofp_core.privacy.dp import (
    DPConfig,
    HistoryEntry,
    PrivacyReport,
    PrivateTraining,
    epsilon_for,
    epsilon_if,
    extend_history,
)

__all__ = [
    "DPConfig",
    "HistoryEntry",
    "PrivacyReport",
    "PrivateTraining",
    "epsilon_for",
    "epsilon_if",
    "extend_history",
]
