"""The `biofp` command. Subcommands are grouped per user: data, site, simulate, fingerprint...

User errors (`BioFPError`) print as one line on stderr and exit 1, never as a traceback.
"""

from __future__ import annotations

import logging
import sys

import typer
from rich.console import Console

from biofp_core.commands.data import data_app
from biofp_core.commands.demo import demo
from biofp_core.commands.site import site_app
from biofp_core.errors import BioFPError

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="BioFP: federated biosignal fingerprints."
)
app.add_typer(data_app, name="data")
app.add_typer(site_app, name="site")
app.command("demo")(demo)

err_console = Console(stderr=True)


def main() -> None:
    """Console entry point: run the app, turning user errors into one-line messages."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app(standalone_mode=False)
    except BioFPError as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("aborted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
