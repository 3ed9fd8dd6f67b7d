"""What may leave a site: the table of every reply key and the typed reply metrics.

The client builds its reply metrics with :class:`TrainReplyMetrics` (training),
:class:`EvaluateReplyMetrics` (evaluation), :class:`FingerprintReplyMetrics` and
:class:`ProbeReplyMetrics` (query messages);
:func:`is_allowed_reply_key` is the allow-list of every reply type. The server parses the same
models. No ``flwr`` import.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from biofp_core.protocol.keys import (
    BUDGET_EXHAUSTED,
    DATA_HOURS,
    DATA_SUBJECTS,
    DATA_WINDOWS,
    DELTA,
    EPSILON,
    EVAL_LOSS,
    LOSS_TERM_PREFIX,
    NUM_EXAMPLES,
    PAYLOAD_BYTES,
    PROBE_BASELINE,
    PROBE_KIND,
    PROBE_KINDS,
    PROBE_ROWS,
    PROBE_SUBJECTS,
    PROBE_VALUE,
    QUERY_FINGERPRINT,
    QUERY_PROBE,
    REFUSED,
    RELEASED_ROWS,
    TERM_PATTERN,
    TRAIN_LOSS,
    MetricValue,
    loss_term_key,
)

# --- What may leave a site: every reply key, where its value comes from, what pays for it ------
# The one table of docs/privacy.md (a test holds the two equal). A key whose `charged` kind is set
# carries patient-derived values: the site sends it only with the ledger entry that paid for it
# (client.replies refuses to build the reply otherwise). The others are counts and settings the
# site chose, ledger read-outs, flags, or post-processing of a charged release.
ARRAYS_ENTRY = "<arrays>"  # the reply's ArrayRecord, as a row of the table
LOSS_TERMS_ENTRY = f"{LOSS_TERM_PREFIX}<term>"  # every loss-term key, as a row of the table


class ReplyKey(BaseModel):
    """One row of the table: a key of one reply type."""

    model_config = ConfigDict(frozen=True)

    source: Literal["dp-sgd", "gaussian", "count", "setting", "ledger", "flag", "post-processing"]
    charged: str | None = None  # the ledger kind that pays for it (patient-derived values)


def _k(source: str, charged: str | None = None) -> ReplyKey:
    return ReplyKey(source=source, charged=charged)  # type: ignore[arg-type]


REPLY_KEYS: dict[str, dict[str, ReplyKey]] = {
    "train": {
        ARRAYS_ENTRY: _k("dp-sgd", "train"),
        NUM_EXAMPLES: _k("count"),
        TRAIN_LOSS: _k("gaussian", "train"),
        LOSS_TERMS_ENTRY: _k("gaussian", "train"),
        EPSILON: _k("ledger"),
        DELTA: _k("setting"),
        PAYLOAD_BYTES: _k("count"),
        BUDGET_EXHAUSTED: _k("ledger"),
        REFUSED: _k("flag"),
        DATA_SUBJECTS: _k("count"),
        DATA_WINDOWS: _k("count"),
        DATA_HOURS: _k("count"),
    },
    "evaluate": {
        NUM_EXAMPLES: _k("count"),
        EVAL_LOSS: _k("gaussian", "evaluate"),
        REFUSED: _k("flag"),
    },
    QUERY_FINGERPRINT: {
        ARRAYS_ENTRY: _k("gaussian", "release"),
        RELEASED_ROWS: _k("count"),
        PAYLOAD_BYTES: _k("post-processing"),
        EPSILON: _k("ledger"),
        DELTA: _k("setting"),
        REFUSED: _k("flag"),
    },
    QUERY_PROBE: {
        PROBE_KIND: _k("setting"),
        PROBE_VALUE: _k("gaussian", "probe:<task>"),
        PROBE_BASELINE: _k("setting"),
        PROBE_ROWS: _k("count"),
        PROBE_SUBJECTS: _k("count"),
        REFUSED: _k("flag"),
    },
}


def _table_of(message_type: str) -> dict[str, ReplyKey] | None:
    category = message_type.partition(".")[0]
    return REPLY_KEYS.get(category if category in ("train", "evaluate") else message_type)


def reply_key(message_type: str, key: str) -> ReplyKey | None:
    """The table's row of `key` in a reply to `message_type`; None when it may not be sent."""
    table = _table_of(message_type)
    if table is None:
        return None
    if key in table and key != ARRAYS_ENTRY:
        return table[key]
    term = key.removeprefix(LOSS_TERM_PREFIX)
    if LOSS_TERMS_ENTRY in table and term != key and TERM_PATTERN.match(term):
        return table[LOSS_TERMS_ENTRY]
    return None


