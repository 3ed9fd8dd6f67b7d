"""Federation figures: update compression, federated vs centralized time, and site scaling.

.venv/bin/python bench/federation.py [--quick] [--cores 2] [--time-steps 32 128]
    [--timing-repeats 2] [--no-repeat] [--only compression|timing|scaling] [--cache-dir DIR]
    [--keep]

Full size: about 20 minutes on 2 quiet cores (more on a busy host), most of it experiment 2's
128-step workload; ``--quick``: tiny model and sizes, about 4 minutes, nearly all of it Ray
start-up (one per simulation).

Every run is ``simulations.run.simulate`` (the real ClientApp and ServerApp in Flower's simulation
engine, Ray) on the synthetic cohort with a small M2AE (211k parameters), in its own child process
pinned to ``--cores`` CPUs (``cpus = cores`` for Ray, one CPU per ClientApp). The child first
builds the cohort and window stores (cached, not timed), then times ``simulate()``. The parent
samples the memory of the child's whole process tree (Ray's GCS, raylet and workers included)
from /proc, and the load other processes put on the host meanwhile (``other_load_cores``: host
CPU time from /proc/stat minus the run's own, per second).

1. Compression: strategy ``fedavg`` vs ``compressed`` with ``fp16`` and ``int8``, same seed and
   config, WITHOUT DP (``dp = false``) so DP noise does not hide the effect of quantisation.
   Bytes per site per round relative to fp32 parameter bytes, two ways: ``payload`` (what each
   site reports in metrics.json: numeric bytes of the update) and ``wire`` (the server's
   ``bytes_received`` / contributing sites: Flower's ``ArrayRecord.count_bytes``, which adds each
   array's .npy header and its key; int8 packs all scales into one array). Final training loss
   (last round, example-weighted over sites) of each compressed run / the fedavg run, and a
   second fedavg run as the run-to-run noise floor.
2. Federated / centralized time for the same total local steps (rounds x sites x local steps;
   ``simulate(centralized=True)`` trains the same model with the same ``train_local`` on the
   pooled data), for two workloads: 4 rounds x 4 sites x 32 local steps (the issue's figure, 512
   steps) and x 128 local steps (2048 steps, a more realistic round). DP on in both (sites get a
   large ε budget so that no round is refused), no per-round federated evaluation (the
   centralized baseline evaluates once at the end). ``raw``: whole ``simulate()`` wall times
   (RunSummary.wall_s, warm cache). Flower/Ray start-up is a fixed cost (Ray's processes, each
   ClientApp process importing torch/Opacus/Flower, first-call warm-up), so it is also measured
   on its own: the engine phase of a 1-round, 1-local-step run of the same sites. ``excl.
   start-up``: the federated engine phase minus its start-up, from the run's own metrics.json
   (the time outside the rounds plus round 1's excess over the median later round), or minus
   the 1x1 runs' median, over the centralized training phase. Each pass runs both workloads'
   (federated, centralized) pairs and one 1x1 run, so everything is interleaved; medians are
   reported with their range.
3. Scaling: N sites x 2 rounds (3 subjects per site, 2 local steps, DP on with a large budget,
   per-round evaluation on as in the default job): wall time per site-round and the peak memory of
   the whole process tree (sum of RSS, which counts shared libraries once per process, and sum of
   PSS, which shares them out; plus the largest single process from wait4).

Timings are wall-clock on a machine that may be shared: they are noisy; the load average and
the other processes' load of every run are in the JSON, and the latter is printed per workload.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from common import report

ROOT = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")
PR_SET_CHILD_SUBREAPER = 36

SMALL_M2AE = {"width": 64, "heads": 4, "decoder_width": 32, "modality_depth": 1, "fusion_depth": 1}
QUICK_M2AE = {"width": 32, "heads": 2, "decoder_width": 16, "modality_depth": 1, "fusion_depth": 1}
BIG_BUDGET = 1e6  # ε of each emulated site where DP is on but the budget must not interfere


@dataclass(frozen=True)
class Sizes:
    """How big each experiment is (``--quick`` shrinks everything)."""

    model: dict[str, int]
    cohort_sites: int  # experiments 1 and 2: sites (one synthetic hospital each)
    cohort_subjects: int  # ... subjects per site
    cohort_minutes: float  # ... minutes per record
    comp_rounds: int
    comp_steps: int
    time_rounds: int
    time_steps: tuple[int, ...]  # workloads: local steps per site-round
    scale_sites: tuple[int, ...]
    scale_subjects: int
    scale_minutes: float
    scale_steps: int
    scale_rounds: int = 2


FULL = Sizes(
    model=SMALL_M2AE, cohort_sites=4, cohort_subjects=8, cohort_minutes=2.0,
    comp_rounds=4, comp_steps=6, time_rounds=4, time_steps=(32, 128),
    scale_sites=(10, 25, 50), scale_subjects=3, scale_minutes=1.0, scale_steps=2,
)  # fmt: skip
QUICK = Sizes(
    model=QUICK_M2AE, cohort_sites=3, cohort_subjects=3, cohort_minutes=1.0,
    comp_rounds=2, comp_steps=2, time_rounds=2, time_steps=(2,),
    scale_sites=(3, 5), scale_subjects=3, scale_minutes=1.0, scale_steps=1,
)  # fmt: skip


# ---- the child: one simulate() call -------------------------------------------------------------


def child_main(spec_path: Path, result_path: Path) -> None:
    """Run one simulation described by `spec_path`; write timings and metrics to `result_path`."""
    import torch

    import simulations.run as sim_run
    from biofp_core.errors import BioFPError
    from server.report import RunReport
    from simulations.run import load_simulation_config, prepare_sites, simulate

    train_local_s: list[float] = []
    train_local = sim_run.train_local

    def timed_train_local(*args: Any, **kwargs: Any) -> Any:  # the centralized run's training
        t = time.monotonic()
        try:
            return train_local(*args, **kwargs)
        finally:
            train_local_s.append(time.monotonic() - t)

    sim_run.train_local = timed_train_local
    spec = json.loads(spec_path.read_text())
    cfg = load_simulation_config(None, **spec["sim"], run=spec["run"])
    prewarm = Path(spec["prewarm_dir"])
    prewarm.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    prepare_sites(cfg.model_copy(update={"out": prewarm, "sites_dir": None}))
    prepare_s = time.monotonic() - t0
    marks: list[tuple[str, float]] = []
    t0 = time.monotonic()
    error = None
    try:
        summary = simulate(cfg, on_stage=lambda text: marks.append((text, time.monotonic() - t0)))
    except BioFPError as exc:
        summary, error = None, str(exc)
    total_s = time.monotonic() - t0
    run_report = RunReport.read(cfg.out)
    state = cfg.run.build_model().state_dict()
    result = {
        "error": error,
        "prewarm_prepare_s": prepare_s,
        "stages": marks,
        "total_s": total_s,
        "run_stage": marks[-1][0] if marks else None,
        "run_phase_s": total_s - marks[-1][1] if marks else None,
        "summary": summary.model_dump(mode="json", exclude={"sites"}) if summary else None,
        "report": run_report.model_dump(mode="json") if run_report else None,
        "n_params": sum(t.numel() for t in state.values()),
        "n_tensors": len(state),
        "fp32_bytes": 4 * sum(t.numel() for t in state.values() if t.is_floating_point()),
        "torch_threads": torch.get_num_threads(),
        "train_local_s": sum(train_local_s) if train_local_s else None,
    }
    result_path.write_text(json.dumps(result, indent=1))
    if error is not None:
        sys.exit(1)


# ---- the parent: process tree, memory -----------------------------------------------------------


def _ppids() -> dict[int, int]:
    """pid -> parent pid of every process visible in /proc."""
    table: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        table[int(entry.name)] = int(stat[stat.rfind(b")") + 2 :].split()[1])
    return table


def descendants(root: int) -> list[int]:
    """Every process below `root` (not `root` itself)."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _ppids().items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _rss_pss(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process in bytes; (0, 0) if it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as fh:
            rss = int(fh.read().split()[1]) * PAGE
        pss = 0
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                    break
        return rss, pss
    except (OSError, ValueError, IndexError):
        return 0, 0


