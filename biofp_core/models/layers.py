"""Opacus-friendly building blocks of M2AE's transformer (SiamQuality, a ConvNet, does not use
them: it is built from torch's Conv1d, GroupNorm and Linear, which Opacus supports as they are).

Every trainable parameter lives in an ``nn.Linear`` (as ``Dense``) or an ``nn.Embedding``: layers
Opacus has exact per-sample gradient rules for. LayerNorms have no affine parameters (the Linear
that follows each one absorbs them). There are no bare ``nn.Parameter`` s, no BatchNorm and no
``nn.MultiheadAttention``; attention is plain tensor math between two Linear layers.

The subject stays dimension 0 of every tensor, and a bag's windows are an extra dimension:
``(B, S, T, D)`` = subjects, sequences per subject (windows or views of windows), tokens, width.
Before a Linear the middle dimensions are flattened into one, ``(B, S * T, D)``: Opacus' Linear rule
sums over every dimension between the first and the last, so the per-sample gradient it returns is
the gradient of one subject's whole loss (all of its windows), and the 3-D layout also suits Opacus'
ghost-clipping norm rule, which accepts 2-D or 3-D inputs only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _LinearInputGradOnly(torch.autograd.Function):
    """y = x W^T + b whose backward returns the input gradient only (no batch weight gradient)."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(
        ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: Tensor
    ) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor) -> tuple:
        (weight,) = ctx.saved_tensors
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        return grad_x, None, None


class Dense(nn.Linear):
    """``nn.Linear`` that can leave its weight gradient to Opacus' per-sample hooks.

    Under DP-SGD with hooks, Opacus computes each subject's weight gradient from the activations and
    output gradients it captures, then overwrites ``.grad`` with the clipped, noised sum: the batch
    weight gradient autograd computes as well is thrown away. With ``batch_weight_grad = False``
    (set by ``biofp_core.privacy`` while DP training runs) that matmul is skipped. Otherwise it is
    exactly ``nn.Linear``.
    """

    batch_weight_grad: bool = True

    def forward(self, x: Tensor) -> Tensor:
        if self.batch_weight_grad or not torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        return _LinearInputGradOnly.apply(x, self.weight, self.bias)


def apply_flat(layer: nn.Module, x: Tensor) -> Tensor:
    """Apply `layer` to x (B, ..., D_in) as (B, N, D_in), N = product of the middle dims."""
    middle = x.shape[1:-1]
    y = layer(x.reshape(x.shape[0], -1, x.shape[-1]))  # (B, N, D_out)
    return y.reshape(x.shape[0], *middle, y.shape[-1])


def patchify(x: Tensor, patch_samples: int) -> Tensor:
    """Cut windows (..., L) into non-overlapping patches (..., L / P, P)."""
    if x.shape[-1] % patch_samples:
        raise ValueError(f"window length {x.shape[-1]} is not a multiple of {patch_samples}")
    return x.unflatten(-1, (x.shape[-1] // patch_samples, patch_samples))


def sinusoidal_table(n_positions: int, width: int) -> Tensor:
    """Fixed sine/cosine positional encodings (n_positions, width) of Vaswani et al. (2017)."""
    position = torch.arange(n_positions, dtype=torch.float32)[:, None]  # (T, 1)
    freq = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(1e4) / width))
    table = torch.zeros(n_positions, width)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: width // 2])
    return table


class SinusoidalPositions(nn.Module):
    """Positional encodings as a non-persistent buffer: no parameters, not in the state dict."""

    def __init__(self, n_positions: int, width: int):
        super().__init__()
        self.register_buffer("table", sinusoidal_table(n_positions, width), persistent=False)

    def forward(self, index: Tensor | None = None) -> Tensor:
        """Encodings of all positions (T, D), or of `index` (...,) -> (..., D)."""
        return self.table if index is None else self.table[index]


class LearnedTokens(nn.Module):
    """A few learned vectors (e.g. modality or mask tokens) held in an ``nn.Embedding``.

    Opacus cannot give per-sample gradients for a bare ``nn.Parameter``, but it can for an embedding
    looked up with a per-subject index tensor, so the lookup is done with a (B, n) index.
    """

    def __init__(self, n_tokens: int, width: int):
        super().__init__()
        self.table = nn.Embedding(n_tokens, width)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, batch_size: int) -> Tensor:
        """All tokens for each subject: (B, n, D)."""
        index = torch.arange(self.table.num_embeddings, device=self.table.weight.device)
        return self.table(index.repeat(batch_size, 1))  # (B, n, D)


class PatchEmbed(nn.Module):
    """Linear projection of patches (B, ..., P) -> tokens (B, ..., D)."""

    def __init__(self, patch_samples: int, width: int):
        super().__init__()
        self.proj = Dense(patch_samples, width)

    def forward(self, patches: Tensor) -> Tensor:
        return apply_flat(self.proj, patches)


class SelfAttention(nn.Module):
    """Multi-head self-attention within each sequence; q/k/v and output are plain Linears."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = Dense(width, 3 * width)
        self.out = Dense(width, width)

    def forward(self, x: Tensor, seq_len: int, attn_mask: Tensor | None = None) -> Tensor:
        """x (B, S*T, D) holds S sequences of T = seq_len tokens per subject.

        attn_mask: bool, broadcastable to (B, S, T, T), True where a query may attend to a key.
        """
        B, N, D = x.shape
        S, H = N // seq_len, self.heads
        qkv = self.qkv(x).view(B * S, seq_len, 3, H, D // H).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B*S, H, T, Dh)
        if attn_mask is not None:
            attn_mask = attn_mask.expand(B, S, seq_len, seq_len).reshape(B * S, 1, seq_len, seq_len)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B*S, H, T, Dh)
        y = y.transpose(1, 2).reshape(B, N, D)  # (B, S*T, D)
        return self.out(y)


class MLP(nn.Module):
    """Two Linears with a GELU between them."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc = Dense(width, hidden)
        self.proj = Dense(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block on (B, S*T, D)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, elementwise_affine=False)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, elementwise_affine=False)
        self.mlp = MLP(width, mlp_ratio * width)

    def forward(self, x: Tensor, seq_len: int, attn_mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), seq_len, attn_mask)
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    """A stack of blocks and a final LayerNorm over (B, S, T, D) sequences of tokens."""

    def __init__(self, width: int, depth: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width, elementwise_affine=False)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """x (B, S, T, D); attn_mask bool broadcastable to (B, S, T, T) -> (B, S, T, D)."""
        B, S, T, D = x.shape
        h = x.reshape(B, S * T, D)  # (B, S*T, D): one row of tokens per subject
        for block in self.blocks:
            h = block(h, T, attn_mask)
        return self.ln_f(h).view(B, S, T, D)


def key_padding_mask(keep: Tensor) -> Tensor:
    """Attention mask from a token mask keep (..., T): queries see kept keys and themselves.

    Letting every query see itself keeps rows finite when all keys of a sequence are dropped.
    """
    eye = torch.eye(keep.shape[-1], dtype=torch.bool, device=keep.device)
    return keep[..., None, :] | eye  # (..., T, T)


def masked_mean(x: Tensor, keep: Tensor) -> Tensor:
    """Mean of x (..., T, D) over the kept tokens keep (..., T) -> (..., D); zeros if none kept."""
    w = keep.to(x.dtype)[..., None]  # (..., T, 1)
    return (x * w).sum(-2) / w.sum(-2).clamp(min=1.0)
