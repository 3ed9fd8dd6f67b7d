"""Deployment cost: a real SuperLink (TLS + SuperNode auth) and two SuperNodes on 127.0.0.1,
against Flower's simulation engine on the same two sites with the same run config.

.venv/bin/python bench/deployment.py [--rounds 3] [--smoke]
.venv/bin/python bench/deployment.py --containers [--cold] [--smoke]     # as root, with buildah

- client start -> first round served: seconds from launching ``biofp client start`` (the run is
  already submitted and waiting for sites) to the site's first training reply leaving it (its
  audit log gets the line). Includes the pre-start checks, the window store (cached), Flower's
  SuperNode start, activation, polling, the ClientApp process start and one round of training.
- per-round wall time (the server's ``RoundMetrics.wall_s``, rounds 2..R, so start-up is not
  counted) deployed and simulated, and their ratio: what TLS, authentication, HTTP polling and one
  ClientApp process per message cost over the simulation engine's long-lived workers. The same
  deployment with ``--insecure`` (no TLS, no node authentication) separates TLS + auth from the
  rest of the deployment runtime.

``--containers``: the same federation in the hospital containers (bench/containers.py: the
images built with deploy/build-images.sh --offline and run with buildah, the two-site check, the
bad-input refusals), against the plain-process deployment of the same run: build time (after a
BioFP source change, after reverting it, with nothing changed; ``--cold`` also times a build
without any cached step first), image sizes, container start -> first round served,
per-round wall time in containers / as plain processes.

The sites are the synthetic cohort's (same seed, same partition) in both cases; each run starts
from empty ledgers. Processes are started with the same harness as tests/test_deployment.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from localfed import (  # noqa: E402  (the shared harness lives with the tests)
    TINY_MODEL,
    LocalFederation,
    make_federation,
    read_json,
    site_cohort,
    wait_until,
    write_app,
)

from biofp_core.audit import AuditLog  # noqa: E402


def _per_site(label: str, seconds: dict[str, float]) -> list[tuple[str, str, str]]:
    """One table row per site: `label (site)` and its seconds."""
    return [(f"{label} ({name})", f"{s:.1f} s", "-") for name, s in sorted(seconds.items())]


def run_overrides(rounds: int, smoke: bool) -> dict:
    """The run both deployments execute (hyphenated run-config keys)."""
    run = {
        "num-rounds": rounds, "min-sites": 2, "fraction-evaluate": 0.0, "local-steps": 4,
        "batch-subjects": 2, "bag-size": 8, "wait-timeout-s": 600.0, "round-timeout-s": 900.0,
    }  # fmt: skip
    if smoke:
        run.update({"local-steps": 2, "bag-size": 4, "model-options": TINY_MODEL})
    return run


def _first_reply(fed: LocalFederation, name: str) -> bool:
    return any(e.message_type.startswith("train") for e in
               AuditLog.at(fed.sites[name].state_dir).entries())  # fmt: skip


def deployed(root: Path, cohort: dict, run: dict, *, insecure: bool = False) -> dict:
    """Start-to-first-round per site and per-round wall times of the deployed run."""
    names = ["north", "south"]
    with make_federation(root, names, cache_dir=root / "cache", insecure=insecure,
                         **cohort) as fed:  # fmt: skip
        fed.start_server()
        for site in fed.sites.values() if not insecure else ():
            fed.register(site)
        app = write_app(fed, root / "app")
        fed.submit(app, {**run, "out-dir": "bench"})
        started = time.perf_counter()
        for site in fed.sites.values():
            fed.start_client(site)
        first: dict[str, float] = {}
        while len(first) < len(fed.sites):
            for name in fed.sites:
                if name not in first and _first_reply(fed, name):
                    first[name] = time.perf_counter() - started
            if time.perf_counter() - started > 900:
                raise TimeoutError("no first round within 900 s")
            time.sleep(0.1)
        metrics = wait_until(lambda: _finished(fed.workdir / "bench"), timeout_s=1800,
                             what="the deployed run", poll_s=0.5)  # fmt: skip
    return {"first_round_s": first, "rounds": _round_walls(metrics)}


def simulated(root: Path, cohort: dict, run: dict) -> dict:
    """Per-round wall times of the same run in Flower's simulation engine."""
    from simulations.run import simulate

    cfg = site_cohort(root, ["north", "south"], cache_dir=root / "cache", **cohort)
    cfg = cfg.model_copy(update={"out": root / "sim-run", "cpus": 2, "reproducible_noise": True})
    run = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in run.items()}
    cfg = type(cfg).model_validate({**cfg.model_dump(), "run": run})
    simulate(cfg)
    metrics = _finished(cfg.out)
    assert metrics is not None, "the simulation did not finish"
    return {"rounds": _round_walls(metrics)}


def _finished(run_dir: Path) -> dict | None:
    doc = read_json(run_dir / "metrics.json")
    if doc and doc.get("status") == "failed":
        raise RuntimeError(f"run failed: {doc.get('error')}")
    return doc if doc and doc.get("status") == "completed" else None


def _round_walls(metrics: dict) -> list[float]:
    return [float(r["wall_s"]) for r in metrics["rounds"]]


