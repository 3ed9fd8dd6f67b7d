"""BioFP ClientApp: one hospital's side of federated pretraining and of the queries after it.

Flower calls ``train`` and ``evaluate`` with the global arrays, and after the last round the
queries ``query.fingerprint`` (release fingerprints) and ``query.probe`` (probe a task locally);
each handler opens the message's site session (:mod:`client.session`: site config, run, run key,
server round, and the ledger opened once), checks the run against the site's own limits, calls
plain code (:mod:`client.task`, :mod:`client.queries`) with that session, and answers through
:class:`client.replies.Replies`, which sends nothing but what the protocol's table of reply keys
allows, checks that every patient-derived value was paid for in the site's ledger, and audits
every reply. Every exception, wherever it is raised, becomes an audited refusal or error reply
with a fixed public reason.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from biofp_core.compression import ErrorFeedback
from biofp_core.errors import PrivacyBudgetError
from biofp_core.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    EVAL_LOSS,
    FINGERPRINTS_ARRAY,
    NUM_EXAMPLES,
    QUERY_FINGERPRINT_ACTION,
    QUERY_PROBE_ACTION,
    REFUSED,
    EvaluateInstruction,
    FingerprintReplyMetrics,
    ProbeInstruction,
    ProbeReplyMetrics,
    TrainInstruction,
    TrainReplyMetrics,
)
from client.limits import check_run_limits
from client.queries import probe_task, release_fingerprints
from client.replies import Replies
from client.session import SiteSession, open_session
from client.site_data import SiteData, load_site_data
from client.task import Arrays, evaluate_round, train_round

ERROR_FEEDBACK_STATE = "biofp-error-feedback"  # Context.state key: compression residual (local)

app = ClientApp()


def _unpack(msg: Message, context: Context, replies: Replies) -> tuple[SiteSession, Arrays]:
    """The message's site session and global arrays, the run checked against the site's
    limits; `replies` learns the session as soon as the site's config is read, so even a data
    error is audited at the site."""
    session = replies.session = open_session(msg, context)
    check_run_limits(session.site, session.run)
    arrays = {name: array.numpy() for name, array in msg.content[ARRAYS_KEY].items()}
    return session, arrays


def _load(msg: Message, context: Context, replies: Replies) -> tuple[SiteSession, SiteData, Arrays]:
    """As :func:`_unpack`, with the site's subjects loaded (training and holdout)."""
    session, arrays = _unpack(msg, context, replies)
    data = load_site_data(session.where, holdout_fraction=session.run.holdout_fraction)
    return session, data, arrays


Handler = Callable[[Message, Context, Replies], Message]
Refusal = Callable[[Replies, PrivacyBudgetError], dict]


def _answered(refused: Refusal) -> Callable[[Handler], Callable[[Message, Context], Message]]:
    """Turn a handler into a Flower one: it gets the message's :class:`Replies`, and what it
    raises becomes a refusal (metrics from `refused`) or an error reply, audited either way."""

    def wrap(handler: Handler) -> Callable[[Message, Context], Message]:
        def handle(msg: Message, context: Context) -> Message:
            replies = Replies(msg, context)
            try:
                return handler(msg, context, replies)
            except PrivacyBudgetError as exc:
                if replies.session is None:
                    return replies.error(exc)
                try:
                    return replies.refusal(exc, refused(replies, exc))
                except Exception as inner:  # e.g. an unreadable ledger while refusing
                    return replies.error(inner)
            except Exception as exc:  # one-line Error reply; details stay in the audit log
                return replies.error(exc)

        handle.__name__, handle.__doc__ = handler.__name__, handler.__doc__
        return handle

    return wrap


def _spent(replies: Replies) -> tuple[float, float]:
    assert replies.session is not None
    return replies.session.spent()


def _train_refusal(replies: Replies, exc: PrivacyBudgetError) -> dict:
    spent, delta = _spent(replies)
    return TrainReplyMetrics.refusal(
        budget_exhausted=exc.exhausted, epsilon=spent, delta=delta
    ).to_metrics()


def _fingerprint_refusal(replies: Replies, exc: PrivacyBudgetError) -> dict:
    spent, delta = _spent(replies)
    return FingerprintReplyMetrics.refusal(epsilon=spent, delta=delta).to_metrics()


@app.train()
@_answered(_train_refusal)
def train(msg: Message, context: Context, replies: Replies) -> Message:
    """Train the global model on this site's subjects, if the site's privacy budget allows."""
    session, data, global_arrays = _load(msg, context, replies)
    instruction = TrainInstruction.from_config(msg.content[CONFIG_KEY])
    residual = context.state.array_records.get(ERROR_FEEDBACK_STATE)
    feedback = ErrorFeedback({k: v.numpy() for k, v in (residual or {}).items()})
    outcome = train_round(session, data, instruction, global_arrays, feedback=feedback)
    residual_state = {k: Array(v) for k, v in feedback.state_dict().items()}
    context.state[ERROR_FEEDBACK_STATE] = ArrayRecord(residual_state)
    return replies.content(outcome.metrics.to_metrics(), outcome.arrays, charged=outcome.charged)


@app.evaluate()
@_answered(lambda replies, exc: {NUM_EXAMPLES: 0, REFUSED: 1})
def evaluate(msg: Message, context: Context, replies: Replies) -> Message:
    """Noisy held-out loss of the global model at this site, charged to its ledger."""
    session, data, global_arrays = _load(msg, context, replies)
    instruction = EvaluateInstruction.from_config(msg.content[CONFIG_KEY])
    outcome = evaluate_round(session, data, instruction, global_arrays)
    metrics = {NUM_EXAMPLES: outcome.subjects, EVAL_LOSS: outcome.loss}
    return replies.content(metrics, charged=outcome.charged)


@app.query(QUERY_FINGERPRINT_ACTION)
@_answered(_fingerprint_refusal)
def fingerprint(msg: Message, context: Context, replies: Replies) -> Message:
    """Release this site's fingerprints of the global model, if the site's own policy allows."""
    session, global_arrays = _unpack(msg, context, replies)
    metrics, parquet, charged = release_fingerprints(session, global_arrays)
    return replies.content(metrics.to_metrics(), {FINGERPRINTS_ARRAY: parquet}, charged=charged)


@app.query(QUERY_PROBE_ACTION)
@_answered(lambda replies, exc: ProbeReplyMetrics.refusal().to_metrics())
def probe(msg: Message, context: Context, replies: Replies) -> Message:
    """Probe one task on this site's own fingerprints; only its noisy, charged scalars leave."""
    session, global_arrays = _unpack(msg, context, replies)
    instruction = ProbeInstruction.from_config(msg.content[CONFIG_KEY])
    metrics, charged = probe_task(session, global_arrays, instruction.task)
    return replies.content(metrics.to_metrics(), charged=charged)
