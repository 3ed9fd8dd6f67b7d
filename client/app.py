"""BioFP ClientApp: one hospital's side of federated pretraining and of the queries after it.

Flower calls ``train`` and ``evaluate`` with the global arrays, and after the last round the
queries ``query.fingerprint`` (release fingerprints) and ``query.probe`` (probe a task locally);
each handler unpacks the message and the configs, calls plain code (:mod:`client.task`,
:mod:`client.queries`), and answers through :class:`client.replies.Replies`, which sends nothing
but arrays, released fingerprints and allowed scalar metrics and audits every reply at the site.
"""

from __future__ import annotations

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
    ProbeReplyMetrics,
)
from client.queries import (
    ProbeInstruction,
    QueryRefusedError,
    fingerprint_refusal,
    probe_task,
    release_fingerprints,
)
from client.replies import Replies
from client.site_data import SiteData, SiteRef, load_site_data, locate_site, site_config
from client.task import Arrays, TrainInstruction, evaluate_round, train_round
from server.config import RunConfig

ERROR_FEEDBACK_STATE = "biofp-error-feedback"  # Context.state key: compression residual (local)

app = ClientApp()


def _unpack(msg: Message, context: Context, replies: Replies) -> tuple[RunConfig, SiteRef, Arrays]:
    """Run config, site and global arrays of a message; `replies` learns the site's config as
    soon as it is read, so even a data error is audited at the site."""
    run = RunConfig.from_run_config(context.run_config)
    where = locate_site(context.node_config, sim_sites=run.sim_sites)
    replies.site = site_config(where)
    arrays = {name: array.numpy() for name, array in msg.content[ARRAYS_KEY].items()}
    return run, where, arrays


def _load(msg: Message, context: Context, replies: Replies) -> tuple[RunConfig, SiteData, Arrays]:
    """As :func:`_unpack`, with the site's subjects loaded (training and holdout)."""
    run, where, arrays = _unpack(msg, context, replies)
    return run, load_site_data(where, holdout_fraction=run.holdout_fraction), arrays


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global model on this site's subjects, if the site's privacy budget allows."""
    replies = Replies(msg, context)
    try:
        run, site, global_arrays = _load(msg, context, replies)
        instruction = TrainInstruction.model_validate(dict(msg.content[CONFIG_KEY]))
        residual = context.state.array_records.get(ERROR_FEEDBACK_STATE)
        feedback = ErrorFeedback({k: v.numpy() for k, v in (residual or {}).items()})
        outcome = train_round(
            site, run, instruction, global_arrays,
            run_id=str(context.run_id), feedback=feedback,
        )  # fmt: skip
    except PrivacyBudgetError as exc:
        return replies.refusal(exc) if replies.site else replies.error(exc)
    except Exception as exc:  # one-line Error reply; details stay in the site's log
        return replies.error(exc)
    residual_state = {k: Array(v) for k, v in feedback.state_dict().items()}
    context.state[ERROR_FEEDBACK_STATE] = ArrayRecord(residual_state)
    return replies.content(outcome.metrics.to_metrics(), outcome.arrays)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Loss of the global model on this site's held-out subjects."""
    replies = Replies(msg, context)
    try:
        run, site, global_arrays = _load(msg, context, replies)
        subjects, loss = evaluate_round(site, run, global_arrays)
    except Exception as exc:  # one-line Error reply; details stay in the site's log
        return replies.error(exc)
    return replies.content({NUM_EXAMPLES: subjects, EVAL_LOSS: loss})


@app.query(QUERY_FINGERPRINT_ACTION)
def fingerprint(msg: Message, context: Context) -> Message:
    """Release this site's fingerprints of the global model, if the site's own policy allows."""
    replies = Replies(msg, context)
    try:
        run, where, global_arrays = _unpack(msg, context, replies)
        metrics, parquet = release_fingerprints(
            replies.site, where, run, global_arrays,
            run_key=replies.run_key, server_round=replies.server_round,
        )  # fmt: skip
    except (PrivacyBudgetError, QueryRefusedError) as exc:
        if replies.site is None:
            return replies.error(exc)
        return replies.refusal(exc, fingerprint_refusal(replies.site).to_metrics())
    except Exception as exc:  # one-line Error reply; details stay in the site's log
        return replies.error(exc)
    return replies.content(metrics.to_metrics(), {FINGERPRINTS_ARRAY: parquet})


@app.query(QUERY_PROBE_ACTION)
def probe(msg: Message, context: Context) -> Message:
    """Probe one task on this site's own fingerprints; only the probe's scalars leave."""
    replies = Replies(msg, context)
    try:
        run, where, global_arrays = _unpack(msg, context, replies)
        instruction = ProbeInstruction.model_validate(dict(msg.content[CONFIG_KEY]))
        metrics = probe_task(replies.site, where, run, global_arrays, instruction.task)
    except QueryRefusedError as exc:
        return replies.refusal(exc, ProbeReplyMetrics.refusal().to_metrics())
    except Exception as exc:  # one-line Error reply; details stay in the site's log
        return replies.error(exc)
    return replies.content(metrics.to_metrics())