def containers(args: argparse.Namespace, rounds: int, cohort: dict, run: dict) -> None:
    """Build the images, run the container check, and the same run as plain processes."""
    import signal

    import containers as ctr

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop and remove the containers
    builds = ctr.build_images(cold=args.cold, skip=args.no_build)
    print(f"builds: {builds}", flush=True)
    with tempfile.TemporaryDirectory(prefix="biofp-bench-containers-") as tmp:
        root = Path(tmp)
        found = ctr.check_containers(root / "containers", run, **cohort)
        print(f"containers: {found}", flush=True)
        plain = deployed(root / "plain", cohort, run)
    box_round = statistics.mean(found["round_s"][1:])
    plain_round = statistics.mean(plain["rounds"][1:])
    size = {name: info["bytes"] for name, info in found["images"].items()}
    rows = [
        *((f"build, {k.split('_')[1]} (deploy/build-images.sh --offline, both images)",
           f"{v / 60:.1f} min", "-") for k, v in builds.items()),
        *((f"image size {name.split('/')[-1]}", f"{b / 1e6:.0f} MB", "report")
          for name, b in size.items()),
        ("server container start -> port open", f"{found['server_start_s']:.1f} s", "-"),
        *_per_site("site container created (buildah from, vfs)", found["site_create_s"]),
        *_per_site("site container start -> first round served", found["first_round_s"]),
        ("site container killed, a new one started -> accepted by the SuperLink",
         f"{found['north_replaced_accepted_s']:.1f} s", "-"),
        ("site container killed, a new one started -> its first round of the next run",
         f"{found['north_replaced_first_round_s']:.1f} s", "-"),
        ("plain process start -> first round served (mean)",
         f"{statistics.mean(plain['first_round_s'].values()):.1f} s", "-"),
        ("round wall in containers, rounds 2..R (mean)", f"{box_round:.2f} s", "-"),
        ("round wall as plain processes, rounds 2..R (mean)", f"{plain_round:.2f} s", "-"),
        ("containers / plain processes per round", f"{box_round / plain_round:.2f}x", "report"),
    ]  # fmt: skip
    payload = {
        "rounds": rounds, "sites": 2, "cohort": cohort, "run": run, "smoke": args.smoke,
        **builds, "containers": found, "plain_first_round_s": plain["first_round_s"],
        "plain_round_s": plain["rounds"], "container_round_mean_s": box_round,
        "plain_round_mean_s": plain_round, "container_over_plain": box_round / plain_round,
    }  # fmt: skip
    report("containers-smoke" if args.smoke else "containers", rows, payload)
    health = found["site_health"]
    print(f"site HEALTHCHECK while serving: exit {health['returncode']}: {health['lines']}")
    print("north killed and replaced:", found["north_restart_log"])
    print("refusals (each site container's whole log):")
    for what, lines in found["refusals"].items():
        print(f"  {what}: {lines[0]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="federated rounds (>= 2)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 2 rounds")
    parser.add_argument(
        "--containers",
        action="store_true",
        help="the hospital containers (buildah) against plain processes",
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="with --containers: also time a build without cached steps",
    )
    parser.add_argument(
        "--no-build", action="store_true", help="with --containers: run the images as they are"
    )
    args = parser.parse_args()
    rounds = 2 if args.smoke else max(2, args.rounds)
    cohort = {"subjects": 6, "minutes": 1.0} if args.smoke else {"subjects": 8, "minutes": 2.0}
    run = run_overrides(rounds, args.smoke)
    if args.containers:
        containers(args, rounds, cohort, run)
        return
    with tempfile.TemporaryDirectory(prefix="biofp-bench-deploy-") as tmp:
        root = Path(tmp)
        dep = deployed(root / "deployed", cohort, run)
        print(f"deployed: {dep}", flush=True)
        plain = deployed(root / "insecure", cohort, run, insecure=True)
        print(f"deployed --insecure: {plain}", flush=True)
        sim = simulated(root / "simulated", cohort, run)
    dep_round = statistics.mean(dep["rounds"][1:])
    plain_round = statistics.mean(plain["rounds"][1:])
    sim_round = statistics.mean(sim["rounds"][1:])
    ratio = dep_round / sim_round
    rows = [
        *_per_site("client start -> first round served", dep["first_round_s"]),
        ("deployed round wall, TLS + auth, rounds 2..R (mean)", f"{dep_round:.2f} s", "-"),
        ("deployed round wall, --insecure (mean)", f"{plain_round:.2f} s", "-"),
        ("simulated round wall, rounds 2..R (mean)", f"{sim_round:.2f} s", "-"),
        ("deployed (TLS + auth) / simulated per round", f"{ratio:.2f}x", "report"),
        ("TLS + auth / --insecure per round", f"{dep_round / plain_round:.2f}x", "report"),
    ]  # fmt: skip
    payload = {
        "rounds": rounds, "sites": 2, "cohort": cohort, "run": run, "smoke": args.smoke,
        "first_round_s": dep["first_round_s"], "deployed_round_s": dep["rounds"],
        "simulated_round_s": sim["rounds"], "deployed_round_mean_s": dep_round,
        "insecure_round_s": plain["rounds"], "insecure_round_mean_s": plain_round,
        "insecure_first_round_s": plain["first_round_s"],
        "tls_auth_over_insecure": dep_round / plain_round,
        "simulated_round_mean_s": sim_round, "overhead_ratio": ratio,
    }  # fmt: skip
    report("deployment-smoke" if args.smoke else "deployment", rows, payload)


if __name__ == "__main__":
    main()
