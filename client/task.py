"""One round at a site in plain code: check the budget, train, charge the ledger, encode.

This is the ClientApp's "task" (as in Flower's quickstart): ``client/app.py`` only opens the
message's site session and calls :func:`train_round` or :func:`evaluate_round`. Nothing here
builds a Message.

Privacy, per round (docs/privacy.md): the round's cost ``(σ, q, steps)`` is known before training
(q = batch_subjects / trainable subjects, Poisson-sampled by subject; computed once, by
:func:`~biofp_core.privacy.accounting.poisson_rate`, and that very q is charged and handed to the
DP-SGD engine), so the site refuses a round
that would take its ledger past its own budget, or that asks beyond its limits, before any
gradient is computed. The round is then charged, under the ledger's lock with the budget checked
again (another process may have spent in the meantime), BEFORE any patient is touched: a round
that fails later is spent all the same and is not answered again. The charge is one sampled
Gaussian for the gradients and the noisy losses together (σ_eff), keyed by
``(run key, server round, "train")``. The run key is the server's
``protocol.RUN_KEY`` (the run directory's id, unchanged when a crashed run is resubmitted under a
new Flower run id), or Flower's run id from an older server. ε is computed from the ledger's whole
history each time (budget check, DP report, charge, exhausted flag, audit), but the RDP of the
round's (σ, q) is evaluated once per process (:func:`biofp_core.privacy.accounting.rdp_epsilon`), so
these cost well under a millisecond each after a site's first round.

The site, run, run key and ledger come from the message's :class:`client.session.SiteSession`
(the ledger is opened once per message). Replays: a round already charged under its key is never
trained again, since a second noisy update for one charge would be unaccounted privacy loss; its
reply is kept by :mod:`client.charged` and a replay with the same global arrays and instruction
gets that very reply again, anything else is refused (:class:`ReplayRefusedError`).
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from biofp_core.audit import arrays_nbytes
from biofp_core.compression import ErrorFeedback, Scheme
from biofp_core.errors import ConfigError, DataError, PrivacyBudgetError, SiteLimitError
from biofp_core.models.base import BioFPModel
from biofp_core.privacy import DPConfig, poisson_rate
from biofp_core.privacy.accounting import rdp_epsilon
from biofp_core.privacy.ledger import Charge, LedgerEntry
from biofp_core.privacy.mechanisms import noise_rng, noisy_mean
from biofp_core.privacy.planner import PlanError, plan_privacy
from biofp_core.protocol import (
    EvaluateInstruction,
    RunConfig,
    TrainInstruction,
    TrainReplyMetrics,
)
from biofp_core.signals.types import WINDOW_S
from biofp_core.training import (
    MetricNoise,
    SubjectBagDataset,
    TrainConfig,
    subject_losses,
    train_local,
)
from client.charged import (
    Answer,
    ReplayRefusedError,
    answered_before,
    charging,
    instruction_json,
    keep_answer,
)
from client.session import SiteSession
from client.site_data import SiteData

__all__ = ["ReplayRefusedError", "evaluate_round", "train_round"]

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class TrainOutcome:
    """What a site sends back after a round: arrays (weights or encoded delta) and metrics,
    and the ledger entry that paid for them (for a replay, the entry of the first answer)."""

    arrays: Arrays
    metrics: TrainReplyMetrics
    charged: LedgerEntry


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


def _dp_config(session: SiteSession, data: SiteData, server_round: int) -> DPConfig | None:
    """The round's DP-SGD settings: the server's σ and clip, the site's δ (and noise seed)."""
    seed = None if data.dp_seed is None else round_seed(data.dp_seed, session.run_key, server_round)
    return session.run.dp_config(delta=session.delta, seed=seed)


@dataclass(frozen=True)
class RoundPlan:
    """What a training round will do, known before any gradient: its settings and DP cost."""

    cfg: TrainConfig
    dp: DPConfig | None
    metric_noise: MetricNoise | None
    sample_rate: float  # q: Poisson rate of subjects per step, charged AND trained with
    steps: int

    def charges(self, run_key: str, server_round: int) -> list[Charge]:
        """The round's ledger entry: one σ = 0 entry for a round without DP (a site with an
        unlimited budget); else ONE sampled Gaussian for the gradients and the noisy losses
        together, since both are drawn from the same Poisson batch each step: stacking the
        clipped gradient (norm C, noise σC) and the clipped losses rescaled to noise σC gives
        one vector of noise multiplier σ_eff = (σ⁻² + σ_m⁻²)^(-1/2) (module docstring)."""
        q, n = self.sample_rate, self.steps
        if self.dp is None:
            return [Charge(run_key, server_round, "train", (0.0, q, n))]
        sigma = self.dp.noise_multiplier
        if self.metric_noise is not None:
            sigma = (sigma**-2 + self.metric_noise.noise_multiplier**-2) ** -0.5
        return [Charge(run_key, server_round, "train", (sigma, q, n))]


