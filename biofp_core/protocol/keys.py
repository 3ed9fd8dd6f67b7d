"""The one naming convention for what travels between server and sites: every key.

Every key put into or read from a Flower ``RecordDict``, ``ConfigRecord`` or ``MetricRecord`` is
defined here and nowhere else. Keys are lower-case and hyphenated, like the keys Flower itself
injects (``"num-examples"``, ``"server-round"``, ``"proximal-mu"``), so one convention holds for
every key, ours and Flower's. Plain data: no ``flwr`` import.
"""

from __future__ import annotations

import re
from typing import Literal, get_args

# --- Records inside a Message's RecordDict (Flower's strategy defaults) ---------------------
ARRAYS_KEY = "arrays"  # ArrayRecord: global weights (server -> site) or update (site -> server)
CONFIG_KEY = "config"  # ConfigRecord: instructions for this round (server -> site)
METRICS_KEY = "metrics"  # MetricRecord: scalar results (site -> server)

# --- Config keys sent by the server (ConfigRecord under CONFIG_KEY) -------------------------
SERVER_ROUND = "server-round"  # int, from 1; injected by Flower's FedAvg.configure_train
PROXIMAL_MU = "proximal-mu"  # float; injected by Flower's FedProx.configure_train
LOCAL_STEPS = "local-steps"  # int, optimiser steps per round at the site
LR = "lr"  # float, local learning rate
COMPRESSION = "compression"  # str, one of SCHEMES: how the site encodes its update
Scheme = Literal["none", "fp16", "int8"]  # float32 delta, float16 delta, int8 + scales
SCHEMES: tuple[str, ...] = get_args(Scheme)
RUN_KEY = "biofp-run"  # str: the run directory's id (run.json), the same after a restart;
#   sites key ledger charges, cached replies and audit entries by it, not by Flower's run id
RUN_KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"  # a run key is also a file-name part

# --- Node config of a deployed site (``flower-supernode --node-config``) -----------------------
SITE_CONFIG_KEY = "site-config"  # str: path to the site's site.toml

# --- Array-record layout of a compressed update (see biofp_core.compression) ----------------
PACKED_KEY = "::packed"  # every encoded tensor, flattened in sorted name order, one array
SCALES_KEY = "::scales"  # int8: float32 (n_tensors,), the scales in sorted tensor-name order

# --- Metric keys of a training reply (MetricRecord under METRICS_KEY) ------------------------
NUM_EXAMPLES = "num-examples"  # int: subject bags trained on; Flower's default weighting key
TRAIN_LOSS = "train-loss"  # float: mean local training loss of the round
LOSS_TERM_PREFIX = "loss-"  # f"{LOSS_TERM_PREFIX}{term}": mean of one named loss term
EPSILON = "epsilon"  # float: total ε spent by the site (inf when it trains without DP)
DELTA = "delta"  # float: the site's δ (0 when it trains without DP)
PAYLOAD_BYTES = "payload-bytes"  # int: bytes of the numeric payload of the update
BUDGET_EXHAUSTED = "budget-exhausted"  # 0/1: the site cannot afford another round
REFUSED = "refused"  # 0/1: the site refused this round (no arrays, weight 0)
# the site's training set in counts (for the model card's data summary); contributing replies only
DATA_SUBJECTS = "data-subjects"  # int: training subjects of the site (held-out ones excluded)
DATA_WINDOWS = "data-windows"  # int: windows of those subjects
DATA_HOURS = "data-hours"  # float: hours of signal in those windows (windows x window length)
DATA_KEYS = (DATA_SUBJECTS, DATA_WINDOWS, DATA_HOURS)


# --- Metric keys of an evaluation reply (MetricRecord under METRICS_KEY) ---------------------
EVAL_LOSS = "eval-loss"  # float: mean loss on the site's held-out subjects


# --- Query messages: Flower message type "query.<action>", sent after the last round ----------
QUERY_FINGERPRINT_ACTION = "fingerprint"  # @app.query action: release the site's fingerprints
QUERY_PROBE_ACTION = "probe"  # @app.query action: probe one task on the site's own fingerprints
QUERY_FINGERPRINT = f"query.{QUERY_FINGERPRINT_ACTION}"  # message type
QUERY_PROBE = f"query.{QUERY_PROBE_ACTION}"  # message type
PROBE_TASK = "probe-task"  # str (ConfigRecord of a probe query): the label column to probe
FINGERPRINTS_ARRAY = "fingerprints-parquet"  # the reply's one Array: the Parquet file, uint8 (N,)

# --- Metric keys of a fingerprint reply (MetricRecord under METRICS_KEY) ---------------------
RELEASED_ROWS = "released-rows"  # int: rows of the released file (0 when refused)
#   with PAYLOAD_BYTES (bytes of the file), EPSILON and DELTA (the site's ε after the release,
#   at its δ) and REFUSED


# --- Metric keys of a probe reply: the scalars of one evaluation.SiteProbe --------------------
PROBE_KIND = "probe-kind"  # int: index of the task's kind in PROBE_KINDS
PROBE_VALUE = "probe-value"  # float: noisy AUROC (macro for classes), or MAE / mean predictor's
PROBE_BASELINE = "probe-baseline"  # float: the public constant 0.5 (AUROC) or 1 (relative MAE)
PROBE_ROWS = "probe-rows"  # int: the site's record rows, labelled or not (aggregation weight)
PROBE_SUBJECTS = "probe-subjects"  # int: subjects behind those rows
PROBE_KINDS = ("binary", "multiclass", "regression")  # evaluation.labels.TASK_KINDS, in order


# --- Metric keys the server adds to each round's aggregated train MetricRecord ---------------
NODES_SAMPLED = "nodes-sampled"  # sites sent a training instruction
REPLIES_OK = "replies-ok"  # sites whose update went into the aggregate
REPLIES_FAILED = "replies-failed"  # error replies (ClientApp raised) and invalid replies
REPLIES_REFUSED = "replies-refused"  # sites that refused the round
REPLIES_MISSING = "replies-missing"  # sampled sites that did not answer before the timeout
NODES_EXCLUDED = "nodes-excluded"  # sites no longer sampled (budget-aware strategies)
BYTES_RECEIVED = "bytes-received"  # array bytes of all training replies of the round

MetricValue = int | float | list[int] | list[float]  # what a MetricRecord holds

TERM_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_]*$")


def loss_term_key(term: str) -> str:
    """Metric key of one named loss term, e.g. ``"loss-recon_ecg"``."""
    if not TERM_PATTERN.match(term):
        raise ValueError(f"loss term name {term!r} must match {TERM_PATTERN.pattern}")
    return f"{LOSS_TERM_PREFIX}{term}"
