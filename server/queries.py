"""After the last round: ask every connected site for released fingerprints and local probes.

Both query messages carry the final global arrays, the last round and the run key, and go to
every connected node at once (one batch per query). Every reply is checked by the one reply
validator (:func:`strategies.replies.check_reply`), as training and evaluation replies are:

- ``query.fingerprint`` (run config ``collect-fingerprints``): each site releases fingerprints
  under its own policy or refuses. A released file is checked (a BioFP fingerprint file with the
  rows the site reported, of the final model's weights) and written to
  ``<run_dir>/fingerprints/node-<id>.parquet``; an invalid one is never written.
- ``query.probe`` (run config ``probe-tasks``), one batch per task: each site cross-validates
  the task's probe on its own fingerprints and sends the scalars only; they are combined by
  :func:`biofp_core.evaluation.aggregate_probes` (row-weighted mean: the pooled metric for MAE,
  not for AUROC, as ``pooled_equivalent`` says). No fingerprint leaves a site for this.

Refusals, failures and silent sites are logged and recorded; the run goes on (its model is
already saved). Everything lands in ``<run_dir>/federated_eval.json`` (:class:`FederatedEval`),
keyed by Flower node id, as the server never learns site names.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from pydantic import BaseModel, ConfigDict, Field

from biofp_core.artifacts import load_model
from biofp_core.errors import DataError
from biofp_core.evaluation import FederatedProbe, SiteProbe, aggregate_probes
from biofp_core.evaluation.federated import PRIVATE_METRIC_OF
from biofp_core.fingerprints.parquet import read_fingerprints
from biofp_core.fsutil import atomic_write_bytes, atomic_write_text
from biofp_core.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    FINGERPRINTS_ARRAY,
    QUERY_FINGERPRINT,
    QUERY_PROBE,
    FingerprintReplyMetrics,
    ProbeInstruction,
    ProbeReplyMetrics,
    QueryInstruction,
    RunConfig,
)
from server.rounds import FederationError, wait_for_sites
from strategies.replies import check_reply, short_reason

log = logging.getLogger(__name__)

FINGERPRINTS_DIR = "fingerprints"
FEDERATED_EVAL_NAME = "federated_eval.json"
FEDERATED_EVAL_FORMAT = "biofp-federated-eval"

QueryStatus = Literal["ok", "refused", "failed", "missing"]


class NodeAnswer(BaseModel):
    """One site's answer to one query, as the server saw it."""

    model_config = ConfigDict(extra="forbid")

    status: QueryStatus
    reason: str | None = Field(None, description="one line: why a reply failed")


class ReleasedFile(NodeAnswer):
    """One site's answer to the fingerprint query."""

    path: str | None = Field(None, description="the checked file, when released")
    rows: int = 0
    bytes: int = 0
    sha256: str | None = Field(None, description="of the file's bytes")
    epsilon: float | None = Field(None, description="the site's total ε after its answer")


class ProbeAnswer(NodeAnswer):
    """One site's answer to the probe query of one task."""

    probe: SiteProbe | None = None


class TaskEvaluation(BaseModel):
    """One task probed at every site, and combined."""

    model_config = ConfigDict(extra="forbid")

    task: str
    federated: FederatedProbe | None = Field(None, description="None: no site could combine")
    error: str | None = Field(None, description="why the sites' probes were not combined")
    sites: dict[int, ProbeAnswer] = Field(default_factory=dict, description="by node id")


