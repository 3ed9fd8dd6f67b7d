"""The release policy of a site (``[release]`` in site.toml) and the Gaussian noise it calibrates.

Privacy model of a release
--------------------------
The rows of a release (one per record, or per window) and their pseudonyms are public by design:
DP protects what the vectors say about a subject, not whether the subject is in the file. So two
neighbouring sites differ in the waveforms of ONE subject (replace-one), and a vector clipped to
L2 norm C moves by at most ``2C``: the per-vector sensitivity is ``Δ = 2C`` (the add/remove figure
``C`` would hold for a sum over subjects, not for a row that is there either way). A subject with k
released vectors has sensitivity ``2C·√k`` for their concatenation.

Noise: each coordinate of each released vector gets N(0, σ²), with σ from the analytic Gaussian
mechanism (Balle & Wang, ICML 2018): the smallest σ for which the Gaussian mechanism of
sensitivity Δ is (ε, δ)-DP, found by bisection on its exact privacy profile. It is valid for every
ε > 0 and tighter than the classic ``σ = Δ·√(2 ln(1.25/δ))/ε`` (which needs ε ≤ 1).

Ledger: the release is charged as one Gaussian step (``sample_rate=1``, ``steps=1``) with
``noise_multiplier = σ / (2C·√k)``, k = ``max_vectors_per_subject``: a public cap of the policy,
never read off the data (the most windows of one patient is patient data). A subject's vectors
beyond the cap are dropped before the noise (`release.prepare_release`), so RDP composes the
charge exactly with DP-SGD rounds. The ledger's ε for it is the ε of the subject's whole
contribution at the site's δ, larger than the per-vector ε of the policy when k > 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ReleaseLevel = Literal["record", "window"]
SENSITIVITY_PER_CLIP_NORM = 2.0  # replace-one: two vectors in the C-ball differ by up to 2C


class ReleasePolicy(BaseModel):
    """What a site lets out of its fingerprints. Without `epsilon`, nothing is charged."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    level: ReleaseLevel = Field("record", description="release record means or every window")
    clip_norm: float | None = Field(None, gt=0, description="C: L2 norm released vectors clip to")
    epsilon: float | None = Field(None, gt=0, description="ε per released vector (Gaussian noise)")
    delta: float | None = Field(
        None, gt=0, lt=1, description="δ per released vector; default the site's privacy δ"
    )
    max_vectors_per_subject: int = Field(
        1, ge=1, description="k: most vectors one subject releases under noise (more are dropped)"
    )

    @model_validator(mode="after")
    def _noise_needs_clipping(self) -> ReleasePolicy:
        if self.epsilon is not None and self.clip_norm is None:
            raise ValueError("epsilon needs clip_norm: noise is calibrated to the clipping norm")
        if self.delta is not None and self.epsilon is None:
            raise ValueError("delta without epsilon: set epsilon to add noise")
        return self

    @property
    def noisy(self) -> bool:
        return self.epsilon is not None


@dataclass(frozen=True)
class NoiseCalibration:
    """The Gaussian noise of one release and what the ledger is charged for it."""

    sigma: float  # std of the noise on each coordinate of each released vector
    epsilon: float  # per released vector
    delta: float  # per released vector
    sensitivity: float  # per vector, 2C
    vectors_per_subject: int  # k: the policy's cap on the vectors one subject releases
    noise_multiplier: float  # σ / (2C·√k), charged with sample_rate=1, steps=1


def _gaussian_delta(sigma: float, *, epsilon: float, sensitivity: float) -> float:
    """Exact δ(ε) of the Gaussian mechanism (Balle & Wang 2018, Theorem 8), in log space."""
    from scipy.special import log_ndtr, ndtr

    a = sensitivity / (2.0 * sigma)
    b = epsilon * sigma / sensitivity
    return float(ndtr(a - b) - math.exp(epsilon + log_ndtr(-a - b)))


def analytic_gaussian_sigma(*, epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """Smallest σ (within 1e-9 relative) making the Gaussian mechanism (ε, δ)-DP.

    Parameters
    ----------
    epsilon, delta
        The target guarantee, ε > 0 and 0 < δ < 1.
    sensitivity
        L2 sensitivity Δ of the released vector.
    """
    if not (epsilon > 0 and 0 < delta < 1 and sensitivity > 0):
        raise ValueError(f"need ε > 0, 0 < δ < 1, Δ > 0; got {epsilon}, {delta}, {sensitivity}")
    lo, hi = 1e-6 * sensitivity, sensitivity
    while _gaussian_delta(hi, epsilon=epsilon, sensitivity=sensitivity) > delta:
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-9 * hi:
        mid = 0.5 * (lo + hi)
        if _gaussian_delta(mid, epsilon=epsilon, sensitivity=sensitivity) > delta:
            lo = mid
        else:
            hi = mid
    return hi  # the upper end always satisfies δ(σ) <= δ


def calibrate_noise(
    policy: ReleasePolicy, *, vectors_per_subject: int, default_delta: float
) -> NoiseCalibration | None:
    """The noise `policy` asks for when each subject releases up to `vectors_per_subject` vectors.

    Returns None for a policy without noise.
    """
    if policy.epsilon is None or policy.clip_norm is None:
        return None
    if vectors_per_subject < 1:
        raise ValueError(f"vectors_per_subject must be >= 1, got {vectors_per_subject}")
    delta = policy.delta if policy.delta is not None else default_delta
    sensitivity = SENSITIVITY_PER_CLIP_NORM * policy.clip_norm
    sigma = analytic_gaussian_sigma(epsilon=policy.epsilon, delta=delta, sensitivity=sensitivity)
    return NoiseCalibration(
        sigma=sigma,
        epsilon=policy.epsilon,
        delta=delta,
        sensitivity=sensitivity,
        vectors_per_subject=vectors_per_subject,
        noise_multiplier=sigma / (sensitivity * math.sqrt(vectors_per_subject)),
    )
