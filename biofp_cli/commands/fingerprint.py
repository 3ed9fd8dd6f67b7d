"""`biofp fingerprint`: embed a site's records with a model and release them under its policy."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import Progress

from biofp_core.errors import ConfigError

MODALITIES = ("paired", "ecg", "ppg")
console = Console()


def fingerprint(
    model: Path = typer.Option(..., "--model", help="model artifact (stem or either file)"),
    data: Path | None = typer.Option(
        None,
        "--data",
        help="data folder (WFDB, EDF, MATLAB or text segments)",
    ),
    config: Path | None = typer.Option(None, "--config", help="site.toml: release policy, budget"),
    out: Path = typer.Option(..., "--out", help="Parquet file to write"),
    modality: str = typer.Option("paired", "--modality", help="paired | ecg | ppg"),
    new_pseudonym_key: bool = typer.Option(
        False,
        "--new-pseudonym-key",
        help="make a new pseudonym key although this site released before (ids will not match)",
    ),
) -> None:
    """Per-record (or per-window) fingerprints with pseudonymous ids, released as Parquet.

    The site's release policy sets the level and optional clipping + Gaussian noise; noise is
    charged to the site's privacy ledger first (refused beyond the budget) and every release is
    written to the site's audit log.
    """
    from biofp_core.fingerprints.export import export_fingerprints
    from biofp_core.site import load_site_config

    if modality not in MODALITIES:
        raise ConfigError(f"unknown modality {modality!r}; valid: {', '.join(MODALITIES)}")
    site = load_site_config(config, data_dir=data)
    with Progress(console=console, transient=True, disable=not console.is_terminal) as progress:
        reading = progress.add_task("reading records", total=None)
        embedding = progress.add_task(f"embedding windows ({modality})", total=None)
        report = export_fingerprints(
            site, model_path=model, out=out, modality=modality,
            on_record=lambda _: progress.advance(reading),
            on_batch=lambda n: progress.advance(embedding, n), new_key=new_pseudonym_key,
        )  # fmt: skip
    noise = (
        f"σ={report.noise_sigma:.3g} (ε={report.epsilon_per_vector:g}, "
        f"δ={report.delta_per_vector:g} per vector)"
        if report.charged
        else "no noise"
    )
    console.print(
        f"released {report.rows} fingerprints ({report.level} level, {report.modality}) of "
        f"{report.subjects} subjects to {out}: {report.bytes} bytes, sha256 {report.sha256[:16]}",
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        f"{noise}; site ε spent {report.site_epsilon:.3f} of {site.privacy.epsilon:g} "
        f"at δ={report.site_delta:g}",
        highlight=False,
        soft_wrap=True,
    )
