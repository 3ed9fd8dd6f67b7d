"""The public federation's comparison study: does joining help each hospital's own tasks?

After ``biofp simulate --cohort public`` (``report = true``), :func:`public_report` probes the
run's fingerprints beside every baseline, on each site's own tasks (:data:`TASKS`):

- ``untrained``: the seed's initialisation of the run's architecture;
- ``hand-crafted``: :mod:`biofp_core.evaluation.handcrafted` features of the same windows;
- ``synthetic-pretrained``: the run's starting weights when the config has ``[pretrain]``;
- ``federated DP``: the run itself;
- and the models ``[compare]`` asks for, each trained here by ``simulate`` from the same start
  into ``OUT/comparisons/``: ``local`` (each site alone, the same σ, sampling rate, steps and
  rounds, so the same ε at that site; probed on that site only), ``nodp`` (federated non-DP),
  ``pooled`` (centralized non-DP), ``ablation`` (federated DP without the rhythm token), and one
  federated DP run per budget in ``epsilons`` (σ from the privacy planner): the utility-vs-ε
  curve of each site's main task (∞: federated non-DP).

Probes (:func:`biofp_core.evaluation.probes.probe`: linear, 5 folds disjoint by subject,
bootstrap 95 % CI over subjects) of the window fingerprints averaged per record (CinC, Liu),
per window (BIDMC heart and respiratory rate from the monitor's 1 Hz numerics) or per subject.
A task may read one signal alone (BIDMC heart rate from PPG alone: the single wearable sensor);
its windows are then embedded from that signal, and the hand-crafted features use only its block.
This is the researcher's view of a simulation (it reads every site's raw labels), never what a
site releases. Cross-modal reconstruction: median Pearson r of ECG decoded from PPG alone, one
window per held-out BIDMC subject. Writes ``OUT/report/public_study.json``
(:class:`PublicStudy`), ``OUT/report/*.png`` and ``OUT/report.md``. Training runs through the
``simulate`` callable it is given (this module never imports :mod:`simulations.run`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from threadpoolctl import threadpool_limits

from biofp_core.artifacts import ModelCard, TrainingProvenance, load_model, save_model
from biofp_core.errors import DataError
from biofp_core.evaluation.handcrafted import MODALITIES as HANDCRAFTED_BLOCKS
from biofp_core.evaluation.handcrafted import handcrafted_features
from biofp_core.evaluation.probes import probe
from biofp_core.fingerprints.compute import window_fingerprints
from biofp_core.fsutil import atomic_write_text
from biofp_core.privacy.planner import PlanError, plan_privacy
from biofp_core.signals.types import MODALITIES as SIGNALS
from biofp_core.signals.types import Modality
from biofp_core.site import PrivacyBudget, load_site_config
from biofp_core.store import WindowStore
from biofp_core.validate import open_site_store
from client.site_data import SimulationSites, SiteData
from server.report import RunReport
from simulations import plots
from simulations.config import SITES_MANIFEST, RunSummary, SimulationConfig, completed_run
from simulations.downstream import cross_modal_reconstruction, load_study_sites
from simulations.public import default_data_root
from simulations.report import REPORT_DIR, REPORT_NAME, error_line, fmt
from simulations.report import table as markdown_table

log = logging.getLogger(__name__)

STUDY_NAME = "public_study.json"
COMPARISONS_DIR = "comparisons"
UNTRAINED, HANDCRAFTED, SYNTHETIC = "untrained", "hand-crafted", "synthetic-pretrained"
LOCAL, FED_DP, FED_NODP = "local DP", "federated DP", "federated non-DP"
POOLED, NO_RHYTHM = "pooled non-DP", "federated DP, no rhythm token"
ORDER = (UNTRAINED, HANDCRAFTED, SYNTHETIC, LOCAL, FED_DP, FED_NODP, POOLED, NO_RHYTHM)
Simulate = Callable[..., RunSummary]  # simulations.run.simulate


@dataclass(frozen=True)
class Task:
    """One probe at one site: how rows are grouped and how a label is read."""

    name: str
    kind: str  # binary | multiclass | regression
    level: str  # record | subject | window
    column: str  # labels.csv column, or "hr" / "rr" (BIDMC numerics)
    positive: tuple[str, ...] = ()  # binary from a text column: these values are class 1
    attack: bool = False  # attribute inference: lower is better
    goal: float | None = None  # the main task's goal for the federated DP model (issue #13)
    modality: str = "paired"  # "ecg" / "ppg": fingerprints of that signal alone, its windows only


HTN = ("Stage 1 hypertension", "Stage 2 hypertension")
TASKS: dict[str, list[Task]] = {  # the main task first
    "cinc2017": [
        Task("AF vs rest", "binary", "record", "rhythm", ("A",), goal=0.95),
        Task("rhythm 4-class", "multiclass", "record", "rhythm"),
    ],
    "liu2022": [
        Task("AF vs rest", "binary", "record", "rhythm", ("AF",), goal=0.95),
        Task("rhythm 6-class", "multiclass", "record", "rhythm"),
    ],
    "ppg-bp": [
        Task("hypertension (stage 1-2)", "binary", "subject", "hypertension", HTN, goal=0.75),
        Task("diabetes", "binary", "subject", "diabetes", ("Type 2 Diabetes", "Diabetes")),
        Task("age", "regression", "subject", "age"),
        Task("sex (attack)", "binary", "subject", "sex", ("Male",), attack=True),
    ],
    "bidmc": [
        Task("respiratory rate", "regression", "window", "rr", goal=0.6),
        Task("heart rate", "regression", "window", "hr"),
        Task("heart rate, PPG alone", "regression", "window", "hr", modality="ppg"),
        Task("age", "regression", "subject", "age"),
        Task("sex (attack)", "binary", "subject", "sex", ("M",), attack=True),
    ],
}


class ProbeScore(BaseModel):
    """One task's probe: AUROC / macro-AUROC, or MAE as a ratio of the mean predictor's."""

    model_config = ConfigDict(ser_json_inf_nan="strings")  # ε ∞ and NaN survive JSON

    value: float | None = None
    ci: tuple[float, float] | None = None
    metric: str | None = None
    mae: float | None = Field(None, description="regression: the MAE itself (units of the label)")
    rows: int = 0
    subjects: int = 0
    attack: bool = False
    main: bool = False
    error: str | None = Field(None, description="why there is no score (one line)")


class StudyModel(BaseModel):
    """One probed model: where it is and what training it cost."""

    model_config = ConfigDict(ser_json_inf_nan="strings")

    model: str | None = None
    wall_s: float = 0.0
    rounds: int | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    epsilon: dict[str, float] = Field(default_factory=dict, description="ε spent per site")
    plan: dict[str, float] | None = Field(None, description="ε-curve runs: the planner's choice")
    error: str | None = None


class RecoveredECG(BaseModel):
    """Cross-modal reconstruction of one model on BIDMC's held-out subjects."""

    model_config = ConfigDict(ser_json_inf_nan="strings")

    median_r: float | None = None
    windows: int = 0
    r: list[float] = Field(default_factory=list)
    figure: str | None = None


