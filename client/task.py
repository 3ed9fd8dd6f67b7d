"""One round at a site in plain code: check the budget, train, charge the ledger, encode.

This is the ClientApp's "task" (as in Flower's quickstart): ``client/app.py`` only unpacks the
message and calls :func:`train_round` or :func:`evaluate_round`. Nothing here builds a Message.

Privacy, per round (docs/privacy.md): the round's cost ``(σ, q, steps)`` is known before training
(q = batch_subjects / trainable subjects, Poisson-sampled by subject), so the site refuses a round
that would take its ledger past its own budget, or that asks beyond its limits, before any
gradient is computed. The round is then charged, under the ledger's lock with the budget checked
again (another process may have spent in the meantime), BEFORE any patient is touched: a round
that fails later is spent all the same and is not answered again. The charge is one sampled
Gaussian for the gradients and the noisy losses together (σ_eff), keyed by
``(run key, server round, "train")``. The run key is the server's
``protocol.RUN_KEY`` (the run directory's id, unchanged when a crashed run is resubmitted under a
new Flower run id), or Flower's run id from an older server. ε is computed from the ledger's whole
history each time (budget check, DP report, charge, exhausted flag, audit), but the RDP of the
round's (σ, q) is evaluated once per process (:func:`biofp_core.privacy.ledger.rdp_epsilon`), so
these cost well under a millisecond each after a site's first round.

Replays: a round already charged under its key is never trained again, since a second noisy update
for one charge would be unaccounted privacy loss. When it is charged, the round's reply (arrays
and metrics, with the sha256 of the global arrays and the instruction it answered) is cached at
``<state_dir>/replies/<run key>-round-NNNN.safetensors``; a replay with the same global arrays and
instruction gets that very reply again, anything else is refused (:class:`ReplayRefusedError`).
"""

from __future__ import annotations

import json
import logging
import math
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from biofp_core.audit import arrays_nbytes, arrays_sha256
from biofp_core.checked_tensors import read_checked, write_checked
from biofp_core.compression import ErrorFeedback, Scheme
from biofp_core.errors import ArtifactError, DataError, PrivacyBudgetError, SiteLimitError
from biofp_core.fsutil import exclusive_lock
from biofp_core.models.base import BioFPModel
from biofp_core.privacy import DPConfig, poisson_rate
from biofp_core.privacy.accounting import rdp_epsilon
from biofp_core.privacy.ledger import Charge, LedgerEntry, PrivacyLedger
from biofp_core.privacy.mechanisms import noise_rng, noisy_mean
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
    REPLIES_DIR,
    CachedAnswer,
    ReplayRefusedError,
    cache_answer,
    cached_answer,
    instruction_json,
)
from client.site_data import SiteData

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class TrainOutcome:
    """What a site sends back after a round: arrays (weights or encoded delta) and metrics,
    and the ledger entry that paid for them (None for a replay of a cached reply)."""

    arrays: Arrays
    metrics: TrainReplyMetrics
    charged: LedgerEntry | None = None


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


def _dp_config(site: SiteData, run: RunConfig, server_round: int, run_key: str) -> DPConfig | None:
    """The round's DP-SGD settings: the server's σ and clip, the site's δ (and noise seed)."""
    if not run.dp:
        return None
    seed = None if site.dp_seed is None else round_seed(site.dp_seed, run_key, server_round)
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
    metric_noise: MetricNoise | None
    sample_rate: float  # q: Poisson rate of subjects per step
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
    site: SiteData, run: RunConfig, instruction: TrainInstruction, model: BioFPModel,
    run_key: str,
) -> RoundPlan:  # fmt: skip
    """The round's training settings and privacy cost (σ, q, steps) at this site.

    Raises
    ------
    SiteLimitError
        Fewer subjects can train than the site's ``min_train_subjects``.
    DataError
        No training subject has data this model can use.
    """
    server_round, limits = instruction.server_round, site.config.privacy
    cfg = run.train_config(steps=instruction.local_steps, lr=instruction.lr).model_copy(
        update={
            "seed": round_seed(run.seed, server_round, site.config.name),
            "proximal_mu": instruction.proximal_mu or None,
        }
    )
    trainable = len(SubjectBagDataset(model, site.train, bag_size=cfg.bag_size, seed=cfg.seed))
    if trainable == 0:
        raise DataError(f"site {site.config.name}: no subject has data {run.model} can train on")
    if trainable < limits.min_train_subjects:
        raise SiteLimitError(
            f"site {site.config.name}: {trainable} training subject(s) can train, below its "
            f"min_train_subjects {limits.min_train_subjects}; refused"
        )
    dp = _dp_config(site, run, server_round, run_key)
    seed = (
        None if site.dp_seed is None else round_seed(site.dp_seed, run_key, "metrics", server_round)
    )
    noise = MetricNoise(clip=limits.metric_clip, noise_multiplier=limits.train_metric_noise,
                        seed=seed)  # fmt: skip
    return RoundPlan(
        cfg=cfg, dp=dp, metric_noise=noise if dp is not None else None,
        sample_rate=poisson_rate(cfg.batch_subjects, trainable), steps=cfg.total_steps(trainable),
    )  # fmt: skip


