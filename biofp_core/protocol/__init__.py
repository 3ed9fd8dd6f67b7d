"""The wire contract between server and sites: every key, the run config, every instruction and
every reply, as plain data and pydantic models that both sides import (never ``flwr``).

- :mod:`~biofp_core.protocol.keys`: every key of a Flower record, ours and Flower's;
- :mod:`~biofp_core.protocol.run_config`: :class:`RunConfig`, what the server decides for a run;
- :mod:`~biofp_core.protocol.instructions`: what a server message asks of a site;
- :mod:`~biofp_core.protocol.replies`: what may leave a site (the table of every reply key, with
  its source and the ledger kind that pays for it) and the typed reply metrics.

Every public name of these modules is importable from the package itself; the run config's are
loaded on first use (it imports torch).
"""

from biofp_core.protocol.instructions import (
    EvaluateInstruction,
    Instruction,
    ProbeInstruction,
    QueryInstruction,
    TrainInstruction,
    TrainSettings,
)
from biofp_core.protocol.keys import (
    ARRAYS_KEY,
    BUDGET_EXHAUSTED,
    BYTES_RECEIVED,
    COMPRESSION,
    CONFIG_KEY,
    DATA_HOURS,
    DATA_KEYS,
    DATA_SUBJECTS,
    DATA_WINDOWS,
    DELTA,
    EPSILON,
    EVAL_LOSS,
    FINGERPRINTS_ARRAY,
    LOCAL_STEPS,
    LOSS_TERM_PREFIX,
    LR,
    METRICS_KEY,
    NODES_EXCLUDED,
    NODES_SAMPLED,
    NUM_EXAMPLES,
    PACKED_KEY,
    PAYLOAD_BYTES,
    PROBE_BASELINE,
    PROBE_KIND,
    PROBE_KINDS,
    PROBE_ROWS,
    PROBE_SUBJECTS,
    PROBE_TASK,
    PROBE_VALUE,
    PROXIMAL_MU,
    QUERY_FINGERPRINT,
    QUERY_FINGERPRINT_ACTION,
    QUERY_PROBE,
    QUERY_PROBE_ACTION,
    REFUSED,
    RELEASED_ROWS,
    REPLIES_FAILED,
    REPLIES_MISSING,
    REPLIES_OK,
    REPLIES_REFUSED,
    RUN_KEY,
    RUN_KEY_PATTERN,
    SCALES_KEY,
    SERVER_ROUND,
    TRAIN_LOSS,
    MetricValue,
    loss_term_key,
)
from biofp_core.protocol.replies import (
    ARRAYS_ENTRY,
    LOSS_TERMS_ENTRY,
    REPLY_KEYS,
    EvaluateReplyMetrics,
    FingerprintReplyMetrics,
    ProbeReplyMetrics,
    ReplyKey,
    TrainReplyMetrics,
    arrays_entry,
    is_allowed_reply_key,
    is_allowed_reply_metric_key,
    reply_key,
)

_RUN_CONFIG_NAMES = ("STRATEGY_NAMES", "RunConfig", "RunConfigValue")


def __getattr__(name: str) -> object:
    """The run config's names, loaded when first asked for: ``run_config`` builds models (torch),
    and code that needs only keys (the SuperNode launcher) should not pay for that."""
    if name in _RUN_CONFIG_NAMES:
        from biofp_core.protocol import run_config

        return getattr(run_config, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ARRAYS_ENTRY", "ARRAYS_KEY", "BUDGET_EXHAUSTED", "BYTES_RECEIVED", "COMPRESSION",
    "CONFIG_KEY", "DATA_HOURS", "DATA_KEYS", "DATA_SUBJECTS", "DATA_WINDOWS", "DELTA", "EPSILON",
    "EVAL_LOSS", "FINGERPRINTS_ARRAY", "LOCAL_STEPS", "LOSS_TERMS_ENTRY", "LOSS_TERM_PREFIX", "LR",
    "METRICS_KEY", "NODES_EXCLUDED", "NODES_SAMPLED", "NUM_EXAMPLES", "PACKED_KEY",
    "PAYLOAD_BYTES", "PROBE_BASELINE", "PROBE_KIND", "PROBE_KINDS", "PROBE_ROWS",
    "PROBE_SUBJECTS", "PROBE_TASK", "PROBE_VALUE", "PROXIMAL_MU", "QUERY_FINGERPRINT",
    "QUERY_FINGERPRINT_ACTION", "QUERY_PROBE", "QUERY_PROBE_ACTION", "REFUSED", "RELEASED_ROWS",
    "REPLIES_FAILED", "REPLIES_MISSING", "REPLIES_OK", "REPLIES_REFUSED", "REPLY_KEYS", "RUN_KEY",
    "RUN_KEY_PATTERN", "SCALES_KEY", "SERVER_ROUND", "STRATEGY_NAMES", "TRAIN_LOSS",
    "EvaluateInstruction", "EvaluateReplyMetrics", "FingerprintReplyMetrics", "Instruction",
    "MetricValue",
    "ProbeInstruction", "ProbeReplyMetrics", "QueryInstruction", "ReplyKey", "RunConfig",
    "RunConfigValue", "TrainInstruction", "TrainReplyMetrics", "TrainSettings", "arrays_entry",
    "is_allowed_reply_key", "is_allowed_reply_metric_key", "loss_term_key", "reply_key",
]  # fmt: skip
