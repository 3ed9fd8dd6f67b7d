"""`biofp site ...`: what hospital IT runs to check a site's data before joining a federation."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from biofp_core.errors import DataError

if TYPE_CHECKING:
    from biofp_core.validate import ValidationReport

site_app = typer.Typer(no_args_is_help=True, help="Site tools: validate data, inspect the ledger.")
console = Console()


@site_app.command("validate")
def validate(
    data: Path | None = typer.Option(None, "--data", help="folder of WFDB records"),
    config: Path | None = typer.Option(None, "--config", help="site.toml"),
    json_out: Path | None = typer.Option(None, "--json", help="also write the report as JSON"),
) -> None:
    """Read every record as training would; print a table per record and a summary.

    Exits 0 when at least one record is usable, 1 with a one-line reason otherwise.
    """
    from biofp_core.site import load_site_config
    from biofp_core.validate import validate_site, write_report_json

    site = load_site_config(config, data_dir=data)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("reading records", total=None)
        report = validate_site(site, on_record=lambda _: progress.advance(task))
    console.print(render_report(report))
    if json_out is not None:
        write_report_json(report, json_out)
    if report.usable_records == 0:
        raise DataError(f"{site.data_dir}: no usable record")


def render_report(report: ValidationReport) -> Table:
    """The per-record table with a summary caption."""
    table = Table(title=f"site {report.site}: {report.data_dir}", show_lines=False)
    for col in ("record", "subject", "fs ECG/PPG (Hz)", "min", "channels", "kept", "dropped"):
        table.add_column(col)
    for r in report.records:
        if not r.usable:
            table.add_row(r.record_id, "-", "-", "-", "-", "0", f"[red]{r.problem}[/red]")
            continue
        fs = "/".join(f"{v:g}" if v else "-" for v in r.fs_hz.values())
        chans = ", ".join(f"{m}={n!r}" for m, n in r.channels.items() if n)
        dropped = ", ".join(f"{k} {v}" for k, v in r.windows_dropped.items() if v) or "-"
        table.add_row(
            r.record_id,
            r.subject_id or "-",
            fs,
            f"{(r.duration_s or 0) / 60:.1f}",
            chans,
            str(r.windows_kept),
            dropped,
        )
    table.caption = (
        f"{report.usable_records} usable, {report.failed_records} failed records; "
        f"{report.subjects} subjects, {report.windows} windows, {report.hours:.2f} h"
        + (f"; labels: {report.labels}" if report.labels else "")
    )
    return table
