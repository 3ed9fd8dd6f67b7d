"""DP-SGD for any BioFP model: a small façade over Opacus with the SUBJECT as the privacy unit.

A training sample is a bag of K windows of one subject (``BioFPModel.draw_bag``) and every model
keeps the subject as dimension 0 of every tensor, so the "per-sample" gradient Opacus clips is the
gradient of one subject's loss over all of its windows. Subjects are Poisson-sampled
with rate q = batch_subjects / n_subjects; the RDP accountant's history
``[(noise_multiplier, sample_rate, steps), ...]`` is the privacy ledger and can be continued across
rounds and runs.

How the DP step stays within 1.5x of the plain step (README; bench/encoders.py, default M2AE,
2 cores; naive Opacus on a transformer costs 2.6-8x):
- ``grad_sample_mode="hooks"`` (default). Opacus' Linear rule gets each subject's weight gradient
  with one batched matmul over all of that subject's tokens; LayerNorms carry no affine parameters
  (the following Linear absorbs them), so nothing else needs per-sample work.
- ``Dense`` layers (``biofp_core.models.layers``) skip the batch weight gradient autograd would also
  compute: DPOptimizer overwrites ``.grad`` with the clipped, noised sum of per-sample gradients, so
  that matmul is pure waste. :class:`PrivateTraining` gives ``Dense`` Opacus' Linear rules
  (:func:`register_dense_rules`) and switches the batch weight gradient off while it is attached
  (``close()`` switches it back on). The per-sample matmul then replaces the batch one instead of
  being added to it; what is left is clipping, noise, hook bookkeeping and small batched matmuls.
- ``"ghost"`` (Opacus fast gradient clipping) is supported but slower here (1.8-2.9x): it needs a
  second backward pass, and its Linear norm rule costs O(tokens^2) per subject, large for a bag of
  K windows of T tokens. ``"functorch"`` is kept for models with layers Opacus has no rule for.
- Many windows per subject amortise the per-subject costs (they scale with subjects x parameters,
  compute with subjects x windows x tokens): a federated run's bags hold 8 windows by default
  (run config ``bag-size``); ``TrainConfig`` and the benchmark default to 16.
Measured (DP step / plain step, medians of interleaved steps in one run, quiet machine,
``bench/encoders.py --compare batch-wgrad,ghost``, 16 subjects x 16 windows): hooks + Dense
1.18-1.21, hooks keeping the batch weight gradient 1.29, ghost 2.93. With affine LayerNorms and
8-window bags, stock hooks measured 1.4-1.7.
The sample rate q is the caller's (:func:`poisson_rate`; a site passes the very q its ledger was
charged for): the engine never derives its own.
Poisson batches use Opacus' ``UniformWithReplacementSampler`` with the exact rate (``DPDataLoader``
derives the rate from ``len(loader)`` and cannot rebuild a dict batch if the first one is empty);
an empty batch still takes a noise-only step, as the accountant assumes.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from opacus.accountants import RDPAccountant
from opacus.grad_sample import prepare_module, register_grad_sampler, register_norm_sampler
from opacus.grad_sample.linear import compute_linear_grad_sample, compute_linear_norm_sample
from opacus.optimizers import DPOptimizer, get_optimizer_class
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from biofp_core.errors import ConfigError, DataError
from biofp_core.models.layers import Dense
from biofp_core.privacy.accounting import poisson_rate, rdp_epsilon

HistoryEntry = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)

__all__ = ["DPConfig", "HistoryEntry", "PrivacyReport", "PrivateTraining", "poisson_rate"]


class DPConfig(BaseModel):
    """DP-SGD settings of one site. The privacy unit is the subject."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    noise_multiplier: float = Field(1.0, ge=0, description="noise std / max_grad_norm")
    max_grad_norm: float = Field(1.0, gt=0, description="clip bound C of each subject's gradient")
    delta: float = Field(1e-5, gt=0, lt=1, description="δ at which ε is reported")
    accountant: Literal["rdp"] = "rdp"
    grad_sample_mode: Literal["hooks", "ghost", "functorch"] = "hooks"
    seed: int | None = Field(
        None,
        description="seeds Poisson sampling and noise; None = OS entropy (needed for a guarantee)",
    )


