"""Does joining help? The public federation's sites, each probed on its own tasks, per model.

.venv/bin/python bench/cohorts.py [--quick] [--max-subjects N] [--rounds N] [--local-steps N]
    [--epsilons 1,2,4] [--skip local,ablation,...] [--out DIR]

The report of ``biofp simulate --cohort public --compare all --curve-epsilons ...``
(:mod:`simulations.public_study`), timed: the shipped ``simulations/configs/public.toml``
(``--quick``: ``public-quick.toml``) trained from its synthetic-pretrained start (``--no-pretrain``:
from the untrained encoder) with every comparison — local DP per site, federated DP (the run),
federated non-DP, pooled non-DP, the rhythm-token ablation and the ε-curve runs — then the
untrained encoder, hand-crafted features and every model probed on each site's tasks, and ECG
decoded from PPG alone on BIDMC's held-out subjects.

Results: a printed table, ``bench/results/<name>.json`` (``cohorts``, ``cohorts-quick`` with
--quick; the study, per-model training times and the wall time) and the figures copied to
``bench/results/<name>-*.png``; the run's own ``report.md`` is in ``--out``/fed-dp.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path

from common import RESULTS, report, shared_data

from biofp_core.errors import BioFPError
from simulations.config import (
    COMPARISONS,
    SUMMARY_NAME,
    RunSummary,
    SimulationConfig,
    completed_run,
)
from simulations.pretrain import pretrained_model
from simulations.public import cohort_config
from simulations.public_study import (
    FED_DP,
    STUDY_NAME,
    TASKS,
    PublicStudy,
    model_labels,
    public_report,
    score_text,
    verdict_rows,
)
from simulations.report import REPORT_DIR
from simulations.run import load_simulation_config, simulate

log = logging.getLogger("cohorts")


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
    p.add_argument("--skip", default="", help=f"comma list of: {', '.join(COMPARISONS)}")
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


def configure(args: argparse.Namespace) -> SimulationConfig:
    """The shipped config with the bench's overrides: every comparison unless skipped."""
    run = json.loads(args.run)
    if args.rounds:
        run["num-rounds"] = args.rounds
    if args.local_steps:
        run["local-steps"] = args.local_steps
    skip = set(filter(None, args.skip.split(",")))
    if skip - set(COMPARISONS):
        raise SystemExit(f"--skip: unknown {sorted(skip - set(COMPARISONS))}; one of {COMPARISONS}")
    if any("=" not in item for item in args.model):
        raise SystemExit("--model: give LABEL=PATH")
    if args.no_pretrain and json.loads(args.pretrain):
        raise SystemExit("--pretrain and --no-pretrain: choose one")
    compare = {
        "models": [m for m in COMPARISONS if m not in skip],
        "epsilons": [float(e) for e in filter(None, args.epsilons.split(","))],
        "repeats": args.repeats or (1 if args.quick else 3),
        "bootstrap": 100 if args.quick else 200,
        "saved_models": dict(item.partition("=")[::2] for item in args.model),
    }
    cfg = load_simulation_config(
        args.config or cohort_config("public", quick=args.quick), out=args.out.resolve() / "fed-dp",
        cache_dir=Path(os.environ.get("BIOFP_CACHE_DIR", args.out.resolve() / "cache")),
        cpus=os.cpu_count(), run=run, compare=compare, report=False,
    )  # fmt: skip
    if args.max_subjects:
        caps = _caps(args.max_subjects)
        sites = [
            s.model_copy(update={"max_subjects": min(caps.get(s.name, caps.get("*", 10**9)),
                                                     s.max_subjects or 10**9)})
            if s.name in caps or "*" in caps else s
            for s in cfg.public_sites
        ]  # fmt: skip
        cfg = cfg.model_copy(update={"public_sites": sites})
    if args.no_pretrain:
        return cfg.model_copy(update={"pretrain": None})
    if json.loads(args.pretrain):
        if cfg.pretrain is None:
            raise SystemExit("--pretrain: the config has no [pretrain] to override")
        pre = {**cfg.pretrain.model_dump(), **json.loads(args.pretrain)}
        cfg = cfg.model_copy(update={"pretrain": cfg.pretrain.model_validate(pre)})
    return cfg


