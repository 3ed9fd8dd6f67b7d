"""A simulation's settings and outcome: :class:`SimulationConfig` (``sim.toml`` and flags), the
run directory's file names, and :class:`RunSummary` (``OUT/summary.json``).

The types every part of ``simulations/`` shares; :mod:`simulations.run` runs them and
:mod:`simulations.report` reports on them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from biofp_core.config import one_of, read_toml
from biofp_core.errors import ConfigError, first_error
from biofp_core.fingerprints.policy import ReleasePolicy
from biofp_core.privacy.ledger import LedgerSummary
from biofp_core.protocol import RunConfig
from biofp_core.site import default_cache_dir
from simulations.partition import PARTITIONERS
from simulations.public import PublicSite

SITES_MANIFEST = "sites.json"
SUMMARY_NAME = "summary.json"
SIMULATION_CONFIG_NAME = "simulation.json"


class SyntheticPretraining(BaseModel):
    """``[pretrain]``: train the run's architecture on simulated signals first (centralized, no
    DP: no patient data, nothing charged), and start the federation from those weights."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sites: int = Field(8, ge=1, description="simulated hospitals (their 4 recording profiles)")
    subjects_per_site: int = Field(64, ge=1, description="simulated subjects each")
    minutes: float = Field(5.0, gt=0, description="minutes per simulated record")
    steps: int = Field(2560, ge=1, description="optimizer steps")
    batch_subjects: int = Field(16, ge=1, description="subjects per step")
    lr: float = Field(1e-3, gt=0, description="learning rate")
    ectopic_per_min: float = Field(
        0.0, ge=0, le=30, description="mean premature (atrial, ventricular) beats per minute"
    )


ComparisonName = Literal["local", "nodp", "pooled", "ablation"]
COMPARISONS: tuple[ComparisonName, ...] = ("local", "nodp", "pooled", "ablation")