def check_round_budget(site: SiteData, plan: RoundPlan) -> float:
    """ε the ledger would reach after this round; refuse a round the site cannot afford.

    Raises
    ------
    PrivacyBudgetError
        The round would exceed the site's budget, or the server asks for training without DP
        while the site's budget is finite.
    PrivacyLedgerError
        The ledger does not verify.
    """
    budget = site.config.privacy
    if plan.dp is None and math.isfinite(budget.epsilon):
        raise PrivacyBudgetError(
            f"site {site.config.name}: the server asks for training without DP but the "
            f"site's budget is ε={budget.epsilon:g}; refused"
        )
    mechanisms = [c.mechanism for c in plan.charges("check", 0)]
    return PrivacyLedger.at(site.state_dir).check_budget(budget=budget, mechanisms=mechanisms)


def charge_round(
    site: SiteData, plan: RoundPlan, *, run_key: str, server_round: int
) -> tuple[LedgerEntry, float, float, bool]:
    """Charge a trained round to the ledger (budget re-checked under its lock).

    Returns
    -------
    tuple[LedgerEntry, float, float, bool]
        The round's last entry, ε after the round (whole history), δ, and whether the budget
        left cannot pay for another such round.
    """
    budget = site.config.privacy
    ledger = PrivacyLedger.at(site.state_dir)
    charges = plan.charges(run_key, server_round)
    entries = ledger.charge_all(charges, delta=budget.delta, budget=budget)
    after = ledger.epsilon(delta=budget.delta)
    again = [c.mechanism for c in charges]
    exhausted = rdp_epsilon([*ledger.history, *again], delta=budget.delta) > budget.epsilon
    delta = budget.delta if plan.dp is not None else 0.0
    return entries[-1], after, delta, exhausted and math.isfinite(budget.epsilon)


# ---- replays: a charged round is answered from the site's cache, never trained again --------

REPLAY_ROUNDS_KEPT = 4  # cached replies kept per run key (the latest rounds)
_CACHE_FORMAT = "biofp-reply-cache"
_CACHE_NAME = re.compile(r"^(?P<key>.+)-round-(?P<round>\d{4,})\.safetensors$")


class _CachedReply(BaseModel):
    """What a cached reply says about itself (its safetensors metadata)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["biofp-reply-cache"] = _CACHE_FORMAT
    run_key: str
    server_round: int
    global_sha256: str = Field(description="sha256 of the global arrays the round trained from")
    instruction: str = Field(description="the instruction answered, as JSON")
    metrics: str = Field(description="the reply's metrics, as JSON")
    sha256: str = Field(description="sha256 of the reply's arrays")


def reply_cache_path(state_dir: Path, run_key: str, server_round: int) -> Path:
    """Where the reply to `server_round` of run `run_key` is cached at a site."""
    return Path(state_dir) / REPLIES_DIR / f"{run_key}-round-{server_round:04d}.safetensors"


def _instruction_json(instruction: TrainInstruction) -> str:
    return json.dumps(instruction.model_dump(by_alias=True), sort_keys=True)


def cache_reply(
    state_dir: Path,
    run_key: str,
    instruction: TrainInstruction,
    global_arrays: Arrays,
    outcome: TrainOutcome,
) -> Path:
    """Cache a charged round's reply (atomically, fsync'ed) and drop the run's older ones."""
    path = reply_cache_path(state_dir, run_key, instruction.server_round)
    meta = _CachedReply(
        run_key=run_key,
        server_round=instruction.server_round,
        global_sha256=arrays_sha256(global_arrays),
        instruction=_instruction_json(instruction),
        metrics=json.dumps(outcome.metrics.to_metrics()),
        sha256=arrays_sha256(outcome.arrays),
    )
    write_checked(path, outcome.arrays, meta)
    for old in path.parent.glob(f"{run_key}-round-*.safetensors"):
        match = _CACHE_NAME.match(old.name)
        if match is None or match["key"] != run_key:
            continue
        if int(match["round"]) <= instruction.server_round - REPLAY_ROUNDS_KEPT:
            old.unlink(missing_ok=True)
    return path


