"""The research report of ``biofp simulate``: comparison models, downstream studies, report.md.

After a federated run with ``report = true``, :func:`simulations.run.report_run` trains the
comparison models (:func:`comparison_configs`, each a :func:`simulations.run.simulate` run) and
:func:`research_report` reports on them all. This module owns no run: it imports the simulation's
types (:mod:`simulations.config`), never :mod:`simulations.run`.

1. the comparison models on the same emulated hospitals: the centralized non-DP baseline
   (``train_centralized``: the sites' training subjects pooled, the same total local steps, no
   ledger charged) in ``OUT/comparisons/centralized``, and the same federated simulation with DP
   off in ``OUT/comparisons/dp-off`` (its own site folders, so its audit lines stay apart);
2. runs the downstream study (:mod:`simulations.downstream`) of every model on the main run's
   sites; only the main model is also released with noise (charged to the sites' ledgers);
3. decodes ECG from PPG alone for a few held-out windows with the main model (M2AE);
4. writes ``OUT/report/downstream.json`` (:class:`ResearchReport`), the figures
   (``OUT/report/*.png``, :mod:`simulations.plots`) and ``OUT/report.md``, whose tables hold the
   numbers of ``metrics.json`` and ``downstream.json``.

A step that fails becomes one line under "What failed" and the later steps go on with what there
is: the main run's outputs are never touched.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from biofp_core.errors import one_line
from biofp_core.evaluation import StudyRow
from biofp_core.fsutil import atomic_write_text
from biofp_core.privacy.ledger import PrivacyLedger
from client.site_data import SimulationSites, SiteData
from server.report import RunReport
from simulations import plots
from simulations.config import SITES_MANIFEST, RunSummary, SimulationConfig
from simulations.downstream import (
    CLEAN,
    NOISY,
    SYNTHETIC_TASKS,
    DownstreamStudy,
    ReconstructedWindow,
    ReconstructionRow,
    StudyConfig,
    cross_modal_reconstruction,
    load_study_sites,
    run_study,
)

log = logging.getLogger(__name__)

REPORT_NAME = "report.md"
REPORT_DIR = "report"  # figures, downstream.json and the study's released files
STUDY_NAME = "downstream.json"
COMPARISONS_DIR = "comparisons"

RunKind = Literal["main", "centralized", "dp-off"]


class ModelRun(BaseModel):
    """One model the report compares: how it was trained and where it is."""

    label: str
    kind: RunKind
    out_dir: str
    status: str
    error: str | None = None
    model_path: str | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    max_epsilon: float | None = None
    wall_s: float = 0.0


class ResearchReport(BaseModel):
    """Everything ``report.md`` shows besides ``metrics.json`` (``OUT/report/downstream.json``)."""

    study: StudyConfig
    runs: list[ModelRun]
    studies: list[DownstreamStudy] = Field(default_factory=list)
    reconstruction: list[ReconstructionRow] = Field(default_factory=list)
    site_epsilon: dict[str, float] = Field(
        default_factory=dict, description="each site's ledger ε after the report's releases"
    )
    figures: dict[str, str] = Field(default_factory=dict, description="name -> path under OUT")
    failures: list[str] = Field(default_factory=list, description="one line per failed step")


def error_line(exc: BaseException) -> str:
    """An exception as one line: its type and message."""
    return one_line(f"{type(exc).__name__}: {exc}", limit=None)


def model_run(label: str, kind: RunKind, summary: RunSummary) -> ModelRun:
    return ModelRun(
        label=label, kind=kind, out_dir=str(summary.out_dir), status=summary.status,
        error=summary.error, model_path=str(summary.model_path) if summary.model_path else None,
        train_loss=summary.train_loss, eval_loss=summary.eval_loss,
        max_epsilon=summary.max_epsilon, wall_s=summary.wall_s,
    )  # fmt: skip


def comparison_configs(cfg: SimulationConfig) -> dict[RunKind, SimulationConfig]:
    """The comparison runs of a federated run: centralized non-DP, and federated DP-off (when the
    main run has DP). Both share the main run's cohort, partition and seeds."""
    root = cfg.out / COMPARISONS_DIR
    no_dp = cfg.run.model_copy(update={"dp": False})
    configs: dict[RunKind, SimulationConfig] = {
        # the main sites, with their budget unchanged (pooled training charges no ledger)
        "centralized": cfg.model_copy(update={
            "out": root / "centralized", "centralized": True, "report": False, "run": no_dp,
            "sites_dir": cfg.site_root, "epsilon": cfg.site_epsilon,
        }),
        "dp-off": cfg.model_copy(update={
            "out": root / "dp-off", "report": False, "run": no_dp, "sites_dir": None,
        }),
    }  # fmt: skip
    if not cfg.run.dp:
        del configs["dp-off"]  # the main run is the DP-off run
    return configs


