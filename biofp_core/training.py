"""One local training loop for every BioFP model, with or without DP-SGD.

The same ``train_local`` serves the Flower client, the simulation and the centralised baseline
(so their figures compare). It knows nothing about objectives: a model draws its own bags
(``draw_bag``) and returns per-subject losses (``loss``); the loop samples subjects, steps the
optimizer and, under DP, lets ``biofp_core.privacy`` clip each subject's gradient, add noise and
account for it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.progress import Progress
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from biofp_core.errors import DataError
from biofp_core.models.base import Batch, BioFPModel, SubjectWindows
from biofp_core.privacy import DPConfig, PrivacyReport, PrivateTraining, poisson_rate
from biofp_core.privacy.mechanisms import NoisyLossSums, metric_rows, noise_rng

logger = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    """Local training settings of one site (one round, or one centralised run)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int | None = Field(None, ge=1, description="optimizer steps; default one epoch")
    batch_subjects: int = Field(16, ge=1, description="subjects per step (expected, under DP)")
    bag_size: int = Field(16, ge=1, description="K, windows per subject's bag")
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    seed: int = 0
    proximal_mu: float | None = Field(None, ge=0, description="FedProx: mu/2 ||w - w_ref||^2")
    trainable: Literal["all", "biases"] = Field(
        "all",
        description="parameters that train: all, or only the bias terms (BitFit; under DP-SGD "
        "the noise grows with the square root of the trained parameters)",
    )

    def total_steps(self, n_subjects: int) -> int:
        """Steps of this run: `steps`, else one epoch, ceil(n_subjects / batch_subjects) steps."""
        if self.steps is not None:
            return self.steps
        return math.ceil(n_subjects / self.batch_subjects)


@dataclass(frozen=True)
class TrainResult:
    """What one call of ``train_local`` did."""

    steps: int
    examples: int  # subject bags seen (sum of batch sizes)
    mean_loss: float  # mean per-subject loss over every bag seen
    final_loss: float  # mean loss of the last non-empty batch
    terms: dict[str, float] = field(default_factory=dict)  # mean of each named term
    wall_s: float = 0.0
    privacy: PrivacyReport | None = None
    noisy_loss: float | None = None  # under DP: the loss estimate that may leave the site
    noisy_terms: dict[str, float] = field(default_factory=dict)  # under DP: each term's estimate