class TreeSampler:
    """Samples the summed RSS and PSS of every process below this one, in a thread."""

    def __init__(self, period_s: float = 0.2) -> None:
        self.period_s = period_s
        self.peak_rss = self.peak_pss = self.peak_procs = self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-sampler", daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while True:
            pids = descendants(me)
            sizes = [_rss_pss(pid) for pid in pids]
            self.peak_rss = max(self.peak_rss, sum(r for r, _ in sizes))
            self.peak_pss = max(self.peak_pss, sum(p for _, p in sizes))
            self.peak_procs = max(self.peak_procs, sum(1 for r, _ in sizes if r))
            self.samples += 1
            if self._stop.wait(self.period_s):
                return

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def reap_leftovers(grace_s: float = 10.0) -> tuple[list[str], list[str]]:
    """Processes the child left behind (re-parented to us, the subreaper): wait for them to
    exit, then terminate the ones still running, by pid. Returns the names of all of them
    and of those that had to be terminated."""
    me = os.getpid()
    leftovers = [_name(pid) for pid in descendants(me)]
    deadline, terminated = time.monotonic() + grace_s, []
    while True:
        alive = []
        for pid in [p for p, parent in _ppids().items() if parent == me]:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if not done:
                alive.append(pid)
        if not alive:
            return leftovers, terminated
        if time.monotonic() > deadline:
            for pid in alive:
                terminated.append(_name(pid))
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 5.0
        time.sleep(0.2)


