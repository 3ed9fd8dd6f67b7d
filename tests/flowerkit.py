"""Messages and contexts as Flower delivers them to the ClientApp (tests that play the server).

Imports nothing of ``server/`` or ``strategies/``: a test process playing a site stays one."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from biofp_core.protocol import ARRAYS_KEY, CONFIG_KEY, RunConfig

RUN_ID = 7  # Flower's run id in every test message and context
NODE_ID = 11  # the site's node id


def initial_arrays(run: RunConfig) -> dict[str, np.ndarray]:
    """The run's initial global arrays."""
    return {k: v.numpy() for k, v in run.build_model().state_dict().items()}


def instruction(
    run: RunConfig,
    message_type: str,
    *,
    arrays: dict[str, np.ndarray] | None = None,
    run_id: int = RUN_ID,
    **config: object,
) -> Message:
    """A server message carrying `arrays` (default: the run's initial arrays) and `config`."""
    named = initial_arrays(run) if arrays is None else arrays
    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in named.items()})
    metadata = Metadata(
        run_id=run_id, message_id=f"instruction-{time.monotonic_ns()}", src_node_id=1,
        dst_node_id=NODE_ID, reply_to_message_id="", group_id="1", created_at=time.time(),
        ttl=600.0, message_type=message_type,
    )  # fmt: skip
    content = RecordDict({ARRAYS_KEY: record, CONFIG_KEY: ConfigRecord(dict(config))})
    return Message(content, metadata=metadata)


def site_context(run: RunConfig, site_toml: Path, *, run_id: int = RUN_ID) -> Context:
    """The context of a deployed site's ClientApp: its site.toml in the node config."""
    return Context(
        run_id=run_id, node_id=NODE_ID, node_config={"site-config": str(site_toml)},
        state=RecordDict(), run_config=run.to_run_config(),
    )  # fmt: skip
