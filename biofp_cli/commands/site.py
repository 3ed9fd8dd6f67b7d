"""`biofp site ...`: what hospital IT runs to check a site's data before joining a federation."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from biofp_core.errors import ConfigError, DataError
from biofp_core.fsutil import check_output_file

if TYPE_CHECKING:
    from biofp_core.audit import AuditEntry
    from biofp_core.privacy.ledger import LedgerEntry, LedgerSummary
    from biofp_core.validate import ValidationReport

site_app = typer.Typer(
    no_args_is_help=True,
    help="Site tools: check the data, initialise the state folder, read the ledger and audit log.",
)
WIDE = 100_000  # columns when not on a terminal: a table written to a file is never cut


class _Console(Console):
    """Rich's console, as wide as it needs to be when the output is not a terminal."""

    def __init__(self) -> None:
        super().__init__()
        if not self.is_terminal:
            self.width = WIDE


console = _Console()


@site_app.command("validate")
def validate(
    data: Path | None = typer.Option(
        None, "--data", help="data folder: WFDB, MATLAB segments, text segments or EDF"
    ),
    config: Path | None = typer.Option(None, "--config", help="site.toml"),
    json_out: Path | None = typer.Option(None, "--json", help="also write the report as JSON"),
) -> None:
    """Read every record as training would; print a table per record and a summary.

    Exits 0 when at least one record is usable, 1 with a one-line reason otherwise.
    """
    from biofp_core.site import load_site_config
    from biofp_core.validate import validate_site, write_report_json

    site = load_site_config(config, data_dir=data)
    if json_out is not None:
        check_output_file(json_out, what="JSON report")
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("reading records", total=None)
        report = validate_site(site, on_record=lambda _: progress.advance(task))
    console.print(render_report(report))
    if report.summary is not None:
        for line in summary_lines(report):
            console.print(line, highlight=False, soft_wrap=True)
    if json_out is not None:
        write_report_json(report, json_out)
    if report.usable_records == 0:
        raise DataError(f"{site.data_dir}: no usable record")


@site_app.command("labels")
def labels(
    out: Path = typer.Option(..., "--out", help="labels CSV to write (stays at the site)"),
    data: Path | None = typer.Option(None, "--data", help="data folder (format detected)"),
    config: Path | None = typer.Option(None, "--config", help="site.toml"),
) -> None:
    """Write the labels the reader found beside the data as a labels CSV for `labels_csv`.

    One row per record (subject labels repeated), or per window with a ``start_s`` column when
    there are window labels; ids are the site's raw ids (pseudonymised only when probed).
    """
    from biofp_core.site import load_site_config
    from biofp_core.store import write_labels_csv
    from biofp_core.validate import open_site_store

    site = load_site_config(config, data_dir=data)
    store = open_site_store(site)
    rows = write_labels_csv(store, out)
    if rows == 0:
        raise DataError(f"{site.data_dir}: no labels found beside the data")
    levels = ", ".join(f"{c} ({lv})" for c, lv in store.manifest.label_levels.items())
    console.print(f"wrote {rows} rows to {out}: {levels}", highlight=False, soft_wrap=True)


MAX_ROWS = 40  # usable records listed one per row; every skipped one is always listed


def summary_lines(report: ValidationReport) -> list[str]:
    """What the folder's reader read: one line per fact, then one per skipped file."""
    s = report.summary
    if s is None:
        return []
    lo, mid, hi = s.duration_s
    rates = "; ".join(f"{m} {', '.join(f'{r:g}' for r in v)} Hz" for m, v in s.rates_hz.items())
    dropped = ", ".join(f"{k} {v}" for k, v in s.windows_dropped.items()) or "none"
    skipped = ", ".join(f"{k} {v}" for k, v in s.records_skipped.items()) or "none"
    levels: dict[str, list[str]] = {}
    for column, level in s.label_levels.items():
        levels.setdefault(level, []).append(column)
    labels = "; ".join(f"{lv}: {', '.join(cols)}" for lv, cols in levels.items()) or "none"
    mods = ", ".join(f"{k} {v}" for k, v in s.modalities.items())
    lines = [
        f"format {s.format}: {s.records} records, {s.subjects} subjects; modality: {mods}; "
        f"rate: {rates}",
        f"duration per record: min {lo:.1f} s, median {mid:.1f} s, max {hi:.1f} s",
        f"windows: {s.windows_kept} kept ({s.windows_padded} padded), dropped: {dropped}",
        f"records skipped: {skipped}",
        f"labels found: {labels}",
    ]
    lines += [f"label problem: {p}" for p in s.label_problems]
    return lines


