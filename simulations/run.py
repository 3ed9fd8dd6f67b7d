"""``simulate``: the real ClientApp and ServerApp on emulated hospitals, in Flower's engine.

Steps: get a cohort (synthetic by default, or a WFDB folder), split its subjects into N emulated
hospitals (:mod:`simulations.partition`), lay each one out as a real site would be (its own
``site.toml``, data, privacy budget and ledger; :mod:`simulations.cohort`), build every site's
window store once (cached), then run ``server.app:app`` and ``client.app:app`` in Flower's
Simulation Engine with one virtual SuperNode per site. The run directory gets the config, the
per-round metrics, the final model, a ledger summary per site and ``summary.json``.

``centralized = true`` instead trains the same model with the same ``train_local`` on the pooled
training subjects of every site, for the same total number of local steps, as a baseline.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from flwr.common.constant import PARTITION_ID_KEY
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from biofp_core.artifacts import (
    DataSummary,
    ModelCard,
    PrivacySummary,
    SitePrivacy,
    TrainingProvenance,
    load_model,
    save_model,
)
from biofp_core.config import one_of, read_toml
from biofp_core.errors import BioFPError, ConfigError, first_error
from biofp_core.fingerprints.policy import ReleasePolicy
from biofp_core.privacy import DPConfig
from biofp_core.privacy.ledger import LedgerSummary, PrivacyLedger
from biofp_core.protocol import RunConfig
from biofp_core.site import default_cache_dir, load_site_config
from biofp_core.training import evaluate_loss, train_local
from biofp_core.validate import open_site_store
from client.site_data import (
    SimulationSites,
    SiteData,
    SiteRef,
    load_site_data,
    locate_site,
)
from server.report import RoundMetrics, RunReport
from simulations.cohort import Cohort, synthetic_cohort, wfdb_cohort, write_sites
from simulations.engine import run_federation
from simulations.partition import PARTITIONERS, Partition, make_partition
from simulations.public import PublicSite, default_data_root, write_public_sites

log = logging.getLogger(__name__)

SITES_MANIFEST = "sites.json"
SUMMARY_NAME = "summary.json"
SIMULATION_CONFIG_NAME = "simulation.json"


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


def load_simulation_config(path: Path | None = None, **overrides: Any) -> SimulationConfig:
    """A SimulationConfig from ``sim.toml`` (if given) with `overrides` on top.

    ``sim.toml`` holds SimulationConfig fields at the top level (or under ``[simulation]``) and
    run-config keys (hyphenated, as in pyproject.toml) under ``[run]``. Overrides use field
    names; ``run`` overrides are merged key by key.

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
    raw.update({k: v for k, v in overrides.items() if v is not None})
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


# ---- data and sites ---------------------------------------------------------------------------


def load_cohort(cfg: SimulationConfig) -> Cohort:
    """The cohort of the simulation's dataset adapter."""
    if cfg.dataset == "wfdb":
        if cfg.data_dir is None:
            raise ConfigError("dataset 'wfdb' needs data_dir (a folder of WFDB records)")
        return wfdb_cohort(cfg.data_dir, cfg.labels_csv)
    return synthetic_cohort(
        cfg.cache_dir, sites=cfg.synth_sites, subjects_per_site=cfg.synth_subjects_per_site,
        minutes=cfg.synth_minutes, seed=cfg.run.seed,
    )  # fmt: skip


def partition_cohort(cfg: SimulationConfig, cohort: Cohort) -> Partition:
    """Split the cohort's subjects into ``cfg.sites`` emulated hospitals."""
    labels = cohort.label(cfg.partition_label) if cfg.partition == "dirichlet" else None
    return make_partition(
        cfg.partition, cohort.subjects, num_sites=cfg.sites, seed=cfg.run.seed, labels=labels,
        alpha=cfg.alpha, modality_share=cfg.modality_share,
    )  # fmt: skip


