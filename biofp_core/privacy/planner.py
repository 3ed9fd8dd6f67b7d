"""A site's DP schedule from its subject count and budget: σ, q, steps per round and rounds.

The plan spends at most the budget ε under the ledger's own accountant
(:func:`~biofp_core.privacy.accounting.rdp_epsilon`), charging what the ledger will charge:

- each round trains ``steps_per_round`` DP-SGD steps, charged as ONE sampled Gaussian per step
  with σ_eff = (σ⁻² + σ_m⁻²)^(-1/2) (σ_m: the site's ``train_metric_noise``; the noisy loss sums
  come from the same batch) and q = expected subjects per step / N (``train``);
- ``evaluations`` noisy held-out losses (default: one per round) at σ = ``eval_noise``, q = 1, one
  step each (``evaluate``): their ε alone is reported as the evaluation reserve.

The rule, simple enough to explain to a site:

1. batch B (expected subjects per step): given, else min(64, N // 4), at least 1; q = B / N.
2. steps per round: about one epoch, ⌈N / B⌉, at most ``max_steps_per_round``.
3. rounds R: given, else 12, fewer when 12 rounds of one step cannot fit the budget.
4. If even σ = ``SIGMA_MAX`` (σ_eff ≈ σ_m) cannot pay for those steps, fewer steps per round
   (at least one, else the plan is refused); if σ at the site's floor leaves ε unspent, more
   steps per round (up to the cap).
5. σ: the smallest value ≥ the floor (``min_noise_multiplier``), on a grid of 3 significant
   digits, whose whole schedule fits the budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field

from biofp_core.errors import BioFPError
from biofp_core.privacy.accounting import History, poisson_rate, rdp_epsilon
from biofp_core.site import PrivacyBudget

__all__ = ["PlanError", "PlannedCharge", "PrivacyPlan", "RoundEpsilon", "plan_privacy"]

DEFAULT_ROUNDS = 12
DEFAULT_MAX_BATCH = 64
MAX_STEPS_PER_ROUND = 100
SIGMA_MAX = 100.0  # the largest σ planned: σ_eff is then within 0.02 % of σ_m = 5


class PlanError(BioFPError):
    """No schedule can train within the budget, or the request is invalid."""


class RoundEpsilon(BaseModel):
    """ε of the whole schedule up to and including one round (its training and evaluation)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    round: int = Field(ge=1)
    epsilon_after: float = Field(ge=0)


class PlannedCharge(BaseModel):
    """One ledger charge of the plan: ``(σ, q, steps)`` under ``(server_round, kind)``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    server_round: int = Field(ge=1)
    kind: str
    noise_multiplier: float = Field(gt=0)
    sample_rate: float = Field(gt=0, le=1)
    steps: int = Field(ge=1)

    @property
    def mechanism(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps)


class PrivacyPlan(BaseModel):
    """A site's DP schedule and the ε it spends (module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    subjects: int = Field(ge=1, description="N: the site's training subjects")
    epsilon_budget: float = Field(gt=0)
    delta: float = Field(gt=0, lt=1)
    rounds: int = Field(ge=1)
    batch_subjects: float = Field(gt=0, description="expected subjects per step")
    sample_rate: float = Field(gt=0, le=1, description="q = batch_subjects / subjects")
    steps_per_round: int = Field(ge=1)
    noise_multiplier: float = Field(gt=0, description="σ of DP-SGD")
    min_noise_multiplier: float = Field(gt=0, description="the site's σ floor")
    train_metric_noise: float = Field(gt=0, description="σ_m of the noisy training loss sums")
    effective_noise_multiplier: float = Field(gt=0, description="σ_eff the ledger charges")
    evaluations: int = Field(ge=0)
    eval_noise: float = Field(gt=0)
    epsilon_evaluations: float = Field(ge=0, description="ε of the evaluations alone")
    epsilon_total: float = Field(ge=0, description="ε of the whole schedule")
    per_round: list[RoundEpsilon]

    def charges(self) -> list[PlannedCharge]:
        """What the ledger will be charged, round by round: ``train`` then ``evaluate``."""
        out = []
        for r in range(1, self.rounds + 1):
            out.append(PlannedCharge(
                server_round=r, kind="train", noise_multiplier=self.effective_noise_multiplier,
                sample_rate=self.sample_rate, steps=self.steps_per_round,
            ))  # fmt: skip
            if r <= self.evaluations:
                out.append(PlannedCharge(
                    server_round=r, kind="evaluate", noise_multiplier=self.eval_noise,
                    sample_rate=1.0, steps=1,
                ))  # fmt: skip
        return out


def effective_noise(sigma: float, metric_noise: float) -> float:
    """σ_eff = (σ⁻² + σ_m⁻²)^(-1/2): DP-SGD and the noisy loss sums charged as one Gaussian."""
    return (sigma**-2 + metric_noise**-2) ** -0.5


def _history(
    sigma_eff: float, q: float, steps: int, rounds: int, evaluations: int, eval_noise: float
) -> History:
    history: History = [(sigma_eff, q, steps * rounds)]
    if evaluations:
        history.append((eval_noise, 1.0, evaluations))
    return history


def _round_up_3(x: float) -> float:
    """`x` rounded UP to 3 significant digits (more noise, never less)."""
    scale = 10 ** (math.floor(math.log10(x)) - 2)
    return round(math.ceil(x / scale - 1e-9) * scale, 12)


