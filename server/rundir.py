"""The run directory: where a federated run starts or resumes, and what it leaves behind.

Layout of ``<out-dir>``::

    run.json                          the run key: a uuid written at the first start, kept on resume
    config.json                       the RunConfig of the run
    checkpoints/round-NNNN.safetensors  global arrays + strategy state after round NNNN
    metrics.json                      RunReport: status and per-round, per-site metrics
    model.safetensors, model.card.json  the final global model (biofp_core.artifacts)

Starting a run in a directory that already holds one resumes it from its last valid checkpoint,
provided the model and strategy are the same; ``num-rounds`` may grow (to extend a run).

The run key identifies the run to the sites (``protocol.RUN_KEY`` in every instruction): a run
resubmitted after a server crash gets a new Flower run id but keeps its run key, so a site
recognises the round that was in flight as one it already trained and was charged for.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from pydantic import BaseModel, ConfigDict, Field

from biofp_core.artifacts import (
    ModelCard,
    PrivacySummary,
    SitePrivacy,
    TrainingProvenance,
    save_model,
)
from biofp_core.errors import ArtifactError, ConfigError
from biofp_core.fsutil import atomic_write_text, read_if_present
from biofp_core.protocol import RUN_KEY_PATTERN, RunConfig
from server.checkpoint import (
    describe_state,
    latest_checkpoint,
    restore_strategy_state,
    save_checkpoint,
)
from server.nodes import node_label
from server.report import RoundMetrics, RunReport

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
RUN_KEY_NAME = "run.json"
RUN_KEY_FORMAT = "biofp-run-key"
MODEL_STEM = "model"
_SAME_FOR_RESUME = ("model", "model_options", "strategy", "strategy_options")


def to_arrayrecord(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord keeping the names (state-dict keys) of `arrays`."""
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def to_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """Name -> numpy array of an ArrayRecord."""
    return {name: array.numpy() for name, array in arrays.items()}


class RunKeyFile(BaseModel):
    """``<out-dir>/run.json``: the run key, fixed at the run's first start."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["biofp-run-key"] = RUN_KEY_FORMAT
    run_key: str = Field(pattern=RUN_KEY_PATTERN)
    created_at: str


def read_run_key(run_dir: Path) -> str | None:
    """The run key stored in `run_dir`, None when the directory has none yet.

    Raises
    ------
    ArtifactError
        ``run.json`` exists but is unreadable: never replaced, since a new key would make the
        sites charge the round in flight again.
    """
    path = Path(run_dir) / RUN_KEY_NAME
    raw = read_if_present(path, "run key", ArtifactError)
    if raw is None:
        return None
    try:
        return RunKeyFile.model_validate_json(raw).run_key
    except ValueError:
        raise ArtifactError(
            f"{path}: corrupt run key file; restore it (a new key would charge the sites "
            "again for the round in flight) or choose another out-dir"
        ) from None


def ensure_run_key(run_dir: Path) -> str:
    """The run key of `run_dir`: the stored one, or a new uuid written atomically and fsync'ed."""
    key = read_run_key(run_dir)
    if key is None:
        key = uuid.uuid4().hex
        created = datetime.now(UTC).isoformat(timespec="seconds")
        text = RunKeyFile(run_key=key, created_at=created).model_dump_json(indent=1)
        path = Path(run_dir) / RUN_KEY_NAME
        atomic_write_text(path, text + "\n")  # durable (file and folder fsync'ed) before any
        # site is charged under it
        log.info("new run key %s in %s", key, run_dir)
    return key