def plan_round(
    session: SiteSession, data: SiteData, instruction: TrainInstruction, model: BioFPModel
) -> RoundPlan:
    """The round's training settings and privacy cost (σ, q, steps) at this site.

    Raises
    ------
    SiteLimitError
        Fewer subjects can train than the site's ``min_train_subjects``.
    DataError
        No training subject has data this model can use.
    """
    run, name = session.run, session.site.name
    server_round, limits = instruction.server_round, session.site.privacy
    cfg = run.train_config(steps=instruction.local_steps, lr=instruction.lr).model_copy(
        update={
            "seed": round_seed(run.seed, server_round, name),
            "proximal_mu": instruction.proximal_mu or None,
        }
    )
    trainable = len(SubjectBagDataset(model, data.train, bag_size=cfg.bag_size, seed=cfg.seed))
    if trainable == 0:
        raise DataError(f"site {name}: no subject has data {run.model} can train on")
    if trainable < limits.min_train_subjects:
        raise SiteLimitError(
            f"site {name}: {trainable} training subject(s) can train, below its "
            f"min_train_subjects {limits.min_train_subjects}; refused"
        )
    dp = _dp_config(session, data, server_round)
    if dp is not None and run.privacy_plan:
        cfg, dp = _site_schedule(session, trainable, cfg, dp)
    seed = (
        None
        if data.dp_seed is None
        else round_seed(data.dp_seed, session.run_key, "metrics", server_round)
    )
    noise = MetricNoise(clip=limits.metric_clip, noise_multiplier=limits.train_metric_noise,
                        seed=seed)  # fmt: skip
    return RoundPlan(
        cfg=cfg, dp=dp, metric_noise=noise if dp is not None else None,
        sample_rate=poisson_rate(cfg.batch_subjects, trainable), steps=cfg.total_steps(trainable),
    )  # fmt: skip


def _site_schedule(
    session: SiteSession, trainable: int, cfg: TrainConfig, dp: DPConfig
) -> tuple[TrainConfig, DPConfig]:
    """The site's own schedule (run config ``privacy-plan``): σ, subjects per step and steps
    per round that :func:`~biofp_core.privacy.planner.plan_privacy` chooses for its training
    subjects and its whole budget over the run's rounds (one evaluation per round reserved when
    the run evaluates), at most the run's ``local-steps`` per round (the server bounds the
    compute, the site the privacy). The ledger still charges each round and refuses one it
    cannot afford.

    Raises
    ------
    SiteLimitError
        No schedule of at least one step per round fits the site's budget.
    """
    run, budget = session.run, session.site.privacy
    try:
        plan = plan_privacy(
            trainable, budget.epsilon, delta=budget.delta, rounds=run.num_rounds,
            evaluations=run.num_rounds if run.fraction_evaluate > 0 else 0, limits=budget,
            max_steps_per_round=run.local_steps,
        )  # fmt: skip
    except PlanError as exc:
        raise SiteLimitError(f"site {session.site.name}: {exc}; refused") from None
    cfg = cfg.model_copy(
        update={"batch_subjects": max(1, round(plan.batch_subjects)), "steps": plan.steps_per_round}
    )
    return cfg, dp.model_copy(update={"noise_multiplier": plan.noise_multiplier})


def check_round_budget(session: SiteSession, plan: RoundPlan) -> float:
    """ε the ledger would reach after this round; refuse a round the site cannot afford.

    Raises
    ------
    PrivacyBudgetError
        The round would exceed the site's budget, or the server asks for training without DP
        while the site's budget is finite.
    PrivacyLedgerError
        The ledger does not verify.
    """
    budget = session.site.privacy
    if plan.dp is None and math.isfinite(budget.epsilon):
        raise PrivacyBudgetError(
            f"site {session.site.name}: the server asks for training without DP but the "
            f"site's budget is ε={budget.epsilon:g}; refused"
        )
    mechanisms = [c.mechanism for c in plan.charges("check", 0)]
    return session.ledger.check_budget(budget=budget, mechanisms=mechanisms)


