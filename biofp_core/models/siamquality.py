"""SiamQuality: a 1D ResNet trained with SimSiam on pairs of good- and poor-quality PPG windows of
the same subject, close in time, so that the fingerprint ignores signal quality.

Modalities share one network. The input is two channels, [signal, modality flag], with the flag
a constant +1 for PPG and -1 for ECG: every filter sees both modalities, and the flag channel acts
as a learned per-modality bias of the stem. ECG-only, PPG-only and paired inputs land in one space.
PPG drives training; with `ecg_pair_frac` > 0 some pairs put the simultaneous ECG window opposite
a good PPG window (a cross-modal positive), which aligns the ECG path to the PPG space. Paired
input gives the PPG fingerprint, or the mean of both with `pair_fusion="mean"`.

DP: Conv1d/GroupNorm/Linear/LayerNorm only, and the loss runs the encoder once per window slot
(B, 1, T) of the bag, so every activation keeps the subject as dim 0 (Opacus sums per-sample
gradients over the repeated calls) and no statistic is shared between subjects.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from biofp_core.models.base import Batch, BioFPModel, ModelConfig, SubjectWindows, as_windows

PPG_FLAG = 1.0  # value of the modality channel for PPG windows
ECG_FLAG = -1.0  # value of the modality channel for ECG windows


class SiamQualityConfig(ModelConfig):
    """Architecture and pairing of SiamQuality (stored in the model card)."""

    stem_channels: int = Field(32, ge=8, description="channels of the stem conv")
    stage_channels: tuple[int, ...] = Field((32, 64, 128, 128), description="channels per stage")
    blocks_per_stage: int = Field(1, ge=1, le=4, description="residual blocks in each stage")
    kernel_size: int = Field(7, ge=3, description="odd kernel of the residual convs")
    groups: int = Field(8, ge=1, description="GroupNorm groups (divides every channel count)")
    proj_dim: int = Field(256, ge=16, description="SimSiam projector output size")
    pred_hidden: int = Field(64, ge=8, description="SimSiam predictor bottleneck")
    pair_fusion: Literal["ppg", "mean"] = Field("ppg", description="paired input: PPG or mean")
    good_sqi: float = Field(0.7, ge=0, le=1, description="PPG SQI at or above which is 'good'")
    min_sqi_gap: float = Field(0.15, ge=0, le=1, description="poor view scores this much lower")
    pair_radius_s: float = Field(60.0, gt=0, description="poor view starts within this of good")
    ecg_pair_frac: float = Field(0.25, ge=0, le=1, description="pairs with simultaneous ECG view")

    @model_validator(mode="after")
    def _check_shapes(self) -> SiamQualityConfig:
        if self.kernel_size % 2 == 0:
            raise ValueError("kernel_size must be odd")
        for c in (self.stem_channels, *self.stage_channels, self.proj_dim):
            if c % self.groups:
                raise ValueError(f"groups={self.groups} does not divide channel count {c}")
        if not self.stage_channels:
            raise ValueError("stage_channels must not be empty")
        return self


# ---------------------------------------------------------------------------- encoder blocks


class ResBlock1d(nn.Module):
    """Basic residual block: conv-GN-ReLU-conv-GN plus a (strided 1x1) shortcut."""

    def __init__(self, c_in: int, c_out: int, *, stride: int, kernel_size: int, groups: int):
        super().__init__()
        pad = kernel_size // 2
        self.conv1 = nn.Conv1d(c_in, c_out, kernel_size, stride=stride, padding=pad, bias=False)
        self.norm1 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv1d(c_out, c_out, kernel_size, padding=pad, bias=False)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv1d(c_in, c_out, 1, stride=stride, bias=False), nn.GroupNorm(groups, c_out)
            )

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, T) -> (B, C_out, T / stride)
        h = F.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return F.relu(h + self.shortcut(x))


class ResNet1d(nn.Module):
    """Stem (stride 2 conv + stride 2 max-pool) then stages that each halve the length."""

    def __init__(self, cfg: SiamQualityConfig):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv1d(2, cfg.stem_channels, 9, stride=2, padding=4, bias=False),
            nn.GroupNorm(cfg.groups, cfg.stem_channels),
            nn.ReLU(),
            nn.MaxPool1d(3, stride=2, padding=1),
        )
        blocks: list[nn.Module] = []
        c_in = cfg.stem_channels
        for c_out in cfg.stage_channels:
            for i in range(cfg.blocks_per_stage):
                stride = 2 if i == 0 else 1
                kw = {"stride": stride, "kernel_size": cfg.kernel_size, "groups": cfg.groups}
                blocks.append(ResBlock1d(c_in, c_out, **kw))
                c_in = c_out
        self.stages = nn.Sequential(*blocks)
        self.out_channels = c_in

    def forward(self, x: Tensor) -> Tensor:  # (B, 2, T) -> (B, C)
        h = self.stem(x)  # (B, C0, T / 4)
        h = self.stages(h)  # (B, C, T / 4 / 2^stages)
        return h.mean(dim=-1)  # global average pooling


def mlp(d_in: int, d_hidden: int, d_out: int, *, norm_out: bool) -> nn.Sequential:
    """Linear-LN-ReLU-Linear (+LN): SimSiam's projector/predictor with LayerNorm for DP."""
    layers: list[nn.Module] = [
        nn.Linear(d_in, d_hidden),
        nn.LayerNorm(d_hidden),
        nn.ReLU(),
        nn.Linear(d_hidden, d_out),
    ]
    if norm_out:
        layers.append(nn.LayerNorm(d_out))
    return nn.Sequential(*layers)


def negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    """-cos(p, stopgrad(z)) per row: (B, P), (B, P) -> (B,)."""
    return -F.cosine_similarity(p, z.detach(), dim=-1)


# ---------------------------------------------------------------------------- view degradation


def degrade_window(x: np.ndarray, rng: np.random.Generator, *, fs_hz: float = 125.0) -> np.ndarray:
    """A synthetic poor-quality copy of a z-scored window: noise, baseline wander, motion, dropout.

    At least one artefact is applied; the result is z-scored again like a stored window.
    """
    n = len(x)
    t_s = np.arange(n) / fs_hz
    y = x.astype(np.float64).copy()
    kinds = rng.random(4) < 0.5
    kinds[rng.integers(4)] = True
    if kinds[0]:  # broadband sensor noise
        y += rng.normal(0.0, rng.uniform(0.2, 0.6), n)
    if kinds[1]:  # baseline wander (respiration, posture), 0.05-0.5 Hz
        f_hz = rng.uniform(0.05, 0.5)
        y += rng.uniform(0.5, 1.5) * np.sin(2 * np.pi * f_hz * t_s + rng.uniform(0, 2 * np.pi))
    if kinds[2]:  # motion artefact: a 1-3 s burst of large low-frequency random walk
        length = int(rng.uniform(1.0, 3.0) * fs_hz)
        start = int(rng.integers(0, n - length))
        walk = np.cumsum(rng.normal(0.0, 1.0, length))
        y[start : start + length] += rng.uniform(1.0, 3.0) * walk / (np.abs(walk).max() + 1e-6)
    if kinds[3]:  # dropout: the probe loses contact, 0.5-2 s flat
        length = int(rng.uniform(0.5, 2.0) * fs_hz)
        start = int(rng.integers(0, n - length))
        y[start : start + length] = y[start]
    return ((y - y.mean()) / (y.std() + 1e-6)).astype(np.float32)


# ---------------------------------------------------------------------------- the model