def _largest_fitting(lo: int, hi: int, fits: Callable[[int], bool]) -> int | None:
    """The largest n in [lo, hi] with fits(n), fits being monotone (true then false)."""
    if not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def plan_privacy(
    subjects: int,
    epsilon: float,
    *,
    delta: float = 1e-5,
    rounds: int | None = None,
    batch: float | None = None,
    evaluations: int | None = None,
    limits: PrivacyBudget | None = None,
    max_steps_per_round: int = MAX_STEPS_PER_ROUND,
) -> PrivacyPlan:
    """The schedule that trains N subjects for R rounds within ε (module docstring).

    Parameters
    ----------
    subjects, epsilon, delta
        The site's training subjects N, its budget ε and δ.
    rounds
        R; None: 12, or fewer when 12 cannot train.
    batch
        Expected subjects per step; None: min(64, N // 4), at least 1.
    evaluations
        Noisy held-out evaluations reserved for (default R, one per round).
    limits
        The site's σ floor, minimum subjects, σ_m and evaluation noise (default: the defaults).

    Raises
    ------
    PlanError
        One line: invalid input, or no plan of at least one step per round fits.
    """
    limits = limits or PrivacyBudget()
    if isinstance(subjects, bool) or subjects < 1:
        raise PlanError(f"plan: subjects must be >= 1, got {subjects}")
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise PlanError(f"plan: epsilon must be a finite number > 0, got {epsilon}")
    if not 0 < delta < 1:
        raise PlanError(f"plan: delta must be in (0, 1), got {delta}")
    if subjects < limits.min_train_subjects:
        raise PlanError(
            f"plan: {subjects} training subject(s), below the site's min_train_subjects "
            f"{limits.min_train_subjects}; a site this small cannot train"
        )
    if rounds is not None and rounds < 1:
        raise PlanError(f"plan: rounds must be >= 1, got {rounds}")
    if batch is None:
        batch = float(max(1, min(DEFAULT_MAX_BATCH, subjects // 4)))
    if not (math.isfinite(batch) and 1 <= batch <= subjects):
        raise PlanError(f"plan: batch must be between 1 and the {subjects} subjects, got {batch}")
    if evaluations is not None and evaluations < 0:
        raise PlanError(f"plan: evaluations must be >= 0, got {evaluations}")
    floor, sigma_m, eval_noise = (
        limits.min_noise_multiplier, limits.train_metric_noise, limits.eval_noise
    )  # fmt: skip
    sigma_hi = max(SIGMA_MAX, floor)
    q = poisson_rate(batch, subjects)

    def n_evals(r: int) -> int:
        return r if evaluations is None else min(evaluations, r)

    def total(sigma: float, steps: int, r: int) -> float:
        history = _history(effective_noise(sigma, sigma_m), q, steps, r, n_evals(r), eval_noise)
        return rdp_epsilon(history, delta=delta)

    if rounds is None:
        rounds = _largest_fitting(1, DEFAULT_ROUNDS, lambda r: total(sigma_hi, 1, r) <= epsilon)
    if rounds is None or total(sigma_hi, 1, rounds) > epsilon:
        r = rounds or 1
        raise PlanError(
            f"plan: even one step per round at σ={sigma_hi:g} (σ_eff≈{sigma_m:g}, q={q:.3g}) for "
            f"{r} round(s) with {n_evals(r)} evaluation(s) exceeds ε={epsilon:g}; "
            "use fewer rounds, a smaller batch or a larger budget"
        )
    cap = max(1, max_steps_per_round)
    steps = min(cap, math.ceil(subjects / batch))
    if total(sigma_hi, steps, rounds) > epsilon:
        steps = _largest_fitting(1, steps, lambda s: total(sigma_hi, s, rounds) <= epsilon) or 1
    elif total(floor, steps, rounds) <= epsilon:
        steps = _largest_fitting(steps, cap, lambda s: total(floor, s, rounds) <= epsilon) or steps
    # σ: smallest on the 3-significant-digit grid in [floor, σ_hi] that fits (bisection in log σ)
    lo, hi = floor, sigma_hi
    if total(floor, steps, rounds) <= epsilon:
        sigma = floor
    else:
        while hi / lo > 1.0005:
            mid = math.sqrt(lo * hi)
            lo, hi = (lo, mid) if total(mid, steps, rounds) <= epsilon else (mid, hi)
        sigma = min(_round_up_3(hi), sigma_hi)
    sigma_eff = effective_noise(sigma, sigma_m)
    per_round = [
        RoundEpsilon(round=r, epsilon_after=rdp_epsilon(
            _history(sigma_eff, q, steps, r, n_evals(r), eval_noise), delta=delta
        ))
        for r in range(1, rounds + 1)
    ]  # fmt: skip
    n_eval = n_evals(rounds)
    eps_eval = rdp_epsilon([(eval_noise, 1.0, n_eval)], delta=delta) if n_eval else 0.0
    return PrivacyPlan(
        subjects=subjects, epsilon_budget=epsilon, delta=delta, rounds=rounds,
        batch_subjects=batch, sample_rate=q, steps_per_round=steps, noise_multiplier=sigma,
        min_noise_multiplier=floor, train_metric_noise=sigma_m,
        effective_noise_multiplier=sigma_eff, evaluations=n_eval, eval_noise=eval_noise,
        epsilon_evaluations=eps_eval, epsilon_total=per_round[-1].epsilon_after,
        per_round=per_round,
    )  # fmt: skip
