"""Site validation: what each record gives (rate, duration, channels, windows kept and dropped)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel

from biofp_core.errors import DataError
from biofp_core.fsutil import atomic_write_text
from biofp_core.site import SiteConfig, read_labels, read_subject_map
from biofp_core.store import WindowStore, build_store


class RecordRow(BaseModel):
    """One line of the validation table."""

    record_id: str
    subject_id: str | None
    usable: bool
    fs_hz: dict[str, float | None] = {}
    duration_s: float | None = None
    channels: dict[str, str | None] = {}
    windows_kept: int = 0
    windows_dropped: dict[str, int] = {}
    problem: str | None = None


class ValidationReport(BaseModel):
    """The whole site: rows per record, totals, and where the window store lives."""

    site: str
    data_dir: str
    store: str | None
    records: list[RecordRow]
    usable_records: int
    failed_records: int
    subjects: int
    windows: int
    hours: float
    labels: str | None = None  # "<n> rows keyed by subject" when a labels CSV was checked


def subject_map_for(config: SiteConfig) -> dict[str, str]:
    """record -> subject from the site's subject map, or from a labels CSV with both columns."""
    if config.subject_map_csv is not None:
        return read_subject_map(config.subject_map_csv)
    if config.labels_csv is not None:
        try:
            return read_subject_map(config.labels_csv)
        except DataError:
            return {}  # labels keyed by one column only: one subject per record
    return {}


def open_site_store(
    config: SiteConfig, *, on_record: Callable[[str], None] | None = None
) -> WindowStore:
    """Build (or reopen from cache) the window store of a configured site."""
    return build_store(
        config.data_dir,
        cache_dir=config.cache_dir,
        config=config.preprocess_config(),
        subject_map=subject_map_for(config),
        on_record=on_record,
    )


def validate_site(
    config: SiteConfig, *, on_record: Callable[[str], None] | None = None
) -> ValidationReport:
    """Process every record of the site and report; raises DataError if none is usable."""
    store = open_site_store(config, on_record=on_record)
    m = store.manifest
    rows = [
        RecordRow(
            record_id=r.record_id,
            subject_id=r.subject_id,
            usable=True,
            fs_hz=r.fs_hz,
            duration_s=r.duration_s,
            channels=r.channels,
            windows_kept=r.n_windows,
            windows_dropped=r.dropped,
        )
        for r in m.records
    ]
    rows += [RecordRow(record_id=f.record_id, subject_id=None, usable=False, problem=f.problem)
             for f in m.failures]  # fmt: skip
    rows.sort(key=lambda r: r.record_id)
    labels = None
    if config.labels_csv is not None:
        key, label_rows = read_labels(
            config.labels_csv,
            subjects={r.subject_id for r in m.records},
            records={r.record_id for r in m.records},
        )
        labels = f"{len(label_rows)} rows keyed by {key}"
    return ValidationReport(
        site=config.name,
        data_dir=str(config.data_dir),
        store=str(store.path),
        records=rows,
        usable_records=len(m.records),
        failed_records=len(m.failures),
        subjects=len(store.subject_ids()),
        windows=m.n_windows,
        hours=m.hours,
        labels=labels,
    )


def write_report_json(report: ValidationReport, path: Path) -> None:
    """Write the report as JSON (atomically: an old report survives a failed write)."""
    atomic_write_text(Path(path), report.model_dump_json(indent=1))