def run_labels(cfg: SimulationConfig) -> dict[RunKind, str]:
    main = "federated DP" if cfg.run.dp else "federated non-DP"
    return {"main": main, "centralized": "centralized non-DP", "dp-off": "federated DP-off"}


def _studies(
    cfg: SimulationConfig, runs: list[ModelRun], sites: list[SiteData], study: StudyConfig,
    stage: Callable[[str], None], failures: list[str],
) -> list[DownstreamStudy]:  # fmt: skip
    """The downstream study of every model; noisy releases only for the main model."""
    studies = []
    for run in (r for r in runs if r.model_path is not None):
        stage(f"report: downstream study of the {run.label} model")
        config = study.model_copy(update={"noisy": study.noisy and run.kind == "main"})
        out_dir = cfg.out / REPORT_DIR / "releases" / run.kind
        try:
            studies.append(run_study(Path(run.model_path), sites, label=run.label,  # type: ignore[arg-type]
                                     out_dir=out_dir, config=config))  # fmt: skip
        except Exception as exc:  # one model's study failing leaves the others
            failures.append(f"downstream study of the {run.label} model failed: {error_line(exc)}")
    return studies


def _figures(
    out: Path, metrics: RunReport | None, studies: list[DownstreamStudy],
    main: DownstreamStudy | None, windows: list[ReconstructedWindow], failures: list[str],
) -> dict[str, str]:  # fmt: skip
    """Draw every figure there is data for; name -> path relative to `out`."""
    fig_dir = out / REPORT_DIR
    jobs: dict[str, Callable[[Path], Path | None]] = {}
    if metrics is not None:
        jobs["loss"] = lambda p: plots.site_series(metrics, "train_loss", p, ylabel="train loss")
        jobs["epsilon"] = lambda p: plots.site_series(metrics, "epsilon", p, ylabel="site ε")
        jobs["bytes"] = lambda p: plots.bytes_per_round(metrics, p)
    if studies:
        jobs["downstream"] = lambda p: plots.downstream_comparison(studies, p)
    if main is not None:
        jobs["ablation"] = lambda p: plots.modality_ablation(main, p)
        jobs["attributes"] = lambda p: plots.attribute_inference(main, p)
    jobs["reconstruction"] = lambda p: plots.reconstruction(windows, p)
    figures = {}
    for name, draw in jobs.items():
        try:
            path = draw(fig_dir / f"{name}.png")
        except Exception as exc:  # a figure that cannot be drawn is reported, not fatal
            failures.append(f"figure {name} failed: {error_line(exc)}")
            continue
        if path is not None:
            figures[name] = path.relative_to(out).as_posix()
    return figures


def _site_epsilon(sites: list[SiteData]) -> dict[str, float]:
    return {s.name: PrivacyLedger.at(s.state_dir).epsilon(delta=s.config.privacy.delta)
            for s in sites}  # fmt: skip


