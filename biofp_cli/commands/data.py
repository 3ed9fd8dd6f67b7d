"""`biofp data ...`: the synthetic cohort and public datasets."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

data_app = typer.Typer(no_args_is_help=True, help="Datasets: synthetic cohort, public downloads.")


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., "--out", help="new or empty folder, or a previous cohort"),
    sites: int = typer.Option(4, "--sites", help="emulated hospitals"),
    subjects_per_site: int = typer.Option(8, "--subjects-per-site", help="one record each"),
    minutes: float = typer.Option(5.0, "--minutes", help="record length"),
    seed: int = typer.Option(0, "--seed", help="same arguments give identical files"),
) -> None:
    """Write the simulated cohort: paired ECG + PPG WFDB records and labels.csv per site."""
    from rich.progress import Progress
    from rich.table import Table

    from biofp_core.fsutil import check_output_dir
    from biofp_core.synth import write_cohort

    check_output_dir(out, what="cohort folder")
    console = Console()
    with Progress(console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("simulating records", total=max(sites * subjects_per_site, 0))
        summary = write_cohort(
            out, sites=sites, subjects_per_site=subjects_per_site, minutes=minutes, seed=seed,
            on_record=lambda _: progress.advance(task),
        )  # fmt: skip
    table = Table(title=f"synthetic cohort in {summary.out_dir}")
    for col in ("site", "fs (Hz)", "channels", "records", "AF", "hypertension"):
        table.add_column(col)
    for s in summary.site_summaries:
        channels = " | ".join(s.channels)
        table.add_row(
            s.site, f"{s.fs_hz:g}", channels, str(s.records), str(s.af), str(s.hypertension)
        )
    table.caption = f"{summary.records} records, {summary.hours:.2f} h; labels: {summary.labels}"
    console.print(table)


_PHYSIONET_DATABASES = {"bidmc": "BIDMC PPG and Respiration Dataset"}


def _root_cause(exc: BaseException) -> BaseException:
    """Innermost exception of a requests/urllib3 chain (e.g. the DNS failure under it)."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        reason = getattr(exc, "reason", None)
        inner = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else None
        nxt = reason if isinstance(reason, BaseException) else inner or exc.__cause__
        if nxt is None:
            break
        exc = nxt
    return exc


@data_app.command("download")
def data_download(
    database: str = typer.Argument(..., help="PhysioNet database: bidmc"),
    out: Path = typer.Option(..., "--out", help="folder the records are written to"),
    timeout_s: float = typer.Option(10.0, "--timeout-s", help="give up on PhysioNet after this"),
) -> None:
    """Download a public PhysioNet database with wfdb (needs internet access)."""
    import requests
    import wfdb
    from wfdb.io.download import PN_CONTENT_URL

    from biofp_core.errors import ConfigError, DataError

    if database not in _PHYSIONET_DATABASES:
        raise ConfigError(
            f"unknown database {database!r}; known: {', '.join(_PHYSIONET_DATABASES)}"
        )
    try:  # wfdb sets no timeout itself: probe first so an offline machine fails fast
        requests.head(f"{PN_CONTENT_URL}{database}/", timeout=timeout_s).raise_for_status()
        out.mkdir(parents=True, exist_ok=True)
        wfdb.dl_database(database, dl_dir=str(out))
    except (OSError, ValueError, IndexError) as exc:
        cause = _root_cause(exc)
        reason = " ".join(f"{type(cause).__name__}: {cause}".split())[:200]
        raise DataError(f"could not download {database} from PhysioNet: {reason}") from None
    Console().print(f"{_PHYSIONET_DATABASES[database]} downloaded to {out}")
