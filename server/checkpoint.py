"""Round checkpoints of the global model and the strategy's state, in the run directory.

After every round the server writes ``<run_dir>/checkpoints/round-NNNN.safetensors``: the global
arrays under ``global/<name>``, the array part of the strategy's own state
(:meth:`strategies.base.CountedFedAvg.state_dict`, e.g. FedAdam's moments) under
``strategy/<entry>/<name>``, and in the safetensors metadata a :class:`CheckpointMeta` (round,
strategy, model, the strategy's JSON state, e.g. the budget-aware exclusions, and the sha256 of
every tensor). What the state holds is the strategy's business, not this module's. A checkpoint is
written to a temporary file, fsync'ed and renamed into place, so a crash leaves the previous
checkpoints as they were; the latest ``keep`` checkpoints are kept.

Resuming loads the newest checkpoint that passes every check. A corrupt one (unreadable,
truncated, or whose tensors no longer match their sha256) is refused with a one-line error, left
on disk for inspection, and the previous checkpoint is used.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from biofp_core.audit import arrays_sha256
from biofp_core.checked_tensors import read_checked, write_checked
from biofp_core.errors import ArtifactError
from strategies.base import CountedFedAvg, StrategyState

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "biofp-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
_GLOBAL_PREFIX = "global/"
_STRATEGY_PREFIX = "strategy/"
_NAME_PATTERN = re.compile(r"^round-(\d{4,})\.safetensors$")


class CheckpointMeta(BaseModel):
    """What a checkpoint file says about itself (stored in its safetensors metadata)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: str = CHECKPOINT_FORMAT
    version: int = CHECKPOINT_VERSION
    server_round: int = Field(ge=0, description="rounds completed when it was written")
    strategy: str
    model: str
    strategy_state: dict[str, Any] = Field(
        default_factory=dict, description="the JSON part of the strategy's state_dict"
    )
    sha256: str = Field(description="audit.arrays_sha256 of every tensor in the file")


@dataclass
class Checkpoint:
    """A loaded checkpoint: global arrays, strategy state and where it came from."""

    meta: CheckpointMeta
    arrays: dict[str, np.ndarray]
    strategy_arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    path: Path | None = None

    @property
    def server_round(self) -> int:
        return self.meta.server_round

    @property
    def strategy_state(self) -> StrategyState:
        """The strategy's state as it was saved, for ``strategy.load_state_dict``."""
        return StrategyState(
            arrays={entry: dict(values) for entry, values in self.strategy_arrays.items()},
            values=dict(self.meta.strategy_state),
        )


def checkpoint_path(run_dir: Path, server_round: int) -> Path:
    """``<run_dir>/checkpoints/round-NNNN.safetensors``."""
    return Path(run_dir) / CHECKPOINT_DIR / f"round-{server_round:04d}.safetensors"


def restore_strategy_state(strategy: CountedFedAvg, checkpoint: Checkpoint) -> None:
    """Put a checkpoint's strategy state back into a freshly built strategy of the same kind.

    Raises
    ------
    ArtifactError
        One line naming the file: its state is not one this strategy has (another strategy,
        or budget-aware sampling switched off since).
    """
    try:
        strategy.load_state_dict(checkpoint.strategy_state)
    except ValueError as exc:
        raise ArtifactError(f"{checkpoint.path}: cannot resume this strategy: {exc}") from None


def save_checkpoint(
    run_dir: Path,
    *,
    server_round: int,
    arrays: dict[str, np.ndarray],
    strategy: CountedFedAvg,
    strategy_name: str,
    model_name: str,
    keep: int = 2,
) -> Path:
    """Write the checkpoint of `server_round` atomically; prune all but the latest `keep`.

    Returns
    -------
    Path
        The checkpoint file.
    """
    state = strategy.state_dict()
    tensors = {f"{_GLOBAL_PREFIX}{k}": np.ascontiguousarray(v) for k, v in arrays.items()}
    for entry, values in state.arrays.items():
        for k, v in values.items():
            tensors[f"{_STRATEGY_PREFIX}{entry}/{k}"] = np.ascontiguousarray(v)
    meta = CheckpointMeta(
        server_round=server_round,
        strategy=strategy_name,
        model=model_name,
        strategy_state=state.values,
        sha256=arrays_sha256(tensors),
    )
    path = checkpoint_path(run_dir, server_round)
    try:
        write_checked(path, tensors, meta)
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot write checkpoint ({exc.strerror})") from None
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> Checkpoint:
    """Read and verify one checkpoint file.

    Raises
    ------
    ArtifactError
        One line naming the file: unreadable, not a BioFP checkpoint, or corrupted.
    """
    meta, tensors = read_checked(path, CheckpointMeta, what="checkpoint")
    if meta.format != CHECKPOINT_FORMAT or meta.version > CHECKPOINT_VERSION:
        raise ArtifactError(f"{path}: unsupported checkpoint format {meta.format} v{meta.version}")
    arrays = {k[len(_GLOBAL_PREFIX) :]: v for k, v in tensors.items() if k.startswith("global/")}
    strategy_arrays: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        if key.startswith(_STRATEGY_PREFIX):
            attr, _, name = key[len(_STRATEGY_PREFIX) :].partition("/")
            strategy_arrays.setdefault(attr, {})[name] = value
    return Checkpoint(meta=meta, arrays=arrays, strategy_arrays=strategy_arrays, path=Path(path))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint files of a run, oldest round first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The newest valid checkpoint of a run, or None when it has none.

    A corrupt checkpoint is refused (logged as one line at ERROR and left on disk) and the one
    before it is tried.

    Raises
    ------
    ArtifactError
        When checkpoints exist but every one of them is corrupt: the run cannot resume safely.
    """
    paths = list_checkpoints(run_dir)
    errors: list[str] = []
    for path in reversed(paths):
        try:
            checkpoint = load_checkpoint(path)
        except ArtifactError as exc:
            log.error("%s; trying the previous checkpoint", exc)
            errors.append(str(exc))
            continue
        if errors:
            log.warning("resuming from %s after refusing %d newer checkpoint(s)", path, len(errors))
        return checkpoint
    if errors:
        raise ArtifactError(
            f"{errors[0]}; no valid checkpoint left in {Path(run_dir) / CHECKPOINT_DIR} "
            "(remove them to restart the run from round 1)"
        )
    return None


def describe_state(checkpoint: Checkpoint) -> str:
    """A short description for logs: round, strategy and state sizes."""
    state = {attr: len(v) for attr, v in checkpoint.strategy_arrays.items()}
    return (
        f"round {checkpoint.server_round} ({checkpoint.meta.strategy}, "
        f"{len(checkpoint.arrays)} tensors, strategy state {json.dumps(state)})"
    )