def arrays_entry(message_type: str) -> ReplyKey | None:
    """The table's row of a reply's arrays; None when the reply may carry none."""
    table = _table_of(message_type)
    return None if table is None else table.get(ARRAYS_ENTRY)


def is_allowed_reply_metric_key(key: str) -> bool:
    """True for the keys a site may put in a training reply's MetricRecord."""
    return reply_key("train", key) is not None


def is_allowed_reply_key(message_type: str, key: str) -> bool:
    """True for the metric keys a site may send in reply to a message of `message_type`
    (``"train[.<action>]"``, ``"evaluate[.<action>]"``, ``"query.fingerprint"``,
    ``"query.probe"``); any other message type: none."""
    return reply_key(message_type, key) is not None


class TrainReplyMetrics(BaseModel):
    """The scalar metrics of one site's training reply, validated in one place.

    The client builds it and sends :meth:`to_metrics`; the server parses replies back with
    :meth:`from_metrics`. A contributing reply has ``num_examples > 0`` and a finite loss; a
    refusal (:meth:`refusal`) has neither and carries no arrays.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_examples: int = Field(..., ge=0, description="subject bags trained on; the FedAvg weight")
    train_loss: float | None = Field(None, description="mean local loss; None only if refused")
    loss_terms: dict[str, float] = Field(default_factory=dict, description="mean of each term")
    epsilon: float = Field(math.inf, ge=0, description="total ε spent; inf without DP")
    delta: float = Field(0.0, ge=0, lt=1, description="the site's δ; 0 without DP")
    payload_bytes: int = Field(0, ge=0, description="numeric bytes of the update sent")
    budget_exhausted: bool = Field(False, description="the site cannot afford another round")
    refused: bool = Field(False, description="the site refused this round")
    data_subjects: int | None = Field(None, ge=0, description="the site's training subjects")
    data_windows: int | None = Field(None, ge=0, description="their windows")
    data_hours: float | None = Field(None, ge=0, description="hours of signal in those windows")

    @field_validator("train_loss")
    @classmethod
    def _finite_loss(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError(f"train_loss must be finite, got {value}")
        return value

    @field_validator("loss_terms")
    @classmethod
    def _valid_terms(cls, terms: dict[str, float]) -> dict[str, float]:
        for term, value in terms.items():
            loss_term_key(term)  # validates the name
            if not math.isfinite(value):
                raise ValueError(f"loss term {term!r} must be finite, got {value}")
        return terms

    @model_validator(mode="after")
    def _contribution_or_refusal(self) -> TrainReplyMetrics:
        if self.refused:
            if self.num_examples != 0 or self.train_loss is not None or self.loss_terms:
                raise ValueError("a refused reply carries no examples and no losses")
        elif self.num_examples == 0 or self.train_loss is None:
            raise ValueError("a contributing reply needs num_examples > 0 and a train_loss")
        return self

    @classmethod
    def refusal(
        cls, *, budget_exhausted: bool = True, epsilon: float = math.inf, delta: float = 0.0
    ) -> TrainReplyMetrics:
        """Metrics of a reply that refuses the round (by default: budget exhausted)."""
        return cls(
            num_examples=0,
            epsilon=epsilon,
            delta=delta,
            budget_exhausted=budget_exhausted,
            refused=True,
        )

    def to_metrics(self) -> dict[str, int | float]:
        """Flat metric dict with protocol keys, ready for ``MetricRecord(...)``.

        Flags are sent as 0/1 ints (MetricRecord rejects bools). A contributing reply always
        has the same keys, as Flower's aggregation requires of all replies in a round.
        """
        metrics: dict[str, int | float] = {
            NUM_EXAMPLES: self.num_examples,
            EPSILON: float(self.epsilon),
            DELTA: float(self.delta),
            PAYLOAD_BYTES: self.payload_bytes,
            BUDGET_EXHAUSTED: int(self.budget_exhausted),
            REFUSED: int(self.refused),
        }
        if self.train_loss is not None:
            metrics[TRAIN_LOSS] = float(self.train_loss)
        for term, value in sorted(self.loss_terms.items()):
            metrics[loss_term_key(term)] = float(value)
        if self.data_subjects is not None:
            metrics[DATA_SUBJECTS] = self.data_subjects
        if self.data_windows is not None:
            metrics[DATA_WINDOWS] = self.data_windows
        if self.data_hours is not None:
            metrics[DATA_HOURS] = float(self.data_hours)
        return metrics

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, MetricValue]) -> TrainReplyMetrics:
        """Parse and validate a reply's metrics; raises ValueError on any unknown key."""
        unknown = sorted(k for k in metrics if not is_allowed_reply_metric_key(k))
        if unknown:
            raise ValueError(f"unknown metric key(s) in reply: {', '.join(unknown)}")
        fields = {field: metrics[key] for key, field in _FIELD_OF_KEY.items() if key in metrics}
        fields["loss_terms"] = {
            key.removeprefix(LOSS_TERM_PREFIX): value
            for key, value in metrics.items()
            if key.startswith(LOSS_TERM_PREFIX)
        }
        return cls.model_validate(fields)  # strict enough: 3.5 examples or a flag of 2 fail


