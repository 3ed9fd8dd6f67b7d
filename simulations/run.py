"""``simulate``: the real ClientApp and ServerApp on emulated hospitals, in Flower's engine.

Steps: get a cohort (synthetic by default, or a WFDB folder), split its subjects into N emulated
hospitals (:mod:`simulations.partition`), lay each one out as a real site would be (its own
``site.toml``, data, privacy budget and ledger; :mod:`simulations.cohort`), build every site's
window store once (cached), then run ``server.app:app`` and ``client.app:app`` in Flower's
Simulation Engine with one virtual SuperNode per site. The run directory gets the config, the
per-round metrics, the final model (its card written by the ServerApp), a ledger summary per site
and ``summary.json``. The simulation reads its emulated sites back only through the ClientApp's
own loader (:meth:`client.site_data.SimulationSites.load`), as a deployed site is read.

``centralized = true`` instead trains the same model with the same ``train_local`` on the pooled
training subjects of every site, for the same total number of local steps, as a baseline.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from biofp_core.artifacts import (
    DataSummary,
    ModelCard,
    PrivacySummary,
    SitePrivacy,
    TrainingProvenance,
    save_model,
)
from biofp_core.errors import BioFPError, ConfigError
from biofp_core.privacy.ledger import PrivacyLedger
from biofp_core.protocol import RunConfig
from biofp_core.site import load_site_config
from biofp_core.training import evaluate_loss, train_local
from biofp_core.validate import open_site_store
from client.site_data import SimulationSites, SiteData, SiteRef
from server.report import RoundMetrics, RunReport
from simulations.cohort import Cohort, synthetic_cohort, wfdb_cohort, write_sites
from simulations.config import (
    SIMULATION_CONFIG_NAME,
    SITES_MANIFEST,
    SUMMARY_NAME,
    RunSummary,
    SimulationConfig,
    SiteReport,
)
from simulations.config import load_simulation_config as load_simulation_config  # for callers
from simulations.downstream import StudyConfig
from simulations.engine import require_engine, run_federation
from simulations.partition import Partition, make_partition
from simulations.pretrain import pretrained_model
from simulations.public import default_data_root, write_public_sites
from simulations.public_study import public_report
from simulations.report import (
    ModelRun,
    comparison_configs,
    error_line,
    model_run,
    research_report,
    run_labels,
)
from simulations.site_toml import SiteSettings

log = logging.getLogger(__name__)

# ---- data and sites ---------------------------------------------------------------------------


def load_cohort(cfg: SimulationConfig) -> Cohort:
    """The cohort of the simulation's dataset adapter."""
    if cfg.dataset == "wfdb":
        if cfg.data_dir is None:
            raise ConfigError("dataset 'wfdb' needs data_dir (a folder of WFDB records)")
        return wfdb_cohort(cfg.data_dir, cfg.labels_csv)
    return synthetic_cohort(
        cfg.cache_dir, sites=cfg.synth_sites, subjects_per_site=cfg.synth_subjects_per_site,
        minutes=cfg.synth_minutes, seed=cfg.run.seed, ectopic_per_min=cfg.synth_ectopic_per_min,
    )  # fmt: skip


def partition_cohort(cfg: SimulationConfig, cohort: Cohort) -> Partition:
    """Split the cohort's subjects into ``cfg.sites`` emulated hospitals."""
    labels = cohort.label(cfg.partition_label) if cfg.partition == "dirichlet" else None
    return make_partition(
        cfg.partition, cohort.subjects, num_sites=cfg.sites, seed=cfg.run.seed, labels=labels,
        alpha=cfg.alpha, modality_share=cfg.modality_share,
    )  # fmt: skip


def site_settings(cfg: SimulationConfig) -> SiteSettings:
    """What every emulated site's ``site.toml`` says alike: cache, budget, limits, release."""
    return SiteSettings(
        cache_dir=cfg.cache_dir, epsilon=cfg.site_epsilon, delta=cfg.delta,
        limits=cfg.site_privacy, release=cfg.release,
    )  # fmt: skip


def prepare_sites(
    cfg: SimulationConfig, *, on_site: Callable[[str], None] | None = None
) -> SimulationSites:
    """Cohort, partition, site folders, window stores and the manifest the ClientApp reads."""
    settings = site_settings(cfg)
    if cfg.dataset == "public":
        tomls = write_public_sites(
            cfg.public_sites, settings, data_root=cfg.data_root or default_data_root(),
            root=cfg.site_root, seed=cfg.run.seed,
        )  # fmt: skip
        modalities = tuple(s.modality for s in cfg.public_sites)
        name, scheme = "public cohorts", "one site per cohort"
    else:
        cohort = load_cohort(cfg)
        partition = partition_cohort(cfg, cohort)
        tomls = write_sites(cohort, partition, cfg.site_root, settings)
        modalities, name, scheme = partition.modalities, cohort.name, partition.scheme
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


def site_reports(
    manifest: SimulationSites, sites: list[SiteData] | None = None, *, holdout_fraction: float
) -> list[SiteReport]:
    """Each emulated hospital's data and ledger summary, read from its own folder (`sites`: the
    manifest's sites already loaded)."""
    if sites is None:
        sites = manifest.load(holdout_fraction=holdout_fraction)
    reports = []
    for ref, data in zip(manifest.sites, sites, strict=True):
        subjects = data.train + data.holdout
        ledger = PrivacyLedger.at(data.state_dir).summary(budget=data.config.privacy,
                                                          site=data.name)  # fmt: skip
        reports.append(
            SiteReport(
                name=data.name, modality=ref.modality, subjects_train=len(data.train),
                subjects_holdout=len(data.holdout), windows=sum(len(s) for s in subjects),
                hours=data.store.manifest.hours, ledger=ledger,
            )
        )  # fmt: skip
    return reports