def charge_round(
    session: SiteSession, plan: RoundPlan, *, server_round: int
) -> tuple[LedgerEntry, float, float, bool]:
    """Charge a trained round to the ledger (budget re-checked under its lock).

    Returns
    -------
    tuple[LedgerEntry, float, float, bool]
        The round's last entry, ε after the round (whole history), δ, and whether the budget
        left cannot pay for another such round.
    """
    budget, ledger = session.site.privacy, session.ledger
    charges = plan.charges(session.run_key, server_round)
    entries = ledger.charge_all(charges, delta=budget.delta, budget=budget)
    after = ledger.epsilon(delta=budget.delta)
    again = [c.mechanism for c in charges]
    exhausted = rdp_epsilon([*ledger.history, *again], delta=budget.delta) > budget.epsilon
    delta = budget.delta if plan.dp is not None else 0.0
    return entries[-1], after, delta, exhausted and math.isfinite(budget.epsilon)


def _encode(
    new: Arrays, start: Arrays, scheme: Scheme | None, feedback: ErrorFeedback
) -> tuple[Arrays, int]:
    """(arrays to send, payload bytes): full weights, or the delta encoded with error feedback."""
    if scheme is None:
        return new, arrays_nbytes(new)
    delta = {name: new[name] - start[name] for name in start}
    encoded = feedback.encode(delta, scheme=scheme)
    return encoded.to_arrays(), encoded.nbytes


def data_counts(data: SiteData) -> dict[str, int | float]:
    """The site's training set in counts, for the model card: subjects, windows, hours."""
    windows = sum(len(subject) for subject in data.train)
    return {
        "data_subjects": len(data.train),
        "data_windows": windows,
        "data_hours": round(windows * WINDOW_S / 3600, 4),
    }


def _same_round(session: SiteSession, server_round: int) -> int:
    """The instruction's round, which must be the session's: the charge is made under the
    one and the cached answer looked up under the other.

    Raises
    ------
    ConfigError
        They differ.
    """
    if server_round != session.server_round:
        raise ConfigError(
            f"server-round {server_round} of the instruction is not the message's round "
            f"{session.server_round}"
        )
    return server_round


def train_round(
    session: SiteSession,
    data: SiteData,
    instruction: TrainInstruction,
    global_arrays: Arrays,
    *,
    feedback: ErrorFeedback,
) -> TrainOutcome:
    """Train the global model on the site's training subjects for one round.

    The round is charged under the session's run key; a round already charged under that key
    is answered with its cached reply (:mod:`client.charged`) and not trained again.

    Raises
    ------
    PrivacyBudgetError
        The round is refused (see :func:`check_round_budget`); nothing was trained.
    ReplayRefusedError
        The round is already charged and its cached reply does not answer this instruction.
    DataError
        The site has no subject this model can train on, or none was sampled.
    """
    _same_round(session, instruction.server_round)
    question = instruction_json(instruction.model_dump(by_alias=True))
    with charging(session):  # the same round asked twice at once trains once
        cached = answered_before(
            session, "train", global_arrays=global_arrays, instruction=question
        )
        if cached is not None:
            metrics = TrainReplyMetrics.from_metrics(cached.metrics)
            return TrainOutcome(arrays=cached.arrays, metrics=metrics, charged=cached.charged)
        outcome = _train(session, data, instruction, global_arrays, feedback)
        answer = Answer(outcome.metrics.to_metrics(), outcome.arrays, outcome.charged)
        keep_answer(session, "train", global_arrays=global_arrays, instruction=question,
                    answer=answer)  # fmt: skip
    return outcome