_FIELD_OF_KEY: dict[str, str] = {
    NUM_EXAMPLES: "num_examples",
    TRAIN_LOSS: "train_loss",
    EPSILON: "epsilon",
    DELTA: "delta",
    PAYLOAD_BYTES: "payload_bytes",
    BUDGET_EXHAUSTED: "budget_exhausted",
    REFUSED: "refused",
    DATA_SUBJECTS: "data_subjects",
    DATA_WINDOWS: "data_windows",
    DATA_HOURS: "data_hours",
}


class EvaluateReplyMetrics(BaseModel):
    """The scalars of one site's evaluation reply: its noisy held-out loss, or a refusal."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_examples: int = Field(..., ge=0, description="held-out subjects; the averaging weight")
    eval_loss: float | None = Field(None, description="noisy held-out loss; None if refused")
    refused: bool = Field(False, description="the site refused to evaluate")

    @model_validator(mode="after")
    def _answer_or_refusal(self) -> EvaluateReplyMetrics:
        if self.refused:
            if self.num_examples != 0 or self.eval_loss is not None:
                raise ValueError("a refused evaluation reply carries no examples and no loss")
        elif self.num_examples == 0 or self.eval_loss is None:
            raise ValueError("an evaluation reply needs num_examples > 0 and an eval_loss")
        elif not math.isfinite(self.eval_loss):
            raise ValueError(f"eval_loss must be finite, got {self.eval_loss}")
        return self

    def to_metrics(self) -> dict[str, int | float]:
        """Flat metric dict with protocol keys, ready for ``MetricRecord(...)``."""
        if self.refused:
            return {NUM_EXAMPLES: 0, REFUSED: 1}
        return {NUM_EXAMPLES: self.num_examples, EVAL_LOSS: float(self.eval_loss or 0.0)}

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, MetricValue]) -> EvaluateReplyMetrics:
        """Parse and validate a reply's metrics; raises ValueError on any unknown key."""
        unknown = sorted(k for k in metrics if not is_allowed_reply_key("evaluate", k))
        if unknown:
            raise ValueError(f"unknown metric key(s) in reply: {', '.join(unknown)}")
        keys = {NUM_EXAMPLES: "num_examples", EVAL_LOSS: "eval_loss", REFUSED: "refused"}
        return cls.model_validate({f: metrics[k] for k, f in keys.items() if k in metrics})


class _QueryReplyMetrics(BaseModel):
    """The scalars of a query reply: one field per protocol key (``KEYS``), flags sent as 0/1."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    KEYS: ClassVar[dict[str, str]] = {}  # protocol key -> field
    ALLOWED: ClassVar[frozenset[str]] = frozenset()

    def to_metrics(self) -> dict[str, int | float]:
        """Flat metric dict with protocol keys, ready for ``MetricRecord(...)``."""
        values = {key: getattr(self, field) for key, field in self.KEYS.items()}
        return {k: int(v) if isinstance(v, bool) else v for k, v in values.items() if v is not None}

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, MetricValue]) -> Self:
        """Parse and validate a reply's metrics; raises ValueError on any unknown key."""
        unknown = sorted(set(metrics) - cls.ALLOWED)
        if unknown:
            raise ValueError(f"unknown metric key(s) in reply: {', '.join(unknown)}")
        return cls.model_validate({f: metrics[k] for k, f in cls.KEYS.items() if k in metrics})