class PublicComparison(BaseModel):
    """``[compare]``: what the public federation's report trains and probes besides the run
    (:mod:`simulations.public_study`); the untrained encoder, hand-crafted features and the
    starting weights are always probed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    models: list[ComparisonName] = Field(
        default_factory=list,
        description="local (each site alone, same ε), nodp (federated non-DP), pooled "
        "(centralized non-DP), ablation (no rhythm token)",
    )
    epsilons: list[float] = Field(
        default_factory=list, description="more per-site budgets for the utility-vs-ε curve"
    )
    saved_models: dict[str, Path] = Field(
        default_factory=dict, description="more saved models to probe alike: label -> path"
    )
    repeats: int = Field(3, ge=1, description="fold draws per probe")
    bootstrap: int = Field(200, ge=0, description="bootstrap resamples for the 95 % CIs")

    @field_validator("epsilons")
    @classmethod
    def _finite_budgets(cls, values: list[float]) -> list[float]:
        bad = [v for v in values if not (0 < v < math.inf)]
        if bad:
            raise ValueError(f"epsilons must be finite and > 0 (got {bad[0]:g}); ∞ is 'nodp'")
        return sorted(set(values))


class SimulationConfig(BaseModel):
    """A simulation: data, emulated hospitals, their budgets, and the federated run (``run``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # --- data -----------------------------------------------------------------------------
    dataset: Literal["synthetic", "wfdb", "public"] = Field(
        "synthetic", description="dataset adapter; public: one site per public cohort"
    )
    data_dir: Path | None = Field(None, description="wfdb: folder of WFDB records")
    labels_csv: Path | None = Field(None, description="wfdb: labels (record, subject, ...)")
    synth_sites: int = Field(4, ge=1, description="synthetic: hospitals in the cohort")
    synth_subjects_per_site: int = Field(16, ge=1, description="synthetic: subjects each")
    synth_minutes: float = Field(5.0, gt=0, description="synthetic: minutes per record")
    synth_ectopic_per_min: float = Field(
        0.0, ge=0, le=30, description="synthetic: mean premature beats per minute (sinus subjects)"
    )
    cache_dir: Path = Field(default_factory=default_cache_dir, description="cohorts + stores")
    data_root: Path | None = Field(
        None, description="public: folder of the cohorts (default $BIOFP_SHARED_DATA)"
    )
    public_sites: list[PublicSite] = Field(
        default_factory=list, description="public: one hospital per cohort folder"
    )
    # --- emulated hospitals -----------------------------------------------------------------
    sites: int = Field(4, ge=1, description="emulated hospitals (virtual SuperNodes)")
    partition: str = Field("iid", description="subject partitioner")
    partition_label: str = Field("af", description="label column for the dirichlet partitioner")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (skewed partitions)")
    modality_share: float = Field(0.5, ge=0, le=1, description="single-sensor sites share")
    epsilon: float | None = Field(
        None, gt=0, description="each site's privacy budget ε; default 8 with DP, inf without"
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="each site's δ")
    site_privacy: dict[str, Any] = Field(
        default_factory=dict, description="more [privacy] keys of every site (limits, noise)"
    )
    sites_dir: Path | None = Field(None, description="site folders and ledgers; default OUT/sites")
    release: ReleasePolicy | None = Field(
        default_factory=ReleasePolicy,
        description="each site's [release] policy (fingerprint queries); None: sites refuse them",
    )
    reproducible_noise: bool = Field(True, description="seed each site's DP noise")
    # --- run ----------------------------------------------------------------------------------
    out: Path = Field(Path("biofp-sim"), description="run directory")
    centralized: bool = Field(False, description="pooled-data baseline instead of federation")
    report: bool = Field(
        False, description="federated runs: comparison models, downstream study, report.md"
    )
    cpus: int = Field(
        default_factory=lambda: os.cpu_count() or 1, ge=1, description="CPUs for the engine"
    )
    cpus_per_site: float = Field(1.0, gt=0, description="CPUs of one ClientApp run")
    ray_address: str | None = Field(
        None, description="an existing Ray cluster (host:port) instead of a local Ray"
    )
    compare: PublicComparison = Field(
        default_factory=PublicComparison, description="[compare]: the public report's models"
    )
    pretrain: SyntheticPretraining | None = Field(
        None, description="[pretrain]: start from weights pretrained on simulated signals"
    )
    run: RunConfig = Field(default_factory=RunConfig, description="the federated run")

    @model_validator(mode="before")
    @classmethod
    def _public_sites_are_the_sites(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and raw.get("dataset") == "public":
            sites = raw.get("public_sites") or []
            if not sites:
                raise ValueError("dataset 'public' needs [[public_sites]]")
            raw = {**raw, "sites": len(sites)}
        return raw

    @model_validator(mode="after")
    def _compare_is_public(self) -> SimulationConfig:
        if (self.compare.models or self.compare.epsilons) and self.dataset != "public":
            raise ValueError(
                f"[compare] trains models for the public cohort's report, not dataset "
                f"{self.dataset!r} (its report trains its own comparisons)"
            )
        return self

    @field_validator("partition")
    @classmethod
    def _known_partitioner(cls, name: str) -> str:
        return one_of("partitioner", name, PARTITIONERS)

    @field_validator("run", mode="before")
    @classmethod
    def _parse_run(cls, value: Any) -> Any:
        return RunConfig.from_run_config(value) if isinstance(value, dict) else value

    @property
    def site_epsilon(self) -> float:
        """The emulated sites' budget: as given, else 8 (DP runs) or none (runs without DP)."""
        if self.epsilon is not None:
            return self.epsilon
        return 8.0 if self.run.dp else math.inf

    @property
    def site_root(self) -> Path:
        return self.sites_dir or self.out / "sites"


def completed_run(out: Path) -> RunSummary | None:
    """The summary in run directory `out` of a completed run whose model is there; None when
    there is none, it is unreadable, or the run did not complete."""
    try:
        summary = RunSummary.model_validate_json((Path(out) / SUMMARY_NAME).read_text())
    except (OSError, ValueError):
        return None
    model = summary.model_path
    done = summary.status == "completed" and model is not None and model.is_file()
    return summary if done else None


def load_simulation_config(path: Path | None = None, **overrides: Any) -> SimulationConfig:
    """A SimulationConfig from ``sim.toml`` (if given) with `overrides` on top.

    ``sim.toml`` holds SimulationConfig fields at the top level (or under ``[simulation]``) and
    run-config keys (hyphenated, as in pyproject.toml) under ``[run]``. Overrides use field
    names; ``run`` and other table overrides (dicts) are merged key by key.

    Raises
    ------
    ConfigError
        One line naming the file and the key at fault.
    """
    raw: dict[str, Any] = {}
    where = "simulation config"
    if path is not None:
        where = str(path)
        raw = read_toml(Path(path), "simulation config")
        raw = {**raw.pop("simulation", {}), **raw}
        base = Path(path).parent  # paths in the file are relative to it; flags to the cwd
        for key in ("data_dir", "labels_csv", "cache_dir", "sites_dir", "out", "data_root"):
            if raw.get(key) is not None:
                raw[key] = base / Path(raw[key]).expanduser()
    run = {**raw.pop("run", {}), **overrides.pop("run", {})}
    for key, value in overrides.items():  # a table given as a dict is merged key by key
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        elif value is not None:
            raw[key] = value
    try:
        return SimulationConfig.model_validate({**raw, "run": run})
    except ConfigError as exc:  # from the run config: already names the key
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None
    except ValidationError as exc:
        raise ConfigError(f"{where}: {first_error(exc)}") from None


class SiteReport(BaseModel):
    """One emulated hospital after the run: its data and its privacy ledger."""

    name: str
    modality: str
    subjects_train: int
    subjects_holdout: int
    windows: int
    hours: float
    ledger: LedgerSummary


class RunSummary(BaseModel):
    """What a simulation did (``OUT/summary.json``; infinite values as "Infinity")."""

    model_config = ConfigDict(ser_json_inf_nan="strings")

    mode: Literal["federated", "centralized"]
    out_dir: Path
    status: str
    error: str | None = None
    rounds: int
    wall_s: float
    train_loss: float | None = None
    eval_loss: float | None = None
    max_epsilon: float | None = None
    failed_replies: int = 0
    refused_replies: int = 0
    model_path: Path | None = None
    report_path: Path | None = None
    sites: list[SiteReport] = Field(default_factory=list)
