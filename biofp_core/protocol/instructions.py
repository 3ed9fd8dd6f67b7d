"""What the server asks of a site: one typed model per message, built by the server and parsed
by the client with the same code.

A message's ``ConfigRecord`` holds an instruction's fields under their wire keys
(:mod:`biofp_core.protocol.keys`). The server builds one with :meth:`Instruction.to_config`; the
ClientApp reads it back with :meth:`Instruction.from_config`. Some keys are added on the way by
Flower's own strategies (``server-round`` by every ``configure_train``, ``proximal-mu`` by FedProx)
or by BioFP's compressed strategy (``compression``): the server's part of a training instruction is
:class:`TrainSettings`, the site reads the whole :class:`TrainInstruction`. Unknown keys are
ignored (a newer server may add some), invalid values fail validation. No ``flwr`` import.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field

from biofp_core.protocol.keys import (
    COMPRESSION,
    LOCAL_STEPS,
    LR,
    PROBE_TASK,
    PROXIMAL_MU,
    RUN_KEY,
    RUN_KEY_PATTERN,
    SERVER_ROUND,
    Scheme,
)

ConfigValue = bool | int | float | str  # what a ConfigRecord value is here


class Instruction(BaseModel):
    """What every server message carries: the run key the site charges its ledger under."""

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    run_key: str | None = Field(None, alias=RUN_KEY, pattern=RUN_KEY_PATTERN)

    def to_config(self) -> dict[str, ConfigValue]:
        """The ``ConfigRecord`` content: wire keys, unset fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Self:
        """Parse a message's ``ConfigRecord`` (raises pydantic's ValidationError)."""
        return cls.model_validate(dict(config))


class TrainSettings(Instruction):
    """The server's part of a training instruction: local steps and learning rate."""

    local_steps: int | None = Field(None, alias=LOCAL_STEPS, ge=1)
    lr: float | None = Field(None, alias=LR, gt=0)


class TrainInstruction(TrainSettings):
    """A training round as the site reads it, with what the strategy added on the way."""

    server_round: int = Field(alias=SERVER_ROUND, ge=1)
    proximal_mu: float = Field(0.0, alias=PROXIMAL_MU, ge=0)
    compression: Scheme | None = Field(None, alias=COMPRESSION)  # None: send full weights


class EvaluateInstruction(Instruction):
    """A federated evaluation of the global model on the site's held-out subjects."""

    server_round: int = Field(alias=SERVER_ROUND, ge=0)


class QueryInstruction(Instruction):
    """A query after the last round: release fingerprints (the round names the release)."""

    server_round: int = Field(0, alias=SERVER_ROUND, ge=0)


class ProbeInstruction(QueryInstruction):
    """A probe query: one label column the site probes on its own fingerprints."""

    task: str = Field(alias=PROBE_TASK, min_length=1, description="the label column to probe")