class FederatedEval(BaseModel):
    """``<run_dir>/federated_eval.json``: what the sites answered to the queries of a run."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["biofp-federated-eval"] = FEDERATED_EVAL_FORMAT
    run_key: str | None
    server_round: int = Field(description="the round whose global model was queried")
    model_weights_sha256: str = Field(description="the final model's weights")
    fingerprints: dict[int, ReleasedFile] = Field(default_factory=dict, description="by node")
    tasks: dict[str, TaskEvaluation] = Field(default_factory=dict)

    def write(self, run_dir: Path) -> Path:
        """Write ``<run_dir>/federated_eval.json`` atomically."""
        path = Path(run_dir) / FEDERATED_EVAL_NAME
        atomic_write_text(path, self.model_dump_json(indent=1) + "\n")
        return path

    @classmethod
    def read(cls, run_dir: Path) -> FederatedEval:
        """The federated evaluation written in `run_dir`."""
        return cls.model_validate_json((Path(run_dir) / FEDERATED_EVAL_NAME).read_bytes())


def _because(answer: NodeAnswer) -> str:
    """': <reason>' for a log line, or what a status means when the reply gives no reason."""
    if answer.reason:
        return f": {answer.reason}"
    return {
        "refused": " (the site's policy, budget or labels; its reason stays in its audit log)",
        "missing": " (no reply before round-timeout-s)",
    }.get(answer.status, "")


def _send(
    grid: Grid, node_ids: Iterable[int], message_type: str, arrays: ArrayRecord,
    instruction: QueryInstruction, *, timeout: float,
) -> dict[int, Message]:  # fmt: skip
    """Send one query to every node; the replies by node id (silent nodes are absent)."""
    content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: ConfigRecord(instruction.to_config())})
    messages = [Message(content, dst_node_id=n, message_type=message_type) for n in node_ids]
    replies = grid.send_and_receive(messages, timeout=timeout)
    return {reply.metadata.src_node_id: reply for reply in replies}


def _save_release(
    reply: Message, metrics: FingerprintReplyMetrics, path: Path, weights_sha256: str
) -> ReleasedFile:
    """Check the file of a valid fingerprint release (its `metrics` already checked by the
    validator) and write it to `path`.

    Raises
    ------
    ValueError, DataError
        The file is not a release the site says it made of the final model: other arrays, a
        file that is not a BioFP fingerprint file, other rows or other weights. Nothing is
        written then.
    """
    arrays = reply.content.array_records[ARRAYS_KEY]
    if list(arrays.keys()) != [FINGERPRINTS_ARRAY]:
        raise ValueError(f"arrays {list(arrays.keys())}, expected [{FINGERPRINTS_ARRAY!r}]")
    blob = arrays[FINGERPRINTS_ARRAY].numpy()
    if blob.dtype != np.uint8 or blob.ndim != 1 or blob.nbytes != metrics.payload_bytes:
        raise ValueError(f"file {blob.dtype} {blob.shape}, not {metrics.payload_bytes} bytes")
    data = blob.tobytes()
    staged = path.with_name(f".{path.name}.part")
    atomic_write_bytes(staged, data)
    try:
        table, meta = read_fingerprints(staged)
        if len(table) != metrics.rows or meta.model_weights_sha256 != weights_sha256:
            raise ValueError(
                f"{len(table)} rows of weights {meta.model_weights_sha256[:12]}, the site said "
                f"{metrics.rows} rows of the final model ({weights_sha256[:12]})"
            )
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)
    return ReleasedFile(
        status="ok", path=str(path), rows=metrics.rows, bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(), epsilon=metrics.epsilon,
    )  # fmt: skip


def _released_file(
    node_id: int, reply: Message | None, folder: Path, weights_sha256: str
) -> ReleasedFile:
    """One node's answer to the fingerprint query, its file written when it released one."""
    if reply is None:
        return ReleasedFile(status="missing")
    checked = check_reply(reply, FingerprintReplyMetrics)
    if checked.status == "failed" or checked.metrics is None:
        return ReleasedFile(status="failed", reason=checked.reason)
    if checked.status == "refused":
        return ReleasedFile(status="refused", epsilon=checked.metrics.epsilon)
    path = folder / f"node-{node_id}.parquet"
    try:
        return _save_release(reply, checked.metrics, path, weights_sha256)
    except (ValueError, DataError) as exc:
        return ReleasedFile(status="failed", reason=f"invalid release: {short_reason(exc, 300)}")


def collect_fingerprints(
    grid: Grid, node_ids: list[int], arrays: ArrayRecord, query: QueryInstruction, *,
    run: RunConfig,
    weights_sha256: str,
) -> dict[int, ReleasedFile]:  # fmt: skip
    """Ask every node for its released fingerprints; write the valid files, log the others."""
    folder = run.run_dir / FINGERPRINTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    replies = _send(grid, node_ids, QUERY_FINGERPRINT, arrays, query, timeout=run.round_timeout_s)
    answers = {n: _released_file(n, replies.get(n), folder, weights_sha256) for n in node_ids}
    for node_id, answer in answers.items():
        if answer.status == "ok":
            log.info("node %d released %d fingerprint rows: %s", node_id, answer.rows, answer.path)
        else:
            log.warning("node %d: fingerprint query %s%s", node_id, answer.status,
                        _because(answer))  # fmt: skip
    return answers


