"""The Gaussian mechanisms behind every metric that leaves a site (besides DP-SGD itself).

A metric is a per-subject vector (the loss and its named terms). Each subject's vector is clipped
to L2 norm C, the clipped vectors are summed, and N(0, (σC)²) noise is added to each coordinate:
adding, removing or replacing one subject moves the sum by at most C (add/remove) or 2C
(replace); the ledger accounts add/remove with σ as its noise multiplier, as for DP-SGD.

- Training (:class:`NoisyLossSums`): one noisy sum per DP-SGD step over the Poisson-sampled
  subjects of that step. The gradients and the losses of a step come from the same batch, so
  they are charged together as ONE sampled Gaussian: the clipped gradient (norm C, noise σC) and
  the clipped loss vector rescaled by σC/(σ_m C_m) (norm σC/σ_m, noise σC) stack into one vector
  of norm C·√(1 + σ²/σ_m²) with noise σC, i.e. noise multiplier σ_eff = (σ⁻² + σ_m⁻²)^(-1/2),
  with the step's q and the round's steps (``train``). An empty batch still draws its noise.
  The estimate sent is the sum over steps divided by the expected subjects per step times the
  steps.
- Evaluation (:func:`noisy_mean`): one noisy sum over the held-out subjects (q = 1, one step),
  divided by their count (a count the site chose to reveal: ``num-examples``).
Non-finite losses are clipped like any other (to the vector (C, 0, ...)), so a crafted model
cannot make a subject's presence show as an error.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence

import numpy as np


def noise_rng(seed: int | None) -> np.random.Generator:
    """A generator for DP noise: seeded (reproducible simulations) or from OS entropy."""
    return np.random.default_rng(secrets.randbits(128) if seed is None else seed)


def clip_rows(values: np.ndarray, clip: float) -> np.ndarray:
    """Rows scaled down to L2 norm <= `clip`; a row holding NaN or inf becomes (clip, 0, ...)."""
    values = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(values).all(axis=1)
    values = np.where(bad[:, None], 0.0, values)
    values[bad, 0] = clip
    norms = np.linalg.norm(values, axis=1, keepdims=True)
    return values * np.minimum(1.0, clip / np.maximum(norms, 1e-12))


def noisy_sum(
    values: np.ndarray, *, clip: float, noise_multiplier: float, rng: np.random.Generator
) -> np.ndarray:
    """Σ of the rows clipped to `clip`, plus N(0, (σ·clip)²) on each coordinate. (n, d) -> (d,)"""
    clipped = clip_rows(values, clip)
    return clipped.sum(axis=0) + rng.normal(0.0, noise_multiplier * clip, size=clipped.shape[1])


def noisy_mean(
    values: np.ndarray, *, clip: float, noise_multiplier: float, rng: np.random.Generator
) -> np.ndarray:
    """:func:`noisy_sum` divided by the number of rows (at least one). (n, d) -> (d,)"""
    total = noisy_sum(values, clip=clip, noise_multiplier=noise_multiplier, rng=rng)
    return total / max(len(values), 1)


def metric_rows(loss: Sequence[float], terms: Mapping[str, Sequence[float]]) -> np.ndarray:
    """Per-subject metric vectors: the loss then each term in sorted name order. (n, 1+T)"""
    columns = [np.asarray(loss, dtype=np.float64)]
    columns += [np.asarray(terms[name], dtype=np.float64) for name in sorted(terms)]
    return np.stack(columns, axis=1)


class NoisyLossSums:
    """The noisy per-step sums of a DP-SGD round's per-subject losses (module docstring)."""

    def __init__(self, *, clip: float, noise_multiplier: float, rng: np.random.Generator):
        self.clip, self.noise_multiplier, self.rng = clip, noise_multiplier, rng
        self.names: list[str] | None = None
        self.total: np.ndarray | None = None
        self.steps = self.empty_steps = 0

    def add(self, loss: Sequence[float], terms: Mapping[str, Sequence[float]]) -> None:
        """One step's sampled subjects: (B,) losses and (B,) per term."""
        names = sorted(terms)
        if self.names is None:
            self.names = names
        elif names != self.names:
            raise ValueError(f"loss terms changed between steps: {self.names} -> {names}")
        rows = metric_rows(loss, terms)
        step = noisy_sum(rows, clip=self.clip, noise_multiplier=self.noise_multiplier, rng=self.rng)
        self.total = step if self.total is None else self.total + step
        self.steps += 1

    def add_empty(self) -> None:
        """A step whose Poisson batch held no subject: its noise is drawn at :meth:`estimate`
        (a sum of independent Gaussians is one Gaussian with the summed variance)."""
        self.empty_steps += 1

    def estimate(self, *, expected_subjects: float) -> tuple[float, dict[str, float]] | None:
        """(loss, terms): the summed noisy sums over (expected subjects per step × steps);
        None when no step had a subject (there is nothing to estimate)."""
        if self.total is None or self.names is None:
            return None
        sd = self.noise_multiplier * self.clip * math.sqrt(self.empty_steps)
        total = self.total + self.rng.normal(0.0, sd, size=self.total.shape)
        mean = total / (expected_subjects * (self.steps + self.empty_steps))
        terms = {name: float(v) for name, v in zip(self.names, mean[1:], strict=True)}
        return float(mean[0]), terms
