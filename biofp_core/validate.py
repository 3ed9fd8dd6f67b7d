"""Site validation: what each record gives (rate, duration, channels, windows kept and dropped)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel

from biofp_core.errors import DataError
from biofp_core.fsutil import atomic_write_text
from biofp_core.site import SiteConfig, check_label_ids, read_subject_map
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
    windows_padded: int = 0
    windows_dropped: dict[str, int] = {}
    problem: str | None = None


class FormatSummary(BaseModel):
    """What the reader of the folder's format read, as `biofp site validate` prints it."""

    format: str
    records: int
    subjects: int
    modalities: dict[str, int]  # "ecg", "ppg", "ecg+ppg" -> records
    rates_hz: dict[str, list[float]]  # modality -> distinct original rates
    duration_s: tuple[float, float, float]  # min, median, max per record
    windows_kept: int
    windows_padded: int
    windows_dropped: dict[str, int]  # reason -> windows
    records_skipped: dict[str, int]  # reason -> records/files
    label_levels: dict[str, str]  # column -> subject/record/window
    label_problems: list[str]


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
    summary: FormatSummary | None = None


def _reason(problem: str) -> str:
    """A failure's reason without its specifics, for counting: 'no usable windows (dropped ...'."""
    for sep in (" (", ":"):
        if sep in problem:
            problem = problem.split(sep)[0]
    return problem.strip()


def format_summary(store: WindowStore) -> FormatSummary:
    """Per-format totals of a store: records, subjects, modalities, rates, windows, labels."""
    import numpy as np

    m = store.manifest
    modalities: dict[str, int] = {}
    rates: dict[str, set[float]] = {}
    dropped: dict[str, int] = {}
    for r in m.records:
        present = [k for k, v in r.channels.items() if v]
        key = "+".join(present) or "-"
        modalities[key] = modalities.get(key, 0) + 1
        for k in present:
            rates.setdefault(k, set()).add(round(float(r.fs_hz[k] or 0), 3))
        for reason, n in r.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + n
    skipped: dict[str, int] = {}
    for f in m.failures:
        skipped[_reason(f.problem)] = skipped.get(_reason(f.problem), 0) + 1
    durations = np.array([r.duration_s for r in m.records])
    return FormatSummary(
        format=m.format,
        records=len(m.records),
        subjects=len(store.subject_ids()),
        modalities=modalities,
        rates_hz={k: sorted(v) for k, v in sorted(rates.items())},
        duration_s=(float(durations.min()), float(np.median(durations)), float(durations.max())),
        windows_kept=m.n_windows,
        windows_padded=m.n_padded,
        windows_dropped=dropped,
        records_skipped=skipped,
        label_levels=m.label_levels,
        label_problems=[f"{p.record_id}: {p.problem}" for p in m.label_problems],
    )


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
        reader=config.reader,
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
            windows_padded=r.n_padded,
            windows_dropped=r.dropped,
        )
        for r in m.records
    ]
    rows += [RecordRow(record_id=f.record_id, subject_id=None, usable=False, problem=f.problem)
             for f in m.failures]  # fmt: skip
    rows.sort(key=lambda r: r.record_id)
    labels = None
    if config.labels_csv is not None:
        key, label_rows = check_label_ids(
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
        summary=format_summary(store),
    )


def write_report_json(report: ValidationReport, path: Path) -> None:
    """Write the report as JSON (atomically: an old report survives a failed write)."""
    atomic_write_text(Path(path), report.model_dump_json(indent=1))
