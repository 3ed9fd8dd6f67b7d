"""BioFP ServerApp: federated pretraining of the shared encoder, round by round.

Reads the run config, builds the strategy it names (composed with compression and budget-aware
sampling when asked), resumes from the run directory's last checkpoint (or starts from the
seeded initial model), runs the remaining rounds with a checkpoint and a metrics report after
each, and saves the final model with every site's ε in its card. If the run config asks for
it, the sites are then queried for released fingerprints and local probes (:mod:`server.queries`),
also when a resumed run finds every round done.
"""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.exit import add_exit_handler

from biofp_core.protocol import RunConfig
from server.queries import run_queries
from server.rounds import run_rounds
from server.rundir import RunDirectory
from strategies.registry import run_strategy

log = logging.getLogger(__name__)

app = ServerApp()

STOPPED = "stopped before the run ended (flwr stop, SIGTERM, or the SuperLink went away)"
_active: list[RunDirectory] = []  # runs of this process still in progress
_handler_added = False


def _mark_stopped() -> None:
    """Flower's exit handler (``flwr stop``, SIGTERM): leave "running" in every active run's
    metrics.json. Runs before Flower's 5 s force-exit timer starts."""
    for run_dir in list(_active):
        run_dir.stop(STOPPED)


def _watch(run_dir: RunDirectory) -> None:
    global _handler_added
    if not _handler_added:
        add_exit_handler(_mark_stopped, run_before_force_exit=True)
        _handler_added = True
    _active.append(run_dir)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or resume) the federated run described by the run config."""
    run = RunConfig.from_run_config(context.run_config)
    strategy = run_strategy(run)
    run_dir = RunDirectory(run, strategy)
    done, arrays = run_dir.start(flower_run_id=context.run_id)
    _watch(run_dir)
    try:
        arrays = run_rounds(
            strategy, grid, run, arrays=arrays, first_round=done + 1, on_round=run_dir.record_round
        )
        path = run_dir.finish(arrays)
    except Exception as exc:  # a BioFPError (one line), or a bug
        run_dir.fail(exc)
        raise
    except BaseException:  # flwr stop (RunNotRunningException), SIGTERM (SystemExit)...
        run_dir.stop(STOPPED)
        raise
    finally:
        _active.remove(run_dir)
    log.info("final model after %d rounds: %s", run.num_rounds, path)
    run_queries(grid, run, arrays, run_key=run_dir.run_key, model_path=path)