def host_busy_s() -> float:
    """CPU seconds the whole host has been busy (all CPUs, /proc/stat: not idle, not iowait)."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_children_cpu_s() -> float:
    """CPU seconds of every process this one has reaped (the children and their orphans)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_child(label: str, spec: dict[str, Any], *, root: Path) -> dict[str, Any]:
    """Run one simulation in a child process (it inherits our CPU affinity); result + memory."""
    spec_path, result_path = root / f"{label}.spec.json", root / f"{label}.result.json"
    log_path = root / f"{label}.log"
    spec_path.write_text(json.dumps(spec, indent=1))
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path),
               str(result_path)]  # fmt: skip
    started, load_start, busy_start, own_start = (
        time.monotonic(),
        os.getloadavg()[0],
        host_busy_s(),
        own_children_cpu_s(),
    )
    print(f"  {label} ...", end="", flush=True)
    with log_path.open("w") as log, TreeSampler() as sampler:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        leftovers, terminated = reap_leftovers()
    wall = time.monotonic() - started
    own_cpu, busy = own_children_cpu_s() - own_start, host_busy_s() - busy_start
    host = {
        "load1_start": load_start,
        "load1_end": os.getloadavg()[0],
        "run_cpu_s": own_cpu,
        "host_busy_cpu_s": busy,
        "other_load_cores": max(0.0, busy - own_cpu) / wall,
    }
    print(f" {wall:.0f} s (other load {host['other_load_cores']:.1f} cores)")
    if proc.returncode != 0 or not result_path.exists():
        tail = "\n".join(log_path.read_text().splitlines()[-20:])
        raise RuntimeError(f"{label}: child exited with {proc.returncode}; {log_path}:\n{tail}")
    result = json.loads(result_path.read_text())
    result["process_wall_s"] = wall
    result["host"] = host
    result["memory"] = {
        "peak_tree_rss_bytes": sampler.peak_rss,
        "peak_tree_pss_bytes": sampler.peak_pss,
        "peak_processes": sampler.peak_procs,
        "samples": sampler.samples,
        "max_single_process_rss_bytes": usage.ru_maxrss * 1024,  # wait4: largest reaped one
        "leftover_processes": leftovers,  # still there when the child had exited
        "terminated_leftovers": terminated,  # ... and still running 10 s later
    }
    return result


# ---- the experiments ----------------------------------------------------------------------------