def _train(
    session: SiteSession, data: SiteData, instruction: TrainInstruction, global_arrays: Arrays,
    feedback: ErrorFeedback,
) -> TrainOutcome:  # fmt: skip
    """Plan, check, charge and train one round (under the site's charging lock)."""
    model = model_from_arrays(session.run, global_arrays)
    plan = plan_round(session, data, instruction, model)
    check_round_budget(session, plan)
    history = session.ledger.history
    server_round = instruction.server_round
    charged, epsilon, delta, exhausted = charge_round(session, plan, server_round=server_round)
    # charged before any patient is touched: a round that fails later is spent all the same
    result = train_local(
        model, data.train, plan.cfg, dp=plan.dp, metric_noise=plan.metric_noise,
        ledger_history=history, sample_rate=plan.sample_rate,
    )  # fmt: skip
    if result.examples == 0:
        raise DataError(
            f"site {session.site.name}: no subject was sampled in {result.steps} steps "
            f"(q={plan.sample_rate:.3g}); raise batch-subjects or local-steps"
        )
    new = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    arrays, payload = _encode(new, global_arrays, instruction.compression, feedback)
    private = plan.dp is not None
    loss = result.noisy_loss if private else result.mean_loss
    metrics = TrainReplyMetrics(
        num_examples=result.examples,
        train_loss=loss if loss is not None else 0.0,
        loss_terms=result.noisy_terms if private else result.terms,
        epsilon=epsilon, delta=delta, payload_bytes=payload, budget_exhausted=exhausted,
        **data_counts(data),
    )  # fmt: skip
    log.info(
        "site %s round %d: %d bags, loss %.4f (sent %.4f), ε %.3g", session.site.name,
        server_round, result.examples, result.mean_loss, metrics.train_loss, epsilon,
    )  # fmt: skip
    return TrainOutcome(arrays=arrays, metrics=metrics, charged=charged)


@dataclass(frozen=True)
class EvaluateOutcome:
    """What a site sends back for an evaluation, and the ledger entry that paid for it."""

    subjects: int
    loss: float
    charged: LedgerEntry


def evaluate_round(
    session: SiteSession, data: SiteData, instruction: EvaluateInstruction, global_arrays: Arrays
) -> EvaluateOutcome:
    """The global model's held-out loss at this site, as a charged noisy mean.

    Each held-out subject's loss is clipped to ``metric_clip`` and their sum gets Gaussian noise
    of σ = ``eval_noise`` × clip (a site with an unlimited budget sends the exact mean and
    records a σ = 0 entry); charged as ``evaluate`` under (run key, round), answered again
    from the cache, and counted against ``max_charged_queries``.

    Raises
    ------
    DataError
        The site has no held-out subject the model can use.
    PrivacyBudgetError
        Over budget or over the query cap, or a charged evaluation asked again differently.
    """
    name, limits, run_key = session.site.name, session.site.privacy, session.run_key
    if not data.holdout:
        raise DataError(
            f"site {name}: no held-out subject to evaluate on "
            "(a site needs at least 2 subjects and holdout-fraction > 0)"
        )
    server_round = _same_round(session, instruction.server_round)
    question = instruction_json(instruction.model_dump(by_alias=True))
    with charging(session):
        cached = answered_before(
            session, "evaluate", global_arrays=global_arrays, instruction=question
        )
        if cached is not None:
            n, loss = int(cached.metrics["n"]), float(cached.metrics["loss"])
            return EvaluateOutcome(n, loss, cached.charged)
        model = model_from_arrays(session.run, global_arrays)
        rows, _ = subject_losses(model, data.holdout, bag_size=session.run.bag_size,
                                 seed=session.run.seed)  # fmt: skip
        if len(rows) == 0:
            raise DataError(f"site {name}: no held-out subject has data {session.run.model} uses")
        private = math.isfinite(limits.epsilon)
        sigma = limits.eval_noise if private else 0.0
        entry = session.ledger.charge(
            run_id=run_key, server_round=server_round, kind="evaluate", noise_multiplier=sigma,
            sample_rate=1.0, steps=1, delta=limits.delta, budget=limits,
        )  # fmt: skip
        if private:
            seed = (
                None
                if data.dp_seed is None
                else round_seed(data.dp_seed, run_key, "eval", server_round)
            )
            loss = float(noisy_mean(rows[:, :1], clip=limits.metric_clip, noise_multiplier=sigma,
                                    rng=noise_rng(seed))[0])  # fmt: skip
        else:
            loss = float(rows[:, 0].mean())
        answer = Answer({"n": len(rows), "loss": loss}, {}, entry)
        keep_answer(session, "evaluate", global_arrays=global_arrays, instruction=question,
                    answer=answer)  # fmt: skip
    return EvaluateOutcome(len(rows), loss, entry)
