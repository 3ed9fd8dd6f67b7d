"""`biofp dashboard`: the coordinator's live, read-only web page over run directories."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console

console = Console(stderr=True, markup=False, highlight=False, soft_wrap=True)  # URLs whole


def dashboard(
    runs: list[Path] = typer.Option(
        ..., "--runs", help="a run directory or a folder of them (repeatable)"
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="bind address (non-loopback: token)"),
    port: int = typer.Option(8050, "--port", help="TCP port"),
    token: str | None = typer.Option(
        None, "--token", help="access token (default: $BIOFP_DASHBOARD_TOKEN)", show_default=False
    ),
    make_token: bool = typer.Option(
        False, "--new-token", help="make a random access token and print it once"
    ),
) -> None:
    """Serve a live, read-only dashboard of runs, rounds and sites (loopback by default)."""
    from server.dashboard.serve import TOKEN_ENV, check_settings, new_token, serve

    token = token or os.environ.get(TOKEN_ENV) or (new_token() if make_token else None)
    settings = check_settings(runs, host=host, port=port, token=token)
    console.print(f"dashboard: {settings.url_with_token if make_token else settings.url}")
    if settings.token and not make_token:
        console.print("every request needs the token: open the URL with ?token=...")
    serve(settings)
