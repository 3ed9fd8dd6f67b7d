"""The contract every BioFP model meets, so one training loop, one DP wrapper and one fingerprint
exporter serve all of them.

A training sample is a *bag*: K windows of ONE subject (the privacy unit). A batch stacks B bags, so
every tensor in a batch has the subject as its first dimension: what Opacus clips per sample.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from biofp_core.signals.types import SubjectWindows  # re-exported: models draw bags from it

WINDOW_SAMPLES = 1250  # 10 s at 125 Hz


class ModelConfig(BaseModel):
    """Base of every model's architecture config (stored in the model card)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    fingerprint_dim: int = Field(128, ge=8, description="D, size of the fingerprint vector")
    window_samples: int = Field(WINDOW_SAMPLES, description="samples per window (10 s at 125 Hz)")


Batch = dict[str, Tensor]  # each value (B, K, ...) : B subjects, K windows per bag


class BioFPModel(nn.Module, ABC):
    """An encoder that turns ECG and/or PPG windows into fingerprints and knows its own loss."""

    name: ClassVar[str]
    config: ModelConfig

    @abstractmethod
    def fingerprint(
        self, ecg: Tensor | None = None, ppg: Tensor | None = None, valid_n: Tensor | None = None
    ) -> Tensor:
        """Fingerprints (B, D) from ECG, PPG or both; inputs (B, 1250) or (B, 1, 1250).

        `valid_n` (B,): signal samples of each window; the rest is padding (short records).
        """

    @abstractmethod
    def draw_bag(
        self, subject: SubjectWindows, *, bag_size: int, rng: np.random.Generator
    ) -> dict[str, np.ndarray] | None:
        """One training bag of `bag_size` windows of this subject: arrays of shape (K, ...).

        Returns None when the subject has nothing this objective can use (e.g. no PPG).
        """

    @abstractmethod
    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-subject loss (B,) computed within each bag only, and named terms (each (B,))."""

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def as_windows(x: Tensor | None) -> Tensor | None:
    """Accept (B, 1250) or (B, 1, 1250); return (B, 1250) float32."""
    if x is None:
        return None
    if x.dim() == 3 and x.shape[1] == 1:
        x = x[:, 0]
    if x.dim() != 2:
        raise ValueError(f"expected windows of shape (B, L) or (B, 1, L), got {tuple(x.shape)}")
    return x.to(torch.float32)
