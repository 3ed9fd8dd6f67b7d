"""The run config: what the server decides for a whole federated run, parsed once per boundary.

Flower hands both apps the same ``context.run_config`` (``[tool.flwr.app.config]`` in
pyproject.toml, fused with ``flwr run --run-config`` overrides, or the simulation's own). This
module turns it into one validated :class:`RunConfig`; the ServerApp and the ClientApp both parse
it with :meth:`RunConfig.from_run_config`, so unknown keys, unknown strategy or model names and
impossible combinations fail before any round starts, with one line listing the valid choices.

Keys are Flower-style (lower case, hyphenated): the field ``local_steps`` is the key
``"local-steps"``. What a site decides for itself (its data, its privacy budget and δ) is never
here: it is in the site's own ``site.toml``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from biofp_core.config import one_of
from biofp_core.errors import ConfigError, first_error
from biofp_core.models import MODEL_NAMES, build_model, model_classes
from biofp_core.models.base import BioFPModel
from biofp_core.protocol.keys import SCHEMES
from biofp_core.training import TrainConfig

if TYPE_CHECKING:
    from biofp_core.privacy.dp import DPConfig

RunConfigValue = bool | int | float | str  # what a Flower UserConfig value can be

# The strategies a run may name (strategies.registry builds them; a test holds the two equal).
# "compressed" and "budget-aware" are shorthands for fedavg with compression / budget-aware on.
STRATEGY_NAMES = (
    "fedavg", "fedprox", "fedadam", "fedyogi", "trimmed-mean", "krum", "compressed", "budget-aware",
)  # fmt: skip


def _hyphenate(name: str) -> str:
    return name.replace("_", "-")


class RunConfig(BaseModel):
    """Everything the server decides for a run; every field is a run-config key (hyphenated)."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", alias_generator=_hyphenate, populate_by_name=True
    )

    # --- aggregation -------------------------------------------------------------------
    strategy: str = Field("fedavg", description="a name in STRATEGY_NAMES")
    strategy_options: str = Field("{}", description="JSON object of extra strategy options")
    num_rounds: int = Field(3, ge=1, description="federated rounds in total (resume included)")
    min_sites: int = Field(2, ge=1, description="sites that must be connected to train a round")
    fraction_train: float = Field(1.0, gt=0, le=1, description="share of sites sampled to train")
    fraction_evaluate: float = Field(1.0, ge=0, le=1, description="0 skips federated evaluation")
    proximal_mu: float = Field(0.0, ge=0, description="FedProx proximal term (fedprox only)")
    compression: str = Field(
        "none", description="sites send deltas encoded so (any strategy; none: full weights)"
    )
    budget_aware: bool = Field(
        False, description="stop sampling sites whose privacy budget is spent (any strategy)"
    )
    # --- model ---------------------------------------------------------------------------
    model: str = Field("m2ae", description="a name in biofp_core.models.MODEL_NAMES")
    model_options: str = Field("{}", description="JSON object of architecture overrides")
    initial_model: str = Field(
        "",
        description="start round 1 from this saved model (biofp_core.artifacts: a .safetensors "
        "with its card, of the run's architecture; e.g. pretrained on synthetic signals) instead "
        "of the seed's initialisation; read by the server only",
    )
    # --- local training (sent to sites each round) ---------------------------------------
    local_steps: int = Field(8, ge=1, description="optimizer steps per site per round")
    lr: float = Field(1e-3, gt=0, description="local learning rate")
    optimizer: Literal["adam", "adamw", "sgd"] = Field("adamw", description="local optimizer")
    batch_subjects: int = Field(4, ge=1, description="expected subjects (bags) per step")
    bag_size: int = Field(8, ge=1, description="windows of one subject per bag")
    trainable: Literal["all", "biases"] = Field(
        "all", description="what local training updates: all parameters, or only the biases"
    )
    holdout_fraction: float = Field(0.25, ge=0, lt=1, description="subjects held out at a site")
    seed: int = Field(0, description="seeds the initial model, sampling and local training")
    # --- differential privacy (the sites' budgets are their own) -------------------------
    dp: bool = Field(True, description="subject-level DP-SGD at every site")
    noise_multiplier: float = Field(1.5, gt=0, description="σ: noise std / clipping norm")
    privacy_plan: bool = Field(
        False,
        description="each site plans its own σ, subjects per step and local steps from its "
        "training subjects and budget (biofp plan, num-rounds rounds); noise-multiplier and "
        "batch-subjects are then the site's, not the server's, and local-steps caps its steps",
    )
    max_grad_norm: float = Field(1.0, gt=0, description="per-subject gradient clipping norm")
    # --- run directory and timeouts --------------------------------------------------------
    out_dir: str = Field("biofp-run", description="run directory: checkpoints, metrics, model")
    keep_checkpoints: int = Field(2, ge=1, description="latest checkpoints kept on disk")
    round_timeout_s: float = Field(
        900.0, gt=0, description="wait this long for replies; a site silent by then is missing"
    )
    wait_timeout_s: float = Field(120.0, gt=0, description="wait this long for min-sites")
    # --- after the last round: query messages (server.queries) -----------------------------
    collect_fingerprints: bool = Field(
        False, description="ask every site for fingerprints released under its own policy"
    )
    probe_tasks: str = Field(
        "", description="comma-separated label columns each site probes on its own fingerprints"
    )
    # --- simulation only ------------------------------------------------------------------
    sim_sites: str = Field("", description="simulation: JSON manifest of the emulated sites")

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, name: str) -> str:
        return one_of("strategy", name, STRATEGY_NAMES)

    @field_validator("model")
    @classmethod
    def _known_model(cls, name: str) -> str:
        return one_of("model", name, MODEL_NAMES)

    @field_validator("compression")
    @classmethod
    def _known_scheme(cls, scheme: str) -> str:
        return one_of("compression", scheme, SCHEMES)

    @field_validator("strategy_options", "model_options")
    @classmethod
    def _json_object(cls, text: str) -> str:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON ({exc.msg})") from None
        if not isinstance(value, dict):
            raise ValueError("must be a JSON object")
        return text

    @field_validator("probe_tasks")
    @classmethod
    def _task_list(cls, text: str) -> str:
        tasks = [t.strip() for t in text.split(",")] if text.strip() else []
        if any(not t for t in tasks):
            raise ValueError(f"empty task name in {text!r} (comma-separated label columns)")
        return ",".join(dict.fromkeys(tasks))

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.proximal_mu > 0 and self.strategy != "fedprox":
            raise ValueError(f"proximal-mu needs strategy 'fedprox', not {self.strategy!r}")
        self.model_architecture()  # unknown or invalid architecture fields fail at parse time
        return self

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Parse Flower's ``context.run_config``.

        Raises
        ------
        ConfigError
            One line naming the key at fault, with the valid choices where there are some.
        """
        try:
            return cls.model_validate(dict(run_config))
        except ValidationError as exc:
            raise ConfigError(f"run config: {first_error(exc, None, _hyphenate)}") from None

    def to_run_config(self) -> dict[str, RunConfigValue]:
        """The hyphenated key -> value mapping Flower carries (inverse of from_run_config)."""
        return self.model_dump(by_alias=True)

    def model_architecture(self) -> dict[str, Any]:
        """The architecture overrides as a dict (validated against the model's config)."""
        options = json.loads(self.model_options)
        _, config_cls = model_classes(self.model)
        try:
            config_cls.model_validate(options)
        except ValidationError as exc:
            raise ValueError(f"model-options: {first_error(exc, None, _hyphenate)}") from None
        return options

    def build_model(self) -> BioFPModel:
        """The model of this run, initialised from ``seed`` (identical at every call)."""
        import torch

        with torch.random.fork_rng():  # leaves the caller's RNG state alone
            torch.manual_seed(self.seed)
            return build_model(self.model, self.model_architecture())

    def build_initial_model(self) -> tuple[BioFPModel, str | None]:
        """The model round 1 starts from, and the sha256 of the weights it was loaded from:
        ``initial-model``'s weights when the run names one, else (:meth:`build_model`, None).

        Raises
        ------
        ArtifactError
            One line naming the file: missing, unreadable or altered (its card's sha256), or a
            model of another architecture than the run's ``model`` and ``model-options``.
        """
        if not self.initial_model:
            return self.build_model(), None
        from biofp_core.artifacts import load_model  # safetensors: only where a model is read
        from biofp_core.errors import ArtifactError

        loaded, card = load_model(self.initial_model)
        if card.model != self.model:
            raise ArtifactError(
                f"{self.initial_model}: initial-model is a {card.model} model, the run trains "
                f"{self.model}"
            )
        _, config_cls = model_classes(self.model)
        ours = config_cls.model_validate(self.model_architecture()).model_dump()
        theirs = loaded.config.model_dump()
        if theirs != ours:
            diff = ", ".join(
                f"{k} {theirs[k]!r} (run: {ours[k]!r})"
                for k in sorted(ours)
                if theirs[k] != ours[k]
            )
            raise ArtifactError(
                f"{self.initial_model}: initial-model has another architecture than the run's "
                f"model-options: {diff}"
            )
        return loaded.train(), card.weights_sha256

    @property
    def compressed(self) -> bool:
        """Sites send compressed deltas: a ``compression`` other than none, or the shorthand
        strategy ``compressed`` (with the scheme ``compression`` names)."""
        return self.compression != "none" or self.strategy == "compressed"

    def strategy_kwargs(self) -> dict[str, Any]:
        """Constructor options of the run's strategy (``strategies.registry.run_strategy``)."""
        options: dict[str, Any] = {
            "fraction_train": self.fraction_train,
            "fraction_evaluate": self.fraction_evaluate,
            "min_train_nodes": self.min_sites,
            "min_evaluate_nodes": self.min_sites if self.fraction_evaluate > 0 else 0,
            "min_available_nodes": self.min_sites,
        }
        if self.strategy == "fedprox":
            options["proximal_mu"] = self.proximal_mu
        if self.compressed:
            options["scheme"] = self.compression
        return {**options, **json.loads(self.strategy_options)}

    def train_config(self, *, steps: int | None = None, lr: float | None = None) -> TrainConfig:
        """Local training settings; a round's instruction may override steps and lr."""
        return TrainConfig(
            steps=steps or self.local_steps,
            lr=lr or self.lr,
            optimizer=self.optimizer,
            batch_subjects=self.batch_subjects,
            bag_size=self.bag_size,
            seed=self.seed,
            trainable=self.trainable,
        )

    def dp_config(self, *, delta: float, seed: int | None) -> DPConfig | None:
        """DP-SGD settings of local training: the run's σ and clip with a site's δ and noise
        seed (None: OS entropy); None for a run without DP."""
        if not self.dp:
            return None
        from biofp_core.privacy.dp import DPConfig  # Opacus: only where DP-SGD runs

        return DPConfig(
            noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
            delta=delta, seed=seed,
        )  # fmt: skip

    @property
    def probe_task_list(self) -> list[str]:
        """The label columns to probe after the last round, in order (none: no probe query)."""
        return self.probe_tasks.split(",") if self.probe_tasks else []

    @property
    def run_dir(self) -> Path:
        """The run directory (relative: to the ServerApp process's working directory)."""
        return Path(self.out_dir).expanduser()
