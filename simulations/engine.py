"""Flower's Simulation Engine, run the way ``flwr run`` runs it, from one Python call.

:func:`run_federation` starts ``server.app:app`` and ``client.app:app`` with one virtual SuperNode
per emulated site. Both apps get the same run config: the ServerApp through its Context, every
ClientApp through the ``[tool.flwr.app.config]`` of a minimal app folder written for the run
(exactly how Flower's own ``flwr-simulation`` process fuses an app's config for its nodes).

Ray on a small machine: at most ``cpus`` CPUs, ``cpus_per_site`` per ClientApp (so
``cpus / cpus_per_site`` ClientApps run at once), no dashboard, Ray's own logs at ERROR and not
forwarded. Ray is started here (:func:`start_ray`), before Flower's engine, which then uses it as
it is (``RayBackend.init_ray`` only starts Ray when none is running) and shuts it down at the end.

Start-up on 2 cores (``bench/federation.py``): ``ray.init`` (GCS, raylet and five Python helper
processes) ~3-5 s, each ClientApp process importing torch, Opacus, Flower and BioFP ~4-5 s (two at
once), the first round's one-off work (torch's first optimizer, the first ε) ~1 s.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from biofp_core.errors import BioFPError, ConfigError
from biofp_core.protocol import RunConfig
from server.app_folder import write_app_folder
from server.report import RoundMetrics, RunReport

log = logging.getLogger(__name__)

LOG_NAME = "run.log"
_LOGGERS = ("flwr", "server", "client", "strategies", "simulations", "biofp_core")


def backend_config(
    *, cpus: int, cpus_per_site: float, ray_address: str | None = None
) -> dict[str, Any]:
    """Ray settings for Flower's engine (see the module docstring).

    With `ray_address` the engine joins that existing Ray cluster (``ray start --head`` on
    some machine, BioFP installed on every node) instead of starting one: the cluster's own
    CPUs are used, ``cpus_per_site`` each per ClientApp.
    """
    if ray_address:
        return {
            "client_resources": {"num_cpus": cpus_per_site, "num_gpus": 0.0},
            "init_args": {
                "address": ray_address, "logging_level": "ERROR", "log_to_driver": False,
            },
        }  # fmt: skip
    return {
        "client_resources": {"num_cpus": min(cpus_per_site, cpus), "num_gpus": 0.0},
        "init_args": {
            "num_cpus": cpus, "num_gpus": 0, "include_dashboard": False,
            "logging_level": "ERROR", "log_to_driver": False,
        },
    }  # fmt: skip


def start_ray(init_args: dict[str, Any]) -> bool:
    """Start Ray for Flower's engine with `init_args`; False if Ray is already running.

    Flower's ``RayBackend`` would start Ray with a job ``runtime_env`` that carries the driver's
    ``sys.path`` as PYTHONPATH. Any runtime_env makes Ray launch workers through its runtime-env
    agent (``setup_worker.py``), so the workers Ray prestarts during ``ray.init`` go unused and
    every ClientApp actor waits for a fresh process: measured 2.7-2.9 s until both actors were
    ready, against 0.4-0.5 s without it (2 busy cores). Here the same PYTHONPATH is exported to
    the environment every Ray process inherits, with no runtime_env, and the actors take the
    prestarted workers.
    """
    import ray

    if ray.is_initialized():
        return False
    inherited = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    paths = dict.fromkeys(p for p in [*sys.path, *inherited] if p)  # once each, across runs
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)  # what RayBackend.init_ray exports too
    ray.init(**init_args)
    return True


@contextmanager
def run_log(path: Path) -> Iterator[None]:
    """INFO logs of Flower and BioFP go to `path`; only warnings and errors reach the console."""
    to_file = logging.FileHandler(path)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_console = logging.StreamHandler()
    to_console.setLevel(logging.WARNING)
    to_console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    saved = []
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate, list(logger.handlers)))
        logger.handlers = [to_file, to_console]
        logger.setLevel(logging.INFO)
        logger.propagate = False
    try:
        yield
    finally:
        for logger, level, propagate, handlers in saved:
            logger.handlers = handlers
            logger.setLevel(level)
            logger.propagate = propagate
        to_file.close()


@contextmanager
def watch_rounds(run_dir: Path, on_round: Callable[[RoundMetrics], None] | None) -> Iterator[None]:
    """Call `on_round` for every round the server records in its metrics.json, while it runs."""
    stop = threading.Event()
    seen: set[int] = set()

    def poll() -> None:
        while True:
            try:
                report = RunReport.read(run_dir)
            except BioFPError:
                report = None  # unreadable right now: try again on the next tick
            for rnd in report.rounds if report else []:
                if rnd.server_round not in seen and on_round is not None:
                    seen.add(rnd.server_round)
                    on_round(rnd)
            if stop.wait(0.5):
                return

    thread = threading.Thread(target=poll, name="biofp-round-watcher", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def require_engine() -> None:
    """Fail fast, in one line, where Flower's simulation engine cannot run: without Ray (the
    site and server images ship without it).

    Raises
    ------
    ConfigError
        Ray is not installed.
    """
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ConfigError(
            "federated simulation needs Ray (Flower's simulation engine), not installed here: "
            "pip install 'flwr[simulation]' (the site and server images ship without it; "
            "--centralized runs without it)"
        ) from None


def run_federation(
    run: RunConfig,
    *,
    num_sites: int,
    cpus: int,
    cpus_per_site: float,
    on_round: Callable[[RoundMetrics], None] | None = None,
    ray_address: str | None = None,
) -> None:
    """Run the ServerApp and `num_sites` ClientApps in Flower's Simulation Engine.

    Uses ``flwr.simulation.run_simulation._run_simulation``, the engine entry point Flower's
    ``flwr-simulation`` process calls: the public ``run_simulation`` gives the apps no run config.
    The run directory (``run.out_dir``) receives the Flower app folder and ``run.log``.

    Raises
    ------
    BioFPError
        Whatever the ServerApp raised (e.g. FederationError when no site contributed a round).
    """
    from flwr.app import Context, RecordDict
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    from client.app import app as client_app
    from server.app import app as server_app

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silence a Ray tip
    run_dir = run.run_dir
    run_config = run.to_run_config()
    app_dir = write_app_folder(run_dir / "flower-app", run_config, name="biofp-simulation")
    context = Context(
        run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    backend = backend_config(cpus=cpus, cpus_per_site=cpus_per_site, ray_address=ray_address)
    with run_log(run_dir / LOG_NAME), watch_rounds(run_dir, on_round):
        started = start_ray(backend["init_args"])
        if ray_address:
            import ray

            cpus_there = ray.cluster_resources().get("CPU", 0)
            log.info("joined the Ray cluster at %s (%g CPUs)", ray_address, cpus_there)
        try:
            _run_simulation(
                num_supernodes=num_sites, client_app=client_app, server_app=server_app,
                backend_config=backend, server_app_context=context, app_dir=str(app_dir),
                is_app=True, exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            )  # fmt: skip
        finally:
            if started:  # Flower's backend shuts Ray down at the end; this covers an early error
                import ray

                ray.shutdown()