class MetricNoise(BaseModel):
    """The Gaussian noise on a DP round's loss sums (``privacy.mechanisms.NoisyLossSums``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    clip: float = Field(gt=0, description="C: L2 clip of each subject's loss vector")
    noise_multiplier: float = Field(gt=0, description="σ: noise std / C, per step")
    seed: int | None = Field(None, description="None: OS entropy")


class SubjectBagDataset(Dataset):
    """Item i = a fresh bag of subject i drawn by the model; subjects without a bag are skipped."""

    def __init__(
        self, model: BioFPModel, subjects: Sequence[SubjectWindows], *, bag_size: int, seed: int
    ):
        self.model, self.bag_size = model, bag_size
        self.rng = np.random.default_rng(seed)
        self.subjects = [
            s for s in subjects if model.draw_bag(s, bag_size=bag_size, rng=self.rng) is not None
        ]

    def __len__(self) -> int:
        return len(self.subjects)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        subject = self.subjects[i]
        bag = self.model.draw_bag(subject, bag_size=self.bag_size, rng=self.rng)
        if bag is None:
            raise DataError(f"subject {subject.subject_id}: no usable bag")
        return {k: torch.as_tensor(v) for k, v in bag.items()}


def collate_bags(items: list[dict[str, Tensor]]) -> Batch:
    """Stack bags (K, ...) into a batch (B, K, ...)."""
    return {k: torch.stack([item[k] for item in items]) for k in items[0]}


def _freeze(model: BioFPModel, trainable: str) -> list[torch.nn.Parameter]:
    """Turn off the gradients of the parameters that do not train; returns them (to restore)."""
    if trainable == "all":
        return []
    frozen = [
        p for name, p in model.named_parameters() if p.requires_grad and not name.endswith(".bias")
    ]
    for p in frozen:
        p.requires_grad_(False)
    return frozen


def _make_optimizer(model: BioFPModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.0, weight_decay=0.0)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, weight_decay=0.0)  # AdamW's own default would decay


class _Proximal:
    """FedProx: adds mu * (w - w_ref) to each gradient; value() = mu/2 ||w - w_ref||^2."""

    def __init__(self, model: BioFPModel, mu: float, reference: Mapping[str, Tensor] | None):
        ref = reference if reference is not None else model.state_dict()
        self.mu = mu
        self.pairs = [(p, ref[n].detach().clone()) for n, p in model.named_parameters()]

    @torch.no_grad()
    def __call__(self) -> None:
        for p, ref in self.pairs:
            pull = self.mu * (p - ref)
            p.grad = pull if p.grad is None else p.grad.add_(pull)

    @torch.no_grad()
    def value(self) -> float:
        return 0.5 * self.mu * sum(float((p - ref).pow(2).sum()) for p, ref in self.pairs)


def _cycle(loader: DataLoader, steps: int) -> Iterator[Batch]:
    """`steps` batches from a shuffled loader, starting a new epoch whenever one ends."""
    done = 0
    while done < steps:
        for batch in loader:
            yield batch
            done += 1
            if done == steps:
                return


class _Meter:
    """Subject-weighted means of the loss and of each term."""

    def __init__(self) -> None:
        self.n, self.loss, self.last = 0, 0.0, float("nan")
        self.terms: dict[str, float] = {}

    def add(self, loss: Tensor, terms: Mapping[str, Tensor], step: int) -> None:
        loss = loss.detach()
        if not torch.isfinite(loss).all():
            raise DataError(f"loss is not finite at step {step}: lower lr or check the data")
        self.n += len(loss)
        self.loss += float(loss.sum())
        self.last = float(loss.mean())
        for k, v in terms.items():
            self.terms[k] = self.terms.get(k, 0.0) + float(v.detach().sum())

    def means(self) -> tuple[float, dict[str, float]]:
        n = max(self.n, 1)
        return self.loss / n if self.n else float("nan"), {k: v / n for k, v in self.terms.items()}


def _plain_step(
    optimizer: torch.optim.Optimizer, loss: Tensor, after_grad: Callable[[], None] | None
) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.mean().backward()
    if after_grad is not None:
        after_grad()
    optimizer.step()


def _loop(
    model: BioFPModel, batches: Iterator[Batch | None], steps: int,
    optimizer: torch.optim.Optimizer, private: PrivateTraining | None, prox: _Proximal | None,
    progress: bool, sums: NoisyLossSums | None,
) -> _Meter:  # fmt: skip
    meter = _Meter()
    bar = Progress(transient=True) if progress else contextlib.nullcontext()
    with bar:
        task = bar.add_task(f"training {model.name}", total=steps) if progress else None
        for step, batch in enumerate(batches, start=1):
            if batch is None:  # empty Poisson batch: noise-only step
                assert private is not None
                private.empty_step(after_noise=prox)
                if sums is not None:
                    sums.add_empty()
            elif private is not None:
                private.zero_grad()
                loss, terms = model.loss(batch)
                if sums is not None:  # before the meter, which refuses a non-finite loss
                    sums.add(_numpy(loss), {k: _numpy(v) for k, v in terms.items()})
                private.backward(loss)
                private.step(after_noise=prox)
                meter.add(loss, terms, step)
            else:
                loss, terms = model.loss(batch)
                _plain_step(optimizer, loss, prox)
                meter.add(loss, terms, step)
            if progress:
                bar.update(task, advance=1, description=f"{model.name} loss {meter.last:.4f}")
    return meter


def _numpy(values: Tensor) -> np.ndarray:
    return values.detach().cpu().double().numpy()


def train_local(
    model: BioFPModel,
    subjects: Sequence[SubjectWindows],
    cfg: TrainConfig,
    *,
    dp: DPConfig | None = None,
    metric_noise: MetricNoise | None = None,
    ledger_history: Sequence[Sequence[float]] | None = None,
    sample_rate: float | None = None,
    reference: Mapping[str, Tensor] | None = None,
    progress: bool = False,
) -> TrainResult:
    """Train `model` in place on the subjects' bags.

    Parameters
    ----------
    model
        Any BioFP model; its own ``draw_bag`` and ``loss`` define the objective.
    subjects
        The site's subjects; those without a usable bag are skipped.
    cfg
        Steps, batch, optimizer and seed.
    dp
        Per-subject DP-SGD settings; None trains without privacy.
    metric_noise
        Under DP: noise the per-step loss sums (same q and steps as the gradients) and return
        the estimate as ``noisy_loss``/``noisy_terms``.
    ledger_history
        Accountant history of earlier rounds/runs, continued under DP.
    sample_rate
        Under DP: q, the Poisson rate of subjects per step, as the caller charged it (a site's
        round plan); default :func:`~biofp_core.privacy.dp.poisson_rate` of
        ``cfg.batch_subjects`` and the subjects that can train.
    reference
        FedProx reference weights (state dict); default the weights at the start of this call.
    progress
        Show a rich progress bar.
    """
    start = time.perf_counter()
    was_training = model.training
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        dataset = SubjectBagDataset(model, subjects, bag_size=cfg.bag_size, seed=cfg.seed)
        if len(dataset) == 0:
            raise DataError(f"no subject has data {model.name} can train on")
        steps = cfg.total_steps(len(dataset))
        frozen = _freeze(model, cfg.trainable)
        private = None
        try:
            optimizer = _make_optimizer(model, cfg)
            prox = _Proximal(model, cfg.proximal_mu, reference) if cfg.proximal_mu else None
            if dp is not None:
                if sample_rate is None:
                    sample_rate = poisson_rate(cfg.batch_subjects, len(dataset))
                private = PrivateTraining(
                    model, optimizer, dataset, dp=dp, sample_rate=sample_rate, steps=steps,
                    collate_fn=collate_bags, history=ledger_history,
                )  # fmt: skip
            model.train()
            batches = iter(private.loader) if private else _cycle(_shuffled(dataset, cfg), steps)
            sums = None
            if private is not None and metric_noise is not None:
                rng = noise_rng(metric_noise.seed)
                sums = NoisyLossSums(
                    clip=metric_noise.clip, noise_multiplier=metric_noise.noise_multiplier, rng=rng
                )
            meter = _loop(model, batches, steps, optimizer, private, prox, progress, sums)
        finally:
            if private is not None:
                private.close()
            for p in frozen:
                p.requires_grad_(True)
            model.train(was_training)
    mean_loss, terms = meter.means()
    if prox is not None:
        terms["prox"] = prox.value()
    noisy = None
    if sums is not None and private is not None:
        noisy = sums.estimate(expected_subjects=private.sample_rate * len(dataset))
    result = TrainResult(
        steps=steps,
        examples=meter.n,
        mean_loss=mean_loss,
        final_loss=meter.last,
        terms=terms,
        wall_s=time.perf_counter() - start,
        privacy=private.report() if private is not None else None,
        noisy_loss=noisy[0] if noisy else None,
        noisy_terms=noisy[1] if noisy else {},
    )
    logger.info("trained %s: %d steps, %d bags, loss %.4f", model.name, steps, meter.n, mean_loss)
    return result


def _shuffled(dataset: SubjectBagDataset, cfg: TrainConfig) -> DataLoader:
    generator = torch.Generator().manual_seed(cfg.seed)
    return DataLoader(
        dataset, batch_size=cfg.batch_subjects, shuffle=True, generator=generator,
        collate_fn=collate_bags,
    )  # fmt: skip


@torch.no_grad()
def subject_losses(
    model: BioFPModel,
    subjects: Sequence[SubjectWindows],
    *,
    bag_size: int,
    seed: int,
    batch_subjects: int = 32,
) -> tuple[np.ndarray, list[str]]:
    """Per-subject metric vectors over one seeded bag each: ((n, 1+T) loss then terms, names)."""
    was_training = model.training
    model.eval()
    rows, names = [], []
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            dataset = SubjectBagDataset(model, subjects, bag_size=bag_size, seed=seed)
            for i in range(0, len(dataset), batch_subjects):
                items = [dataset[j] for j in range(i, min(i + batch_subjects, len(dataset)))]
                loss, terms = model.loss(collate_bags(items))
                names = sorted(terms)
                rows.append(metric_rows(_numpy(loss), {k: _numpy(v) for k, v in terms.items()}))
    finally:
        model.train(was_training)
    return (np.concatenate(rows) if rows else np.zeros((0, 1))), names


def evaluate_loss(
    model: BioFPModel,
    subjects: Sequence[SubjectWindows],
    *,
    bag_size: int,
    seed: int,
    batch_subjects: int = 32,
) -> dict[str, float]:
    """Mean per-subject loss and terms over one bag per subject (seeded), plus "subjects"."""
    rows, names = subject_losses(
        model, subjects, bag_size=bag_size, seed=seed, batch_subjects=batch_subjects
    )
    if not np.isfinite(rows).all():
        raise DataError("loss is not finite on the held-out subjects: lower lr or check the data")
    means = rows.mean(axis=0) if len(rows) else np.full(1, np.nan)
    terms = {name: float(v) for name, v in zip(names, means[1:], strict=True)}
    return {"loss": float(means[0]), **terms, "subjects": float(len(rows))}
