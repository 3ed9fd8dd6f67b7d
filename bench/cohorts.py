"""Does joining help? The public federation's sites, each probed on its own tasks, per model.

.venv/bin/python bench/cohorts.py [--quick] [--max-subjects N] [--rounds N] [--local-steps N]
    [--epsilons 1,2,4] [--skip local,ablation,...] [--out DIR]

Every model is trained by the simulation's own code paths (``simulations.run.simulate``: Flower's
engine with DP-SGD and per-site ledgers, or ``centralized = true``), from the shipped
``simulations/configs/public.toml`` (``--quick``: ``public-quick.toml``):

- ``untrained``: the seed's initialisation of the run's architecture;
- ``synthetic-pretrained``: the run's starting point when its config has ``[pretrain]``
  (:mod:`simulations.pretrain`: simulated signals only, no patient data, nothing charged); every
  trained model below starts from it (``--no-pretrain``: from the untrained encoder);
- ``handcrafted``: :mod:`biofp_core.evaluation.handcrafted` features of the same windows;
- ``local DP``: each site alone (a one-site federation: the same σ, sampling rate, steps and
  rounds, so the same ε at that site as in the federation), probed on its own site only;
- ``federated DP`` (the default config, ε ≤ 8 per site), ``federated non-DP`` (``dp = false``),
  ``pooled non-DP`` (``centralized = true``, ``dp = false``);
- ``federated DP, no rhythm token`` (``rhythm_token = false``): the ablation;
- ``federated DP ε=e`` for each of ``--epsilons`` (budget e per site; a site refuses the rounds
  past it): the utility-vs-ε curve of each site's main task (∞: federated non-DP).

Probes (:func:`biofp_core.evaluation.probes.probe`, linear, 5 folds disjoint by subject,
bootstrap 95 % CI over subjects) of the window fingerprints averaged per record (CinC, PPG-BP),
per 10 s segment (Liu), per window (BIDMC HR and respiratory rate from the monitor's 1 Hz
numerics), per subject (subject labels). This bench reads every site's raw labels: it is the
researcher's view of a simulation, never what a site releases. Cross-modal reconstruction: median
Pearson r of ECG decoded from PPG alone on BIDMC's held-out subjects (one window each).

Results: a printed table and ``bench/results/cohorts.json`` (``cohorts-quick.json`` with --quick).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from common import RESULTS, report, shared_data
from threadpoolctl import threadpool_limits

from biofp_core.artifacts import ModelCard, TrainingProvenance, load_model, save_model
from biofp_core.errors import DataError
from biofp_core.evaluation.handcrafted import handcrafted_features
from biofp_core.evaluation.probes import probe
from biofp_core.fingerprints.compute import window_fingerprints
from biofp_core.privacy.planner import PlanError, plan_privacy
from biofp_core.site import PrivacyBudget, load_site_config
from biofp_core.store import WindowStore
from biofp_core.validate import open_site_store
from client.site_data import SimulationSites, load_site_data
from simulations import plots
from simulations.downstream import cross_modal_reconstruction, load_study_sites
from simulations.pretrain import pretrained_model
from simulations.public import cohort_config
from simulations.run import (
    RunSummary,
    SimulationConfig,
    load_simulation_config,
    prepare_sites,
    simulate,
)

log = logging.getLogger("cohorts")

UNTRAINED, HANDCRAFTED, LOCAL = "untrained", "handcrafted", "local DP"
FED_DP, FED_NODP, POOLED = "federated DP", "federated non-DP", "pooled non-DP"
NO_RHYTHM = "federated DP, no rhythm token"
SYNTHETIC = "synthetic-pretrained"  # the federation's starting point: no patient data
ORDER = (UNTRAINED, HANDCRAFTED, SYNTHETIC, LOCAL, FED_DP, FED_NODP, POOLED, NO_RHYTHM)


@dataclass(frozen=True)
class Task:
    """One probe at one site: how rows are grouped and how a label is read."""

    name: str
    kind: str  # binary | multiclass | regression
    level: str  # record | subject | window
    column: str  # labels.csv column, or "hr" / "rr" (BIDMC numerics)
    positive: tuple[str, ...] = ()  # binary from a text column: these values are class 1
    attack: bool = False  # attribute inference: lower is better
    main: bool = False


HTN = ("Stage 1 hypertension", "Stage 2 hypertension")
TASKS: dict[str, list[Task]] = {
    "cinc2017": [
        Task("AF vs rest", "binary", "record", "rhythm", ("A",), main=True),
        Task("rhythm 4-class", "multiclass", "record", "rhythm"),
    ],
    "liu2022": [
        Task("AF vs rest", "binary", "record", "rhythm", ("AF",), main=True),
        Task("rhythm 6-class", "multiclass", "record", "rhythm"),
    ],
    "ppg-bp": [
        Task("hypertension (stage 1-2)", "binary", "subject", "hypertension", HTN, main=True),
        Task("diabetes", "binary", "subject", "diabetes", ("Type 2 Diabetes", "Diabetes")),
        Task("age", "regression", "subject", "age"),
        Task("sex (attack)", "binary", "subject", "sex", ("Male",), attack=True),
    ],
    "bidmc": [
        Task("respiratory rate", "regression", "window", "rr", main=True),
        Task("heart rate", "regression", "window", "hr"),
        Task("age", "regression", "subject", "age"),
        Task("sex (attack)", "binary", "subject", "sex", ("M",), attack=True),
    ],
}


# ---- labels and features ------------------------------------------------------------------


def _labels_by_record(labels_csv: Path) -> dict[tuple[str, float | None], dict[str, str]]:
    """(record, start_s) -> row; start None for record-level rows (any window of the record)."""
    with open(labels_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {(r["record"], float(r["start_s"]) if r.get("start_s") else None): r for r in rows}


def bidmc_numerics(data_root: Path, record: str, starts: np.ndarray, seconds: float) -> np.ndarray:
    """(n, 2) mean monitor HR and respiratory rate over each window (NaN where none)."""
    import wfdb

    try:
        num = wfdb.rdrecord(str(data_root / "bidmc" / f"{record}n"))
    except (OSError, ValueError):
        return np.full((len(starts), 2), np.nan)
    names = [n.rstrip(",").strip().upper() for n in num.sig_name]
    out = np.full((len(starts), 2), np.nan)
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
    subject: np.ndarray
    record: np.ndarray
    start_s: np.ndarray
    label: list[dict[str, str]]  # per row
    numerics: np.ndarray | None  # (n, 2) HR, RR (BIDMC)
    holdout: set[str]


def site_rows(site_toml: Path, data_root: Path, holdout: set[str]) -> SiteRows:
    config = load_site_config(site_toml)
    store = open_site_store(config)
    mask = np.asarray(store.mask, dtype=bool)
    rows = np.flatnonzero(mask.any(axis=1))  # the rows window_fingerprints("paired") embeds
    records = store.manifest.records
    ri = np.asarray(store.record_index)[rows]
    record = np.array([records[i].record_id for i in ri], dtype=object)
    subject = np.array([records[i].subject_id for i in ri], dtype=object)
    start = np.asarray(store.start_s[rows], dtype=np.float64)
    assert config.labels_csv is not None, f"{site_toml}: no labels_csv"
    table = _labels_by_record(config.labels_csv)
    label = [
        table.get((r, s)) or table.get((r, None)) or {} for r, s in zip(record, start, strict=True)
    ]
    numerics = None
    if config.name == "bidmc":
        seconds = store.ecg.shape[1] / 125.0
        numerics = np.full((len(rows), 2), np.nan)
        for rec in dict.fromkeys(record):
            at = np.flatnonzero(record == rec)
            numerics[at] = bidmc_numerics(data_root, rec, start[at], seconds)
    return SiteRows(config.name, store, rows, subject, record, start, label, numerics, holdout)


def handcrafted_matrix(site: SiteRows) -> np.ndarray:
    s = site.store
    return handcrafted_features(
        np.asarray(s.ecg[site.rows]), np.asarray(s.ppg[site.rows]), np.asarray(s.mask[site.rows]),
        valid_n=np.asarray(s.valid_n[site.rows]),
    )  # fmt: skip


def fingerprint_matrix(site: SiteRows, model_path: Path) -> np.ndarray:
    model, _ = load_model(model_path)
    table = window_fingerprints(site.store, model, modality="paired")
    assert len(table) == len(site.rows)
    return table.fp


def _number(cell: str) -> float:
    """A numeric label; BIDMC writes ages over 89 as '90+' (read as 90); NaN if none."""
    try:
        return float(cell.rstrip("+")) if cell else math.nan
    except ValueError:
        return math.nan


def _target(site: SiteRows, task: Task) -> tuple[np.ndarray, tuple[str, ...]]:
    """Per-row label (class index or value; NaN where unknown) and class names."""
    if task.column in ("hr", "rr"):
        assert site.numerics is not None
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


def _aggregate(site: SiteRows, X: np.ndarray, y: np.ndarray, level: str):
    """Mean features per record / subject (or rows as they are); label and subject of each."""
    ok = np.isfinite(y)
    if level == "window":
        return X[ok], y[ok], site.subject[ok]
    keys = (site.record if level == "record" else site.subject)[ok]
    uniq, inverse = np.unique(keys.astype(str), return_inverse=True)
    sums = np.zeros((len(uniq), X.shape[1]))
    np.add.at(sums, inverse, X[ok])
    counts = np.bincount(inverse, minlength=len(uniq))[:, None]
    first = np.unique(inverse, return_index=True)[1]
    return sums / counts, y[ok][first], site.subject[ok][first]


def probe_site(site: SiteRows, X: np.ndarray, args: dict) -> dict[str, dict]:
    """Every task of the site on features X (one row per site row)."""
    out = {}
    for task in TASKS[site.name]:
        y, classes = _target(site, task)
        Xa, ya, groups = _aggregate(site, X, y, task.level)
        try:
            with threadpool_limits(limits=1, user_api="blas"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = probe(Xa, ya, groups, kind=task.kind, task=task.name, classes=classes, **args)
        except DataError as exc:
            out[task.name] = {"error": str(exc)}
            continue
        value = r.value / r.baseline if r.metric == "mae" else r.value
        lo, hi = (r.ci_low / r.baseline, r.ci_high / r.baseline) if r.metric == "mae" else (
            r.ci_low, r.ci_high)  # fmt: skip
        out[task.name] = {
            "metric": "MAE / mean predictor's" if r.metric == "mae" else r.metric,
            "value": value, "ci": [lo, hi], "mae": r.value if r.metric == "mae" else None,
            "rows": r.rows, "subjects": r.subjects, "attack": task.attack, "main": task.main,
        }  # fmt: skip
    return out


# ---- models -------------------------------------------------------------------------------


def _sim(cfg: SimulationConfig, out: Path, **update) -> SimulationConfig:
    run = cfg.run.model_copy(update=update.pop("run", {}))
    return cfg.model_copy(update={"out": out, "sites_dir": None, "run": run, **update})


def train(cfg: SimulationConfig, label: str, *, reuse: bool = False) -> dict:
    """Run one simulation; its model path, wall time, losses and per-site ε."""
    t0 = time.perf_counter()
    done = cfg.out / "summary.json"
    if reuse and done.is_file():  # a completed run of an earlier call (same --out): its model
        summary = RunSummary.model_validate_json(done.read_text())
        if summary.status == "completed" and summary.model_path is not None:
            log.warning("reusing %s from %s", label, cfg.out)
            return _summary_row(summary, summary.wall_s)
    log.warning("training %s -> %s", label, cfg.out)
    try:
        summary = simulate(cfg)
    except Exception as exc:  # a failed run is a row of the table, not the end of the bench
        log.warning("%s failed: %s", label, exc)
        return {"error": str(exc), "wall_s": time.perf_counter() - t0}
    return _summary_row(summary, time.perf_counter() - t0)


def _summary_row(summary: RunSummary, wall_s: float) -> dict:
    return {
        "model": str(summary.model_path), "wall_s": wall_s,
        "rounds": summary.rounds, "train_loss": summary.train_loss, "eval_loss": summary.eval_loss,
        "epsilon": {s.name: s.ledger.epsilon for s in summary.sites},
    }  # fmt: skip


def planned(
    base: SimulationConfig, out: Path, epsilon: float, train_subjects: dict[str, int]
) -> tuple[SimulationConfig | None, dict]:
    """The federated DP run at budget ε per site: σ (and, if even σ_max cannot pay for them,
    fewer local steps) from the privacy planner for the site with the fewest training subjects
    (it spends the most), the run's rounds, batch and evaluations; no probe queries (they would
    spend the budget the curve is about)."""
    n = min(train_subjects.values())
    limits = PrivacyBudget.model_validate({**base.site_privacy, "epsilon": epsilon})
    try:
        plan = plan_privacy(
            n, epsilon, delta=base.delta, rounds=base.run.num_rounds,
            batch=min(float(base.run.batch_subjects), n), limits=limits,
            max_steps_per_round=base.run.local_steps,
        )  # fmt: skip
    except PlanError as exc:
        return None, {"error": str(exc)}
    run = {"noise_multiplier": plan.noise_multiplier, "local_steps": plan.steps_per_round,
           "probe_tasks": ""}  # fmt: skip
    info = {
        "plan": {
            "subjects": n,
            "sigma": plan.noise_multiplier,
            "steps_per_round": plan.steps_per_round,
            "epsilon": plan.epsilon_total,
        }
    }
    return _sim(base, out, epsilon=epsilon, run=run), info  # fmt: skip


def untrained_model(cfg: SimulationConfig, out: Path) -> dict:
    model = cfg.run.build_model()
    card = ModelCard(training=TrainingProvenance(rounds=0, strategy="none", local_steps=0,
                                                 seed=cfg.run.seed))  # fmt: skip
    return {"model": str(save_model(model, out / "untrained", card)), "wall_s": 0.0}


def reconstruction(cfg: SimulationConfig, model: str, figure: Path) -> dict:
    """Median Pearson r of ECG decoded from PPG alone, one window per held-out BIDMC subject;
    the three windows nearest the median drawn to `figure`."""
    manifest = SimulationSites.model_validate_json((cfg.out / "sites.json").read_text())
    sites = load_study_sites(manifest, holdout_fraction=cfg.run.holdout_fraction)
    bidmc = [s for s in sites if s.modality == "both"]
    n = sum(len(s.holdout) for s in bidmc)
    rows = cross_modal_reconstruction(Path(model), bidmc, windows=n)
    r = [w.row.correlation for w in rows]
    if not r:
        return {"median_r": None, "windows": 0, "r": []}
    median = float(np.median(r))
    typical = sorted(rows, key=lambda w: abs(w.row.correlation - median))[:3]
    drawn = plots.reconstruction(typical, figure)
    return {"median_r": median, "windows": len(r), "r": r, "figure": str(drawn)}


def draw_curve(results: dict, models: dict, base: SimulationConfig, path: Path) -> Path | None:
    """Each site's main task against ε per site (the ε runs, the default ε, ∞ = non-DP), with
    the untrained, synthetic-pretrained and hand-crafted levels as dashed lines."""
    curves: dict[str, list[tuple[float, float, float, float]]] = {}
    references: dict[str, dict[str, float]] = {}
    ylabels: dict[str, str] = {}
    runs = {FED_DP: base.site_epsilon, FED_NODP: math.inf}
    runs |= {k: float(k.split("=")[1]) for k in models if k.startswith(f"{FED_DP} ε=")}
    for site, tasks in TASKS.items():
        main = next(t for t in tasks if t.main)
        ylabels[site] = f"{main.name}: " + ("MAE ratio" if main.kind == "regression" else "AUROC")
        for label, eps in runs.items():
            r = results.get(label, {}).get(site, {}).get(main.name)
            if r and "error" not in r:
                curves.setdefault(site, []).append((eps, r["value"], *r["ci"]))
        for label in (UNTRAINED, SYNTHETIC, HANDCRAFTED):
            r = results.get(label, {}).get(site, {}).get(main.name)
            if r and "error" not in r:
                references.setdefault(site, {})[label] = r["value"]
    return plots.utility_vs_epsilon(curves, path, ylabels=ylabels, references=references)


# ---- main ---------------------------------------------------------------------------------


def _caps(text: str) -> dict[str, int]:
    """'N' (every site) or 'site=N,site=N' -> {site or '*': N}."""
    if "=" not in text:
        return {"*": int(text)}
    return {k.strip(): int(v) for k, v in (item.split("=") for item in text.split(","))}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="public-quick.toml, fewer fold draws")
    p.add_argument("--config", type=Path, help="another sim.toml of the public federation")
    p.add_argument("--max-subjects", help="N (every site) or site=N,...: subjects per site")
    p.add_argument("--rounds", type=int, help="override num-rounds")
    p.add_argument("--local-steps", type=int, help="override local-steps")
    p.add_argument("--run", default="{}", help="JSON of more [run] overrides (all models)")
    p.add_argument("--epsilons", default="", help="extra budgets for the ε curve, e.g. 1,2,4")
    skips = "local, nodp, pooled, ablation, recon, baselines (untrained and hand-crafted)"
    p.add_argument("--skip", default="", help=f"comma list of: {skips}")
    p.add_argument("--reuse", action="store_true", help="keep completed runs found in --out")
    p.add_argument("--pretrain", default="{}", help="JSON of [pretrain] overrides (e.g. steps)")
    p.add_argument(
        "--no-pretrain",
        action="store_true",
        help="every model starts from the seed's initialisation (no [pretrain])",
    )
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="also probe this saved model (biofp_core.artifacts format); repeatable",
    )
    p.add_argument("--repeats", type=int, help="fold draws per probe (default 1 quick, 3 full)")
    p.add_argument("--out", type=Path, default=Path("/tmp/biofp-cohorts"))
    p.add_argument("--name", help="results file stem (default cohorts[-quick])")
    return p.parse_args()


def main() -> None:
    args = parse()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    t_start = time.perf_counter()
    name = args.name or ("cohorts-quick" if args.quick else "cohorts")
    skip = set(filter(None, args.skip.split(",")))
    out = args.out.resolve()
    os.environ.setdefault("BIOFP_SHARED_DATA", str(shared_data()))
    run = json.loads(args.run)
    if args.rounds:
        run["num-rounds"] = args.rounds
    if args.local_steps:
        run["local-steps"] = args.local_steps
    base = load_simulation_config(
        args.config or cohort_config("public", quick=args.quick), out=out / "fed-dp",
        cache_dir=Path(os.environ.get("BIOFP_CACHE_DIR", out / "cache")), cpus=os.cpu_count(),
        run=run,
    )  # fmt: skip
    if args.max_subjects:
        caps = _caps(args.max_subjects)
        sites = [
            s.model_copy(update={"max_subjects": min(caps.get(s.name, caps.get("*", 10**9)),
                                                     s.max_subjects or 10**9)})
            if s.name in caps or "*" in caps else s
            for s in base.public_sites
        ]  # fmt: skip
        base = base.model_copy(update={"public_sites": sites})
    if args.no_pretrain:
        base = base.model_copy(update={"pretrain": None})
    elif base.pretrain is not None and json.loads(args.pretrain):
        pre = base.pretrain.model_validate(
            {**base.pretrain.model_dump(), **json.loads(args.pretrain)}
        )
        base = base.model_copy(update={"pretrain": pre})
    nodp = {"dp": False}  # with ε = inf: a site with a finite budget refuses non-DP training
    options = json.loads(base.run.model_options or "{}")
    plans: dict[str, SimulationConfig] = {FED_DP: base}
    if "nodp" not in skip:
        plans[FED_NODP] = _sim(base, out / "fed-nodp", run=nodp, epsilon=math.inf)
    if "pooled" not in skip:
        plans[POOLED] = _sim(base, out / "pooled", run=nodp, centralized=True, epsilon=math.inf)
    if "ablation" not in skip:
        no_token = json.dumps({**options, "rhythm_token": False})
        plans[NO_RHYTHM] = _sim(base, out / "no-rhythm", run={"model_options": no_token})
    if "local" not in skip:
        for site in base.public_sites:
            plans[f"{LOCAL} {site.name}"] = _sim(
                base, out / f"local-{site.name}", public_sites=[site], sites=1,
                run={"min_sites": 1},
            )  # fmt: skip
    manifest = prepare_sites(base)  # the federated DP run's folders: its held-out split too
    train_subjects = {
        load_site_config(ref.site_config).name: len(
            load_site_data(ref, holdout_fraction=base.run.holdout_fraction).train
        )
        for ref in manifest.sites
    }
    curve: dict[str, dict] = {}
    for eps in filter(None, args.epsilons.split(",")):
        label = f"{FED_DP} ε={eps}"
        cfg, curve[label] = planned(base, out / f"fed-dp-eps{eps}", float(eps), train_subjects)
        if cfg is not None:
            plans[label] = cfg
    models: dict[str, dict] = {}
    if "baselines" not in skip:
        models[UNTRAINED] = untrained_model(base, out)
    if base.pretrain is not None:  # every model below starts from it
        t0 = time.perf_counter()
        path = pretrained_model(base, simulate)
        models[SYNTHETIC] = {"model": str(path), "wall_s": time.perf_counter() - t0}
    for label, cfg in plans.items():
        models[label] = {**train(cfg, label, reuse=args.reuse), **curve.get(label, {})}
    for item in args.model:  # models trained elsewhere (e.g. on synthetic data), probed alike
        label, _, path = item.partition("=")
        models[label] = {"model": str(Path(path).resolve()), "wall_s": 0.0}
    for label, info in curve.items():  # a budget with no plan: its reason
        models.setdefault(label, info)
    t_train = time.perf_counter() - t_start

    repeats = args.repeats or (1 if args.quick else 3)
    probe_args = {"folds": 5, "repeats": repeats, "seed": 0,
                  "n_boot": 100 if args.quick else 200}  # fmt: skip
    results: dict[str, dict[str, dict]] = {}
    feature_s: dict[str, float] = {}
    data_root = Path(os.environ["BIOFP_SHARED_DATA"])
    for ref in manifest.sites:
        site = site_rows(ref.site_config, data_root, set())
        t0 = time.perf_counter()
        if "baselines" not in skip:
            results.setdefault(HANDCRAFTED, {})[site.name] = probe_site(
                site, handcrafted_matrix(site), probe_args
            )
        feature_s[site.name] = time.perf_counter() - t0
        for label, m in models.items():
            if "model" not in m:
                continue
            if label.startswith(LOCAL) and label != f"{LOCAL} {site.name}":
                continue
            key = LOCAL if label.startswith(LOCAL) else label
            X = fingerprint_matrix(site, Path(m["model"]))
            results.setdefault(key, {})[site.name] = probe_site(site, X, probe_args)
        log.warning("probed %s", site.name)
    recon = {}
    if "recon" not in skip:
        for label in (POOLED, FED_DP, SYNTHETIC, UNTRAINED):
            if "model" in models.get(label, {}):
                cfg = plans.get(label, base)
                slug = label.replace(" ", "-").replace(",", "")
                figure = RESULTS / f"{name}-reconstruction-{slug}.png"
                recon[label] = reconstruction(cfg, models[label]["model"], figure)
    wall = time.perf_counter() - t_start
    payload = {
        "config": str(args.config or cohort_config("public", quick=args.quick)),
        "overrides": {"max_subjects": args.max_subjects, "run": run, "skip": sorted(skip)},
        "probe": probe_args, "models": models, "results": results, "reconstruction": recon,
        "wall_s": {"total": wall, "training": t_train, "handcrafted_and_probes": feature_s},
        "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
    }  # fmt: skip
    curve_png = draw_curve(results, models, base, RESULTS / f"{name}-epsilon.png")
    payload["figures"] = {"epsilon": str(curve_png) if curve_png else None}
    rows = table_rows(results, models, recon)
    rows.append(("wall time (s): total / training", f"{wall:.0f} / {t_train:.0f}", "≤ 7200"))
    report(name, rows, payload)


def _fmt(r: dict | None) -> str:
    if not r:
        return "—"
    if "error" in r:
        return "n/a"
    lo, hi = r["ci"]
    return f"{r['value']:.3f} [{lo:.2f},{hi:.2f}]"


def table_rows(results: dict, models: dict, recon: dict) -> list[tuple[str, str, str]]:
    labels = [k for k in ORDER if k in results] + [k for k in results if k not in ORDER]
    rows = []
    for site, tasks in TASKS.items():
        for task in tasks:
            for label in labels:
                r = results.get(label, {}).get(site, {}).get(task.name)
                if r is None:
                    continue
                target = "lower is better" if task.attack else ""
                if label == FED_DP and task.main:
                    target = "main task"
                rows.append((f"{site} {task.name}: {label}", _fmt(r), target))
    for label, m in models.items():
        if label == POOLED and "wall_s" in m:
            rows.append((f"trained: {label}", f"{m['wall_s']:.0f} s", "no site ledger charged"))
        elif "epsilon" in m:
            eps = ", ".join(f"{k} {v:.2f}" for k, v in m["epsilon"].items())
            plan = m.get("plan")
            if plan:
                eps = f"σ {plan['sigma']:g} x {plan['steps_per_round']} steps; {eps}"
            rows.append((f"ε spent: {label}", f"{m['wall_s']:.0f} s", eps))
        elif "error" in m:
            rows.append((f"training {label}", "failed", m["error"][:60]))
    for label, r in recon.items():
        rows.append((f"ECG from PPG median r: {label}", f"{r['median_r']}", f"{r['windows']} win"))
    return rows


if __name__ == "__main__":
    main()