def _load_cached(path: Path) -> tuple[_CachedReply, Arrays] | None:
    """The cached reply at `path`; None when it is missing or does not check out."""
    if not path.exists():
        return None
    try:
        return read_checked(path, _CachedReply, what="cached reply")
    except ArtifactError as exc:
        log.error("%s", exc)
        return None


def replayed_round(
    site: SiteData, instruction: TrainInstruction, global_arrays: Arrays, *, run_key: str
) -> TrainOutcome | None:
    """The cached reply when this round is already charged at the site; None when it is not.

    Raises
    ------
    ReplayRefusedError
        The round is charged but its cached reply answers other global arrays or another
        instruction, or is missing or corrupt.
    """
    server_round = instruction.server_round
    key = (run_key, server_round, "train")
    if not any(e.key == key for e in PrivacyLedger.at(site.state_dir).entries):
        return None
    path = reply_cache_path(site.state_dir, run_key, server_round)
    where = f"site {site.config.name}: round {server_round} of run {run_key} is already charged"
    cached = _load_cached(path)
    if cached is None:
        raise ReplayRefusedError(
            f"{where} but its reply is not cached ({path}); training it again would release a "
            "second noisy update for one charge; refused"
        )
    meta, arrays = cached
    if meta.global_sha256 != arrays_sha256(global_arrays):
        raise ReplayRefusedError(
            f"{where} and the replay carries other global arrays (sha256 "
            f"{arrays_sha256(global_arrays)[:12]}, charged for {meta.global_sha256[:12]}); "
            "training it again would release a second noisy update for one charge; refused"
        )
    if meta.instruction != _instruction_json(instruction):
        now, then = json.loads(_instruction_json(instruction)), json.loads(meta.instruction)
        changed = ", ".join(
            f"{k} {now.get(k)!r}, charged for {then.get(k)!r}"
            for k in sorted({*now, *then})
            if now.get(k) != then.get(k)
        )
        raise ReplayRefusedError(
            f"{where} and the replay carries another instruction ({changed}); training it again "
            "would release a second noisy update for one charge; refused"
        )
    metrics = TrainReplyMetrics.from_metrics(json.loads(meta.metrics))
    paid = [
        e for e in PrivacyLedger.at(site.state_dir).entries
        if e.key[:2] == (run_key, server_round) and e.kind.startswith("train")
    ]  # fmt: skip
    log.info(
        "%s: replay answered with the cached reply (sha256 %s), nothing trained or charged",
        where, meta.sha256[:12],
    )  # fmt: skip
    return TrainOutcome(arrays=arrays, metrics=metrics, charged=paid[-1])


def _encode(
    new: Arrays, start: Arrays, scheme: Scheme | None, feedback: ErrorFeedback
) -> tuple[Arrays, int]:
    """(arrays to send, payload bytes): full weights, or the delta encoded with error feedback."""
    if scheme is None:
        return new, arrays_nbytes(new)
    delta = {name: new[name] - start[name] for name in start}
    encoded = feedback.encode(delta, scheme=scheme)
    return encoded.to_arrays(), encoded.nbytes