def render_report(report: ValidationReport) -> Table:
    """The per-record table (skipped records first, then up to MAX_ROWS usable ones)."""
    table = Table(title=f"site {report.site}: {report.data_dir}", show_lines=False)
    for col in ("record", "subject", "fs ECG/PPG (Hz)", "s", "channels", "kept", "dropped"):
        table.add_column(col)
    failed = [r for r in report.records if not r.usable]
    usable = [r for r in report.records if r.usable]
    for r in failed + usable[:MAX_ROWS]:
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
            f"{r.duration_s or 0:.1f}",
            chans,
            str(r.windows_kept) + (f" ({r.windows_padded} padded)" if r.windows_padded else ""),
            dropped,
        )
    if len(usable) > MAX_ROWS:
        table.add_row(f"... {len(usable) - MAX_ROWS} more usable records", *[""] * 6)
    table.caption = (
        f"{report.usable_records} usable, {report.failed_records} failed records; "
        f"{report.subjects} subjects, {report.windows} windows, {report.hours:.2f} h"
        + (f"; labels: {report.labels}" if report.labels else "")
    )
    return table


def _existing_site_dir(site_dir: Path) -> Path:
    if not site_dir.is_dir():
        raise ConfigError(f"{site_dir}: site folder not found")
    return site_dir


def _state_of(site_dir: Path, config: Path | None) -> tuple[Path, Path | None]:
    """(state folder, site.toml) of `--site-dir`: the state folder itself, or the site's folder
    holding its site.toml; a folder with neither a ledger nor a site.toml is an error."""
    from biofp_core.privacy.ledger import LEDGER_FILENAME, MARKER_FILENAME
    from biofp_core.site import load_site_config

    site_dir = _existing_site_dir(site_dir)
    toml = site_dir / "site.toml"
    if config is None and toml.is_file():
        return load_site_config(toml).resolved_state_dir(), toml
    if (site_dir / LEDGER_FILENAME).exists() or (site_dir / MARKER_FILENAME).exists():
        return site_dir, config
    raise ConfigError(
        f"{site_dir}: no privacy ledger here; give the site's state folder or the folder "
        "holding its site.toml"
    )


@site_app.command("init")
def init(
    config: Path = typer.Option(..., "--config", help="the site's site.toml"),
    new_site: bool = typer.Option(
        False, "--new-site", help="start a NEW budget for records another site's ledger holds"
    ),
) -> None:
    """Initialise the site's state folder once: the privacy ledger and its marker (site.json),
    and bind the site's records to it (in the cache folder's registry).

    Run once per site; afterwards a missing or edited ledger refuses every charged action.
    A new state folder for records already bound to another one (a moved data folder, an edited
    state_dir) is refused: it would forget the ε spent on them. A ledger written by an older
    BioFP is migrated into the hash chain.
    """
    from biofp_core.privacy.binding import bind, check_new_ledger, record_digests
    from biofp_core.privacy.ledger import MARKER_FILENAME, initialise_site_state
    from biofp_core.site import load_site_config

    site = load_site_config(config)
    state = site.resolved_state_dir()
    digests = record_digests(site)
    if not (state / MARKER_FILENAME).exists():
        check_new_ledger(site, digests, new_site=new_site)
        if new_site:
            console.print(
                f"WARNING: --new-site: site {site.name} starts a NEW privacy budget in {state}; "
                "only for a truly separate site, never for a moved data folder",
                style="bold red", highlight=False, soft_wrap=True,
            )  # fmt: skip
    marker = initialise_site_state(state, name=site.name)
    bind(site, state, marker.site_id, digests)
    console.print(
        f"site {site.name}: state folder {state} initialised (site id {marker.site_id[:12]}, "
        f"{marker.entries} ledger entries), {len(digests)} record files bound to it",
        highlight=False, soft_wrap=True,
    )  # fmt: skip