def _add_release_policy(toml: Path, policy: ReleasePolicy | None) -> None:
    """Append an emulated site's ``[release]`` policy to its fresh site.toml (None: none)."""
    if policy is not None:
        items = policy.model_dump(exclude_none=True).items()
        with toml.open("a") as fh:
            fh.write("\n[release]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in items))


def prepare_sites(
    cfg: SimulationConfig, *, on_site: Callable[[str], None] | None = None
) -> SimulationSites:
    """Cohort, partition, site folders, window stores and the manifest the ClientApp reads."""
    if cfg.dataset == "public":
        tomls = write_public_sites(
            cfg.public_sites, data_root=cfg.data_root or default_data_root(),
            root=cfg.site_root, cache_dir=cfg.cache_dir, epsilon=cfg.site_epsilon,
            delta=cfg.delta, seed=cfg.run.seed, limits=cfg.site_privacy,
        )  # fmt: skip
        modalities = tuple(s.modality for s in cfg.public_sites)
        name, scheme = "public cohorts", "one site per cohort"
    else:
        cohort = load_cohort(cfg)
        partition = partition_cohort(cfg, cohort)
        tomls = write_sites(
            cohort, partition, cfg.site_root, cache_dir=cfg.cache_dir,
            epsilon=cfg.site_epsilon, delta=cfg.delta, limits=cfg.site_privacy,
        )  # fmt: skip
        modalities, name, scheme = partition.modalities, cohort.name, partition.scheme
    for toml in tomls:
        _add_release_policy(toml, cfg.release)
    sites = []
    for index, (toml, modality) in enumerate(zip(tomls, modalities, strict=True)):
        open_site_store(load_site_config(toml))  # build once; clients reopen it from the cache
        seed = cfg.run.seed * 1000 + index if cfg.reproducible_noise else None
        sites.append(SiteRef(site_config=toml.resolve(), modality=modality, dp_seed=seed))
        if on_site is not None:
            on_site(toml.parent.name)
    manifest = SimulationSites(sites=sites)
    manifest.write(cfg.out / SITES_MANIFEST)
    log.info("%d sites from %s (%s)", len(sites), name, scheme)
    return manifest


# ---- entry points -------------------------------------------------------------------------------


def _site_data(cfg: SimulationConfig, index: int) -> SiteData:
    """Emulated site `index` exactly as its ClientApp loads it (partition id, sim manifest)."""
    site = locate_site({PARTITION_ID_KEY: index}, sim_sites=str(cfg.out / SITES_MANIFEST))
    return load_site_data(site, holdout_fraction=cfg.run.holdout_fraction)


def site_reports(cfg: SimulationConfig, manifest: SimulationSites) -> list[SiteReport]:
    """Each emulated hospital's data and ledger summary, read from its own folder."""
    reports = []
    for index, site in enumerate(manifest.sites):
        data = _site_data(cfg, index)
        subjects = data.train + data.holdout
        ledger = PrivacyLedger.at(data.state_dir).summary(
            budget=data.config.privacy, site=data.config.name
        )
        reports.append(
            SiteReport(
                name=data.config.name, modality=site.modality, subjects_train=len(data.train),
                subjects_holdout=len(data.holdout), windows=sum(len(s) for s in subjects),
                hours=open_site_store(data.config).manifest.hours, ledger=ledger,
            )
        )  # fmt: skip
    return reports


def _data_summary(reports: list[SiteReport]) -> DataSummary:
    return DataSummary(
        sites=len(reports),
        subjects=sum(r.subjects_train + r.subjects_holdout for r in reports),
        windows=sum(r.windows for r in reports),
        hours=sum(r.hours for r in reports),
    )


def _add_data_summary(model_path: Path, reports: list[SiteReport]) -> None:
    """Put what the server cannot know (subjects, windows, hours) into the model card."""
    model, card = load_model(model_path)
    save_model(model, model_path, card.model_copy(update={"data": _data_summary(reports)}))


def train_centralized(
    cfg: SimulationConfig, run: RunConfig, manifest: SimulationSites
) -> RunSummary:
    """The baseline: the same model and ``train_local`` on every site's training subjects pooled,
    for the federated run's total local steps (rounds x sites x local steps); no ledger is
    charged (the pooled data belongs to no site)."""
    sites = [_site_data(cfg, i) for i in range(cfg.sites)]
    train = [s for site in sites for s in site.train]
    holdout = [s for site in sites for s in site.holdout]
    model = run.build_model()
    steps = run.num_rounds * cfg.sites * run.local_steps
    dp = None
    if run.dp:
        seed = cfg.run.seed * 1000 - 1 if cfg.reproducible_noise else None
        dp = DPConfig(noise_multiplier=run.noise_multiplier, max_grad_norm=run.max_grad_norm,
                      delta=cfg.delta, seed=seed)  # fmt: skip
    result = train_local(model, train, run.train_config(steps=steps), dp=dp)
    eval_loss = None
    if holdout:
        eval_loss = evaluate_loss(model, holdout, bag_size=run.bag_size, seed=run.seed)["loss"]
    epsilon = result.privacy.epsilon if result.privacy is not None else None
    privacy = None
    if epsilon is not None:
        privacy = PrivacySummary(sites={"pooled": SitePrivacy(epsilon=epsilon, delta=cfg.delta)})
    card = ModelCard(
        training=TrainingProvenance(rounds=0, strategy="centralized", local_steps=steps,
                                    seed=run.seed),
        privacy=privacy,
    )  # fmt: skip
    path = save_model(model, cfg.out / "model", card)
    reports = site_reports(cfg, manifest)
    _add_data_summary(path, reports)
    return RunSummary(
        mode="centralized", out_dir=cfg.out, status="completed", rounds=0,
        wall_s=0.0, train_loss=result.mean_loss, eval_loss=eval_loss,
        max_epsilon=epsilon, model_path=path, sites=reports,
    )  # fmt: skip


def _federated_summary(
    cfg: SimulationConfig, manifest: SimulationSites, wall_s: float
) -> RunSummary:
    report = RunReport.read(cfg.out) or RunReport(num_rounds=cfg.run.num_rounds, status="failed")
    reports = site_reports(cfg, manifest)
    if report.model_path is not None:
        _add_data_summary(Path(report.model_path), reports)
    last = report.rounds[-1] if report.rounds else None
    epsilons = [r.ledger.epsilon for r in reports if r.ledger.entries]
    return RunSummary(
        mode="federated", out_dir=cfg.out, status=report.status, error=report.error,
        rounds=max((r.server_round for r in report.rounds), default=0), wall_s=wall_s,
        train_loss=last.train_loss if last else None, eval_loss=last.eval_loss if last else None,
        max_epsilon=max(epsilons, default=None),
        failed_replies=sum(r.failed for r in report.rounds),
        refused_replies=sum(r.refused for r in report.rounds),
        model_path=Path(report.model_path) if report.model_path else None, sites=reports,
    )  # fmt: skip


def simulate(
    cfg: SimulationConfig,
    *,
    on_stage: Callable[[str], None] | None = None,
    on_round: Callable[[RoundMetrics], None] | None = None,
) -> RunSummary:
    """Run a simulation (see the module docstring) and write its run directory.

    Parameters
    ----------
    cfg : SimulationConfig
        What to simulate; ``cfg.out`` is the run directory (an existing run there resumes).
    on_stage : callable, optional
        Called with a short description as each stage starts (for progress display).
    on_round : callable, optional
        Called with each round's metrics as the server records them.

    Returns
    -------
    RunSummary
        Also written to ``OUT/summary.json``.

    Raises
    ------
    BioFPError
        Bad config or data, or a failed run (after ``summary.json`` is written).
    """
    started = time.monotonic()
    stage = on_stage or (lambda _: None)
    out = cfg.out.resolve()
    cfg = cfg.model_copy(update={"out": out})
    out.mkdir(parents=True, exist_ok=True)
    (out / SIMULATION_CONFIG_NAME).write_text(cfg.model_dump_json(indent=1) + "\n")
    stage("preparing sites")
    manifest = prepare_sites(cfg, on_site=lambda name: stage(f"window store of {name} ready"))
    run = cfg.run.model_copy(update={"out_dir": str(out), "sim_sites": str(out / SITES_MANIFEST)})
    if cfg.centralized:
        stage("training on pooled data")
        summary = train_centralized(cfg, run, manifest)
        summary = summary.model_copy(update={"wall_s": time.monotonic() - started})
        (out / SUMMARY_NAME).write_text(summary.model_dump_json(indent=1) + "\n")
        return summary
    stage("starting Flower's simulation engine")
    error: BioFPError | None = None
    try:
        run_federation(
            run, num_sites=cfg.sites, cpus=cfg.cpus, cpus_per_site=cfg.cpus_per_site,
            on_round=on_round, ray_address=cfg.ray_address,
        )  # fmt: skip
    except BioFPError as exc:
        error = exc
    summary = _federated_summary(cfg, manifest, time.monotonic() - started)
    if error is not None and summary.error is None:
        summary = summary.model_copy(update={"status": "failed", "error": str(error)})
    (out / SUMMARY_NAME).write_text(summary.model_dump_json(indent=1) + "\n")
    if cfg.report:
        from simulations.report import research_report  # it imports this module

        summary.report_path = research_report(cfg, summary, on_stage=stage)
        (out / SUMMARY_NAME).write_text(summary.model_dump_json(indent=1) + "\n")
    if error is not None:
        raise error
    return summary
