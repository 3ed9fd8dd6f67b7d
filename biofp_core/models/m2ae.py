"""M2AE: a cross-modal masked autoencoder for paired ECG/PPG windows.

    ECG patches ─► ECG encoder ─┐                           ┌─► ECG decoder ─► ECG patches
                                ├─► fusion (bottleneck) ─────┤
    PPG patches ─► PPG encoder ─┘        │                   └─► PPG decoder ─► PPG patches
                                         └─► mean-pool ─► Linear ─► fingerprint (D)

Training, per window of a subject's bag of K windows:
- complementary masking: n = round(mask_ratio * T) patches are hidden from ECG and a DISJOINT set of
  n from PPG, so a patch hidden in one modality is visible in the other (mask_ratio 0.5 with an even
  T makes the masks exact complements);
- whole-modality dropout: with probability `modality_dropout` a paired window loses ECG or PPG;
- losses: MSE on the hidden patches of the kept modalities (`recon`), MSE on every patch of a
  dropped modality (`cross`), and InfoNCE (`align`) between the fingerprints of the ECG-only,
  PPG-only and joint views of each window, whose negatives are ONLY the other windows of the same
  bag, i.e. of the same subject (subject-level DP): no term ever mixes subjects;
- every view's fingerprint regresses, linearly, beat statistics of its window (`stats`,
  rhythm.py) and, with `template_targets`, each of its signals' mean beat (`template`).
The three views go through the same fusion encoder and projection in one call (block-diagonal
attention masks keep the single-modality views apart), which is what puts ECG-only, PPG-only and
paired fingerprints in one space.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from biofp_core.models.base import Batch, BioFPModel, ModelConfig, SubjectWindows, as_windows
from biofp_core.models.layers import (
    Dense,
    Encoder,
    LearnedTokens,
    PatchEmbed,
    SinusoidalPositions,
    apply_flat,
    key_padding_mask,
    masked_mean,
    patchify,
)
from biofp_core.signals.rhythm import (
    BEAT_STATS,
    RHYTHM_FEATURES,
    STAT_NAMES,
    paired_statistics,
    rhythm_features,
)

MODALITIES = ("ecg", "ppg")


class M2AEConfig(ModelConfig):
    """Architecture and objective of M2AE. Defaults: 1.37 M parameters, 10 tokens per modality.

    Patching is chosen for speed: attention cost grows with tokens, and with 1 s patches a paired
    window is 2 x 10 tokens. The fingerprint path (2 + 2 modality blocks, 2 fusion blocks, rhythm
    token included) runs at about 2,400 paired and 4,800 PPG-only windows/s on 2 cores
    (README, "Figures": ``bench/encoders.py``).
    """

    patch_samples: int = Field(125, ge=1)  # samples per patch (1 s at 125 Hz) -> T = 10 tokens
    width: int = Field(128, ge=8)  # token width of the modality encoders and the fusion encoder
    heads: int = Field(4, ge=1)  # attention heads (encoders and decoders)
    mlp_ratio: int = Field(4, ge=1)  # MLP hidden width / token width
    modality_depth: int = Field(2, ge=1)  # transformer blocks per modality encoder
    fusion_depth: int = Field(2, ge=1)  # blocks in the shared bottleneck over both token sets
    decoder_width: int = Field(64, ge=8)  # token width of each (light) decoder
    decoder_depth: int = Field(1, ge=1)  # blocks per decoder
    mask_ratio: float = Field(0.5, gt=0, le=0.5)  # fraction of patches hidden per modality
    modality_dropout: float = Field(0.25, ge=0, le=1)  # P(a paired window loses one modality)
    temperature: float = Field(0.1, gt=0)  # InfoNCE temperature
    recon_weight: float = Field(1.0, ge=0)  # weight of masked reconstruction
    cross_weight: float = Field(1.0, ge=0)  # weight of reconstructing a dropped modality
    align_weight: float = Field(0.5, ge=0)  # weight of the within-bag InfoNCE alignment
    stats_weight: float = Field(1.0, ge=0)  # weight of regressing beat statistics (rhythm.py)
    beat_stats: tuple[str, ...] = STAT_NAMES  # which BEAT_STATS every fingerprint regresses
    rhythm_token: bool = True  # one token per modality from the window's beat intervals
    rhythm_template: int = Field(0, ge=0, le=64)  # points of the window's mean beat in that token
    template_targets: int = Field(0, ge=0, le=64)  # points of each signal's mean beat regressed
    template_weight: float = Field(1.0, ge=0)  # weight of regressing the mean beats
    joint_templates: bool = True  # the joint view regresses them too (else one-signal views only)
    good_quality: float = Field(0.5, ge=0, le=1)  # draw_bag prefers windows with SQI >= this

    @model_validator(mode="after")
    def _check_shapes(self) -> M2AEConfig:
        if self.window_samples % self.patch_samples:
            raise ValueError(f"patch_samples must divide window_samples ({self.window_samples})")
        if self.width % self.heads or self.decoder_width % self.heads:
            raise ValueError("width and decoder_width must be divisible by heads")
        if self.hidden_patches < 1:
            raise ValueError("mask_ratio hides no patch: raise it or shorten the patches")
        unknown = set(self.beat_stats) - set(BEAT_STATS)
        if unknown or not self.beat_stats or len(set(self.beat_stats)) < len(self.beat_stats):
            raise ValueError(
                f"beat_stats: choose one or more of {', '.join(BEAT_STATS)}, once each"
            )
        if self.rhythm_template and not self.rhythm_token:
            raise ValueError(
                "rhythm_template feeds the rhythm token: set rhythm_token = true "
                "or rhythm_template = 0"
            )
        return self

    @property
    def n_patches(self) -> int:
        return self.window_samples // self.patch_samples

    @property
    def hidden_patches(self) -> int:
        """Patches hidden per modality and window; 2 * this <= n_patches since mask_ratio <= 0.5."""
        return round(self.mask_ratio * self.n_patches)


class Decoder(nn.Module):
    """Light decoder: fused tokens + one query per patch position -> reconstructed patches."""

    def __init__(self, cfg: M2AEConfig):
        super().__init__()
        self.proj_in = Dense(cfg.width, cfg.decoder_width)
        self.query = LearnedTokens(1, cfg.decoder_width)  # the mask token
        self.positions = SinusoidalPositions(cfg.n_patches, cfg.decoder_width)
        self.encoder = Encoder(cfg.decoder_width, cfg.decoder_depth, cfg.heads, cfg.mlp_ratio)
        self.head = Dense(cfg.decoder_width, cfg.patch_samples)

    def forward(self, memory: Tensor, memory_keep: Tensor) -> Tensor:
        """memory (B, K, M, D) fused tokens, memory_keep (B, K, M) -> patches (B, K, T, P)."""
        B, K, M, _ = memory.shape
        mem = apply_flat(self.proj_in, memory)  # (B, K, M, Dd)
        query = self.query(B)[:, None] + self.positions()  # (B, 1, T, Dd)
        query = query.expand(B, K, -1, -1)  # (B, K, T, Dd)
        keep = torch.cat([memory_keep, memory_keep.new_ones(B, K, query.shape[2])], dim=-1)
        h = self.encoder(torch.cat([mem, query], dim=2), key_padding_mask(keep))  # (B, K, M+T, Dd)
        return apply_flat(self.head, h[:, :, M:])  # (B, K, T, P)


def info_nce(a: Tensor, b: Tensor, ok: Tensor, same: Tensor, temperature: float) -> Tensor:
    """Symmetric InfoNCE per bag (B,): positive a[k]~b[k], negatives the bag's other windows only.

    a, b (B, K, F); ok (B, K) windows usable on both sides; same (B, K, K) True where two bag slots
    hold the same window (drawn with replacement), which must not act as each other's negatives.
    """
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = a @ b.transpose(1, 2) / temperature  # (B, K, K): one subject's windows only
    eye = torch.eye(a.shape[1], dtype=torch.bool, device=a.device)
    negative = ok[:, :, None] & ok[:, None, :] & ~same & ~eye  # (B, K, K)
    logits = logits.masked_fill(~(negative | eye), float("-inf"))
    ce = -(logits.log_softmax(-1) + logits.log_softmax(-2)).diagonal(dim1=-2, dim2=-1) / 2  # (B,K)
    rows = (ok & negative.any(-1)).to(a.dtype)  # (B, K) windows with a positive and a negative
    return (ce * rows).sum(-1) / rows.sum(-1).clamp(min=1.0)


def patch_valid(valid_n: Tensor | None, shape: tuple[int, ...], patch: int, device) -> Tensor:
    """(…, T) bool: patches holding at least one signal sample (the rest is a short record's
    zero padding); all True without `valid_n` (…)."""
    T = shape[-1]
    if valid_n is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    start = torch.arange(T, device=device) * patch  # (T,)
    return start < valid_n.to(device)[..., None]


def weighted_mean(err: Tensor, weight: Tensor) -> Tensor:
    """Per-subject mean of err (B, ...) over the True entries of weight (B, ...) -> (B,)."""
    w = weight.to(err.dtype)
    return (err * w).flatten(1).sum(-1) / w.flatten(1).sum(-1).clamp(min=1.0)


class M2AE(BioFPModel):
    """Cross-modal masked autoencoder with one fingerprint space for ECG, PPG and both."""

    name: ClassVar[str] = "m2ae"
    config: M2AEConfig

    def __init__(self, config: M2AEConfig | None = None):
        super().__init__()
        cfg = self.config = config if config is not None else M2AEConfig()
        enc = (cfg.width, cfg.modality_depth, cfg.heads, cfg.mlp_ratio)
        self.embed = nn.ModuleDict(
            {m: PatchEmbed(cfg.patch_samples, cfg.width) for m in MODALITIES}
        )
        self.encoders = nn.ModuleDict({m: Encoder(*enc) for m in MODALITIES})
        self.positions = SinusoidalPositions(cfg.n_patches, cfg.width)
        self.modality = LearnedTokens(len(MODALITIES), cfg.width)
        self.fusion = Encoder(cfg.width, cfg.fusion_depth, cfg.heads, cfg.mlp_ratio)
        if cfg.rhythm_token:
            self.rhythm = nn.ModuleDict(
                {
                    m: Dense(len(RHYTHM_FEATURES) + cfg.rhythm_template, cfg.width)
                    for m in MODALITIES
                }
            )
        self.head = Dense(cfg.width, cfg.fingerprint_dim)
        self.stats_head = Dense(cfg.fingerprint_dim, len(cfg.beat_stats))  # linear: probes see it
        if cfg.template_targets:  # like PaPaGei-S's morphology indices: the mean beat, linearly
            self.template_head = Dense(cfg.fingerprint_dim, 2 * cfg.template_targets)
        self.decoders = nn.ModuleDict({m: Decoder(cfg) for m in MODALITIES})

    # ---- encoding -------------------------------------------------------------------------------

    def _rhythm_features(
        self, m: int, windows: Tensor, valid_n: Tensor | None = None, points: int | None = None
    ) -> np.ndarray:
        """Rhythm features (B, S, F) of windows (B, S, L) of modality m, signal in the first
        `valid_n` (B, S) samples, the mean beat in `points` (default: the token's) (no gradient)."""
        flat = windows.detach().flatten(0, 1).cpu().float().numpy()  # (B*S, L)
        lengths = None if valid_n is None else torch.as_tensor(valid_n).flatten().cpu().numpy()
        points = self.config.rhythm_template if points is None else points
        features = rhythm_features(
            flat, modality=MODALITIES[m], template_points=points, valid_n=lengths
        )  # (B*S, F)
        return features.reshape(*windows.shape[:2], -1)

    def _bag_features(
        self, batch: Batch, avail: Tensor, points: int | None = None
    ) -> list[np.ndarray]:
        """Rhythm features (B, K, F) of each modality's windows in a batch of bags (mean beat in
        `points`, default the token's); all 0 where the modality is absent (no beats)."""
        present = avail.cpu().numpy()  # (B, K, 2)
        return [
            np.where(
                present[:, :, m, None],
                self._rhythm_features(m, batch[name], batch.get("valid_n"), points),
                0.0,
            )
            for m, name in enumerate(MODALITIES)
        ]

    def _rhythm_input(self, features: np.ndarray, like: Tensor) -> Tensor | None:
        """The rhythm token's input (B, S, F) on `like`'s device, or None without the token."""
        if not self.config.rhythm_token:
            return None
        return torch.from_numpy(features).to(like.device)

    def _encode(
        self, m: int, patches: Tensor, modality: Tensor, position: Tensor | None = None,
        rhythm: Tensor | None = None, patch_ok: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        """Patches (B, S, T', P) of modality m at `position` (B, S, T') -> tokens (B, S, T'', D).

        With `rhythm` (B, S, F), the modality's rhythm token is appended: T'' = T' + 1.
        `patch_ok` (B, S, T') False for padding patches: no token attends to them.
        modality (B, 2, D) holds both modality tokens, looked up once per forward pass (Opacus'
        ghost clipping refuses a module called twice).
        """
        pos = self.positions() if position is None else self.positions(position)  # (.., T', D)
        tokens = self.embed[MODALITIES[m]](patches) + pos  # (B, S, T', D)
        if rhythm is not None:
            beat = apply_flat(self.rhythm[MODALITIES[m]], rhythm)[:, :, None]  # (B, S, 1, D)
            tokens = torch.cat([tokens, beat], dim=2)
        mask = None
        if patch_ok is not None:
            mask = key_padding_mask(self._token_ok(patch_ok, rhythm is not None))
        tokens = self.encoders[MODALITIES[m]](tokens, mask)
        return tokens + modality[:, m, None, None]  # (B, S, T'', D)

    @staticmethod
    def _token_ok(patch_ok: Tensor, rhythm: bool) -> Tensor:
        """Token mask (..., T' [+1]) from a patch mask: the rhythm token is always valid."""
        if not rhythm:
            return patch_ok
        return torch.cat([patch_ok, patch_ok.new_ones(*patch_ok.shape[:-1], 1)], dim=-1)

    def _encode_windows(
        self, ecg: Tensor | None, ppg: Tensor | None, *, what: str, valid_n: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Every patch (and rhythm token) of ECG, PPG or both (B, L), fused: (B, 1, M, D), with
        the token mask (B, 1, M): False for padding patches of windows shorter than L."""
        given = [(m, x) for m, x in enumerate((as_windows(ecg), as_windows(ppg))) if x is not None]
        if not given:
            raise ValueError(f"{what} needs ECG, PPG or both")
        x0 = given[0][1]
        modality = self.modality(len(x0))  # (B, 2, D)
        shape = (len(x0), 1, self.config.n_patches)
        lengths = None if valid_n is None else torch.as_tensor(valid_n)[:, None]  # (B, 1)
        patch_ok = patch_valid(lengths, shape, self.config.patch_samples, x0.device)  # (B, 1, T)
        padded = not bool(patch_ok.all())  # whole windows: no mask, the fast attention path
        tokens, token_ok = [], []
        for m, x in given:
            rhythm = None
            if self.config.rhythm_token:  # beat detection only when the token is used
                features = self._rhythm_features(m, x[:, None], lengths)
                rhythm = self._rhythm_input(features, x)
            patches = patchify(x, self.config.patch_samples)[:, None]  # (B, 1, T, P)
            tokens.append(
                self._encode(
                    m, patches, modality, rhythm=rhythm, patch_ok=patch_ok if padded else None
                )
            )
            token_ok.append(self._token_ok(patch_ok, rhythm is not None))
        ok = torch.cat(token_ok, dim=2)  # (B, 1, M)
        return self.fusion(torch.cat(tokens, dim=2), key_padding_mask(ok) if padded else None), ok

    def fingerprint(
        self, ecg: Tensor | None = None, ppg: Tensor | None = None, valid_n: Tensor | None = None
    ) -> Tensor:
        """Fingerprints (B, D) from ECG, PPG or both; every signal patch is visible and padding
        patches (past `valid_n` (B,) samples) are kept out of attention and pooling."""
        h, ok = self._encode_windows(ecg, ppg, what="fingerprint", valid_n=valid_n)
        return self.head(masked_mean(h, ok)[:, 0])  # (B, D_fp)

    @torch.no_grad()
    def reconstruct(
        self, target: str, *, ecg: Tensor | None = None, ppg: Tensor | None = None
    ) -> Tensor:
        """Windows (B, L) of modality `target` decoded from ECG, PPG or both, every patch visible.

        ``reconstruct("ecg", ppg=x)`` is the cross-modal figure: ECG from PPG alone.
        """
        if target not in MODALITIES:
            raise ValueError(f"unknown modality {target!r}; valid: {', '.join(MODALITIES)}")
        fused, keep = self._encode_windows(ecg, ppg, what="reconstruct")  # (B,1,M,D), (B,1,M)
        return self.decoders[target](fused, keep)[:, 0].flatten(1)  # (B, L)

    # ---- training objective ---------------------------------------------------------------------

    def complementary_masks(
        self, B: int, K: int, device: torch.device, patch_ok: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Random disjoint masks per window.

        Returns hidden (B, K, 2, T) bool, True where a patch is hidden in ECG (index 0) or PPG (1),
        and visible (B, K, 2, V) the patch positions each modality keeps, V = T - hidden_patches.
        With `patch_ok` (B, K, T) (a padded window's signal patches), signal patches are drawn
        first and dealt alternately to the two hidden sets, so both modalities hide (and see)
        some of a short window's signal.
        """
        T, n = self.config.n_patches, self.config.hidden_patches
        key = torch.rand(B, K, T, device=device)
        if patch_ok is not None:
            key = key + (~patch_ok).to(key.dtype) * 2.0  # padding sorts last
        perm = key.argsort(dim=-1)  # (B, K, T)
        hide_ecg, hide_ppg, shared = (
            perm[..., 0 : 2 * n : 2],
            perm[..., 1 : 2 * n : 2],
            perm[..., 2 * n :],
        )
        visible = torch.stack(
            [torch.cat([hide_ppg, shared], -1), torch.cat([hide_ecg, shared], -1)], dim=2
        )  # (B, K, 2, V)
        hidden = torch.zeros(B, K, 2, T, dtype=torch.bool, device=device)
        hidden.scatter_(-1, torch.stack([hide_ecg, hide_ppg], dim=2), True)
        return hidden, visible

    def _drop_modality(self, avail: Tensor) -> Tensor:
        """avail (B, K, 2) -> keep (B, K, 2): paired windows lose ECG or PPG with prob p."""
        B, K, _ = avail.shape
        u = torch.rand(B, K, 2, device=avail.device)  # (drop?, which one) per window
        drop = (u[..., 0] < self.config.modality_dropout) & avail.all(-1)  # (B, K)
        drop_ecg = u[..., 1] < 0.5
        dropped = torch.stack([drop & drop_ecg, drop & ~drop_ecg], dim=-1)  # (B, K, 2)
        return avail & ~dropped

    def _fuse_views(self, tokens: Tensor, keep: Tensor, avail: Tensor, token_ok: Tensor) -> Tensor:
        """One fusion call over the joint and the single-modality views of each window.

        tokens (B, K, 2V, D) = [ECG visible | PPG visible]; keep/avail (B, K, 2); token_ok
        (B, K, 2V) False for padding patches, which no token attends to.
        Returns (B, 2K, 2V, D): [:, :K] the joint view, [:, K:] ECG-only and PPG-only side by side.
        """
        V = tokens.shape[2] // 2
        slot = torch.arange(2 * V, device=tokens.device) // V  # (2V,) modality of each slot
        same_modality = slot[:, None] == slot[None, :]  # (2V, 2V): block-diagonal
        joint = key_padding_mask(keep.repeat_interleave(V, dim=-1) & token_ok)  # (B, K, 2V, 2V)
        single = key_padding_mask(avail.repeat_interleave(V, dim=-1) & token_ok) & same_modality
        views = torch.cat([tokens, tokens], dim=1)  # (B, 2K, 2V, D)
        return self.fusion(views, torch.cat([joint, single], dim=1))

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-subject loss (B,) and terms recon/cross/align/stats[/template] (B,), each within
        one bag."""
        cfg = self.config
        avail = batch["mask"].bool()  # (B, K, 2) [has_ecg, has_ppg]
        B, K, _ = avail.shape
        patches = torch.stack(
            [patchify(batch[m].float(), cfg.patch_samples) for m in MODALITIES], 2
        )
        patch_ok = patch_valid(
            batch.get("valid_n"), (B, K, cfg.n_patches), cfg.patch_samples, avail.device
        )  # (B, K, T): False for padding patches
        hidden, visible = self.complementary_masks(B, K, avail.device, patch_ok)
        keep = self._drop_modality(avail)  # (B, K, 2)
        index = visible[..., None].expand(-1, -1, -1, -1, cfg.patch_samples)
        seen = patches.gather(3, index)  # (B, K, 2, V, P)
        seen_ok = patch_ok[:, :, None].expand(-1, -1, 2, -1).gather(3, visible)  # (B, K, 2, V)
        padded = not bool(patch_ok.all())
        modality = self.modality(B)  # (B, 2, D)
        features = self._bag_features(batch, avail)  # each (B, K, F)
        tokens = torch.cat(
            [
                self._encode(
                    m, seen[:, :, m], modality, visible[:, :, m],
                    rhythm=self._rhythm_input(features[m], patches),
                    patch_ok=seen_ok[:, :, m] if padded else None,
                )
                for m in (0, 1)
            ],
            dim=2,
        )  # (B, K, 2V, D); V counts the rhythm token  # fmt: skip
        V = tokens.shape[2] // 2
        rhythm = cfg.rhythm_token
        token_ok = torch.cat([self._token_ok(seen_ok[:, :, m], rhythm) for m in (0, 1)], dim=-1)
        h = self._fuse_views(tokens, keep, avail, token_ok)  # (B, 2K, 2V, D)
        slot_keep = keep.repeat_interleave(V, dim=-1) & token_ok  # (B, K, 2V)
        pooled = torch.stack(
            [
                masked_mean(h[:, :K], slot_keep),
                masked_mean(h[:, K:, :V], token_ok[..., :V]),
                masked_mean(h[:, K:, V:], token_ok[..., V:]),
            ],
            dim=1,
        )  # (B, 3, K, D): joint, ECG-only, PPG-only
        z = apply_flat(self.head, pooled)  # (B, 3, K, D_fp)
        terms = {
            **self._reconstruction(h[:, :K], slot_keep, patches, hidden, keep, avail, patch_ok),
            "align": self._alignment(z, keep, avail, batch.get("index")),
            "stats": self._statistics(
                z, keep, avail, *paired_statistics(*features, cfg.beat_stats)
            ),
        }
        total = (
            cfg.recon_weight * terms["recon"]
            + cfg.cross_weight * terms["cross"]
            + cfg.align_weight * terms["align"]
            + cfg.stats_weight * terms["stats"]
        )
        if cfg.template_targets:
            beats = features  # the token's mean beats, unless it holds another size
            if cfg.rhythm_template != cfg.template_targets:
                beats = self._bag_features(batch, avail, points=cfg.template_targets)
            terms["template"] = self._templates(z, keep, avail, beats)
            total = total + cfg.template_weight * terms["template"]
        return total, terms

    def _reconstruction(
        self, fused: Tensor, slot_keep: Tensor, patches: Tensor, hidden: Tensor, keep: Tensor,
        avail: Tensor, patch_ok: Tensor,
    ) -> dict[str, Tensor]:  # fmt: skip
        """recon: MSE on hidden patches of kept modalities; cross: every patch of dropped ones;
        padding patches (patch_ok (B, K, T) False) are no target."""
        pred = torch.stack([self.decoders[m](fused, slot_keep) for m in MODALITIES], 2)
        err = (pred - patches).pow(2).mean(-1)  # (B, K, 2, T)
        signal = patch_ok[:, :, None]  # (B, K, 1, T): padding is never a target
        recon = hidden & keep[..., None] & signal  # (B, K, 2, T)
        cross = (avail & ~keep)[..., None] & signal  # (B, K, 2, T)
        return {"recon": weighted_mean(err, recon), "cross": weighted_mean(err, cross)}

    def _alignment(self, z: Tensor, keep: Tensor, avail: Tensor, index: Tensor | None) -> Tensor:
        """Mean within-bag InfoNCE over the view pairs (ECG, PPG), (joint, ECG), (joint, PPG)."""
        K = z.shape[2]
        if index is None:
            same = torch.zeros(z.shape[0], K, K, dtype=torch.bool, device=z.device)
        else:
            same = index[:, :, None] == index[:, None, :]  # (B, K, K)
        has_joint, has_ecg, has_ppg = keep.any(-1), avail[..., 0], avail[..., 1]
        t = self.config.temperature
        return (
            info_nce(z[:, 1], z[:, 2], has_ecg & has_ppg, same, t)
            + info_nce(z[:, 0], z[:, 1], has_joint & has_ecg, same, t)
            + info_nce(z[:, 0], z[:, 2], has_joint & has_ppg, same, t)
        ) / 3

    def _statistics(
        self, z: Tensor, keep: Tensor, avail: Tensor, stats: np.ndarray, ok: np.ndarray
    ) -> Tensor:
        """MSE of the beat statistics (B, K, S) predicted linearly from every view's fingerprint.

        Each view (joint, ECG-only, PPG-only) must carry the window's rhythm on its own, which is
        what lets a PPG-only fingerprint tell atrial fibrillation from sinus rhythm.
        """
        target = torch.from_numpy(stats).to(z.device)[:, None]  # (B, 1, K, S)
        pred = apply_flat(self.stats_head, z)  # (B, 3, K, S)
        err = (pred - target).pow(2).mean(-1)  # (B, 3, K)
        views = torch.stack([keep.any(-1), avail[..., 0], avail[..., 1]], dim=1)  # (B, 3, K)
        return weighted_mean(err, views & torch.from_numpy(ok).to(z.device)[:, None])

    def _templates(
        self, z: Tensor, keep: Tensor, avail: Tensor, features: list[np.ndarray]
    ) -> Tensor:
        """MSE of each signal's mean beat predicted linearly from every view's fingerprint: the
        joint view both kept signals', a one-signal view its own. `features` (B, K, F) per
        modality: rhythm features whose last ``template_targets`` columns are the mean beat
        (all 0 for an absent signal or too few beats: no target).

        The rhythm statistics say how beats follow each other; the mean beat is their shape
        (QRS and pulse morphology), which the patch tokens see but nothing else asks to keep.
        """
        N = self.config.template_targets
        target = torch.from_numpy(np.stack([f[..., -N:] for f in features], 2)).to(z.device)
        has = torch.from_numpy(np.stack([f[..., 0] > 0 for f in features], -1)).to(z.device)
        pred = apply_flat(self.template_head, z).unflatten(-1, (2, N))  # (B, 3, K, 2, N)
        err = (pred - target[:, None].float()).pow(2).mean(-1)  # (B, 3, K, 2)
        own = torch.eye(2, dtype=torch.bool, device=z.device)  # a one-signal view: its own
        joint = keep & avail if self.config.joint_templates else torch.zeros_like(keep)
        views = torch.stack([joint, avail & own[0], avail & own[1]], dim=1)  # (B, 3, K, 2)
        return weighted_mean(err, views & has[:, None])

    # ---- data -----------------------------------------------------------------------------------

    def draw_bag(
        self, subject: SubjectWindows, *, bag_size: int, rng: np.random.Generator
    ) -> dict[str, np.ndarray] | None:
        """K windows with ECG and/or PPG, good-quality first, with replacement if fewer than K.

        Returns arrays "ecg", "ppg" (K, L) float32, "mask" (K, 2) bool, "index" (K,) int64 (the
        windows' positions in `subject`), "valid_n" (K,) int64 (signal samples; padding
        follows), or None when no window has either modality.
        """
        mask = np.asarray(subject.mask, dtype=bool)
        usable = np.flatnonzero(mask.any(axis=1))
        if len(usable) == 0:
            return None
        quality = np.where(mask, np.nan_to_num(subject.quality, nan=0.0), np.nan)[usable]
        with np.errstate(invalid="ignore"):
            good = np.nanmin(quality, axis=1) >= self.config.good_quality  # every present modality
        order = np.concatenate([rng.permutation(usable[good]), rng.permutation(usable[~good])])
        chosen = order[:bag_size]
        if len(chosen) < bag_size:
            chosen = np.concatenate([chosen, rng.choice(chosen, bag_size - len(chosen))])
        return {
            "ecg": np.asarray(subject.ecg[chosen], dtype=np.float32),
            "ppg": np.asarray(subject.ppg[chosen], dtype=np.float32),
            "mask": mask[chosen],
            "index": chosen.astype(np.int64),
            "valid_n": subject.valid_samples()[chosen].astype(np.int64),
        }
