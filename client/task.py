"""One round at a site in plain code: check the budget, train, charge the ledger, encode.

This is the ClientApp's "task" (as in Flower's quickstart): ``client/app.py`` only unpacks the
message and calls :func:`train_round` or :func:`evaluate_round`. Nothing here builds a Message.

Privacy, per round (DESIGN.md §5): the round's cost ``(σ, q, steps)`` is known before training
(q = batch_subjects / trainable subjects, Poisson-sampled by subject), so the site refuses a round
that would take its ledger past its own budget before any gradient is computed. After training
the ledger is charged under its lock with the budget checked again (another process may have
spent in the meantime), keyed by ``(run id, server round)`` so a replayed message costs nothing.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from biofp_core.audit import arrays_nbytes
from biofp_core.compression import ErrorFeedback, Scheme, check_scheme
from biofp_core.errors import DataError, PrivacyBudgetError
from biofp_core.models.base import BioFPModel
from biofp_core.privacy import DPConfig, PrivacyReport
from biofp_core.privacy.ledger import PrivacyLedger
from biofp_core.protocol import (
    COMPRESSION,
    LOCAL_STEPS,
    LR,
    PROXIMAL_MU,
    SERVER_ROUND,
    TrainReplyMetrics,
)
from biofp_core.training import SubjectBagDataset, TrainConfig, evaluate_loss, train_local
from client.site_data import SiteData
from server.config import RunConfig

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


class TrainInstruction(BaseModel):
    """The server's instructions for one training round (the message's ConfigRecord)."""

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    server_round: int = Field(alias=SERVER_ROUND, ge=1)
    local_steps: int | None = Field(None, alias=LOCAL_STEPS, ge=1)
    lr: float | None = Field(None, alias=LR, gt=0)
    proximal_mu: float = Field(0.0, alias=PROXIMAL_MU, ge=0)
    compression: str | None = Field(None, alias=COMPRESSION)

    def scheme(self) -> Scheme | None:
        """The update encoding the server asked for, or None for full weights."""
        return None if self.compression is None else check_scheme(self.compression)


@dataclass(frozen=True)
class TrainOutcome:
    """What a site sends back after a round: arrays (weights or encoded delta) and metrics."""

    arrays: Arrays
    metrics: TrainReplyMetrics


def round_seed(*parts: object) -> int:
    """A stable 31-bit seed from a run seed, a round and a site name."""
    return zlib.crc32(":".join(map(str, parts)).encode()) & 0x7FFFFFFF


def model_from_arrays(run: RunConfig, arrays: Mapping[str, np.ndarray]) -> BioFPModel:
    """The run's model with the global arrays loaded (strictly: names and shapes must match)."""
    model = run.build_model()
    state = {name: torch.from_numpy(np.array(value)) for name, value in arrays.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DataError(f"global arrays do not fit model {run.model!r}: {exc}") from None
    return model


def _dp_config(site: SiteData, run: RunConfig, server_round: int) -> DPConfig | None:
    """The round's DP-SGD settings: the server's σ and clip, the site's δ (and noise seed)."""
    if not run.dp:
        return None
    seed = None if site.dp_seed is None else round_seed(site.dp_seed, server_round)
    return DPConfig(
        noise_multiplier=run.noise_multiplier,
        max_grad_norm=run.max_grad_norm,
        delta=site.config.privacy.delta,
        seed=seed,
    )


@dataclass(frozen=True)
class RoundPlan:
    """What a training round will do, known before any gradient: its settings and DP cost."""

    cfg: TrainConfig
    dp: DPConfig | None
    sample_rate: float  # q: Poisson rate of subjects per step
    steps: int


def plan_round(
    site: SiteData, run: RunConfig, instruction: TrainInstruction, model: BioFPModel
) -> RoundPlan:
    """The round's training settings and privacy cost (σ, q, steps) at this site.

    Raises
    ------
    DataError
        No training subject has data this model can use.
    """
    server_round = instruction.server_round
    cfg = run.train_config(steps=instruction.local_steps, lr=instruction.lr).model_copy(
        update={
            "seed": round_seed(run.seed, server_round, site.config.name),
            "proximal_mu": instruction.proximal_mu or None,
        }
    )
    trainable = len(SubjectBagDataset(model, site.train, bag_size=cfg.bag_size, seed=cfg.seed))
    if trainable == 0:
        raise DataError(f"site {site.config.name}: no subject has data {run.model} can train on")
    return RoundPlan(
        cfg=cfg,
        dp=_dp_config(site, run, server_round),
        sample_rate=min(1.0, cfg.batch_subjects / trainable),
        steps=cfg.total_steps(trainable),
    )


def check_round_budget(site: SiteData, plan: RoundPlan) -> float:
    """ε the ledger would reach after this round; refuse a round the site cannot afford.

    Raises
    ------
    PrivacyBudgetError
        The round would exceed the site's budget, or the server asks for training without DP
        while the site's budget is finite.
    """
    budget = site.config.privacy
    if plan.dp is None:
        if math.isfinite(budget.epsilon):
            raise PrivacyBudgetError(
                f"site {site.config.name}: the server asks for training without DP but the "
                f"site's budget is ε={budget.epsilon:g}; refused"
            )
        return math.inf
    return PrivacyLedger.at(site.state_dir).check_budget(
        budget=budget, noise_multiplier=plan.dp.noise_multiplier,
        sample_rate=plan.sample_rate, steps=plan.steps,
    )  # fmt: skip


def charge_round(
    site: SiteData, report: PrivacyReport, *, run_id: str, server_round: int
) -> tuple[float, float, bool]:
    """Charge a trained round to the ledger (budget re-checked under its lock).

    Returns
    -------
    tuple[float, float, bool]
        ε after the round (whole history), δ, and whether another such round would exceed
        the budget.
    """
    budget = site.config.privacy
    ledger = PrivacyLedger.at(site.state_dir)
    mechanism = {
        "noise_multiplier": report.noise_multiplier,
        "sample_rate": report.sample_rate,
        "steps": report.steps,
    }
    entry = ledger.charge(
        run_id=run_id, server_round=server_round, delta=budget.delta, budget=budget, **mechanism
    )
    exhausted = ledger.epsilon_if(delta=budget.delta, **mechanism) > budget.epsilon
    return entry.epsilon_after, budget.delta, exhausted


def _encode(
    new: Arrays, start: Arrays, scheme: Scheme | None, feedback: ErrorFeedback
) -> tuple[Arrays, int]:
    """(arrays to send, payload bytes): full weights, or the delta encoded with error feedback."""
    if scheme is None:
        return new, arrays_nbytes(new)
    delta = {name: new[name] - start[name] for name in start}
    encoded = feedback.encode(delta, scheme=scheme)
    return encoded.to_arrays(), encoded.nbytes


def train_round(
    site: SiteData,
    run: RunConfig,
    instruction: TrainInstruction,
    global_arrays: Arrays,
    *,
    run_id: str,
    feedback: ErrorFeedback,
) -> TrainOutcome:
    """Train the global model on the site's training subjects for one round.

    Raises
    ------
    PrivacyBudgetError
        The round is refused (see :func:`check_round_budget`); nothing was trained.
    DataError
        The site has no subject this model can train on, or none was sampled.
    """
    model = model_from_arrays(run, global_arrays)
    plan = plan_round(site, run, instruction, model)
    check_round_budget(site, plan)
    history = PrivacyLedger.at(site.state_dir).history
    result = train_local(model, site.train, plan.cfg, dp=plan.dp, ledger_history=history)
    epsilon, delta, exhausted = math.inf, 0.0, False
    if result.privacy is not None:
        epsilon, delta, exhausted = charge_round(
            site, result.privacy, run_id=run_id, server_round=instruction.server_round
        )
    if result.examples == 0:
        raise DataError(
            f"site {site.config.name}: no subject was sampled in {result.steps} steps "
            f"(q={plan.sample_rate:.3g}); raise batch-subjects or local-steps"
        )
    new = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    arrays, payload = _encode(new, global_arrays, instruction.scheme(), feedback)
    metrics = TrainReplyMetrics(
        num_examples=result.examples,
        train_loss=result.mean_loss,
        loss_terms=result.terms,
        epsilon=epsilon,
        delta=delta,
        payload_bytes=payload,
        budget_exhausted=exhausted,
    )
    log.info(
        "site %s round %d: %d bags, loss %.4f, ε %.3g", site.config.name,
        instruction.server_round, result.examples, result.mean_loss, epsilon,
    )  # fmt: skip
    return TrainOutcome(arrays=arrays, metrics=metrics)


def evaluate_round(site: SiteData, run: RunConfig, global_arrays: Arrays) -> tuple[int, float]:
    """(held-out subjects evaluated, mean held-out loss) of the global model at this site.

    Raises
    ------
    DataError
        The site has no held-out subject the model can use.
    """
    if not site.holdout:
        raise DataError(
            f"site {site.config.name}: no held-out subject to evaluate on "
            "(a site needs at least 2 subjects and holdout-fraction > 0)"
        )
    model = model_from_arrays(run, global_arrays)
    losses = evaluate_loss(model, site.holdout, bag_size=run.bag_size, seed=run.seed)
    subjects = int(losses["subjects"])
    if subjects == 0:
        raise DataError(f"site {site.config.name}: no held-out subject has data {run.model} uses")
    return subjects, float(losses["loss"])