class RunDirectory:
    """One run's directory, bound to its config and strategy.

    Parameters
    ----------
    run : RunConfig
        The run's config; ``run.out_dir`` is the directory.
    strategy : object
        The run's strategy, whose state is checkpointed and restored.
    """

    def __init__(self, run: RunConfig, strategy: object) -> None:
        self.run = run
        self.strategy = strategy
        self.path = run.run_dir
        self.report = RunReport(num_rounds=run.num_rounds)
        self.run_key: str | None = None  # set by start()

    def _check_same_run(self) -> None:
        """Refuse to resume a run directory that holds a different model or strategy."""
        path = self.path / CONFIG_NAME
        if not path.exists():
            return
        try:
            previous = RunConfig.model_validate_json(path.read_bytes())
        except ValueError as exc:
            raise ConfigError(f"{path}: unreadable run config ({exc})") from None
        changed = [
            key.replace("_", "-")
            for key in _SAME_FOR_RESUME
            if getattr(previous, key) != getattr(self.run, key)
        ]
        if changed:
            raise ConfigError(
                f"{self.path} holds a run with other {', '.join(changed)}; "
                "resume it with the same settings or choose another out-dir"
            )

    def start(self, flower_run_id: int | None = None) -> tuple[int, ArrayRecord]:
        """(rounds already done, global arrays to continue from): resume or initialise.

        `flower_run_id` (Flower's id of this submission) is added to the report's
        ``flower_run_ids``, beside the run key, and logged.

        Raises
        ------
        ConfigError
            The directory holds a run of another model or strategy.
        ArtifactError
            Checkpoints exist but none is valid, or the run key file is corrupt.
        """
        self._check_same_run()
        self.path.mkdir(parents=True, exist_ok=True)
        self.run_key = ensure_run_key(self.path)
        atomic_write_text(self.path / CONFIG_NAME, self.run.model_dump_json(indent=1) + "\n")
        previous = RunReport.read(self.path)
        self.report.run_key = self.run_key
        self.report.flower_run_ids = list(previous.flower_run_ids) if previous else []
        self.report.initial_model_sha256 = previous.initial_model_sha256 if previous else None
        if flower_run_id is not None and flower_run_id not in self.report.flower_run_ids:
            self.report.flower_run_ids.append(flower_run_id)
        log.info(
            "run key %s (the 'run' in the sites' ledgers and audit logs) = Flower run %s; "
            "run directory %s",
            self.run_key,
            flower_run_id if flower_run_id is not None else "?",
            self.path,
        )
        checkpoint = latest_checkpoint(self.path)
        if checkpoint is None:
            model, self.report.initial_model_sha256 = self.run.build_initial_model()
            arrays = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
            self.report.write(self.path)
            return 0, to_arrayrecord(arrays)
        restore_strategy_state(self.strategy, checkpoint)
        done = checkpoint.server_round
        if previous is not None:
            self.report.rounds = [r for r in previous.rounds if r.server_round <= done]
        self.report.resumed_from_round = done
        self.report.write(self.path)
        log.info("resuming %s from %s", self.path, describe_state(checkpoint))
        return done, to_arrayrecord(checkpoint.arrays)

    def record_round(self, arrays: ArrayRecord | None, metrics: RoundMetrics) -> None:
        """Add a round's metrics; checkpoint its arrays when some site contributed."""
        self.report.rounds.append(metrics)
        if arrays is not None:
            save_checkpoint(
                self.path,
                server_round=metrics.server_round,
                arrays=to_numpy(arrays),
                strategy=self.strategy,
                strategy_name=self.run.strategy,
                model_name=self.run.model,
                keep=self.run.keep_checkpoints,
            )
        self.report.write(self.path)

    def fail(self, error: Exception) -> None:
        """Mark the run failed, with the one-line reason."""
        self.report.status = "failed"
        self.report.error = " ".join(str(error).split())
        self.report.write(self.path)

    def stop(self, reason: str) -> None:
        """Mark the run stopped (``flwr stop``, SIGTERM, the SuperLink going away), unless it
        already completed or failed."""
        if self.report.status != "running":
            return
        self.report.status = "stopped"
        self.report.error = " ".join(reason.split())
        self.report.write(self.path)

    def _card(self) -> ModelCard:
        rounds = max((r.server_round for r in self.report.rounds), default=0)
        contributors = self.report.contributors()
        names = self.report.site_names()
        sites = {n: p for n, p in self.report.site_privacy().items() if n in contributors}
        privacy = None
        if self.run.dp and sites:
            privacy = PrivacySummary(
                sites={
                    node_label(node, names): SitePrivacy(epsilon=eps, delta=delta)
                    for node, (eps, delta) in sorted(sites.items())
                }
            )
        return ModelCard(
            data=self.report.data_summary(),
            training=TrainingProvenance(
                rounds=rounds,
                strategy=self.run.strategy,
                local_steps=self.run.local_steps,
                seed=self.run.seed,
                initialised_from=self.report.initial_model_sha256,
                created_at=datetime.now(UTC),
            ),
            privacy=privacy,
        )

    def finish(self, arrays: ArrayRecord) -> Path:
        """Save the final model (safetensors + card with every site's ε) and close the report."""
        model = self.run.build_model()
        state = {k: torch.from_numpy(np.array(v)) for k, v in to_numpy(arrays).items()}
        model.load_state_dict(state, strict=True)
        path = save_model(model, self.path / MODEL_STEM, self._card())
        self.report.status = "completed"
        self.report.model_path = str(path)
        self.report.write(self.path)
        return path
