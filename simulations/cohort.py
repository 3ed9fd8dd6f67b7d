"""Dataset adapters and emulated hospitals: a cohort of records, split by subject into sites.

Two adapters give a :class:`Cohort` (records, the subject of each record, and label rows):

- :func:`synthetic_cohort`: the embedded synthetic cohort (``biofp_core.synth``), generated once
  into a cache folder keyed by its arguments and reused afterwards.
- :func:`wfdb_cohort`: any folder of WFDB records (e.g. BIDMC), with an optional labels CSV
  (columns ``record`` and ``subject`` map records to subjects; without one, every record is its
  own subject).

:func:`write_sites` then lays out one folder per emulated hospital, exactly as a real site would
have it: ``data/`` (links to its subjects' record files), ``labels.csv`` (its subjects' rows),
``state/`` (its privacy ledger and audit log) and a ``site.toml`` with its privacy budget. The
ClientApp reads a simulated site through that ``site.toml``, as it would in deployment.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from biofp_core.errors import DataError
from biofp_core.privacy.ledger import initialise_site_state
from biofp_core.signals.read import find_records
from biofp_core.site import read_csv_rows, read_subject_map
from biofp_core.store import record_files
from biofp_core.synth import write_cohort
from biofp_core.synth.cohort import MANIFEST_NAME
from biofp_core.synth.physiology import ECTOPY_MODEL
from simulations.partition import Partition
from simulations.site_toml import SITE_TOML, SiteSettings, site_toml

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cohort:
    """Records (id -> header path), the subject of each record, and label rows per subject."""

    name: str
    headers: dict[str, Path]
    subject_of: dict[str, str]
    labels: dict[str, dict[str, str]]

    @property
    def subjects(self) -> list[str]:
        return sorted(set(self.subject_of.values()))

    def records_of(self, subjects: set[str] | tuple[str, ...]) -> list[str]:
        """Record ids of the given subjects, sorted."""
        wanted = set(subjects)
        return sorted(r for r, s in self.subject_of.items() if s in wanted)

    def label(self, column: str) -> dict[str, str]:
        """Subject -> value of one label column (subjects without it are left out)."""
        return {s: row[column] for s, row in self.labels.items() if row.get(column, "") != ""}


def synthetic_cohort(
    cache_dir: Path, *, sites: int, subjects_per_site: int, minutes: float, seed: int,
    ectopic_per_min: float = 0.0,
) -> Cohort:  # fmt: skip
    """The synthetic cohort with these arguments, generated into `cache_dir` on first use."""
    key = f"synth-{sites}x{subjects_per_site}-{minutes:g}min-seed{seed}"
    args: dict[str, float] = {"sites": sites, "subjects_per_site": subjects_per_site,
                              "minutes": minutes}  # fmt: skip
    if ectopic_per_min > 0:
        key += f"-ectopy{ectopic_per_min:g}v{ECTOPY_MODEL}"  # another model: another cohort
        args["ectopic_per_min"] = ectopic_per_min
    out = Path(cache_dir) / "cohorts" / key
    try:
        cached = json.loads((out / MANIFEST_NAME).read_text())["args"]
    except (OSError, ValueError, KeyError):
        cached = None
    if cached != {**args, "seed": seed}:
        log.info("generating the synthetic cohort %s", key)
        write_cohort(out, seed=seed, **args)  # type: ignore[arg-type]
    rows = read_csv_rows(out / "labels.csv")[1]
    headers = {r["record"]: out / r["site"] / f"{r['record']}.hea" for r in rows}
    return Cohort(
        name=key,
        headers=headers,
        subject_of={r["record"]: r["subject"] for r in rows},
        labels={r["subject"]: r for r in rows},
    )


def wfdb_cohort(data_dir: Path, labels_csv: Path | None = None) -> Cohort:
    """Every WFDB record under `data_dir`; subjects and labels from `labels_csv` if given.

    Record ids are header paths relative to `data_dir` without ``.hea`` (as in window stores).
    """
    data_dir = Path(data_dir).resolve()
    headers = {
        h.relative_to(data_dir).with_suffix("").as_posix(): h for h in find_records(data_dir)
    }
    subject_of = {r: r for r in headers}
    labels: dict[str, dict[str, str]] = {}
    if labels_csv is not None:
        columns, rows = read_csv_rows(labels_csv)
        if "record" in columns and "subject" in columns:
            mapping = read_subject_map(labels_csv)
            subject_of = {r: mapping.get(r, r) for r in headers}
        key = "subject" if "subject" in columns else "record"
        for row in rows:
            subject = row[key].strip() if key == "subject" else subject_of.get(row[key].strip())
            if subject:
                labels[subject] = row
    return Cohort(name=data_dir.name, headers=headers, subject_of=subject_of, labels=labels)


def _link(target: Path, link: Path) -> None:
    """A symlink `link` -> `target` (replacing a stale one)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        if link.is_symlink() and Path(os.readlink(link)) == target:
            return
        link.unlink()
    link.symlink_to(target)


