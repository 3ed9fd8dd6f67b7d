"""`biofp evaluate`: linear probes on released fingerprints, beside an attribute-inference audit.

Labels meet fingerprints by pseudonym: a labels CSV naming raw subjects/records is pseudonymised
with the key of the site that exported the fingerprints (``--config site.toml`` or ``--site-dir``);
a CSV keyed by ``subject_pseudonym``/``record_pseudonym`` needs neither.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from biofp_core.errors import ConfigError, DataError

if TYPE_CHECKING:
    from biofp_core.evaluation import LabelRows, ProbeResult
    from biofp_core.fingerprints.parquet import FingerprintMeta
    from biofp_core.fingerprints.pseudonyms import SiteKey
    from biofp_core.fingerprints.table import FingerprintTable

AUDIT_ATTRIBUTES = ("sex", "age")
console = Console()


def _site_key(config: Path | None, site_dir: Path | None) -> SiteKey | None:
    from biofp_core.fingerprints.pseudonyms import SiteKey
    from biofp_core.site import load_site_config

    if config is not None and site_dir is not None:
        raise ConfigError("give --config or --site-dir, not both")
    if site_dir is not None:
        return SiteKey.load(site_dir)
    if config is not None:
        return SiteKey.load(load_site_config(config).resolved_state_dir())
    return None


def _load(
    path: Path, key: SiteKey | None, model: Path | None
) -> tuple[FingerprintTable, FingerprintMeta]:
    """A fingerprint file, checked against the site key and the expected model."""
    from biofp_core.fingerprints.parquet import read_fingerprints

    table, meta = read_fingerprints(path)
    if key is not None and meta.site != key.site:
        raise DataError(f"{path}: exported by another site than the one whose key was given")
    if model is not None:
        from biofp_core.artifacts import load_model

        card = load_model(model)[1]
        if meta.model_weights_sha256 != card.weights_sha256:
            raise DataError(
                f"{path}: fingerprints of {meta.model} weights {meta.model_weights_sha256[:12]}, "
                f"not of {model} ({card.weights_sha256[:12]}): another model version"
            )
    return table, meta


def _tasks(labels: LabelRows, tasks: list[str], audit: bool) -> list[tuple[str, str]]:
    """(task, role) pairs: the requested tasks, then the audited attributes the labels have."""
    pairs = [(t, "utility") for t in dict.fromkeys(tasks)]
    if audit:
        pairs += [(a, "attack") for a in AUDIT_ATTRIBUTES if a in labels.columns and a not in tasks]
    return pairs


def _row(
    path: Path, meta: FingerprintMeta, role: str, result: ProbeResult, ref: ProbeResult | None
) -> dict:
    from biofp_core.evaluation import relative_score

    return {
        "file": str(path),
        "model": meta.model,
        "model_weights_sha256": meta.model_weights_sha256,
        "modality": meta.modality,
        "noise_sigma": meta.noise_sigma,
        "epsilon_per_vector": meta.release.epsilon,
        "role": role,
        "relative_to_first": ref if ref is None else relative_score(result, ref),
        **result.model_dump(),
    }


def evaluate(
    fingerprints: list[Path] = typer.Option(
        ..., "--fingerprints", help="fingerprint file; repeat to compare (the first is reference)"
    ),
    labels: Path = typer.Option(..., "--labels", help="labels CSV"),
    task: list[str] = typer.Option(..., "--task", help="label column to probe; repeatable"),
    config: Path | None = typer.Option(None, "--config", help="site.toml: its key for raw ids"),
    site_dir: Path | None = typer.Option(None, "--site-dir", help="site state folder (its key)"),
    model: Path | None = typer.Option(None, "--model", help="require fingerprints of this model"),
    level: str = typer.Option("record", "--level", help="record | window rows"),
    audit: bool = typer.Option(False, "--audit", help="also infer sex and age (attack)"),
    folds: int = typer.Option(5, "--folds", min=2, help="subject-disjoint folds"),
    repeats: int = typer.Option(5, "--repeats", min=1, help="fold draws averaged"),
    bootstrap: int = typer.Option(1000, "--bootstrap", min=0, help="resamples for the 95 % CI"),
    seed: int = typer.Option(0, "--seed"),
    json_out: Path | None = typer.Option(None, "--json", help="also write the results as JSON"),
) -> None:
    """Subject-disjoint k-fold linear probes (logistic / ridge): AUROC or MAE with 95 % CI."""
    from biofp_core.evaluation import check_against, evaluate_table, read_labels, task_labels
    from biofp_core.fsutil import atomic_write_text, check_output_file

    if level not in ("record", "window"):
        raise ConfigError(f"unknown level {level!r}; valid: record, window")
    if json_out is not None:
        check_output_file(json_out, what="JSON results")
    key = _site_key(config, site_dir)
    files = [(path, *_load(path, key, model)) for path in fingerprints]
    rows = read_labels(labels, key=key)
    for _, table, _ in files:
        check_against(rows, table)
    tasks = [(task_labels(rows, name), role) for name, role in _tasks(rows, task, audit)]
    results, reference = [], {}
    for number, (path, table, meta) in enumerate(files, start=1):
        if not (table.level == level).any():
            raise DataError(
                f"{path}: no {level}-level rows (released at {meta.release.level} level)"
            )
        for labels_of_task, role in tasks:
            result = evaluate_table(table, labels_of_task, level=level, folds=folds,
                                    repeats=repeats, seed=seed, n_boot=bootstrap)  # fmt: skip
            ref = reference.setdefault(labels_of_task.task, result)
            row = _row(path, meta, role, result, ref if len(files) > 1 else None)
            results.append({"number": number, **row})
    console.print(render_results(results))
    if json_out is not None:
        atomic_write_text(json_out, json.dumps({"results": results}, indent=1) + "\n")


def render_results(results: list[dict]) -> Table:
    """One row per (file, task): metric with its 95 % CI, the baseline and the subjects.

    Files are numbered in the first column; the caption says which is which.
    """
    compare = len({r["number"] for r in results}) > 1
    table = Table(
        title="linear probes, subject-disjoint CV", box=box.SIMPLE, pad_edge=False,
        padding=(0, 1, 0, 0),
    )  # fmt: skip
    for col in ("#", "task", "metric", "value (95 % CI)", "baseline", "subjects"):
        table.add_column(col, no_wrap=True)
    if compare:
        table.add_column("vs #1", no_wrap=True)
    legend = {}
    for r in results:
        number = r["number"]
        noise = f"σ={r['noise_sigma']:.3g}" if r["noise_sigma"] is not None else "no noise"
        legend[number] = f"#{number} {Path(r['file']).name} ({r['modality']}, {noise})"
        cells = [
            str(number),
            r["task"] + (" (attack)" if r["role"] == "attack" else ""),
            r["metric"],
            f"{r['value']:.3f} ({r['ci_low']:.3f}-{r['ci_high']:.3f})",
            f"{r['baseline']:.3f}",
            str(r["subjects"]),
        ]
        if compare:
            cells.append(f"{r['relative_to_first']:.3f}")
        table.add_row(*cells)
    table.caption = "; ".join(legend.values())
    return table
