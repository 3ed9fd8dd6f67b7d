"""`biofp demo`: the synthetic hospital cohort, generated and validated site by site."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

console = Console()


def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="where the cohort and reports go"),
    sites: int = typer.Option(4, "--sites", min=1),
    subjects_per_site: int = typer.Option(8, "--subjects-per-site", min=1),
    minutes: float = typer.Option(5.0, "--minutes", min=0.5),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Generate the synthetic hospital cohort and validate every site as its IT would."""
    from biofp_cli.commands.site import render_report
    from biofp_core.fsutil import check_output_dir
    from biofp_core.site import SiteConfig
    from biofp_core.synth import write_cohort
    from biofp_core.validate import validate_site, write_report_json

    cohort_dir = check_output_dir(out, what="demo folder") / "cohort"
    summary = write_cohort(
        cohort_dir, sites=sites, subjects_per_site=subjects_per_site, minutes=minutes, seed=seed
    )
    console.print(
        f"synthetic cohort: {summary.records} records, {summary.hours:.1f} h in {cohort_dir}"
    )
    for site_dir in sorted(p for p in cohort_dir.iterdir() if p.is_dir()):
        site = SiteConfig(
            name=site_dir.name,
            data_dir=site_dir.resolve(),
            cache_dir=(out / "cache").resolve(),
            labels_csv=(site_dir / "labels.csv").resolve(),
        )
        report = validate_site(site)
        console.print(render_report(report))
        write_report_json(report, out / "validation" / f"{site_dir.name}.json")
    console.print(f"validation reports in {out / 'validation'}")
