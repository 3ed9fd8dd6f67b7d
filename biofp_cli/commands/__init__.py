"""CLI subcommand groups, one module per user (site IT, researchers, coordinators)."""

from __future__ import annotations

import warnings


def insecure_mode(insecure: bool, insecure_non_loopback: bool, risk: str) -> bool:
    """Whether a start runs without TLS: ``--insecure`` (warned about, with its `risk`) or
    ``--insecure-non-loopback`` (which implies it)."""
    if insecure:
        warnings.warn(f"--insecure: {risk}", UserWarning, stacklevel=2)
    return insecure or insecure_non_loopback