@site_app.command("ledger")
def ledger(
    site_dir: Path = typer.Option(
        ..., "--site-dir", help="the site's state folder, or its folder holding site.toml"
    ),
    config: Path | None = typer.Option(None, "--config", help="site.toml (budget from [privacy])"),
    as_json: bool = typer.Option(False, "--json", help="print summary and entries as JSON"),
) -> None:
    """Print the privacy ledger: every charged round, ε spent, the budget and what is left.

    The ledger is verified first (hash chain, marker, audit log): a tampered or missing ledger
    is an error, never "no privacy spent".
    """
    import json

    from biofp_core.privacy.ledger import PrivacyLedger
    from biofp_core.site import PrivacyBudget, load_site_config

    state_dir, config = _state_of(site_dir, config)
    site = load_site_config(config) if config is not None else None
    budget = site.privacy if site is not None else PrivacyBudget()
    state = state_dir
    book = PrivacyLedger.at(state)
    book.verify()
    summary = book.summary(budget=budget, site=site.name if site is not None else None)
    flower_runs = flower_run_ids(state)
    if as_json:
        doc = {
            "summary": summary.model_dump(),
            "budget_from": "config" if site is not None else "default",
            "entries": [ledger_entry_json(e, flower_runs) for e in book.entries],
        }
        typer.echo(json.dumps(doc, indent=2))
        return
    if not book.entries:
        console.print(f"no privacy spent yet ({book.path})", highlight=False, soft_wrap=True)
        return
    console.print(render_ledger(book.entries, summary, flower_runs))
    source = "" if site is not None else " (default: no --config given)"
    exhausted = " (exhausted)" if summary.exhausted else ""
    console.print(f"ε spent: {summary.epsilon:.3f} at δ={summary.delta:g}", highlight=False)
    console.print(f"budget: ε={summary.budget_epsilon:g}{source}", highlight=False)
    console.print(f"budget left: {summary.budget_left:.3f}{exhausted}", highlight=False)
    console.print(RUN_COLUMNS_NOTE, highlight=False)


RUN_COLUMNS_NOTE = (
    "run key: BioFP's run key (run.json in the coordinator's run directory, also in its "
    "metrics.json); Flower run: the run id(s) of `flwr ls` that sent its messages"
)


def flower_run_ids(state_dir: Path) -> dict[str, list[int]]:
    """Run key -> the Flower run ids that sent it messages, from the audit log."""
    from biofp_core.audit import AuditLog, AuditLogError

    try:
        entries = AuditLog.at(state_dir).entries()
    except AuditLogError:
        return {}
    out: dict[str, list[int]] = {}
    for e in entries:
        ids = out.setdefault(e.run_key, [])
        if e.flower_run_id is not None and e.flower_run_id not in ids:
            ids.append(e.flower_run_id)
    return out


def ledger_entry_json(entry: LedgerEntry, flower_runs: dict[str, list[int]]) -> dict:
    """A ledger entry for ``--json``: its run as ``run_key`` (the file's ``run_id``) beside the
    Flower run ids that sent it messages."""
    doc = entry.model_dump()
    key = doc.pop("run_id")
    return {"run_key": key, "flower_run_ids": flower_runs.get(key, []), **doc}


