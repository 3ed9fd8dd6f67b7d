"""The run directory: where a federated run starts or resumes, and what it leaves behind.

Layout of ``<out-dir>``::

    config.json                       the RunConfig of the run
    checkpoints/round-NNNN.safetensors  global arrays + strategy state after round NNNN
    metrics.json                      RunReport: status and per-round, per-site metrics
    model.safetensors, model.card.json  the final global model (biofp_core.artifacts)

Starting a run in a directory that already holds one resumes it from its last valid checkpoint,
provided the model and strategy are the same; ``num-rounds`` may grow (to extend a run).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from biofp_core.artifacts import (
    DataSummary,
    ModelCard,
    PrivacySummary,
    SitePrivacy,
    TrainingProvenance,
    save_model,
)
from biofp_core.errors import ConfigError
from biofp_core.fsutil import atomic_write_text
from server.checkpoint import (
    describe_state,
    latest_checkpoint,
    restore_strategy_state,
    save_checkpoint,
)
from server.config import RunConfig
from server.report import RoundMetrics, RunReport

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
MODEL_STEM = "model"
_SAME_FOR_RESUME = ("model", "model_options", "strategy", "strategy_options")


def to_arrayrecord(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord keeping the names (state-dict keys) of `arrays`."""
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def to_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """Name -> numpy array of an ArrayRecord."""
    return {name: array.numpy() for name, array in arrays.items()}


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

    def start(self) -> tuple[int, ArrayRecord]:
        """(rounds already done, global arrays to continue from): resume or initialise.

        Raises
        ------
        ConfigError
            The directory holds a run of another model or strategy.
        ArtifactError
            Checkpoints exist but none is valid.
        """
        self._check_same_run()
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / CONFIG_NAME, self.run.model_dump_json(indent=1) + "\n")
        checkpoint = latest_checkpoint(self.path)
        if checkpoint is None:
            model = self.run.build_model()
            arrays = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
            self.report.write(self.path)
            return 0, to_arrayrecord(arrays)
        restore_strategy_state(self.strategy, checkpoint)
        done = checkpoint.server_round
        previous = RunReport.read(self.path)
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

    def _card(self) -> ModelCard:
        rounds = max((r.server_round for r in self.report.rounds), default=0)
        contributors = self.report.contributors()
        sites = {n: p for n, p in self.report.site_privacy().items() if n in contributors}
        privacy = None
        if self.run.dp and sites:
            privacy = PrivacySummary(
                sites={
                    f"node-{node}": SitePrivacy(epsilon=eps, delta=delta)
                    for node, (eps, delta) in sorted(sites.items())
                }
            )
        return ModelCard(
            data=DataSummary(sites=len(contributors)),
            training=TrainingProvenance(
                rounds=rounds,
                strategy=self.run.strategy,
                local_steps=self.run.local_steps,
                seed=self.run.seed,
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