def _as_history(history: Sequence[Sequence[float]]) -> list[HistoryEntry]:
    return [(float(s), float(q), int(n)) for s, q, n in history]


@functools.cache
def register_dense_rules() -> None:
    """Give ``Dense`` (an ``nn.Linear``) Opacus' Linear grad-sample and norm rules: Opacus looks
    rules up by exact type. Idempotent; called whenever a :class:`PrivateTraining` is built."""
    register_grad_sampler(Dense)(compute_linear_grad_sample)
    register_norm_sampler(Dense)(compute_linear_norm_sample)


@dataclass(frozen=True)
class PrivacyReport:
    """What one DP training run spent, and the ledger after it."""

    epsilon: float  # ε at δ over the whole history (previous runs included)
    delta: float
    history: list[HistoryEntry]  # accountant history after this run
    steps: int  # DP steps in this run (empty Poisson batches included)
    empty_steps: int  # steps whose Poisson batch held no subject (noise only)
    sample_rate: float  # q: Poisson rate of subjects per step
    noise_multiplier: float
    max_grad_norm: float


class _PerSubjectLoss(nn.Module):
    """Identity 'criterion' for Opacus' ghost clipping: the model already returns (B,) losses."""

    reduction = "mean"

    def forward(self, loss: Tensor) -> Tensor:
        return loss


def _generator(seed: int | None) -> torch.Generator:
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    else:
        warnings.warn(
            "DPConfig.seed is set: sampling and noise are reproducible by whoever knows the seed",
            stacklevel=3,
        )
    return torch.Generator().manual_seed(seed)


def _check_model(model: nn.Module) -> None:
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ConfigError(f"model is not DP-compatible: {errors[0]}")