def train_centralized(
    cfg: SimulationConfig, run: RunConfig, manifest: SimulationSites
) -> RunSummary:
    """The baseline: the same model and ``train_local`` on every site's training subjects pooled,
    for the federated run's total local steps (rounds x sites x local steps); no ledger is
    charged (the pooled data belongs to no site)."""
    sites = manifest.load(holdout_fraction=run.holdout_fraction)
    train = [s for site in sites for s in site.train]
    holdout = [s for site in sites for s in site.holdout]
    model, initial = run.build_initial_model()
    steps = run.num_rounds * cfg.sites * run.local_steps
    seed = cfg.run.seed * 1000 - 1 if cfg.reproducible_noise else None
    dp = run.dp_config(delta=cfg.delta, seed=seed)
    result = train_local(model, train, run.train_config(steps=steps), dp=dp)
    eval_loss = None
    if holdout:
        eval_loss = evaluate_loss(model, holdout, bag_size=run.bag_size, seed=run.seed)["loss"]
    epsilon = result.privacy.epsilon if result.privacy is not None else None
    privacy = None
    if epsilon is not None:
        privacy = PrivacySummary(sites={"pooled": SitePrivacy(epsilon=epsilon, delta=cfg.delta)})
    reports = site_reports(manifest, sites, holdout_fraction=run.holdout_fraction)
    data = DataSummary(
        sites=len(reports), subjects=sum(r.subjects_train + r.subjects_holdout for r in reports),
        windows=sum(r.windows for r in reports), hours=sum(r.hours for r in reports),
    )  # fmt: skip
    card = ModelCard(
        data=data,
        training=TrainingProvenance(rounds=0, strategy="centralized", local_steps=steps,
                                    seed=run.seed, initialised_from=initial),
        privacy=privacy,
    )  # fmt: skip
    path = save_model(model, cfg.out / "model", card)
    return RunSummary(
        mode="centralized", out_dir=cfg.out, status="completed", rounds=0,
        wall_s=0.0, train_loss=result.mean_loss, eval_loss=eval_loss,
        max_epsilon=epsilon, model_path=path, sites=reports,
    )  # fmt: skip


def _federated_summary(
    cfg: SimulationConfig, manifest: SimulationSites, wall_s: float
) -> RunSummary:
    """The run's summary from the ServerApp's metrics.json (its model card is the ServerApp's)."""
    report = RunReport.read(cfg.out) or RunReport(num_rounds=cfg.run.num_rounds, status="failed")
    reports = site_reports(manifest, holdout_fraction=cfg.run.holdout_fraction)
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


def _comparison_runs(
    cfg: SimulationConfig, stage: Callable[[str], None]
) -> tuple[list[ModelRun], list[str]]:
    """The report's comparison models (:func:`simulations.report.comparison_configs`), each
    trained by :func:`simulate`; a run that fails is one line, and the others go on."""
    runs, failures = [], []
    labels = run_labels(cfg)
    for kind, sub in comparison_configs(cfg).items():
        label = labels[kind]
        stage(f"report: training the {label} model")
        try:
            summary = simulate(sub, on_stage=lambda text, label=label: stage(f"{label}: {text}"))
        except Exception as exc:  # a comparison must never cost the main run its report
            failures.append(f"{label} run failed: {error_line(exc)}")
            runs.append(ModelRun(label=label, kind=kind, out_dir=str(sub.out), status="failed",
                                 error=error_line(exc)))  # fmt: skip
            continue
        runs.append(model_run(label, kind, summary))
    return runs, failures


def report_run(
    cfg: SimulationConfig, summary: RunSummary, *, study: StudyConfig | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> Path:  # fmt: skip
    """The research report of a federated run: its comparison models trained here (when it has
    a model), then :func:`simulations.report.research_report` (the public federation:
    :func:`simulations.public_study.public_report`). Returns ``OUT/report.md``."""
    stage = on_stage or (lambda _: None)
    if cfg.dataset == "public":  # each site's own tasks, every baseline: its own study
        return public_report(cfg, summary, simulate, on_stage=stage)
    runs: list[ModelRun] = []
    failures: list[str] = []
    if summary.model_path is not None:
        runs, failures = _comparison_runs(cfg, stage)
    return research_report(
        cfg, summary, comparisons=runs, failures=failures, study=study, on_stage=stage
    )


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
    if not cfg.centralized:
        require_engine()  # before any work: a Ray-free install stops here, in one line
    out = cfg.out.resolve()
    cfg = cfg.model_copy(update={"out": out})
    if cfg.pretrain is not None and not cfg.run.initial_model:
        initial = pretrained_model(cfg, simulate, stage)
        cfg = cfg.model_copy(
            update={"run": cfg.run.model_copy(update={"initial_model": str(initial)})}
        )
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
        summary.report_path = report_run(cfg, summary, on_stage=stage)
        (out / SUMMARY_NAME).write_text(summary.model_dump_json(indent=1) + "\n")
    if error is not None:
        raise error
    return summary