class FingerprintReplyMetrics(_QueryReplyMetrics):
    """What a site released in reply to a fingerprint query, or that it refused."""

    KEYS: ClassVar[dict[str, str]] = {
        RELEASED_ROWS: "rows", PAYLOAD_BYTES: "payload_bytes", EPSILON: "epsilon",
        DELTA: "delta", REFUSED: "refused",
    }  # fmt: skip
    ALLOWED: ClassVar[frozenset[str]] = frozenset(
        set(REPLY_KEYS[QUERY_FINGERPRINT]) - {ARRAYS_ENTRY}
    )

    rows: int = Field(ge=0, description="rows of the released file")
    payload_bytes: int = Field(ge=0, description="bytes of the released Parquet file")
    epsilon: float = Field(ge=0, description="the site's total ε after the release")
    delta: float = Field(ge=0, lt=1, description="the site's δ")
    refused: bool = False

    @model_validator(mode="after")
    def _release_or_refusal(self) -> FingerprintReplyMetrics:
        if self.refused and (self.rows or self.payload_bytes):
            raise ValueError("a refused fingerprint reply releases no rows and no bytes")
        if not self.refused and not (self.rows and self.payload_bytes):
            raise ValueError("a fingerprint release needs rows > 0 and payload-bytes > 0")
        return self

    @classmethod
    def refusal(cls, *, epsilon: float, delta: float) -> FingerprintReplyMetrics:
        """Metrics of a reply that releases nothing."""
        return cls(rows=0, payload_bytes=0, epsilon=epsilon, delta=delta, refused=True)


class ProbeReplyMetrics(_QueryReplyMetrics):
    """The scalars of one site's probe of one task (an ``evaluation.SiteProbe`` without its task
    and metric names, which the server knows), or a refusal."""

    KEYS: ClassVar[dict[str, str]] = {
        PROBE_KIND: "kind", PROBE_VALUE: "value", PROBE_BASELINE: "baseline", PROBE_ROWS: "rows",
        PROBE_SUBJECTS: "subjects", REFUSED: "refused",
    }  # fmt: skip
    ALLOWED: ClassVar[frozenset[str]] = frozenset(REPLY_KEYS[QUERY_PROBE])

    kind: Literal["binary", "multiclass", "regression"] | None = None  # sent as its index
    value: float | None = Field(None, description="the site's out-of-fold metric")
    baseline: float | None = None
    rows: int = Field(0, ge=0, description="the site's record rows: the aggregation weight")
    subjects: int = Field(0, ge=0)
    refused: bool = False

    @field_validator("kind", mode="before")
    @classmethod
    def _kind_of_code(cls, value: object) -> object:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if value not in range(len(PROBE_KINDS)):
                raise ValueError(f"probe kind code {value} is not one of 0..{len(PROBE_KINDS) - 1}")
            return PROBE_KINDS[int(value)]
        return value

    @model_validator(mode="after")
    def _probe_or_refusal(self) -> ProbeReplyMetrics:
        scalars = (self.kind, self.value, self.baseline)
        if self.refused:
            if any(s is not None for s in scalars) or self.rows or self.subjects:
                raise ValueError("a refused probe reply carries no probe scalars")
        elif any(s is None for s in scalars):
            raise ValueError("a probe reply needs kind, value and baseline")
        elif not (math.isfinite(self.value or 0.0) and math.isfinite(self.baseline or 0.0)):
            raise ValueError("probe value and baseline must be finite")
        return self

    @classmethod
    def refusal(cls) -> ProbeReplyMetrics:
        """Metrics of a reply that probes nothing."""
        return cls(refused=True)

    def to_metrics(self) -> dict[str, int | float]:
        metrics = super().to_metrics()
        if self.kind is not None:
            metrics[PROBE_KIND] = PROBE_KINDS.index(self.kind)
        return metrics