class PrivateTraining:
    """Per-subject DP-SGD attached to one model for one run; ``close()`` detaches it.

    The model itself is never wrapped: Opacus hooks are attached to its layers, so its parameters
    are trained in place and its state dict keeps its own keys (no ``_module.`` prefix).

    Parameters
    ----------
    model
        The model to train; its ``loss`` is called directly by the training loop.
    optimizer
        A plain torch optimizer over ``model.parameters()``.
    dataset
        One item per subject (a bag); ``len(dataset)`` is the number of subjects n.
    dp
        Noise, clip, δ and grad-sample mode.
    sample_rate
        q, the Poisson rate of each subject per step (:func:`poisson_rate`): what the caller
        charged or will account for; ``q * n`` subjects are expected per step.
    steps
        Number of Poisson batches the loader yields.
    collate_fn
        Stacks a list of bags into a batch; called only for non-empty batches.
    history
        Accountant history to continue (the site's ledger), oldest first.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        dataset: Dataset,
        *,
        dp: DPConfig,
        sample_rate: float,
        steps: int,
        collate_fn: Callable[[list], dict[str, Tensor]],
        history: Sequence[Sequence[float]] | None = None,
    ):
        n = len(dataset)  # type: ignore[arg-type]
        if n == 0:
            raise DataError("no subject has data this model can train on")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample rate q={sample_rate!r} is not in (0, 1]")
        register_dense_rules()
        _check_model(model)
        if dp.noise_multiplier == 0:
            warnings.warn("DP-SGD without noise: clipping only, ε is infinite", stacklevel=2)
        self.dp, self.model = dp, model
        self.sample_rate = float(sample_rate)
        self.steps, self.empty_steps = 0, 0
        rng = _generator(dp.seed)
        self.hooks = prepare_module(
            model, grad_sample_mode=dp.grad_sample_mode, wrap_model=False,
            batch_first=True, loss_reduction="mean",
            **({"max_grad_norm": dp.max_grad_norm} if dp.grad_sample_mode == "ghost" else {}),
        )  # fmt: skip
        self.hooks.forbid_grad_accumulation()  # one Poisson batch per step, as accounted
        optim_class = get_optimizer_class("flat", False, grad_sample_mode=dp.grad_sample_mode)
        self.optimizer: DPOptimizer = optim_class(
            optimizer, noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
            expected_batch_size=self.sample_rate * n, loss_reduction="mean", generator=rng,
        )  # fmt: skip
        self.accountant = RDPAccountant()
        self.accountant.history = _as_history(history or [])
        self.optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(self.sample_rate))
        self.criterion = None
        if dp.grad_sample_mode == "ghost":
            self.criterion = DPLossFastGradientClipping(
                self.hooks, self.optimizer, _PerSubjectLoss()
            )
        sampler = UniformWithReplacementSampler(
            num_samples=n, sample_rate=self.sample_rate, generator=rng, steps=steps
        )
        self.loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=_keep_empty(collate_fn))
        self._dense = [m for m in model.modules() if isinstance(m, Dense)]
        for layer in self._dense:  # per-sample hooks replace the batch weight gradient
            layer.batch_weight_grad = dp.grad_sample_mode != "hooks"

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: Tensor) -> None:
        """Backward of per-subject losses (B,): per-subject gradients, clipped at step()."""
        with warnings.catch_warnings():
            # Opacus' hooks on the first layer (its input needs no grad) trigger a benign warning
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            warnings.filterwarnings("ignore", message="In CPU autocast")
            if self.criterion is not None:
                self.criterion(loss).backward()
            else:
                loss.mean().backward()

    def step(self, *, after_noise: Callable[[], None] | None = None) -> None:
        """Clip, noise, account, call `after_noise` (data-independent gradient terms), update."""
        if self.criterion is None:  # per-sample gradients (hooks): ghost clipping keeps none
            drop_non_finite_subjects(self.optimizer.params)
        if self.optimizer.pre_step():
            if after_noise is not None:
                after_noise()
            self.optimizer.original_optimizer.step()
        self.steps += 1

    def empty_step(self, *, after_noise: Callable[[], None] | None = None) -> None:
        """A step for an empty Poisson batch: zero gradient + noise, counted by the accountant."""
        self.zero_grad()
        for p in self.optimizer.params:
            if self.criterion is not None:
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = p.new_zeros((0, *p.shape))
        self.empty_steps += 1
        self.step(after_noise=after_noise)

    def report(self) -> PrivacyReport:
        history = _as_history(self.accountant.history)
        return PrivacyReport(
            epsilon=rdp_epsilon(history, delta=self.dp.delta),
            delta=self.dp.delta,
            history=history,
            steps=self.steps,
            empty_steps=self.empty_steps,
            sample_rate=self.sample_rate,
            noise_multiplier=self.dp.noise_multiplier,
            max_grad_norm=self.dp.max_grad_norm,
        )

    def close(self) -> None:
        """Remove hooks and per-sample state; the model is a plain module again."""
        for layer in self._dense:
            layer.batch_weight_grad = True
        self.optimizer.zero_grad(set_to_none=True)
        self.hooks.cleanup()
        for p in self.model.parameters():
            for attr in ("grad_sample", "summed_grad"):
                if hasattr(p, attr):
                    delattr(p, attr)


def drop_non_finite_subjects(params: Sequence[nn.Parameter]) -> int:
    """Zero every per-subject gradient of a subject whose gradient holds a NaN or an inf.

    Clipping scales a gradient by C / its norm, which leaves a non-finite gradient non-finite,
    and Gaussian noise does not hide a NaN: one crafted subject would otherwise turn the whole
    update into NaN, an exact bit that the charged noise does not cover. A zeroed subject
    contributes nothing (norm 0 <= C), so the sensitivity the ledger charged still holds.
    Returns how many subjects were dropped."""
    samples = [g for p in params for g in _grad_samples(p)]
    if not samples:
        return 0
    finite = torch.stack([g.flatten(1).isfinite().all(dim=1) for g in samples]).all(dim=0)
    for g in samples:
        g[~finite] = 0.0
    return int((~finite).sum())


def _grad_samples(p: nn.Parameter) -> list[Tensor]:
    """The per-sample gradients Opacus keeps on `p` (a tensor, or a list after several passes)."""
    value = getattr(p, "grad_sample", None)
    if value is None:
        return []
    return [g for g in (value if isinstance(value, list) else [value]) if g.shape[0] > 0]


def _keep_empty(collate_fn: Callable[[list], dict[str, Tensor]]) -> Callable[[list], dict | None]:
    """Collate that returns None for an empty Poisson batch instead of failing."""

    def collate(items: list) -> dict[str, Tensor] | None:
        return collate_fn(items) if items else None

    return collate