class SiamQuality(BioFPModel):
    """1D ResNet + SimSiam on (good, poor) PPG pairs; fingerprint = projected pooled features."""

    name: ClassVar[str] = "siamquality"
    config: SiamQualityConfig

    def __init__(self, config: SiamQualityConfig | None = None):
        super().__init__()
        self.config = config or SiamQualityConfig()
        cfg = self.config
        self.encoder = ResNet1d(cfg)
        self.to_fingerprint = nn.Linear(self.encoder.out_channels, cfg.fingerprint_dim)
        self.projector = mlp(cfg.fingerprint_dim, cfg.proj_dim, cfg.proj_dim, norm_out=True)
        self.predictor = mlp(cfg.proj_dim, cfg.pred_hidden, cfg.proj_dim, norm_out=False)

    def _embed(self, x: Tensor, flag: Tensor) -> Tensor:
        """Fingerprints of one window per row: x (B, T), flag (B,) -> (B, D)."""
        flags = flag.to(x.dtype)[:, None].expand_as(x)  # (B, T)
        h = self.encoder(torch.stack([x, flags], dim=1))  # (B, 2, T) -> (B, C)
        return self.to_fingerprint(h)  # (B, D)

    def fingerprint(
        self, ecg: Tensor | None = None, ppg: Tensor | None = None, valid_n: Tensor | None = None
    ) -> Tensor:
        """Fingerprints (B, D) from PPG (preferred), ECG, or both per `config.pair_fusion`.

        SiamQuality has no padding mask: a padded window (`valid_n`) is embedded as it is, and
        training skips padded windows (`draw_bag`).
        """
        ecg, ppg = as_windows(ecg), as_windows(ppg)
        if ppg is None and ecg is None:
            raise ValueError("fingerprint needs ecg, ppg or both")
        if ppg is not None:
            fp_ppg = self._embed(ppg, ppg.new_full((len(ppg),), PPG_FLAG))  # (B, D)
            if ecg is None or self.config.pair_fusion == "ppg":
                return fp_ppg
        assert ecg is not None
        fp_ecg = self._embed(ecg, ecg.new_full((len(ecg),), ECG_FLAG))  # (B, D)
        return fp_ecg if ppg is None else 0.5 * (fp_ppg + fp_ecg)

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """Symmetric SimSiam loss per subject (B,), averaged over the subject's K pairs."""
        view_a = batch["view_a"].to(torch.float32)  # (B, K, T) good PPG
        view_b = batch["view_b"].to(torch.float32)  # (B, K, T) poor PPG or simultaneous ECG
        flag_b = batch.get("modality_b")  # (B, K) PPG_FLAG / ECG_FLAG
        if flag_b is None:
            flag_b = view_b.new_full(view_b.shape[:2], PPG_FLAG)
        flag_a = view_a.new_full(view_a.shape[:1], PPG_FLAG)  # (B,)
        terms = []
        for k in range(view_a.shape[1]):  # one slot at a time keeps the subject as dim 0
            z_a = self.projector(self._embed(view_a[:, k], flag_a))  # (B, P)
            z_b = self.projector(self._embed(view_b[:, k], flag_b[:, k]))  # (B, P)
            p_a, p_b = self.predictor(z_a), self.predictor(z_b)  # (B, P)
            terms.append(0.5 * (negative_cosine(p_a, z_b) + negative_cosine(p_b, z_a)))
        per_subject = torch.stack(terms, dim=1).mean(dim=1)  # (B, K) -> (B,)
        return per_subject, {"simsiam": per_subject.detach()}

    def draw_bag(
        self, subject: SubjectWindows, *, bag_size: int, rng: np.random.Generator
    ) -> dict[str, np.ndarray] | None:
        """K (good PPG, poor view) pairs of one subject; None when it has no PPG window.

        Good windows score >= `good_sqi` (or the subject's top half if none does). The poor view
        of a good window is the lowest-scoring PPG window of the same record starting within
        `pair_radius_s` and at least `min_sqi_gap` lower; failing that, a degraded copy
        (`degrade_window`). With probability `ecg_pair_frac`, a good window that has ECG is paired
        with its simultaneous ECG window instead.

        Returns
        -------
        dict
            ``view_a`` (K, T) float32, ``view_b`` (K, T) float32, ``modality_b`` (K,) float32 flags.
        """
        whole = subject.valid_samples() >= subject.ppg.shape[1]  # padded windows: not used
        score = np.where(subject.mask[:, 1] & whole, subject.quality[:, 1], np.nan)
        ppg_idx = np.flatnonzero(np.isfinite(score))
        if len(ppg_idx) == 0:
            return None
        good = ppg_idx[score[ppg_idx] >= self.config.good_sqi]
        if len(good) == 0:
            good = ppg_idx[score[ppg_idx] >= np.median(score[ppg_idx])]
        picks = rng.choice(good, size=bag_size, replace=len(good) < bag_size)
        view_b = np.empty((bag_size, subject.ppg.shape[1]), dtype=np.float32)
        flag_b = np.full(bag_size, PPG_FLAG, dtype=np.float32)
        for k, g in enumerate(picks):
            if subject.mask[g, 0] and rng.random() < self.config.ecg_pair_frac:
                view_b[k], flag_b[k] = subject.ecg[g], ECG_FLAG
                continue
            poor = self._poor_partner(subject, score, int(g))
            view_b[k] = (
                subject.ppg[poor] if poor is not None else degrade_window(subject.ppg[g], rng)
            )
        view_a = subject.ppg[picks].astype(np.float32)
        return {"view_a": view_a, "view_b": view_b, "modality_b": flag_b}

    def _poor_partner(self, subject: SubjectWindows, score: np.ndarray, g: int) -> int | None:
        """Lowest-scoring PPG window near window g (same record), or None if none is poor enough."""
        near = (
            (subject.record_index == subject.record_index[g])
            & (np.abs(subject.start_s - subject.start_s[g]) <= self.config.pair_radius_s)
            & (score <= score[g] - self.config.min_sqi_gap)  # NaN (no PPG) compares False
        )
        cand = np.flatnonzero(near)
        if len(cand) == 0:
            return None
        dist = np.abs(subject.start_s[cand] - subject.start_s[g])
        return int(cand[np.lexsort((dist, score[cand]))[0]])  # lowest score, then nearest