def data_counts(site: SiteData) -> dict[str, int | float]:
    """The site's training set in counts, for the model card: subjects, windows, hours."""
    windows = sum(len(subject) for subject in site.train)
    return {
        "data_subjects": len(site.train),
        "data_windows": windows,
        "data_hours": round(windows * WINDOW_S / 3600, 4),
    }


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

    The round is charged under ``instruction.run_key or run_id``; a round already charged under
    that key is answered with its cached reply (:func:`replayed_round`) and not trained again.

    Raises
    ------
    PrivacyBudgetError
        The round is refused (see :func:`check_round_budget`); nothing was trained.
    ReplayRefusedError
        The round is already charged and its cached reply does not answer this instruction.
    DataError
        The site has no subject this model can train on, or none was sampled.
    """
    run_key = instruction.run_key or run_id
    with exclusive_lock(Path(site.state_dir) / REPLIES_DIR / ".lock"):
        # the same round asked twice at once trains once: the second finds the cached reply
        return _train_round(site, run, instruction, global_arrays, run_key, feedback)


def _train_round(
    site: SiteData, run: RunConfig, instruction: TrainInstruction, global_arrays: Arrays,
    run_key: str, feedback: ErrorFeedback,
) -> TrainOutcome:  # fmt: skip
    """:func:`train_round` under the site's training lock."""
    replayed = replayed_round(site, instruction, global_arrays, run_key=run_key)
    if replayed is not None:
        return replayed
    model = model_from_arrays(run, global_arrays)
    plan = plan_round(site, run, instruction, model, run_key)
    check_round_budget(site, plan)
    history = PrivacyLedger.at(site.state_dir).history
    server_round = instruction.server_round
    charged, epsilon, delta, exhausted = charge_round(
        site, plan, run_key=run_key, server_round=server_round
    )  # before any patient is touched: a round that fails later is spent all the same
    result = train_local(
        model, site.train, plan.cfg, dp=plan.dp, metric_noise=plan.metric_noise,
        ledger_history=history, sample_rate=plan.sample_rate,
    )  # fmt: skip
    if result.examples == 0:
        raise DataError(
            f"site {site.config.name}: no subject was sampled in {result.steps} steps "
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
        **data_counts(site),
    )  # fmt: skip
    outcome = TrainOutcome(arrays=arrays, metrics=metrics, charged=charged)
    cache_reply(site.state_dir, run_key, instruction, global_arrays, outcome)
    log.info(
        "site %s round %d: %d bags, loss %.4f (sent %.4f), ε %.3g", site.config.name,
        server_round, result.examples, result.mean_loss, metrics.train_loss, epsilon,
    )  # fmt: skip
    return outcome


@dataclass(frozen=True)
class EvaluateOutcome:
    """What a site sends back for an evaluation, and the ledger entry that paid for it."""

    subjects: int
    loss: float
    charged: LedgerEntry


def evaluate_round(
    site: SiteData, run: RunConfig, instruction: EvaluateInstruction, global_arrays: Arrays,
    *, run_key: str,
) -> EvaluateOutcome:  # fmt: skip
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
    name, limits = site.config.name, site.config.privacy
    if not site.holdout:
        raise DataError(
            f"site {name}: no held-out subject to evaluate on "
            "(a site needs at least 2 subjects and holdout-fraction > 0)"
        )
    server_round, sha = instruction.server_round, arrays_sha256(global_arrays)
    question = instruction_json(instruction.model_dump(by_alias=True))
    where = {"run_key": run_key, "kind": "evaluate", "server_round": server_round}
    with exclusive_lock(Path(site.state_dir) / REPLIES_DIR / ".lock"):
        cached = cached_answer(site.state_dir, **where, global_sha256=sha, instruction=question)
        if cached is not None:
            entry = next(e for e in PrivacyLedger.at(site.state_dir).entries
                         if e.hash == cached.ledger_entry)  # fmt: skip
            return EvaluateOutcome(int(cached.metrics["n"]), float(cached.metrics["loss"]), entry)
        model = model_from_arrays(run, global_arrays)
        rows, _ = subject_losses(model, site.holdout, bag_size=run.bag_size, seed=run.seed)
        if len(rows) == 0:
            raise DataError(f"site {name}: no held-out subject has data {run.model} uses")
        private = math.isfinite(limits.epsilon)
        sigma = limits.eval_noise if private else 0.0
        entry = PrivacyLedger.at(site.state_dir).charge(
            **{k: v for k, v in where.items() if k != "run_key"}, run_id=run_key,
            noise_multiplier=sigma, sample_rate=1.0, steps=1, delta=limits.delta,
            budget=limits,
        )  # fmt: skip
        if private:
            seed = (
                None
                if site.dp_seed is None
                else round_seed(site.dp_seed, run_key, "eval", server_round)
            )
            loss = float(noisy_mean(rows[:, :1], clip=limits.metric_clip, noise_multiplier=sigma,
                                    rng=noise_rng(seed))[0])  # fmt: skip
        else:
            loss = float(rows[:, 0].mean())
        answer = CachedAnswer(
            global_sha256=sha,
            instruction=question,
            metrics={"n": len(rows), "loss": loss},
            ledger_entry=entry.hash,
        )
        cache_answer(site.state_dir, **where, answer=answer)
    return EvaluateOutcome(len(rows), loss, entry)