def _labels_csv(cohort: Cohort, records: list[str]) -> str:
    """labels.csv of one site: record, subject, then every other label column."""
    extra = sorted({c for s in {cohort.subject_of[r] for r in records}
                    for c in cohort.labels.get(s, {})} - {"record", "subject"})  # fmt: skip
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["record", "subject", *extra])
    for record in records:
        subject = cohort.subject_of[record]
        row = cohort.labels.get(subject, {})
        writer.writerow([record, subject, *(row.get(c, "") for c in extra)])
    return buf.getvalue()


def cohort_tasks(cohort: Cohort) -> dict[str, str]:
    """``[tasks]`` of the cohort's emulated sites, from its whole label columns (the simulation
    owns the cohort): 0/1 columns binary, other numeric columns regression; text columns and
    the id columns are not declared."""
    tasks: dict[str, str] = {}
    columns = {c for row in cohort.labels.values() for c in row} - {"record", "subject", "site"}
    for column in sorted(columns):
        cells = [v.strip() for v in cohort.label(column).values() if v.strip()]
        try:
            numbers = {float(c) for c in cells}
        except ValueError:
            continue
        if numbers:
            tasks[column] = "binary" if numbers <= {0.0, 1.0} else "regression"
    return tasks


def write_sites(
    cohort: Cohort, partition: Partition, root: Path, settings: SiteSettings
) -> list[Path]:
    """One folder per emulated hospital under `root`; returns their site.toml paths.

    `settings` are what every site's ``site.toml`` shares (budget, ``[privacy]`` limits such as
    ``min_train_subjects`` for tiny cohorts, release policy). The ``state/`` folder (ledger,
    audit log) of a site is initialised once and never reset, so a site's privacy spending
    carries over to every later run that uses the same `root`.
    """
    tomls, tasks = [], cohort_tasks(cohort)
    for index, subjects in enumerate(partition.sites):
        name = f"site_{index:02d}"
        site_dir = Path(root) / name
        records = cohort.records_of(subjects)
        if not records:
            raise DataError(f"{name}: no record for its {len(subjects)} subject(s)")
        wanted: set[Path] = set()
        for record in records:
            header = cohort.headers[record]
            rel_dir = Path(record).parent
            for f in record_files(header):
                link = site_dir / "data" / rel_dir / f.relative_to(header.parent)
                _link(f.resolve(), link)
                wanted.add(link)
        for stale in (site_dir / "data").rglob("*"):
            if stale.is_symlink() and stale not in wanted:
                stale.unlink()  # a subject that moved to another site in this partition
        (site_dir / "labels.csv").write_text(_labels_csv(cohort, records))
        toml = site_dir / SITE_TOML
        toml.write_text(
            site_toml(name, "data", settings, labels_csv="labels.csv", tables={"tasks": tasks})
        )
        initialise_site_state(site_dir / "state", name=name)
        tomls.append(toml)
    return tomls