def probe_answer(task: str, reply: Message | None) -> ProbeAnswer:
    """One node's answer to the probe query of `task`."""
    if reply is None:
        return ProbeAnswer(status="missing")
    checked = check_reply(reply, ProbeReplyMetrics)
    metrics = checked.metrics
    if checked.status == "failed" or metrics is None:
        return ProbeAnswer(status="failed", reason=checked.reason)
    if checked.status == "refused" or metrics.kind is None:
        return ProbeAnswer(status="refused")
    probe = SiteProbe(
        task=task, kind=metrics.kind, metric=PRIVATE_METRIC_OF[metrics.kind], value=metrics.value,
        baseline=metrics.baseline, rows=metrics.rows, subjects=metrics.subjects,
    )  # fmt: skip
    return ProbeAnswer(status="ok", probe=probe)


def combine_probes(task: str, answers: dict[int, ProbeAnswer]) -> TaskEvaluation:
    """The task's evaluation: every node's answer and the row-weighted combination of the
    probes (None when no site probed it, or when the sites disagree on its kind)."""
    probes = [a.probe for a in answers.values() if a.probe is not None]
    evaluation = TaskEvaluation(task=task, sites=answers)
    if not probes:
        evaluation.error = "no site probed the task"
        return evaluation
    try:
        evaluation.federated = aggregate_probes(probes)
    except ValueError:
        kinds = sorted({f"{p.kind} ({p.metric})" for p in probes})
        evaluation.error = f"the sites infer different kinds of task: {', '.join(kinds)}"
    return evaluation


def probe_sites(
    grid: Grid, node_ids: list[int], arrays: ArrayRecord, query: QueryInstruction, task: str,
    *, timeout: float,
) -> TaskEvaluation:  # fmt: skip
    """Ask every node to probe `task` on its own fingerprints; combine the scalars."""
    probe = ProbeInstruction(**query.model_dump(), task=task)
    replies = _send(grid, node_ids, QUERY_PROBE, arrays, probe, timeout=timeout)
    answers = {n: probe_answer(task, replies.get(n)) for n in node_ids}
    for node_id, answer in answers.items():
        if answer.status != "ok":
            log.warning("node %d: probe of %r %s%s", node_id, task, answer.status,
                        _because(answer))  # fmt: skip
    evaluation = combine_probes(task, answers)
    if evaluation.federated is not None:
        fed = evaluation.federated
        log.info("task %r: %s %.4f over %d sites (%d rows)", task, fed.metric, fed.value,
                 fed.sites, fed.rows)  # fmt: skip
    else:
        log.warning("task %r: not combined: %s", task, evaluation.error)
    return evaluation


def run_queries(
    grid: Grid, run: RunConfig, arrays: ArrayRecord, *, run_key: str | None, model_path: Path
) -> FederatedEval | None:
    """Send the queries the run config asks for (none: return None) to every connected site
    and write ``<run_dir>/federated_eval.json``."""
    tasks = run.probe_task_list
    if not (run.collect_fingerprints or tasks):
        return None
    try:
        wait_for_sites(grid, needed=run.min_sites, timeout_s=run.wait_timeout_s)
    except FederationError as exc:  # the model is saved: query the sites that are here
        log.error("%s; querying the connected sites only", exc)
    node_ids = sorted(grid.get_node_ids())
    query = QueryInstruction(run_key=run_key, server_round=run.num_rounds)
    result = FederatedEval(
        run_key=run_key,
        server_round=run.num_rounds,
        model_weights_sha256=load_model(model_path)[1].weights_sha256,
    )
    if run.collect_fingerprints:
        result.fingerprints = collect_fingerprints(
            grid, node_ids, arrays, query, run=run,
            weights_sha256=result.model_weights_sha256,
        )  # fmt: skip
    for task in tasks:
        result.tasks[task] = probe_sites(
            grid, node_ids, arrays, query, task, timeout=run.round_timeout_s
        )
    path = result.write(run.run_dir)
    log.info("federated evaluation of %d node(s) written to %s", len(node_ids), path)
    return result