def main_run(cfg: SimulationConfig, *, reuse: bool) -> RunSummary:
    """The federated DP run (a completed one in its folder is kept when `reuse`); a failed run's
    summary (its report then says so, and the comparisons are not trained)."""
    done = completed_run(cfg.out) if reuse else None
    if done is not None:
        return done
    try:
        return simulate(cfg)
    except BioFPError as exc:
        log.warning("federated DP failed: %s", exc)
        return RunSummary.model_validate_json((cfg.out / SUMMARY_NAME).read_text())


def table_rows(study: PublicStudy) -> list[tuple[str, str, str]]:
    rows = []
    for site, tasks in TASKS.items():
        for i, task in enumerate(tasks):
            for label in model_labels(study):
                r = study.results.get(label, {}).get(site, {}).get(task.name)
                if r is None:
                    continue
                target = "lower is better" if task.attack else ""
                if label == FED_DP and i == 0 and task.goal is not None:
                    sign = "≤" if task.kind == "regression" else "≥"
                    target = f"main task, goal {sign} {task.goal:g}"
                rows.append((f"{site} {task.name}: {label}", score_text(r), target))
    for label, m in study.models.items():
        if m.epsilon:
            eps = ", ".join(f"{k} {v:.2f}" for k, v in m.epsilon.items())
            if m.plan:
                eps = f"σ {m.plan['sigma']:.3g} x {m.plan['steps_per_round']:.0f} steps; {eps}"
            rows.append((f"trained: {label}", f"{m.wall_s:.0f} s", f"ε spent: {eps}"))
        elif m.error:
            rows.append((f"training {label}", "failed", m.error[:60]))
    for label, r in study.reconstruction.items():
        rows.append((f"ECG from PPG median r: {label}", f"{r.median_r}", f"{r.windows} windows"))
    rows += [(q, answer, f"{goal}: {state}") for q, answer, goal, state in verdict_rows(study)]
    return rows


def main() -> None:
    args = parse()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    t_start = time.perf_counter()
    name = args.name or ("cohorts-quick" if args.quick else "cohorts")
    os.environ.setdefault("BIOFP_SHARED_DATA", str(shared_data()))
    cfg = configure(args)
    wall: dict[str, float] = {}
    if cfg.pretrain is not None:  # timed apart: cached once for every later run
        t0 = time.perf_counter()
        initial = pretrained_model(cfg, simulate)
        wall["pretraining"] = time.perf_counter() - t0
        run = cfg.run.model_copy(update={"initial_model": str(initial)})
        cfg = cfg.model_copy(update={"run": run})
    t0 = time.perf_counter()
    summary = main_run(cfg, reuse=args.reuse)
    wall["federated DP"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    path = public_report(cfg, summary, simulate, reuse=args.reuse)
    wall["comparisons and probes"] = time.perf_counter() - t0
    wall["total"] = time.perf_counter() - t_start
    study = PublicStudy.model_validate_json((cfg.out / REPORT_DIR / STUDY_NAME).read_text())
    figures = {}
    for figure, rel in study.figures.items():
        copy = RESULTS / f"{name}-{Path(rel).name}"
        RESULTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cfg.out / rel, copy)
        figures[figure] = str(copy)
    payload = {
        "config": str(args.config or cohort_config("public", quick=args.quick)),
        "overrides": {"max_subjects": args.max_subjects, "run": args.run, "skip": args.skip,
                      "epsilons": args.epsilons, "no_pretrain": args.no_pretrain},
        "report": str(path), "study": json.loads(study.model_dump_json()), "figures": figures,
        "wall_s": wall, "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
    }  # fmt: skip
    rows = table_rows(study)
    rows.append(("wall time (s): total", f"{wall['total']:.0f}", "≤ 7200 (2 cores)"))
    report(name, rows, payload)


if __name__ == "__main__":
    main()
