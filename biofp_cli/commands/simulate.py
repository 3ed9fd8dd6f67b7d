"""``biofp simulate``: the README's main job, from the command line.

``biofp_cli.cli`` forwards ``biofp simulate ...`` here without importing this package's
dependencies (Flower, Ray) until the command runs, so ``biofp --help`` stays fast. Flags override
the values of ``--config sim.toml``; unset flags leave them alone.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from biofp_core.errors import ConfigError

if TYPE_CHECKING:
    from server.dashboard.serve import BackgroundDashboard
    from server.report import RoundMetrics
    from simulations.run import RunSummary

app = typer.Typer(add_completion=False, no_args_is_help=False)
console = Console()


def _run_overrides(**flags: Any) -> dict[str, Any]:
    """Run-config keys (hyphenated) for the flags that were given."""
    return {key.replace("_", "-"): v for key, v in flags.items() if v is not None}


def _compare_overrides(models: str | None, epsilons: str | None) -> dict[str, Any] | None:
    """``[compare]`` keys from --compare and --curve-epsilons (None: neither given)."""
    from simulations.config import COMPARISONS

    update: dict[str, Any] = {}
    if models is not None:
        names = [m.strip() for m in models.split(",") if m.strip()]
        update["models"] = list(COMPARISONS) if names == ["all"] else names
    if epsilons is not None:
        try:
            update["epsilons"] = [float(e) for e in epsilons.split(",") if e.strip()]
        except ValueError:
            raise ConfigError(f"--curve-epsilons: not a list of numbers: {epsilons!r}") from None
    return update or None


def _render(summary: RunSummary) -> Table:
    """One row per emulated site: subjects, ε spent, budget left."""
    table = Table(title=f"{summary.mode} run in {summary.out_dir}: {summary.status}")
    for col in ("site", "modality", "train/holdout subjects", "windows", "ε spent", "budget left"):
        table.add_column(col)
    for site in summary.sites:
        ledger = site.ledger
        table.add_row(
            site.name, site.modality, f"{site.subjects_train}/{site.subjects_holdout}",
            str(site.windows), f"{ledger.epsilon:.3g}", f"{ledger.budget_left:.3g}",
        )  # fmt: skip
    loss = "-" if summary.eval_loss is None else f"{summary.eval_loss:.4f}"
    eps = "-" if summary.max_epsilon is None else f"{summary.max_epsilon:.3g}"
    table.caption = (
        f"{summary.rounds} rounds in {summary.wall_s:.0f} s; held-out loss {loss}; max ε {eps}; "
        f"{summary.refused_replies} refused, {summary.failed_replies} failed replies; "
        f"model: {summary.model_path}"
    )
    return table


@app.command()
def simulate(
    config: Path | None = typer.Option(None, "--config", help="sim.toml (flags override it)"),
    sites: int | None = typer.Option(None, "--sites", help="emulated hospitals (default: 4)"),
    rounds: int | None = typer.Option(None, "--rounds", help="federated rounds (default: 3)"),
    strategy: str | None = typer.Option(None, "--strategy", help="strategy (default: fedavg)"),
    model: str | None = typer.Option(None, "--model", help="m2ae or siamquality (default: m2ae)"),
    dp: bool | None = typer.Option(None, "--dp/--no-dp", help="subject-level DP-SGD (default: on)"),
    epsilon: float | None = typer.Option(
        None, "--epsilon", help="each site's ε budget (default: 8; none with --no-dp)"
    ),
    out: Path | None = typer.Option(None, "--out", help="run directory (default: biofp-sim)"),
    centralized: bool | None = typer.Option(
        None, "--centralized/--federated", help="pooled-data baseline instead (default: federated)"
    ),
    collect_fingerprints: bool | None = typer.Option(
        None,
        "--collect-fingerprints/--no-collect-fingerprints",
        help="after the last round, ask each site for fingerprints released under its policy",
    ),
    probe_tasks: str | None = typer.Option(
        None,
        "--probe-tasks",
        help="label columns each site probes on its own fingerprints, e.g. af,hypertension",
    ),
    report: bool | None = typer.Option(
        None,
        "--report/--no-report",
        help="then train comparison models, study released fingerprints, write OUT/report.md "
        "and plots (default: on; federated runs)",
    ),
    cohort: str | None = typer.Option(
        None, "--cohort", help="a shipped federation: 'public' (one site per public cohort)"
    ),
    quick: bool = typer.Option(False, "--quick", help="with --cohort: the few-minute CI variant"),
    compare: str | None = typer.Option(
        None,
        "--compare",
        help="--cohort public: the report also trains these, a comma list of local (each site "
        "alone), nodp, pooled, ablation, or 'all'",
    ),
    curve_epsilons: str | None = typer.Option(
        None,
        "--curve-epsilons",
        help="--cohort public: federated DP runs at these per-site budgets for the report's "
        "utility-vs-ε curve, e.g. 1,2,4",
    ),
    data_root: Path | None = typer.Option(
        None,
        "--data-root",
        help="--cohort public: the cohorts' folder (default: $BIOFP_SHARED_DATA or ../shared/data)",
    ),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="run on this existing Ray cluster (host:port)"
    ),
    dashboard: bool = typer.Option(
        False, "--dashboard", help="serve the live dashboard of this run on 127.0.0.1 (then wait)"
    ),
    dashboard_port: int = typer.Option(8050, "--dashboard-port", help="the dashboard's port"),
) -> None:
    """Federated pretraining on emulated hospitals with the real ClientApp and ServerApp,
    in Flower's simulation engine; writes config, per-round metrics, ledgers and the model
    (and, when asked, released fingerprints and federated_eval.json), then OUT/report.md unless
    --no-report."""
    from simulations.public import cohort_config
    from simulations.run import load_simulation_config
    from simulations.run import simulate as run_simulation

    if cohort is not None:
        if config is not None:
            raise ConfigError("give --cohort or --config, not both")
        config = cohort_config(cohort, quick=quick)
    elif quick:
        raise ConfigError("--quick needs --cohort")
    cfg = load_simulation_config(
        config, sites=sites, epsilon=epsilon, out=out, centralized=centralized, report=report,
        data_root=data_root, ray_address=ray_address,
        compare=_compare_overrides(compare, curve_epsilons),
        run=_run_overrides(
            num_rounds=rounds, strategy=strategy, model=model, dp=dp,
            collect_fingerprints=collect_fingerprints, probe_tasks=probe_tasks,
        ),
    )  # fmt: skip
    if "report" not in cfg.model_fields_set:  # set by neither flag nor sim.toml: on here
        cfg = cfg.model_copy(update={"report": True})
    live = _start_dashboard(cfg.out, dashboard_port) if dashboard else None
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total} rounds"), TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=console, transient=True) as progress:
        total = 1 if cfg.centralized else cfg.run.num_rounds
        task = progress.add_task("starting", total=total)

        def on_round(metrics: RoundMetrics) -> None:
            loss = "-" if metrics.train_loss is None else f"{metrics.train_loss:.4f}"
            progress.update(
                task, completed=metrics.server_round,
                description=f"round {metrics.server_round}: {metrics.contributed}/"
                f"{metrics.sampled} sites, loss {loss}",
            )  # fmt: skip

        try:
            summary = run_simulation(
                cfg, on_stage=lambda text: progress.update(task, description=text),
                on_round=on_round,
            )  # fmt: skip
        except BaseException:
            if live is not None:
                live.stop()
            raise
    console.print(_render(summary))
    if summary.report_path is not None:
        console.print(f"report: {summary.report_path}")
    if live is not None:
        console.print(f"dashboard still at {live.settings.url} (Ctrl-C to stop)")
        _serve_until_stopped(live)


def _serve_until_stopped(live: BackgroundDashboard) -> None:
    """Serve the finished run's dashboard until Ctrl-C or SIGTERM, then exit at once: the run is
    complete and written, and the exit must not wait on what the simulation engine left behind
    (its signal handlers, Ray's and Flower's threads). A parent may have started this process
    with SIGINT ignored or blocked: both are undone here."""
    import os
    import sys
    import threading

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    live.wait(until=stop)
    live.stop()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _start_dashboard(out: Path, port: int) -> BackgroundDashboard:
    """The dashboard of run directory `out` on loopback, in a thread of this process."""
    from server.dashboard.serve import start_background

    live = start_background([out], port=port)
    console.print(f"dashboard: {live.settings.url}")
    return live


def main(args: list[str]) -> None:
    """Run ``biofp simulate`` with `args`; a usage error becomes a one-line ConfigError."""
    try:
        app(args=args, prog_name="biofp simulate", standalone_mode=False)
    except click.UsageError as exc:
        raise ConfigError(f"{exc.format_message()} (see 'biofp simulate --help')") from None
