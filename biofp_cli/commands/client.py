"""`biofp client start`: what hospital IT runs: the site's SuperNode."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from biofp_cli.commands import insecure_mode

client_app = typer.Typer(no_args_is_help=True, help="Hospital: run this site's SuperNode.")
console = Console(stderr=True, markup=False)  # paths and [sections] as is


@client_app.command("start")
def start(
    config: Path = typer.Option(..., "--config", help="site.toml, with its federation section"),
    insecure: bool = typer.Option(
        False, "--insecure", help="no TLS, no node key: a local test only"
    ),
    insecure_non_loopback: bool = typer.Option(
        False,
        "--insecure-non-loopback",
        help="DANGEROUS: allow --insecure towards a SuperLink that is not on this machine",
    ),
    check: bool = typer.Option(False, "--check", help="run the pre-start checks and exit"),
    health: bool = typer.Option(
        False,
        "--health",
        help="the checks of a running site (a container's HEALTHCHECK), then exit: as --check, "
        "but the runtime API port must be held by this site's SuperNode",
    ),
) -> None:
    """Check site.toml, keys, data, the state folder (initialised once by `biofp site init`) and
    the SuperLink, build the window store, then run the Flower SuperNode (until stopped). Only
    what docs/privacy.md lists leaves the site, each value charged to the ledger."""
    from biofp_cli.supernode import prepare_supernode, run_supernode, warm_store

    insecure = insecure_mode(
        insecure, insecure_non_loopback, "traffic to the SuperLink is not encrypted"
    )
    launch = prepare_supernode(
        config, insecure=insecure, allow_non_loopback=insecure_non_loopback, serving=health
    )
    fed = launch.federation
    console.print(f"checks passed; site {launch.site.name} -> {fed.superlink}")
    console.print(
        f"runtime API (ClientApps) on 127.0.0.1:{launch.runtime_port} "
        f"({launch.runtime_port_source})"
    )
    if check or health:
        return
    subjects = warm_store(launch)
    console.print(f"window store ready: {subjects} subjects")
    run_supernode(launch)