def research_report(
    cfg: SimulationConfig, summary: RunSummary, *, comparisons: list[ModelRun],
    failures: list[str] | None = None, study: StudyConfig | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> Path:  # fmt: skip
    """Downstream studies, figures and ``OUT/report.md`` of the main run `summary` and its
    `comparisons` (trained by :func:`simulations.run.report_run`; `failures`: one line per
    comparison that failed), see the module doc.

    `study` defaults to the cohort's tasks (synthetic: af, hypertension; wfdb: every numeric
    label column) with the default probes. Never raises for a failed step: each is one line in
    the report. Returns the report's path.
    """
    stage = on_stage or (lambda _: None)
    out = cfg.out
    failures = list(failures or [])
    if study is None:
        study = StudyConfig(tasks=SYNTHETIC_TASKS if cfg.dataset == "synthetic" else None)
    runs = [model_run(run_labels(cfg)["main"], "main", summary)]
    studies: list[DownstreamStudy] = []
    windows: list[ReconstructedWindow] = []
    sites: list[SiteData] = []
    if summary.model_path is None:
        failures.append(f"main run {summary.status}, no model: nothing to compare or study")
    else:
        runs += comparisons
        try:
            manifest = SimulationSites.read(out / SITES_MANIFEST)
            sites = load_study_sites(manifest, holdout_fraction=cfg.run.holdout_fraction)
        except Exception as exc:
            failures.append(f"sites could not be opened for the study: {error_line(exc)}")
        if sites:
            studies = _studies(cfg, runs, sites, study, stage, failures)
            stage("report: cross-modal reconstruction")
            try:
                windows = cross_modal_reconstruction(summary.model_path, sites)
            except Exception as exc:
                failures.append(f"cross-modal reconstruction failed: {error_line(exc)}")
    stage("report: figures")
    try:
        metrics = RunReport.read(out)
    except Exception as exc:
        failures.append(f"metrics.json unreadable: {error_line(exc)}")
        metrics = None
    main = next((s for s in studies if s.model == runs[0].label), None)
    figures = _figures(out, metrics, studies, main, windows, failures)
    report = ResearchReport(
        study=study, runs=runs, studies=studies, reconstruction=[w.row for w in windows],
        site_epsilon=_site_epsilon(sites), figures=figures, failures=failures,
    )  # fmt: skip
    (out / REPORT_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / REPORT_DIR / STUDY_NAME, report.model_dump_json(indent=1) + "\n")
    path = out / REPORT_NAME
    atomic_write_text(path, render_markdown(cfg, summary, metrics, report))
    log.info("research report: %s (%d failed steps)", path, len(failures))
    return path


# ---- markdown ---------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 4) -> str:
    """A number as report.md writes it: `digits` significant digits; "–" for none."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return f"{value:.{digits}g}"


def fmt_probe(row: StudyRow | None) -> str:
    """A probe's value with its 95 % CI: ``0.812 [0.701, 0.903]``."""
    if row is None:
        return "–"
    r = row.result
    low, high = (("–" if math.isnan(x) else f"{x:.3f}") for x in (r.ci_low, r.ci_high))
    return f"{r.value:.3f} [{low}, {high}]"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table's lines (and a blank one after it)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def _image(report: ResearchReport, name: str, alt: str) -> list[str]:
    path = report.figures.get(name)
    return [f"![{alt}]({path})", ""] if path else []


def _training_section(metrics: RunReport | None, report: ResearchReport) -> list[str]:
    lines = ["## Federated training", ""]
    if metrics is None or not metrics.rounds:
        return [*lines, "No round was recorded.", ""]
    lines += table(
        ["round", "sites ok", "failed", "refused", "train loss", "held-out loss",
         "bytes received", "max ε"],
        [[str(r.server_round), f"{r.contributed}/{r.sampled}", str(r.failed), str(r.refused),
          fmt(r.train_loss), fmt(r.eval_loss), str(r.bytes_received), fmt(r.max_epsilon)]
         for r in metrics.rounds],
    )  # fmt: skip
    lines += ["Per site (by registration name when the sites were registered with one, else by "
              "Flower node id; ε is the site's total over its whole ledger, as it reported it):",
              ""]  # fmt: skip
    lines += table(
        ["round", "site", "status", "train loss", "ε", "bytes"],
        [[str(r.server_round), plots.short_node(s.node_id, s.name), s.status, fmt(s.train_loss),
          fmt(s.epsilon), str(s.payload_bytes)] for r in metrics.rounds for s in r.sites],
    )  # fmt: skip
    lines += _image(report, "loss", "train loss per round per site")
    lines += _image(report, "epsilon", "ε per round per site")
    lines += _image(report, "bytes", "bytes per round")
    return lines


def _sites_section(summary: RunSummary, report: ResearchReport) -> list[str]:
    rows = [[s.name, s.modality, f"{s.subjects_train}/{s.subjects_holdout}", str(s.windows),
             fmt(s.ledger.epsilon), fmt(report.site_epsilon.get(s.name)),
             fmt(s.ledger.budget_epsilon)] for s in summary.sites]  # fmt: skip
    header = ["site", "sensors", "train/held-out subjects", "windows", "ε after training",
              "ε after the report's releases", "budget"]  # fmt: skip
    return ["## Sites", "", *table(header, rows)]


def _runs_section(report: ResearchReport) -> list[str]:
    rows = [[r.label, f"`{r.out_dir}`", r.status, fmt(r.train_loss), fmt(r.eval_loss),
             fmt(r.max_epsilon)] for r in report.runs]  # fmt: skip
    return ["## Models compared", "",
            *table(["model", "run directory", "status", "train loss", "held-out loss", "max ε"],
                    rows)]  # fmt: skip


def _release_lines(report: ResearchReport) -> list[str]:
    rows = []
    for study in report.studies:
        for variant in (CLEAN, NOISY):
            done = [r for r in study.releases if r.variant == variant and not r.refused]
            refused = [r for r in study.releases if r.variant == variant and r.refused]
            if not done and not refused:
                continue
            sigma = {fmt(r.noise_sigma) for r in done}
            eps = {fmt(r.epsilon_per_vector) for r in done}
            rows.append([study.model, variant, str(len(done)), str(len(refused)),
                         str(sum(r.rows for r in done)), str(sum(r.bytes for r in done)),
                         ", ".join(sorted(sigma)), ", ".join(sorted(eps))])  # fmt: skip
    s = report.study
    return [
        "Each site released record-level fingerprints (paired, ECG only, PPG only; a single-sensor "
        "site only its own) through the real release path (Parquet file, audit line, ledger). "
        f"Noisy release (main model only): the site's own noisy policy, else clipping to "
        f"C = {s.clip_norm:g} plus Gaussian noise of ε = {s.release_epsilon:g} per vector, charged "
        "to the site's ledger. Probes: linear, "
        f"{s.folds}-fold CV by subject redrawn {s.repeats} times, 95 % CI by bootstrap over "
        f"subjects ({s.n_boot} resamples).",
        "",
        *table(["model", "release", "files", "refused", "rows", "bytes", "noise σ",
                 "ε per vector"], rows),
    ]  # fmt: skip


def _downstream_section(report: ResearchReport) -> list[str]:
    lines = ["## Downstream: released fingerprints", ""]
    if not report.studies:
        return [*lines, "No downstream study could be run.", ""]
    lines += _release_lines(report)
    lines += ["### Tasks by model (released without noise)", ""]
    rows = []
    for study in report.studies:
        for task in study.tasks:
            cells = [study.ablation_row(CLEAN, task, m) for m in ("paired", "ecg", "ppg")]
            first = next((c for c in cells if c is not None), None)
            metric = first.result.metric if first else "–"
            baseline = fmt(first.result.baseline) if first else "–"
            rows.append([study.model, task, metric, *(fmt_probe(c) for c in cells), baseline])
    lines += table(["model", "task", "metric", "paired", "ECG only", "PPG only", "baseline"], rows)
    lines += _image(report, "downstream", "downstream metrics by model")
    main = next((s for s in report.studies if s.model == report.runs[0].label), None)
    if main is None:
        return lines
    lines += [f"### Modality ablation ({main.model} model)", "",
              "`relative`: the score over the paired score (AUROC), or paired MAE over the MAE; "
              "1.0 = as good as paired.", ""]  # fmt: skip
    rows = []
    for task in main.tasks:
        for m in ("paired", "ecg", "ppg"):
            cells = [main.ablation_row(v, task, m) for v in (CLEAN, NOISY)]
            pairs = [(fmt_probe(c), fmt(c.relative if c else None)) for c in cells]
            rows.append([task, m, *(x for pair in pairs for x in pair)])
    lines += table(["task", "fingerprints", "no noise", "relative", "noisy", "relative"], rows)
    lines += _image(report, "ablation", "modality ablation")
    lines += [f"### Attribute inference ({main.model} model)", "",
              "Utility beside leakage: an attack's `relative` < 1 means the release protects the "
              "attribute better than the release without noise.", ""]  # fmt: skip
    rows = [[study.model, r.fingerprints, r.result.task, r.role, r.result.metric,
             fmt_probe(r), fmt(r.result.baseline), fmt(r.relative)]
            for study in report.studies for r in study.attributes]  # fmt: skip
    lines += table(["model", "release", "task", "role", "metric", "value [95 % CI]", "baseline",
                     "relative"], rows)  # fmt: skip
    lines += _image(report, "attributes", "attribute inference")
    return lines


def _reconstruction_section(report: ResearchReport) -> list[str]:
    lines = ["## Cross-modal reconstruction", ""]
    if not report.reconstruction:
        return [*lines, "No reconstruction (the model has no cross-modal decoder, or no held-out "
                "subject has paired windows).", ""]  # fmt: skip
    caption = "; ".join(f"{r.site} subject {r.subject[:8]}: r = {r.correlation:.3f}"
                        for r in report.reconstruction)  # fmt: skip
    lines += _image(report, "reconstruction", "ECG reconstructed from PPG alone")
    lines += [f"*ECG decoded from PPG alone (red) beside the real ECG (black), for windows of "
              f"held-out subjects (never trained on); Pearson r per window: {caption}.*",
              ""]  # fmt: skip
    lines += table(["site", "subject (pseudonym)", "start (s)", "r"],
                    [[r.site, r.subject, f"{r.start_s:g}", fmt(r.correlation)]
                     for r in report.reconstruction])  # fmt: skip
    return lines


def render_markdown(
    cfg: SimulationConfig, summary: RunSummary, metrics: RunReport | None, report: ResearchReport
) -> str:
    """report.md: the run, what failed, training, sites, models, downstream, reconstruction."""
    run = cfg.run
    dp = f"DP-SGD σ = {run.noise_multiplier:g}, C = {run.max_grad_norm:g}" if run.dp else "no DP"
    lines = [
        "# BioFP simulation report", "",
        f"Federated {run.model} on {cfg.sites} emulated hospitals ({cfg.dataset} cohort, "
        f"{cfg.partition} partition), {run.num_rounds} rounds of {run.local_steps} local steps "
        f"({run.strategy}), {dp}, seed {run.seed}. Status: **{summary.status}**, "
        f"{summary.rounds} rounds in {summary.wall_s:.0f} s. Numbers below come from "
        f"`metrics.json` and `{REPORT_DIR}/{STUDY_NAME}`.", "",
    ]  # fmt: skip
    if report.failures:
        lines += ["## What failed", "", *(f"- {f}" for f in report.failures), ""]
    lines += _training_section(metrics, report)
    lines += _sites_section(summary, report)
    lines += _runs_section(report)
    lines += _downstream_section(report)
    lines += _reconstruction_section(report)
    notes = [f"- {s.model}: {n}" for s in report.studies for n in s.notes]
    if notes:
        lines += ["## Notes", "", *notes, ""]
    return "\n".join(lines)
