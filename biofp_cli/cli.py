"""The `biofp` command. Subcommands are grouped per user: data, site, simulate, fingerprint...

User errors (`BioFPError`) print as one line on stderr and exit 1, never as a traceback.
"""

from __future__ import annotations

import logging
import sys

import typer
from rich.console import Console
from rich.markup import escape

from biofp_cli.commands.certs import certs_app
from biofp_cli.commands.client import client_app
from biofp_cli.commands.dashboard import dashboard
from biofp_cli.commands.data import data_app
from biofp_cli.commands.demo import demo
from biofp_cli.commands.evaluate import evaluate
from biofp_cli.commands.fingerprint import fingerprint
from biofp_cli.commands.plan import plan
from biofp_cli.commands.pretrain import pretrain
from biofp_cli.commands.server import server_app
from biofp_cli.commands.site import site_app
from biofp_core.errors import BioFPError

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="BioFP: federated biosignal fingerprints."
)
app.add_typer(data_app, name="data")
app.add_typer(site_app, name="site")
app.add_typer(certs_app, name="certs")
app.add_typer(server_app, name="server")
app.add_typer(client_app, name="client")
app.command("demo")(demo)
app.command("fingerprint")(fingerprint)
app.command("evaluate")(evaluate)
app.command("dashboard")(dashboard)
app.command("plan")(plan)
app.command("pretrain")(pretrain)

err_console = Console(stderr=True)


@app.command(
    "simulate",
    add_help_option=False,
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def simulate(ctx: typer.Context) -> None:
    """Federated pretraining on emulated hospitals in Flower's simulation engine (--help)."""
    from biofp_cli.commands.simulate import (
        main as simulate_main,  # imports Flower only when it runs
    )

    simulate_main(list(ctx.args))


def main() -> None:
    """Console entry point: run the app, turning user errors into one-line messages."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = app(standalone_mode=False)  # click returns a typer.Exit's code here
    except BioFPError as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except OSError as exc:  # a path the user gave that cannot be written: one line, no traceback
        line = f"{exc.filename or 'file'}: {exc.strerror or exc}"
        err_console.print(f"[red]error:[/red] {escape(line)}", highlight=False, soft_wrap=True)
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
    if isinstance(code, int) and not isinstance(code, bool) and code != 0:
        sys.exit(code)