def render_ledger(
    entries: list[LedgerEntry],
    summary: LedgerSummary,
    flower_runs: dict[str, list[int]] | None = None,
) -> Table:
    """One row per charged round or release."""
    title = "privacy ledger" + (f" of site {summary.site}" if summary.site else "")
    table = Table(title=title)
    for col in ("time", "run key", "Flower run", "round", "kind", "σ", "q", "steps", "ε after"):
        table.add_column(col, no_wrap=True)
    flower_runs = flower_runs or {}
    for e in entries:
        table.add_row(
            e.time,
            escape(e.run_id),
            ", ".join(map(str, flower_runs.get(e.run_id, []))) or "-",
            str(e.server_round),
            e.kind,
            f"{e.noise_multiplier:.4g}",
            f"{e.sample_rate:.4g}",
            str(e.steps),
            f"{e.epsilon_after:.3f}",
        )
    return table


@site_app.command("audit")
def audit(
    site_dir: Path = typer.Option(..., "--site-dir", help="the site's state folder"),
    as_json: bool = typer.Option(False, "--json", help="print the entries as JSON"),
    check: bool = typer.Option(
        False,
        "--check",
        help="run the five consistency checks against the ledger; exit 1 if any fails",
    ),
    config: Path | None = typer.Option(None, "--config", help="site.toml (δ from [privacy])"),
) -> None:
    """List the audit log: every message this site sent, with its size, sha256 and ε."""
    import json

    from biofp_core.audit import AuditLog

    state = _existing_site_dir(site_dir)
    entries = AuditLog.at(state).entries()
    if check:
        _check_audit(state, entries, config)
    elif as_json:
        typer.echo(json.dumps([e.model_dump() for e in entries], indent=2))
    elif not entries:
        console.print("no outgoing message logged yet", highlight=False)
    else:
        console.print(render_audit(entries))


def _check_audit(state: Path, entries: list[AuditEntry], config: Path | None) -> None:
    """Print each check's verdict; exit 1 (one line per violation) when any fails."""
    from biofp_core.audit_check import CHECKS, check_audit
    from biofp_core.privacy.ledger import PrivacyLedger
    from biofp_core.site import PrivacyBudget, load_site_config

    budget = load_site_config(config).privacy if config is not None else PrivacyBudget()
    book = PrivacyLedger.at(state)
    violations = check_audit(entries, book.entries, ledger_epsilon=book.epsilon(delta=budget.delta))
    for name in CHECKS:
        failed = [v for v in violations if v.check == name]
        verdict = f"FAILED ({len(failed)})" if failed else "ok"
        console.print(f"{name}: {verdict}", highlight=False)
    for v in violations:
        console.print(str(v), highlight=False, soft_wrap=True)
    console.print(
        f"{len(entries)} audit lines, {len(book.entries)} ledger entries: "
        + ("all five checks passed" if not violations else f"{len(violations)} violation(s)"),
        highlight=False,
    )
    if violations:
        raise typer.Exit(1)


def render_audit(entries: list[AuditEntry]) -> Table:
    """One short row per outgoing message (sha256 cut to 12 hex digits)."""
    table = Table(title="outgoing messages", box=box.SIMPLE, pad_edge=False, padding=(0, 1, 0, 0))
    cols = ("time (UTC)", "run key", "Flower run", "round", "type", "bytes", "sha256", "ε")
    for col in (*cols, "metrics"):
        table.add_column(col, no_wrap=col != "metrics")  # only metric names wrap
    for e in entries:
        table.add_row(
            e.time.replace("T", " ").removesuffix("+00:00"),
            escape(e.run_key),
            str(e.flower_run_id) if e.flower_run_id is not None else "-",
            str(e.server_round),
            escape(e.message_type),
            str(e.payload_bytes),
            e.arrays_sha256[:12] if e.arrays_sha256 else "-",
            f"{e.epsilon:.3f}" if e.epsilon is not None else "-",
            escape(", ".join(e.metric_keys)) or "-",
        )
    return table