def _spec(root: Path, name: str, sim: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    sim = {"out": str(root / "runs" / name), **sim}
    return {"sim": sim, "run": run, "prewarm_dir": str(root / "prewarm" / name)}


def _rounds(result: dict[str, Any]) -> list[dict[str, Any]]:
    report_ = result["report"] or {}
    return report_.get("rounds", [])


def _check_complete(label: str, result: dict[str, Any], sites: int, rounds: int) -> None:
    done = _rounds(result)
    if len(done) != rounds or any(r["contributed"] != sites for r in done):
        got = [(r["server_round"], r["contributed"], r["failed"], r["refused"]) for r in done]
        raise RuntimeError(f"{label}: expected {rounds} rounds x {sites} sites, got {got}")


def compression(root: Path, sizes: Sizes, cores: int, repeat: bool) -> dict[str, Any]:
    """Experiment 1: bytes and final loss of fedavg, compressed fp16, compressed int8 (no DP)."""
    sim = {
        "sites": sizes.cohort_sites, "synth_sites": sizes.cohort_sites,
        "synth_subjects_per_site": sizes.cohort_subjects, "synth_minutes": sizes.cohort_minutes,
        "cache_dir": str(root / "cache"), "cpus": cores,
    }  # fmt: skip
    run = {
        "model-options": json.dumps(sizes.model), "num-rounds": sizes.comp_rounds,
        "local-steps": sizes.comp_steps, "dp": False, "seed": 0,
    }  # fmt: skip
    variants = {
        "none": {"strategy": "fedavg"},
        "fp16": {"strategy": "compressed", "compression": "fp16"},
        "int8": {"strategy": "compressed", "compression": "int8"},
    }
    if repeat:
        variants["none-repeat"] = {"strategy": "fedavg"}
    out: dict[str, Any] = {"sim": sim, "run": run, "dp": False, "runs": {}}
    for name, extra in variants.items():
        spec = _spec(root, f"comp-{name}", sim, {**run, **extra})
        result = run_child(f"compression-{name}", spec, root=root)
        _check_complete(name, result, sizes.cohort_sites, sizes.comp_rounds)
        rounds = _rounds(result)
        payloads = [s["payload_bytes"] for r in rounds for s in r["sites"] if s["status"] == "ok"]
        wire = [r["bytes_received"] / r["contributed"] for r in rounds]
        fp32 = result["fp32_bytes"]
        out["runs"][name] = {
            **extra,
            "fp32_param_bytes": fp32,
            "n_params": result["n_params"],
            "n_tensors": result["n_tensors"],
            "payload_bytes_per_site_round": statistics.mean(payloads),
            "wire_bytes_per_site_round": statistics.mean(wire),
            "payload_ratio": statistics.mean(payloads) / fp32,
            "wire_ratio": statistics.mean(wire) / fp32,
            "final_train_loss": rounds[-1]["train_loss"],
            "final_eval_loss": rounds[-1]["eval_loss"],
            "train_loss_by_round": [r["train_loss"] for r in rounds],
            "run_phase_s": result["run_phase_s"],
        }
    base = out["runs"]["none"]
    for entry in out["runs"].values():
        entry["wire_ratio_vs_fedavg_wire"] = (
            entry["wire_bytes_per_site_round"] / base["wire_bytes_per_site_round"]
        )
        entry["train_loss_ratio"] = entry["final_train_loss"] / base["final_train_loss"]
        if entry["final_eval_loss"] is not None and base["final_eval_loss"]:
            entry["eval_loss_ratio"] = entry["final_eval_loss"] / base["final_eval_loss"]
    return out


def _federated_times(fed: dict[str, Any], sizes: Sizes, steps: int, workers: int) -> dict[str, Any]:
    """Where a federated run's time went, from its own metrics.json (see ``definitions``)."""
    round_s = [r["wall_s"] for r in _rounds(fed)]
    steady_round = statistics.median(round_s[1:]) if len(round_s) > 1 else round_s[0]
    outside = fed["run_phase_s"] - sum(round_s)  # Ray, ServerApp set-up, final model, teardown
    warmup = max(0.0, round_s[0] - steady_round)  # round 1's extra: first ClientApp calls
    site_steps = sizes.cohort_sites * steps  # per round
    return {
        "whole_s": fed["total_s"],
        "engine_phase_s": fed["run_phase_s"],
        "round_wall_s": round_s,
        "steady_round_s": steady_round,
        "outside_rounds_s": outside,
        "round1_warmup_s": warmup,
        "startup_s": outside + warmup,
        "concurrent_clientapps": workers,
        "s_per_site_step_with_overheads": steady_round * min(workers, sizes.cohort_sites)
        / site_steps,
        "final_train_loss": _rounds(fed)[-1]["train_loss"],
        "max_epsilon": (fed["summary"] or {}).get("max_epsilon"),
        "host": fed["host"],
        **fed["memory"],
    }  # fmt: skip


def _centralized_times(cent: dict[str, Any], steps: int) -> dict[str, Any]:
    return {
        "whole_s": cent["total_s"],
        "train_phase_s": cent["run_phase_s"],
        "train_local_s": cent["train_local_s"],
        "s_per_local_step": cent["train_local_s"] / steps,
        "train_loss": (cent["summary"] or {}).get("train_loss"),
        "torch_threads": cent["torch_threads"],
        "host": cent["host"],
        **cent["memory"],
    }


RATIOS = ("ratio_raw", "ratio_excl_startup", "ratio_excl_startup_1x1", "ratio_rounds_only")


def _median_range(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "range": [min(values), max(values)]}


def _timing_pair(
    root: Path, sim: dict[str, Any], run: dict[str, Any], sizes: Sizes, steps: int, i: int
) -> dict[str, Any]:
    """One (federated, centralized) pair of `steps` local steps per site-round, back to back."""
    run = {**run, "local-steps": steps}
    total = sizes.time_rounds * sizes.cohort_sites * steps
    workers = max(1, int(sim["cpus"] / sim_cpus_per_site(sim)))
    fed_spec = _spec(root, f"time-{steps}-fed-{i}", sim, run)
    fed = run_child(f"timing-{steps}-federated-{i}", fed_spec, root=root)
    _check_complete("timing-federated", fed, sizes.cohort_sites, sizes.time_rounds)
    cent_spec = _spec(root, f"time-{steps}-cent-{i}", {**sim, "centralized": True}, run)
    cent = run_child(f"timing-{steps}-centralized-{i}", cent_spec, root=root)
    f, c = _federated_times(fed, sizes, steps, workers), _centralized_times(cent, total)
    return {
        "federated": f,
        "centralized": c,
        "ratio_raw": f["whole_s"] / c["whole_s"],
        "ratio_excl_startup": (f["engine_phase_s"] - f["startup_s"]) / c["train_phase_s"],
        "ratio_rounds_only": sum(f["round_wall_s"]) / c["train_phase_s"],
        "other_load_cores": max(f["host"]["other_load_cores"], c["host"]["other_load_cores"]),
    }


def _workload_summary(pairs: list[dict[str, Any]], total_steps: int) -> dict[str, Any]:
    out: dict[str, Any] = {"total_local_steps": total_steps, "pairs": pairs}
    for key in (*RATIOS, "other_load_cores"):
        stats = _median_range([pair[key] for pair in pairs])
        out[key], out[f"{key}_range"] = stats["median"], stats["range"]
    for side, key in (("federated", "whole_s"), ("centralized", "whole_s"),
                      ("federated", "startup_s"), ("centralized", "train_phase_s")):  # fmt: skip
        out[f"{side}_{key}_median"] = statistics.median(p[side][key] for p in pairs)
    return out


def timing(
    root: Path, sizes: Sizes, cores: int, repeats: int, steps_list: tuple[int, ...]
) -> dict[str, Any]:
    """Experiment 2: federated vs centralized wall time for the same total local steps (DP on),
    for each workload in `steps_list` (local steps per site-round), plus 1-round 1-step runs
    that measure the fixed start-up on its own. Each of the `repeats` passes runs every workload's
    pair and one 1x1 run, so all of them are interleaved (the host's load moves them a lot)."""
    sim = {
        "sites": sizes.cohort_sites, "synth_sites": sizes.cohort_sites,
        "synth_subjects_per_site": sizes.cohort_subjects, "synth_minutes": sizes.cohort_minutes,
        "cache_dir": str(root / "cache"), "cpus": cores, "epsilon": BIG_BUDGET,
    }  # fmt: skip
    run = {
        "model-options": json.dumps(sizes.model), "num-rounds": sizes.time_rounds,
        "dp": True, "fraction-evaluate": 0.0, "seed": 0,
    }  # fmt: skip
    pairs: dict[int, list[dict[str, Any]]] = {steps: [] for steps in steps_list}
    tiny: list[dict[str, Any]] = []
    for i in range(1, repeats + 1):
        for steps in steps_list:
            pairs[steps].append(_timing_pair(root, sim, run, sizes, steps, i))
        tiny_spec = _spec(root, f"time-1x1-{i}", sim, {**run, "num-rounds": 1, "local-steps": 1})
        result = run_child(f"timing-1-round-1-step-{i}", tiny_spec, root=root)
        _check_complete("timing-1-round-1-step", result, sizes.cohort_sites, 1)
        tiny.append({
            "engine_phase_s": result["run_phase_s"],
            "whole_s": result["total_s"],
            "round_wall_s": [r["wall_s"] for r in _rounds(result)],
            "host": result["host"],
        })  # fmt: skip
    startup_1x1 = statistics.median(t["engine_phase_s"] for t in tiny)
    workloads = {}
    for steps, done in pairs.items():
        for pair in done:
            fed_s, cent_s = pair["federated"], pair["centralized"]
            startup_free = fed_s["engine_phase_s"] - startup_1x1
            pair["ratio_excl_startup_1x1"] = startup_free / cent_s["train_phase_s"]
        total = sizes.time_rounds * sizes.cohort_sites * steps
        workloads[str(steps)] = _workload_summary(done, total)
    fed_startups = [p["federated"]["startup_s"] for done in pairs.values() for p in done]
    return {
        "sim": sim,
        "run": run,
        "rounds": sizes.time_rounds,
        "sites": sizes.cohort_sites,
        "workloads": workloads,
        "startup": {
            "one_round_one_step_runs": tiny,
            "one_round_one_step_engine_phase_s": _median_range([t["engine_phase_s"] for t in tiny]),
            "from_federated_runs_s": _median_range(fed_startups),
        },
        "definitions": TIMING_DEFINITIONS,
    }


TIMING_DEFINITIONS = {
    "workloads": "keyed by local steps per site-round; total local steps = rounds x sites x "
    "steps in both the federated and the centralized run",
    "pairs": "interleaved (federated, centralized) runs; the ratios are their medians, "
    "*_range their min and max",
    "ratio_raw": "whole simulate() wall times (RunSummary.wall_s, warm cache): "
    "federated / centralized",
    "engine_phase_s": "federated: from simulate()'s 'starting Flower's simulation "
    "engine' to its return (Ray, ServerApp, rounds, final model, site reports)",
    "train_phase_s": "centralized: from 'training on pooled data' to simulate()'s "
    "return (model, pooled train_local, one held-out evaluation, model save, site "
    "reports); train_local_s is the pooled train_local call alone",
    "startup_s": "from the run's own timings: engine phase outside the metrics.json "
    "rounds (Ray start, actor pool, ServerApp set-up, final model, teardown) + round 1's "
    "wall_s minus the median of rounds 2..R (each Ray worker's first ClientApp call "
    "imports torch/Opacus and the app)",
    "one_round_one_step_engine_phase_s": "the fixed start-up measured on its own: engine "
    "phase of a 1-round run with 1 local step per site (Ray start, ClientApp processes and "
    "their imports, one tiny round, final model, site reports, Ray shutdown)",
    "ratio_excl_startup": "(federated engine phase - startup_s) / centralized train phase",
    "ratio_excl_startup_1x1": "(federated engine phase - median 1x1 engine phase) / "
    "centralized train phase; the subtracted run also trains 1 step per site, so this is "
    "slightly optimistic",
    "ratio_rounds_only": "sum of metrics.json round wall_s / centralized train phase; "
    "NOT start-up free: round 1 holds the workers' warm-up",
    "host": "per run: load1 at start and end, and other_load_cores = (host CPU time busy "
    "from /proc/stat - CPU time of this run's process tree from getrusage) / wall time: "
    "the cores other processes used meanwhile (0 = quiet; the run itself can use --cores)",
    "other_load_cores": "per pair: the larger of its two runs'; per workload: median, range",
    "s_per_site_step_with_overheads": "federated steady round x concurrent ClientApps / "
    "(sites x local steps): one-thread step time plus each site-round's fixed work "
    "(model build, Opacus set-up, ε accounting, encode, messaging), per step",
    "s_per_local_step": "centralized train_local time / total steps (torch_threads "
    "intra-op threads)",
    "below_1": "a ratio below 1 is possible: the engine runs concurrent_clientapps sites "
    "at once with one thread each, while the centralized train_local is one process whose "
    "intra-op threads speed this small model up little and suffer most from other load",
}


def sim_cpus_per_site(sim: dict[str, Any]) -> float:
    return float(sim.get("cpus_per_site", 1.0))


def scaling(root: Path, sizes: Sizes, cores: int) -> dict[str, Any]:
    """Experiment 3: N sites x 2 rounds: time per site-round and peak tree memory."""
    out: dict[str, Any] = {"runs": {}}
    run = {
        "model-options": json.dumps(sizes.model), "num-rounds": sizes.scale_rounds,
        "local-steps": sizes.scale_steps, "dp": True, "seed": 0, "batch-subjects": 2,
    }  # fmt: skip
    out["run"] = run
    for n in sizes.scale_sites:
        sim = {
            "sites": n, "synth_sites": n, "synth_subjects_per_site": sizes.scale_subjects,
            "synth_minutes": sizes.scale_minutes, "cache_dir": str(root / "cache"), "cpus": cores,
            "epsilon": BIG_BUDGET,
        }  # fmt: skip
        result = run_child(f"scale-{n}", _spec(root, f"scale-{n}", sim, run), root=root)
        _check_complete(f"scale-{n}", result, n, sizes.scale_rounds)
        site_rounds = n * sizes.scale_rounds
        rounds_total = sum(r["wall_s"] for r in _rounds(result))
        out["runs"][str(n)] = {
            "sim": sim,
            "whole_s": result["total_s"],
            "run_phase_s": result["run_phase_s"],
            "rounds_total_s": rounds_total,
            "round_wall_s": [r["wall_s"] for r in _rounds(result)],
            "s_per_site_round": result["run_phase_s"] / site_rounds,
            "s_per_site_round_rounds_only": rounds_total / site_rounds,
            "s_per_site_round_last_round": _rounds(result)[-1]["wall_s"] / n,
            **result["memory"],
        }
    return out


# ---- main ---------------------------------------------------------------------------------------


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def _compression_rows(comp: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for name, target in (("fp16", "<= 0.51"), ("int8", "<= 0.27")):
        r = comp[name]
        rows.append((f"{name} bytes/site/round / fp32 (payload)", f"{r['payload_ratio']:.4f}",
                     target))  # fmt: skip
        rows.append((f"{name} bytes/site/round / fp32 (wire)", f"{r['wire_ratio']:.4f}",
                     f"(info; / fedavg wire: {r['wire_ratio_vs_fedavg_wire']:.4f})"))  # fmt: skip
    for name in ("fp16", "int8"):
        ratio = comp[name]["train_loss_ratio"]
        rows.append((f"{name} final train loss / fedavg (no DP)", f"{ratio:.6f}", "1 +- 0.02"))
    for name in ("fp16", "int8"):
        ratio = comp[name].get("eval_loss_ratio", math.nan)
        rows.append((f"{name} final held-out loss / fedavg (no DP)", f"{ratio:.6f}", "(info)"))
    if "none-repeat" in comp:
        ratio = comp["none-repeat"]["train_loss_ratio"]
        rows.append(("fedavg rerun train loss / fedavg", f"{ratio:.6f}", "(noise floor)"))
    return rows


def _timing_rows(t: dict[str, Any]) -> list[tuple[str, str, str]]:
    def spread(w: dict[str, Any], key: str, fmt: str = ".2f") -> str:
        low, high = w[f"{key}_range"]
        return f"{w[key]:{fmt}} ({low:{fmt}}-{high:{fmt}})"

    rows = []
    for steps, w in t["workloads"].items():
        n, shape = len(w["pairs"]), f"{t['rounds']}r x {t['sites']} sites x {steps} steps"
        rows += [
            (f"fed / centralized time, {shape}: whole runs", spread(w, "ratio_raw"),
             f"<= 1.3 (median, range of {n} pairs)"),
            ("  same, excl. start-up (run's own timings)", spread(w, "ratio_excl_startup"),
             "(start-up free)"),
            ("  same, excl. start-up (1x1 runs)", spread(w, "ratio_excl_startup_1x1"),
             "(cross-check)"),
            ("  fed whole / centralized whole (s)",
             f"{w['federated_whole_s_median']:.0f} / {w['centralized_whole_s_median']:.0f}",
             f"{w['total_local_steps']} local steps"),
            ("  other processes' load during the pairs (cores)",
             spread(w, "other_load_cores", ".1f"), "(0 = quiet host)"),
        ]  # fmt: skip
    one = t["startup"]["one_round_one_step_engine_phase_s"]
    fed = t["startup"]["from_federated_runs_s"]
    rows += [
        ("Flower/Ray fixed start-up: 1-round 1-step run (s)",
         f"{one['median']:.1f} ({one['range'][0]:.1f}-{one['range'][1]:.1f})",
         "engine phase, median (range)"),
        ("Flower/Ray fixed start-up: in the runs above (s)",
         f"{fed['median']:.1f} ({fed['range'][0]:.1f}-{fed['range'][1]:.1f})",
         "outside rounds + round-1 excess"),
    ]  # fmt: skip
    return rows


def _scaling_rows(runs: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for n, r in runs.items():
        per = "/".join(
            f"{r[k]:.2f}"
            for k in (
                "s_per_site_round",
                "s_per_site_round_rounds_only",
                "s_per_site_round_last_round",
            )
        )
        rows.append((f"{n} sites x 2 rounds: s/site-round", per, "whole/rounds/round 2"))
        mem = f"{_mib(r['peak_tree_rss_bytes'])} / {_mib(r['peak_tree_pss_bytes'])}"
        rows.append((f"{n} sites x 2 rounds: peak tree RSS / PSS (MiB)", mem, "(info)"))
    return rows


def _rows(payload: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    if "compression" in payload:
        rows += _compression_rows(payload["compression"]["runs"])
    if "timing" in payload:
        rows += _timing_rows(payload["timing"])
    if "scaling" in payload:
        rows += _scaling_rows(payload["scaling"]["runs"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke sizes (about 4 minutes)")
    parser.add_argument("--cores", type=int, default=2, help="CPUs for each simulation")
    parser.add_argument("--cache-dir", type=Path, help="reuse this cohort/window-store cache")
    parser.add_argument("--keep", action="store_true", help="keep the temporary run folders")
    parser.add_argument(
        "--time-steps", type=int, nargs="+",
        help="experiment 2's workloads: local steps per site-round (default 32 128; 2 --quick)",
    )  # fmt: skip
    parser.add_argument(
        "--timing-repeats", type=int, help="passes of experiment 2 (default 2; 1 --quick)"
    )
    parser.add_argument(
        "--no-repeat", action="store_true", help="no second fedavg run (loss noise floor)"
    )
    parser.add_argument(
        "--only",
        choices=("compression", "timing", "scaling"),
        action="append",
        help="run only these experiments (repeatable)",
    )
    parser.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(*args.child)
        return
    allowed = sorted(os.sched_getaffinity(0))
    if args.cores > len(allowed):
        parser.error(f"--cores {args.cores}: only {len(allowed)} CPUs available")
    sizes = QUICK if args.quick else FULL
    if args.time_steps:
        sizes = replace(sizes, time_steps=tuple(args.time_steps))
    # Orphans of the child (Ray daemons) are re-parented here, so they stay in the sampled tree.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    root = Path(tempfile.mkdtemp(prefix="biofp-bench-fed-"))
    if args.cache_dir:
        args.cache_dir.mkdir(parents=True, exist_ok=True)
        (root / "cache").symlink_to(args.cache_dir.resolve())
    cores = args.cores
    os.sched_setaffinity(0, allowed[:cores])  # children inherit; ids below are rebased to these
    only = set(args.only or ("compression", "timing", "scaling"))
    payload: dict[str, Any] = {
        "sizes": asdict(sizes),
        "quick": args.quick,
        "cores": cores,
        "cpus": allowed[:cores],
        "loadavg_before": os.getloadavg(),
        "note": "wall-clock timings on a shared machine: noisy",
    }
    started = time.monotonic()
    try:
        print(f"runs in {root}")
        if "compression" in only:
            repeat = not (args.no_repeat or args.quick)
            payload["compression"] = compression(root, sizes, cores, repeat=repeat)
        if "timing" in only:
            repeats = args.timing_repeats or (1 if args.quick else 2)
            payload["timing"] = timing(root, sizes, cores, repeats, sizes.time_steps)
        if "scaling" in only:
            payload["scaling"] = scaling(root, sizes, cores)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    payload["loadavg_after"] = os.getloadavg()
    payload["bench_wall_s"] = time.monotonic() - started
    payload["parent_max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    name = "federation-quick" if args.quick else "federation"
    if only != {"compression", "timing", "scaling"}:
        name += "-partial"
    report(name, _rows(payload), payload)


if __name__ == "__main__":
    main()
