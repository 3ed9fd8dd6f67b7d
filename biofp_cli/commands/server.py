"""`biofp server ...`: what a coordinator runs: the SuperLink, and the flwr CLI's connection."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from biofp_cli.commands import insecure_mode

server_app = typer.Typer(no_args_is_help=True, help="Coordinator: run the federation's SuperLink.")
console = Console(stderr=True, markup=False)  # paths and [sections] as is

INSECURE_HELP = "no TLS, no SuperNode authentication: a local test only"


@server_app.command("start")
def start(
    config: Path = typer.Option(..., "--config", help="server.toml"),
    insecure: bool = typer.Option(False, "--insecure", help=INSECURE_HELP),
    insecure_non_loopback: bool = typer.Option(
        False,
        "--insecure-non-loopback",
        help="DANGEROUS: allow --insecure on an address other than 127.0.0.1/::1",
    ),
    check: bool = typer.Option(False, "--check", help="run the pre-start checks and exit"),
    dashboard: bool = typer.Option(
        False, "--dashboard", help="also serve the live dashboard of [superlink] workdir (loopback)"
    ),
    dashboard_port: int = typer.Option(8050, "--dashboard-port", help="the dashboard's port"),
) -> None:
    """Check server.toml, certificates and port, then run the Flower SuperLink (until stopped)."""
    from biofp_cli.superlink import prepare_superlink, run_superlink

    insecure = insecure_mode(
        insecure, insecure_non_loopback, "traffic is not encrypted and any SuperNode may join"
    )
    launch = prepare_superlink(config, insecure=insecure, allow_non_loopback=insecure_non_loopback)
    cfg = launch.config
    console.print(f"checks passed; SuperLink for {cfg.address}")
    if check:
        return
    if not insecure and cfg.auth.supernode_auth:
        console.print(
            "register each site's key: flwr supernode register SITE.pub biofp "
            "(after: biofp server connect --config ...)"
        )
    if dashboard:
        from server.dashboard.serve import start_background

        live = start_background([cfg.superlink.workdir], port=dashboard_port)
        console.print(f"dashboard of {cfg.superlink.workdir}: {live.settings.url}")
    run_superlink(launch)


@server_app.command("connect")
def connect(
    config: Path = typer.Option(..., "--config", help="server.toml"),
    name: str = typer.Option("biofp", "--name", help="connection name for the flwr CLI"),
    default: bool = typer.Option(False, "--default", help="make it flwr's default SuperLink"),
    insecure: bool = typer.Option(False, "--insecure", help="connect without TLS (local test)"),
) -> None:
    """Add this SuperLink to the flwr CLI's config, for `flwr run` and `flwr supernode ...`."""
    from biofp_cli.superlink import write_flwr_connection
    from biofp_core.deployment import load_server_config

    cfg = load_server_config(config)
    path = write_flwr_connection(cfg, name=name, insecure=insecure, default=default)
    console.print(f"[superlink.{name}] -> {cfg.address} written to {path}")
    console.print(f"e.g. flwr supernode register SITE.pub {name}; flwr run APP {name}")


@server_app.command("app")
def app(out: Path = typer.Option(..., "--out", help="folder for the app's pyproject.toml")) -> None:
    """Write a code-free Flower app folder for `flwr run DIR biofp --run-config run.toml`."""
    from biofp_core.fsutil import check_output_dir
    from server.app_folder import write_app_folder

    folder = write_app_folder(check_output_dir(out, what="app folder"))
    console.print(f"Flower app (no code, the sites run their installed BioFP): {folder}")


@server_app.command("status")
def status(
    config: Path = typer.Option(..., "--config", help="server.toml"),
    run: str = typer.Option(..., "--run", help="the run's out-dir (relative: under workdir)"),
    wait: bool = typer.Option(False, "--wait", help="wait while the run is running"),
    timeout_s: float = typer.Option(3600.0, "--timeout", help="give up waiting after this"),
    as_json: bool = typer.Option(False, "--json", help="print metrics.json's summary as JSON"),
) -> None:
    """A run's status: run key and Flower run ids, each round's sites by name, the model.

    Exits 0 when the run completed, 1 when it failed or was stopped (or is still running
    after --timeout).
    """
    from server.status import read_status, render_status

    report, run_dir = read_status(config, run, wait=wait, timeout_s=timeout_s)
    if as_json:
        typer.echo(report.model_dump_json(indent=1))
    else:
        for line in render_status(report, run_dir):
            typer.echo(line)
    if report.status != "completed":
        raise typer.Exit(1)
