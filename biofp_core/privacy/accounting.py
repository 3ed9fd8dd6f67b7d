"""ε of an Opacus accountant history, computed once per (σ, q) per process.

Opacus' RDP of a sampled Gaussian mechanism is its one-step RDP times ``steps`` (``compute_rdp``
returns ``rdp * steps``), and the one-step RDP depends on (σ, q) only. :func:`rdp_epsilon`
therefore computes the one-step RDP of each distinct (σ, q) once per process (about 0.15-0.3 s on
2 cores) and keeps it; ε of a whole history is then the same sum and the same RDP-to-ε conversion
as Opacus' ``RDPAccountant.get_epsilon``, bit for bit, in well under a millisecond.

A history item with σ = 0 is a round trained without DP: its ε is infinite, and so is the ε of
every history that holds one. When the optimum lies at the smallest or largest RDP order, Opacus
warns that a wider range could tighten the bound; the bound is still valid (conservative), so
that warning is silenced here.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np

from biofp_core.errors import DataError

History = list[tuple[float, float, int]]  # Opacus' accountant history: (σ, q, steps)


def poisson_rate(batch_subjects: float, subjects: int) -> float:
    """q: the Poisson rate at which each of `subjects` is sampled per step, for `batch_subjects`
    expected subjects per step (capped at 1). The one place q is computed: a site's round plan
    charges it and passes it to the DP-SGD engine, the planner plans with it."""
    if subjects <= 0:
        raise DataError("no subject has data this model can train on")
    return min(1.0, batch_subjects / subjects)


def compact_history(history: History) -> History:
    """Merge items with the same (σ, q), summing steps: RDP is additive, so ε is unchanged."""
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, n in history:
        steps[(sigma, q)] = steps.get((sigma, q), 0) + n
    return [(sigma, q, n) for (sigma, q), n in steps.items()]


@functools.lru_cache(maxsize=256)
def _one_step_rdp(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    """Opacus' RDP of ONE step of the sampled Gaussian mechanism at its default orders."""
    from opacus.accountants import RDPAccountant  # imports torch: only when ε is computed
    from opacus.accountants.analysis import rdp as analysis

    rdp = analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
        orders=RDPAccountant.DEFAULT_ALPHAS,
    )  # fmt: skip
    return tuple(float(x) for x in rdp)


def rdp_epsilon(history: History, *, delta: float) -> float:
    """ε of a whole accountant history at `delta`, as Opacus' `RDPAccountant` computes it.

    0.0 for an empty history; inf when an item has σ = 0 (trained without DP).
    """
    if not history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    rdp = sum([np.array(_one_step_rdp(sigma, q)) * n for sigma, q, n in compact_history(history)])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
        eps, _ = analysis.get_privacy_spent(
            orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta
        )
    return float(eps)


def _gaussian_epsilon(noise_multiplier: float, *, delta: float) -> float:
    """ε of ONE plain Gaussian release (q = 1): its RDP is α / (2σ²) in closed form."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    orders = np.array(RDPAccountant.DEFAULT_ALPHAS, dtype=float)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
        eps, _ = analysis.get_privacy_spent(
            orders=orders, rdp=orders / (2.0 * noise_multiplier**2), delta=delta
        )
    return float(eps)


def gaussian_noise_multiplier(*, epsilon: float, delta: float) -> float:
    """Smallest σ (noise std / sensitivity, within 1e-6) whose ONE Gaussian release costs at
    most `epsilon` at `delta` under the RDP accountant (the ledger's own ε)."""
    if not (epsilon > 0 and 0 < delta < 1):
        raise ValueError(f"need ε > 0 and 0 < δ < 1, got {epsilon}, {delta}")
    lo, hi = 1e-3, 1.0
    while _gaussian_epsilon(hi, delta=delta) > epsilon:
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-6 * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _gaussian_epsilon(mid, delta=delta) > epsilon else (lo, mid)
    return hi