class PublicStudy(BaseModel):
    """Everything the public report shows (``OUT/report/public_study.json``)."""

    model_config = ConfigDict(ser_json_inf_nan="strings")

    probe: dict[str, int]
    models: dict[str, StudyModel]
    results: dict[str, dict[str, dict[str, ProbeScore]]] = Field(
        default_factory=dict, description="model -> site -> task -> score"
    )
    reconstruction: dict[str, RecoveredECG] = Field(default_factory=dict)
    figures: dict[str, str] = Field(default_factory=dict, description="name -> path under OUT")
    wall_s: dict[str, float] = Field(default_factory=dict)
    failures: list[str] = Field(default_factory=list, description="one line per failed step")


# ---- labels and features ------------------------------------------------------------------


def _labels_by_record(labels_csv: Path) -> dict[tuple[str, float | None], dict[str, str]]:
    """(record, start_s) -> row; start None for record-level rows (any window of the record)."""
    with open(labels_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {(r["record"], float(r["start_s"]) if r.get("start_s") else None): r for r in rows}


def bidmc_numerics(folder: Path, record: str, starts: np.ndarray, seconds: float) -> np.ndarray:
    """(n, 2) mean monitor HR and respiratory rate over each window (NaN where none), from the
    record's numerics file ``<record>n`` in the BIDMC `folder`."""
    import wfdb

    out = np.full((len(starts), 2), np.nan)
    try:
        num = wfdb.rdrecord(str(folder / f"{record}n"))
    except (OSError, ValueError):
        return out
    names = [n.rstrip(",").strip().upper() for n in num.sig_name]
    for j, name in enumerate(("HR", "RESP")):
        if name not in names:
            continue
        x = num.p_signal[:, names.index(name)]
        for i, s in enumerate(starts):
            seg = x[int(s * num.fs) : int((s + seconds) * num.fs)]
            seg = seg[np.isfinite(seg) & (seg > 0)]
            out[i, j] = seg.mean() if len(seg) else np.nan
    return out


@dataclass
class SiteRows:
    """A site's usable windows (store order) with their ids and raw labels."""

    name: str
    store: WindowStore
    rows: np.ndarray  # store indices of windows with a signal
    mask: np.ndarray  # (n, 2) bool: the row has ECG, PPG
    subject: np.ndarray
    record: np.ndarray
    start_s: np.ndarray
    label: list[dict[str, str]]  # per row
    numerics: np.ndarray | None  # (n, 2) HR, RR (BIDMC)


def site_rows(site_toml: Path, numerics_folder: Path | None = None) -> SiteRows:
    """The site's windows and labels; BIDMC numerics from `numerics_folder` when given."""
    config = load_site_config(site_toml)
    store = open_site_store(config)
    mask = np.asarray(store.mask, dtype=bool)
    rows = np.flatnonzero(mask.any(axis=1))  # the rows window_fingerprints("paired") embeds
    records = store.manifest.records
    ri = np.asarray(store.record_index)[rows]
    record = np.array([records[i].record_id for i in ri], dtype=object)
    subject = np.array([records[i].subject_id for i in ri], dtype=object)
    start = np.asarray(store.start_s[rows], dtype=np.float64)
    if config.labels_csv is None:
        raise DataError(f"{site_toml}: no labels_csv to probe")
    table = _labels_by_record(config.labels_csv)
    label = [
        table.get((r, s)) or table.get((r, None)) or {} for r, s in zip(record, start, strict=True)
    ]
    numerics = None
    if numerics_folder is not None:
        seconds = store.ecg.shape[1] / store.manifest.config.fs_hz
        numerics = np.full((len(rows), 2), np.nan)
        for rec in dict.fromkeys(record):
            at = np.flatnonzero(record == rec)
            numerics[at] = bidmc_numerics(numerics_folder, rec, start[at], seconds)
    return SiteRows(config.name, store, rows, mask[rows], subject, record, start, label, numerics)


def site_modalities(site: SiteRows) -> list[str]:
    """The inputs the site's tasks read: "paired" and/or one signal alone."""
    return list(dict.fromkeys(t.modality for t in TASKS.get(site.name, [])))


def has_signal(site: SiteRows, modality: str) -> np.ndarray:
    """Which rows (n,) the input `modality` has: every row for "paired"."""
    if modality == "paired":
        return np.ones(len(site.rows), dtype=bool)
    return site.mask[:, SIGNALS.index(Modality(modality))]  # the store's column order


def handcrafted_matrices(site: SiteRows) -> dict[str, np.ndarray]:
    """Hand-crafted features per input of the site's tasks: those of both signals, and for one
    signal alone the same with the other signal's block zeroed (the blocks are independent)."""
    s = site.store
    paired = handcrafted_features(
        np.asarray(s.ecg[site.rows]), np.asarray(s.ppg[site.rows]), site.mask,
        valid_n=np.asarray(s.valid_n[site.rows]),
    )  # fmt: skip
    width = paired.shape[1] // len(HANDCRAFTED_BLOCKS)
    out = {}
    for modality in site_modalities(site):
        if modality == "paired":
            out[modality] = paired
            continue
        at = HANDCRAFTED_BLOCKS.index(modality) * width
        out[modality] = np.zeros_like(paired)
        out[modality][:, at : at + width] = paired[:, at : at + width]
    return out


def fingerprint_matrices(site: SiteRows, model_path: Path) -> dict[str, np.ndarray]:
    """Fingerprints (n, D) per input of the site's tasks; rows without that signal are zeros
    (their labels are never probed); an input no window has is left out."""
    model, _ = load_model(model_path)
    out = {}
    for modality in site_modalities(site):
        has = has_signal(site, modality)
        if not has.any():
            continue
        table = window_fingerprints(site.store, model, modality=modality)
        assert len(table) == int(has.sum())
        X = np.zeros((len(site.rows), table.fp.shape[1]), dtype=np.float32)
        X[has] = table.fp
        out[modality] = X
    return out


def _number(cell: str) -> float:
    """A numeric label; BIDMC writes ages over 89 as '90+' (read as 90); NaN if none."""
    try:
        return float(cell.rstrip("+")) if cell else math.nan
    except ValueError:
        return math.nan


def _target(site: SiteRows, task: Task) -> tuple[np.ndarray, tuple[str, ...]]:
    """Per-row label (class index or value; NaN where unknown) and class names."""
    if task.column in ("hr", "rr"):
        if site.numerics is None:
            raise DataError(f"{site.name}: no monitor numerics for {task.name}")
        return site.numerics[:, 0 if task.column == "hr" else 1], ()
    cells = [row.get(task.column, "").strip() for row in site.label]
    if task.kind == "regression":
        return np.array([_number(c) for c in cells]), ()
    if task.kind == "binary":
        if task.column == "diabetes":  # empty cell: no diabetes
            return np.array([1.0 if c in task.positive else 0.0 for c in cells]), ("no", "yes")
        y = [np.nan if not c else (1.0 if c in task.positive else 0.0) for c in cells]
        return np.array(y), ("rest", "/".join(task.positive))
    classes = tuple(sorted({c for c in cells if c}))
    return np.array([classes.index(c) if c else np.nan for c in cells], dtype=float), classes


def _aggregate(site: SiteRows, X: np.ndarray, y: np.ndarray, task: Task):
    """Mean features per record / subject (or rows as they are) over the rows with the task's
    input and a label; label and subject of each."""
    ok = np.isfinite(y) & has_signal(site, task.modality)
    level = task.level
    if level == "window":
        return X[ok], y[ok], site.subject[ok]
    keys = (site.record if level == "record" else site.subject)[ok]
    uniq, inverse = np.unique(keys.astype(str), return_inverse=True)
    sums = np.zeros((len(uniq), X.shape[1]))
    np.add.at(sums, inverse, X[ok])
    counts = np.bincount(inverse, minlength=len(uniq))[:, None]
    first = np.unique(inverse, return_index=True)[1]
    return sums / counts, y[ok][first], site.subject[ok][first]


def probe_site(
    site: SiteRows, features: dict[str, np.ndarray], args: dict[str, int]
) -> dict[str, ProbeScore]:
    """Every task of the site on its input's features (one row per site row; a dict from
    :func:`fingerprint_matrices` or :func:`handcrafted_matrices`); a task that cannot be
    probed (one class, too few subjects, features a fit cannot use) is a score with its reason,
    and the other tasks go on."""
    out = {}
    for i, task in enumerate(TASKS.get(site.name, [])):
        try:
            y, classes = _target(site, task)
            if task.modality not in features:
                raise DataError(f"{task.name}: no window has {task.modality.upper()}")
            Xa, ya, groups = _aggregate(site, features[task.modality], y, task)
            with threadpool_limits(limits=1, user_api="blas"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = probe(Xa, ya, groups, kind=task.kind, task=task.name, classes=classes, **args)  # type: ignore[arg-type]
            if r.metric == "mae" and not r.baseline > 0:
                raise DataError(f"{task.name}: every value is the same; nothing to predict")
        except Exception as exc:  # e.g. NaN fingerprints of a diverged model: this task only
            out[task.name] = ProbeScore(error=error_line(exc), attack=task.attack, main=i == 0)
            continue
        ratio = r.metric == "mae"
        scale = r.baseline if ratio else 1.0
        out[task.name] = ProbeScore(
            metric="MAE / mean predictor's" if ratio else r.metric, value=r.value / scale,
            ci=(r.ci_low / scale, r.ci_high / scale), mae=r.value if ratio else None,
            rows=r.rows, subjects=r.subjects, attack=task.attack, main=i == 0,
        )  # fmt: skip
    return out


# ---- the models ---------------------------------------------------------------------------


def _variant(cfg: SimulationConfig, out: Path, **update: Any) -> SimulationConfig:
    """`cfg` as a comparison run in `out`: its own site folders, no report, `update` applied
    (``run``: a dict of RunConfig field updates)."""
    run = cfg.run.model_copy(update=update.pop("run", {}))
    return cfg.model_copy(
        update={"out": out, "sites_dir": None, "report": False, "run": run, **update}
    )


def planned_run(
    cfg: SimulationConfig, out: Path, epsilon: float, train_subjects: dict[str, int]
) -> tuple[SimulationConfig | None, dict[str, float], str | None]:
    """The federated DP run at budget ε per site: σ (and, if even σ_max cannot pay for them,
    fewer local steps) from the privacy planner for the site with the fewest training subjects
    among those that can train (it spends the most); no probe queries (they would spend the
    budget the curve is about). Returns (config or None, the plan, why there is none)."""
    limits = PrivacyBudget.model_validate({**cfg.site_privacy, "epsilon": epsilon})
    n = min((k for k in train_subjects.values() if k >= limits.min_train_subjects), default=0)
    if n == 0:
        why = f"no site has the {limits.min_train_subjects} training subjects a round needs"
        return None, {}, why
    try:
        plan = plan_privacy(
            n, epsilon, delta=cfg.delta, rounds=cfg.run.num_rounds,
            batch=min(float(cfg.run.batch_subjects), n), limits=limits,
            max_steps_per_round=cfg.run.local_steps,
        )  # fmt: skip
    except PlanError as exc:
        return None, {}, str(exc)
    run = {"dp": True, "noise_multiplier": plan.noise_multiplier,
           "local_steps": plan.steps_per_round, "probe_tasks": ""}  # fmt: skip
    info = {"subjects": float(n), "sigma": plan.noise_multiplier,
            "steps_per_round": float(plan.steps_per_round),
            "epsilon": plan.epsilon_total}  # fmt: skip
    return _variant(cfg, out, epsilon=epsilon, run=run), info, None


def comparison_configs(
    cfg: SimulationConfig, train_subjects: dict[str, int]
) -> tuple[dict[str, SimulationConfig], dict[str, StudyModel]]:
    """The runs ``[compare]`` asks for, each in ``OUT/comparisons/<name>``, and a row per ε
    budget: the planner's choice, or why it cannot serve that budget."""
    root = cfg.out / COMPARISONS_DIR
    wanted = set(cfg.compare.models)
    if not cfg.run.dp:
        wanted.discard("nodp")  # the run itself is the federated non-DP model
    nodp = {"dp": False}  # with ε = inf: a site with a finite budget refuses non-DP training
    runs: dict[str, SimulationConfig] = {}
    curve: dict[str, StudyModel] = {}
    if "nodp" in wanted:
        runs[FED_NODP] = _variant(cfg, root / "fed-nodp", run=nodp, epsilon=math.inf)
    if "pooled" in wanted:
        runs[POOLED] = _variant(cfg, root / "pooled", run=nodp, centralized=True,
                                epsilon=math.inf)  # fmt: skip
    if "ablation" in wanted:
        no_token = {"rhythm_token": False, "rhythm_template": 0}  # the token and what it holds
        options = json.dumps({**json.loads(cfg.run.model_options), **no_token})
        # its own start: [pretrain] trains one for this architecture (the run's has the token)
        runs[NO_RHYTHM] = _variant(cfg, root / "no-rhythm",
                                   run={"model_options": options, "initial_model": ""})  # fmt: skip
    if "local" in wanted:
        for site in cfg.public_sites:
            runs[f"{LOCAL} {site.name}"] = _variant(
                cfg, root / f"local-{site.name}", public_sites=[site], sites=1,
                run={"min_sites": 1},
            )  # fmt: skip
    for eps in cfg.compare.epsilons:
        label = f"{FED_DP} ε={eps:g}"
        sub, plan, why = planned_run(cfg, root / f"fed-dp-eps{eps:g}", eps, train_subjects)
        if sub is None:
            curve[label] = StudyModel(error=why)
        else:
            runs[label] = sub
            curve[label] = StudyModel(plan=plan)  # completed by its run
    return runs, curve


def study_model(summary: RunSummary, wall_s: float) -> StudyModel:
    return StudyModel(
        model=str(summary.model_path) if summary.model_path else None, wall_s=wall_s,
        rounds=summary.rounds, train_loss=summary.train_loss, eval_loss=summary.eval_loss,
        epsilon={s.name: s.ledger.epsilon for s in summary.sites},
        error=None if summary.model_path else (summary.error or summary.status),
    )  # fmt: skip


def train(
    cfg: SimulationConfig, label: str, simulate: Simulate, *, reuse: bool,
    stage: Callable[[str], None],
) -> StudyModel:  # fmt: skip
    """Run one comparison (a completed run already in its folder is kept when `reuse`)."""
    t0 = time.perf_counter()
    done = completed_run(cfg.out) if reuse else None
    if done is not None:
        log.warning("reusing %s from %s", label, cfg.out)
        return study_model(done, done.wall_s)
    log.warning("training %s -> %s", label, cfg.out)
    try:
        summary = simulate(cfg, on_stage=lambda text: stage(f"{label}: {text}"))
    except Exception as exc:  # a failed comparison is a row of the report, not its end
        log.warning("%s failed: %s", label, exc)
        return StudyModel(error=error_line(exc), wall_s=time.perf_counter() - t0)
    return study_model(summary, time.perf_counter() - t0)


def untrained_model(cfg: SimulationConfig, folder: Path) -> StudyModel:
    model = cfg.run.build_model()
    card = ModelCard(training=TrainingProvenance(rounds=0, strategy="none", local_steps=0,
                                                 seed=cfg.run.seed))  # fmt: skip
    return StudyModel(model=str(save_model(model, folder / "untrained", card)))


# ---- probes, reconstruction, figures ------------------------------------------------------


def reconstruction(paired: list[SiteData], model: str, figure: Path) -> RecoveredECG:
    """Median Pearson r of ECG decoded from PPG alone, one window per held-out subject of the
    `paired` sites; the three windows nearest the median drawn to `figure`."""
    held_out = sum(len(s.holdout) for s in paired)
    rows = cross_modal_reconstruction(Path(model), paired, windows=held_out)
    r = [w.row.correlation for w in rows]
    if not r:
        return RecoveredECG()
    median = float(np.median(r))
    typical = sorted(rows, key=lambda w: abs(w.row.correlation - median))[:3]
    drawn = plots.reconstruction(typical, figure)
    return RecoveredECG(median_r=median, windows=len(r), r=r,
                        figure=str(drawn) if drawn else None)  # fmt: skip


def curve_points(study: PublicStudy, site_epsilon: float) -> dict[str, list[tuple[float, ...]]]:
    """Each site's main task at every budget there is a model for: (ε, value, ci_low, ci_high);
    the run itself at `site_epsilon`, federated non-DP at ∞."""
    runs = {FED_DP: site_epsilon, FED_NODP: math.inf}
    runs |= {k: float(k.split("=")[1]) for k in study.models if k.startswith(f"{FED_DP} ε=")}
    curves: dict[str, list[tuple[float, ...]]] = {}
    for site, tasks in TASKS.items():
        for label, eps in runs.items():
            r = study.results.get(label, {}).get(site, {}).get(tasks[0].name)
            if r is not None and r.value is not None and r.ci is not None:
                curves.setdefault(site, []).append((eps, r.value, *r.ci))
    return curves


def draw_curve(study: PublicStudy, site_epsilon: float, path: Path) -> Path | None:
    """The utility-vs-ε figure: each site's main task against ε per site, with the untrained,
    synthetic-pretrained and hand-crafted levels as dashed lines."""
    references: dict[str, dict[str, float]] = {}
    ylabels = {}
    for site, tasks in TASKS.items():
        main = tasks[0]
        ylabels[site] = f"{main.name}: " + ("MAE ratio" if main.kind == "regression" else "AUROC")
        for label in (UNTRAINED, SYNTHETIC, HANDCRAFTED):
            r = study.results.get(label, {}).get(site, {}).get(main.name)
            if r is not None and r.value is not None:
                references.setdefault(site, {})[label] = r.value
    curves = curve_points(study, site_epsilon)
    return plots.utility_vs_epsilon(curves, path, ylabels=ylabels, references=references)  # type: ignore[arg-type]


def probe_all(
    manifest: SimulationSites, cfg: SimulationConfig, study: PublicStudy,
    stage: Callable[[str], None],
) -> None:  # fmt: skip
    """Probe every model (and the hand-crafted features) on every site into `study.results`;
    local models only on their own site."""
    args = study.probe
    folders = {s.name: s.folder for s in cfg.public_sites}
    root = cfg.data_root or default_data_root()
    for ref in manifest.sites:
        name = load_site_config(ref.site_config).name
        stage(f"report: probing {name}")
        try:
            numerics = root / folders[name] if name == "bidmc" else None
            site = site_rows(ref.site_config, numerics)
            features = handcrafted_matrices(site)
        except Exception as exc:  # one site's failure leaves the others
            study.failures.append(f"{name}: windows or labels unreadable: {error_line(exc)}")
            continue
        study.results.setdefault(HANDCRAFTED, {})[name] = probe_site(site, features, args)
        for label, m in study.models.items():
            if m.model is None or (label.startswith(LOCAL) and label != f"{LOCAL} {name}"):
                continue
            key = LOCAL if label.startswith(LOCAL) else label
            try:
                X = fingerprint_matrices(site, Path(m.model))
            except Exception as exc:
                study.failures.append(f"{label} on {name}: {error_line(exc)}")
                continue
            study.results.setdefault(key, {})[name] = probe_site(site, X, args)


def run_public_study(
    cfg: SimulationConfig, summary: RunSummary, simulate: Simulate, *, reuse: bool = False,
    on_stage: Callable[[str], None] | None = None,
) -> PublicStudy:  # fmt: skip
    """Train the comparisons, probe every model, reconstruct and draw (see the module doc).
    A step that fails is one line in ``failures``; the others go on."""
    stage = on_stage or (lambda _: None)
    t0 = time.perf_counter()
    report_dir = cfg.out / REPORT_DIR
    repeats, boot = cfg.compare.repeats, cfg.compare.bootstrap
    study = PublicStudy(
        probe={"folds": 5, "repeats": repeats, "seed": 0, "n_boot": boot},
        models={UNTRAINED: untrained_model(cfg, report_dir / "models")},
    )
    if cfg.run.initial_model:
        study.models[SYNTHETIC if cfg.pretrain else "initial model"] = StudyModel(
            model=cfg.run.initial_model
        )
    study.models[FED_DP if cfg.run.dp else FED_NODP] = study_model(summary, summary.wall_s)
    study.models |= {k: StudyModel(model=str(v)) for k, v in cfg.compare.saved_models.items()}
    manifest = SimulationSites.read(cfg.out / SITES_MANIFEST)
    train_subjects = {site.name: site.subjects_train for site in summary.sites}
    runs, curve = comparison_configs(cfg, train_subjects)
    study.models |= {k: v for k, v in curve.items() if k not in runs}
    for label, sub in runs.items():
        stage(f"report: training the {label} model")
        trained = train(sub, label, simulate, reuse=reuse, stage=stage)
        plan = curve[label].plan if label in curve else None
        study.models[label] = trained.model_copy(update={"plan": plan})
        if trained.error:
            study.failures.append(f"{label} run failed: {trained.error}")
    study.wall_s["training"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    probe_all(manifest, cfg, study, stage)
    study.wall_s["probes"] = time.perf_counter() - t1
    stage("report: cross-modal reconstruction")
    try:  # the run's held-out subjects, the same windows for every model (seeded split)
        sites = load_study_sites(manifest, holdout_fraction=cfg.run.holdout_fraction)
        paired = [s for s in sites if s.modality == "both"]
    except Exception as exc:
        study.failures.append(f"held-out windows unreadable: {error_line(exc)}")
        paired = []
    for label in (POOLED, FED_DP, FED_NODP, SYNTHETIC, UNTRAINED) if paired else ():
        model = study.models.get(label)
        if model is None or model.model is None:
            continue
        slug = label.replace(" ", "-").replace(",", "")
        try:
            study.reconstruction[label] = reconstruction(
                paired, model.model, report_dir / f"reconstruction-{slug}.png"
            )
        except Exception as exc:
            study.failures.append(f"reconstruction of {label} failed: {error_line(exc)}")
    figures = {f"reconstruction {k}": v.figure for k, v in study.reconstruction.items() if v.figure}
    try:
        drawn = draw_curve(study, cfg.site_epsilon, report_dir / "epsilon-curve.png")
        if drawn is not None:
            figures["epsilon curve"] = str(drawn)
    except Exception as exc:
        study.failures.append(f"figure epsilon curve failed: {error_line(exc)}")
    study.figures = {k: Path(v).relative_to(cfg.out).as_posix() for k, v in figures.items()}
    study.wall_s["total"] = time.perf_counter() - t0
    return study


def public_report(
    cfg: SimulationConfig, summary: RunSummary, simulate: Simulate, *, reuse: bool = False,
    on_stage: Callable[[str], None] | None = None,
) -> Path:  # fmt: skip
    """The study of a public-federation run (:func:`run_public_study`), written to
    ``OUT/report/public_study.json`` and ``OUT/report.md``; returns the report's path."""
    out = cfg.out
    if summary.model_path is None:
        study = PublicStudy(probe={}, models={}, failures=[
            f"main run {summary.status}, no model: nothing to compare or study"])  # fmt: skip
    else:
        try:
            study = run_public_study(cfg, summary, simulate, reuse=reuse, on_stage=on_stage)
        except Exception as exc:  # e.g. the run's sites unreadable: the run itself stands
            study = PublicStudy(probe={}, models={}, failures=[f"study failed: {error_line(exc)}"])
    (out / REPORT_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / REPORT_DIR / STUDY_NAME, study.model_dump_json(indent=1) + "\n")
    path = out / REPORT_NAME
    atomic_write_text(path, render_markdown(cfg, summary, study))
    log.info("public report: %s (%d failed steps)", path, len(study.failures))
    return path


# ---- markdown -----------------------------------------------------------------------------


def score_text(r: ProbeScore | None) -> str:
    """``0.953 [0.94, 0.97]``; ``n/a`` with no score; ``–`` with no probe."""
    if r is None:
        return "–"
    if r.value is None or r.ci is None:
        return "n/a"
    return f"{r.value:.3f} [{r.ci[0]:.2f}, {r.ci[1]:.2f}]"


def model_labels(study: PublicStudy) -> list[str]:
    present = [k for k in ORDER if k in study.results]
    return present + sorted(k for k in study.results if k not in ORDER)


def goal_rows(study: PublicStudy) -> list[list[str]]:
    """Each site's main task: goal, federated DP score, met or not (MAE ratio: lower is better)."""
    rows = []
    for site, tasks in TASKS.items():
        main = tasks[0]
        r = _score(study, FED_DP, site, main)
        if main.goal is None or r is None:
            continue
        lower = main.kind == "regression"
        met = r.value <= main.goal if lower else r.value >= main.goal
        goal = f"{'≤' if lower else '≥'} {main.goal:g}"
        rows.append([site, main.name, goal, score_text(r), "met" if met else "not met"])
    return rows


def _score(study: PublicStudy, label: str, site: str, task: Task) -> ProbeScore | None:
    r = study.results.get(label, {}).get(site, {}).get(task.name)
    return r if r is not None and r.value is not None else None


def _compare_tasks(
    study: PublicStudy, other: str, tasks: list[tuple[str, Task]], *,
    within: tuple[float, float] | None = None,
) -> tuple[int, int, int]:  # fmt: skip
    """(tasks where federated DP beats `other`, of them those where it lies outside `other`'s
    95 % CI, tasks both have a score for): AUROC higher, MAE ratio lower; with `within` =
    (AUROC, relative MAE) margins: no worse than `other` by them."""
    wins = clear = scored = 0
    for site, task in tasks:
        a, b = _score(study, FED_DP, site, task), _score(study, other, site, task)
        if a is None or b is None:
            continue
        x, y = a.value, b.value
        low, high = b.ci or (y, y)
        scored += 1
        if task.kind == "regression":
            win = x <= y * (1 + within[1]) if within else x < y
            clear += win and x < low
        else:
            win = x >= y - within[0] if within else x > y
            clear += win and x > high
        wins += win
    return wins, clear, scored


def verdict_rows(study: PublicStudy) -> list[list[str]]:
    """The issue's questions answered from the scores (joining helps, learning shows, the
    reconstruction goal): count (and how many wins lie outside the other model's 95 % CI: a
    win inside it is within what resampling subjects moves), target, met / not met; "–"
    without the models."""
    main = [(site, tasks[0]) for site, tasks in TASKS.items()]
    every = [(site, t) for site, tasks in TASKS.items() for t in tasks if not t.attack]
    chosen = [("liu2022", TASKS["liu2022"][1]), ("ppg-bp", TASKS["ppg-bp"][0])]
    checks = [
        ("beats local DP on the main task", LOCAL, main, None, 3),
        ("within 0.03 AUROC / 10 % MAE of pooled non-DP", POOLED, every, (0.03, 0.1), None),
        ("beats the untrained encoder", UNTRAINED, every, None, None),
        ("beats hand-crafted on 6-class and hypertension", HANDCRAFTED, chosen, None, None),
    ]
    flags = {LOCAL: "--compare local", POOLED: "--compare pooled"}
    rows = []
    for text, other, tasks, within, need in checks:
        wins, clear, scored = _compare_tasks(study, other, tasks, within=within)
        if scored == 0:
            how = f" (run with {flags[other]})" if other in flags else ""
            rows.append([f"federated DP {text}", f"not measured{how}", "–", "–"])
            continue
        target = need if need is not None else scored
        state = "met" if wins >= target else "not met"
        answer = f"{wins} of {scored} tasks"
        if within is None:  # how many of the wins a resampling of subjects would not undo
            answer += f" ({clear} outside the other's 95 % CI)"
        rows.append([f"federated DP {text}", answer, f"{target}", state])
    recon = study.reconstruction.get(POOLED)
    if recon is not None and recon.median_r is not None:
        met = "met" if recon.median_r >= 0.5 else "not met"
        rows.append(["ECG from PPG alone, pooled non-DP: median r", f"{recon.median_r:.3f}",
                     "≥ 0.5", met])  # fmt: skip
    return rows


def _models_section(study: PublicStudy) -> list[str]:
    rows = []
    for label, m in study.models.items():
        eps = ", ".join(f"{k} {fmt(v, 3)}" for k, v in m.epsilon.items()) or "–"
        if m.epsilon and not any(m.epsilon.values()):
            eps = "none charged (pooled data, no site ledger)"
        if m.plan:
            eps = f"σ {m.plan['sigma']:.3g} × {m.plan['steps_per_round']:.0f} steps; {eps}"
        state = m.error or ("ok" if m.model else "–")
        rows.append([label, state, f"{m.wall_s:.0f}", fmt(m.eval_loss), eps])
    return ["## Models", "", *markdown_table(["model", "status", "trained (s)", "held-out loss",
                                      "ε spent per site"], rows)]  # fmt: skip


def _site_sections(study: PublicStudy) -> list[str]:
    labels = model_labels(study)
    lines = ["## Probes per site", "",
             f"Linear probes on frozen fingerprints: {study.probe.get('folds', 5)} folds disjoint "
             f"by subject × {study.probe.get('repeats', 0)} draws, bootstrap 95 % CI over "
             "subjects. AUROC (macro for multi-class); regression: MAE as a ratio of the mean "
             "predictor's (lower is better). Attacks (sex inference): lower is better. Local DP "
             "is each site's own model.", ""]  # fmt: skip
    for site, tasks in TASKS.items():
        if not any(site in study.results.get(label, {}) for label in labels):
            continue
        lines += [f"### {site}", ""]
        rows = []
        for i, task in enumerate(tasks):
            name = task.name + (" (main)" if i == 0 else "")
            rows.append([name, *(score_text(study.results.get(lb, {}).get(site, {}).get(task.name))
                                 for lb in labels)])  # fmt: skip
        lines += markdown_table(["task", *labels], rows)
    return lines


def _reconstruction_section(study: PublicStudy) -> list[str]:
    lines = ["## Cross-modal reconstruction (ECG from PPG alone, BIDMC held-out subjects)", ""]
    if not study.reconstruction:
        return [*lines, "No reconstruction (no held-out subject with paired windows).", ""]
    lines += markdown_table(["model", "median r", "windows"],
                    [[k, fmt(v.median_r, 3), str(v.windows)]
                     for k, v in study.reconstruction.items()])  # fmt: skip
    for name, path in study.figures.items():
        if name.startswith("reconstruction "):
            lines += [f"![{name}]({path})", ""]
    return lines


def render_markdown(cfg: SimulationConfig, summary: RunSummary, study: PublicStudy) -> str:
    """report.md of a public-federation run: goals, models, probes per site, ε curve,
    reconstruction, what failed."""
    run = cfg.run
    dp = f"DP-SGD σ = {run.noise_multiplier:g}" if run.dp else "no DP"
    start = f", starting from {SYNTHETIC} weights" if cfg.pretrain else ""
    metrics = RunReport.read(cfg.out)
    eps = ", ".join(f"{s.name} {s.ledger.epsilon:.2f}" for s in summary.sites)
    lines = [
        "# BioFP public-federation report", "",
        f"{run.model} federated over {cfg.sites} public cohorts (one hospital each), "
        f"{run.num_rounds} rounds of {run.local_steps} local steps{start}, {dp}, budget ε "
        f"{fmt(cfg.site_epsilon)} per site. Status: **{summary.status}**, {summary.rounds} "
        f"rounds in {summary.wall_s:.0f} s; ε spent: {eps or '–'}. Numbers below come from "
        f"`{REPORT_DIR}/{STUDY_NAME}`.", "",
    ]  # fmt: skip
    if metrics is not None and metrics.rounds:
        last = metrics.rounds[-1]
        lines += [f"Last round: train loss {fmt(last.train_loss)}, held-out loss "
                  f"{fmt(last.eval_loss)} (`metrics.json`).", ""]  # fmt: skip
    if study.failures:
        lines += ["## What failed", "", *(f"- {f}" for f in study.failures), ""]
    if run.dp:
        goals = goal_rows(study)
        if goals:
            lines += ["## Goals (federated DP model)", ""]
            lines += markdown_table(["site", "main task", "goal", "federated DP", ""], goals)
        lines += ["## Does joining help?", ""]
        lines += markdown_table(["question", "answer", "goal", ""], verdict_rows(study))
    else:
        lines += ["The goals and \"does joining help?\" are about a federated DP run; this run "
                  "trains without DP (its model is the federated non-DP row).", ""]  # fmt: skip
    lines += _models_section(study)
    lines += _site_sections(study)
    if "epsilon curve" in study.figures:
        lines += ["## Utility against ε", "", f"![utility vs ε]({study.figures['epsilon curve']})",
                  "", "*Each site's main task against the per-site budget (∞: federated "
                  "non-DP; add budgets with `[compare] epsilons`); dashed: reference models.*",
                  ""]  # fmt: skip
    lines += _reconstruction_section(study)
    return "\n".join(lines)
