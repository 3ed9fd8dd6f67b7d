"""The per-site window store: preprocessed windows cached on disk as memory-mappable arrays.

A store lives in `<cache_dir>/<key>/`, where the key hashes the CONTENT of every record file
(header and signal files) and the preprocessing config, so any change to either builds a new
store and an unchanged site reopens its store in milliseconds. Files:

    manifest.json                 StoreManifest: config, one RecordSummary per record, failures
    ecg.npy, ppg.npy              (N, 1250) float32, z-scored, zeros where a modality is absent
    mask.npy                      (N, 2) bool, [has_ecg, has_ppg]
    quality.npy                   (N, 2, 5) float32, QUALITY_FIELDS per modality, NaN if absent
    start_s.npy                   (N,) float64, window start in its record
    record_index.npy              (N,) int32, index into manifest.records
    valid_n.npy                   (N,) int32, signal samples of each window (the rest is padding)
    window_labels.npy             (N, C) str, window-level labels (manifest.window_label_columns)

The manifest also holds the folder's format, the labels found per level (subject labels in the
manifest, record labels on each record, window labels in window_labels.npy) and every file that
was skipped with its reason. Windows are written to disk as records finish, so a site's store
never has to fit in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from biofp_core import __version__
from biofp_core.config import PreprocessConfig
from biofp_core.errors import DataError, RecordError
from biofp_core.fsutil import atomic_write_text
from biofp_core.signals.formats import Item, ReaderConfig, Source, open_source, read_item
from biofp_core.signals.preprocess import DROP_TOO_SHORT, preprocess_record
from biofp_core.signals.types import MODALITIES, RawRecord, SubjectWindows, Windows

log = logging.getLogger(__name__)

STORE_VERSION = 2
QUALITY_FIELDS = ("flat_frac", "clip_frac", "skewness", "template_corr", "score")
ARRAY_NAMES = ("ecg", "ppg", "mask", "quality", "start_s", "record_index", "valid_n")


class RecordSummary(BaseModel):
    """What one record contributed to the store."""

    model_config = ConfigDict(extra="forbid")

    record_id: str
    subject_id: str
    duration_s: float
    channels: dict[str, str | None]  # modality -> header channel name
    fs_hz: dict[str, float | None]  # modality -> original rate
    n_windows: int
    n_padded: int = 0  # windows of a record shorter than a window, zero-padded
    dropped: dict[str, int]
    default_subject: str = ""  # the subject the format gives (else the record id)
    labels: dict[str, str] = {}  # record-level labels


class RecordFailure(BaseModel):
    """A record that could not be used, with the one-line reason."""

    record_id: str
    problem: str


class StoreManifest(BaseModel):
    """The store's table of contents; `records[i]` matches `record_index == i`."""

    version: int = STORE_VERSION
    code_version: str = __version__
    key: str
    data_dir: str
    format: str = "wfdb"
    config: PreprocessConfig
    records: list[RecordSummary]
    failures: list[RecordFailure]
    n_windows: int
    label_levels: dict[str, str] = {}  # label column -> "subject", "record" or "window"
    subject_labels: dict[str, dict[str, str]] = {}
    window_label_columns: list[str] = []  # columns of window_labels.npy
    label_problems: list[RecordFailure] = []  # label files that could not be used, and why

    @property
    def n_padded(self) -> int:
        return sum(r.n_padded for r in self.records)

    @property
    def hours(self) -> float:
        return sum(r.duration_s for r in self.records) / 3600


@dataclass(frozen=True)
class RecordResult:
    """Outcome of processing one record in a worker: windows or a failure."""

    record_id: str
    windows: Windows | None = None
    summary: dict | None = None
    problem: str | None = None
    window_labels: dict[str, str] | None = None


class WindowStore:
    """An opened store: its manifest and read-only memory-mapped arrays."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.manifest = StoreManifest.model_validate_json((path / "manifest.json").read_bytes())
            arrays = {n: np.load(path / f"{n}.npy", mmap_mode="r") for n in ARRAY_NAMES}
        except (OSError, ValueError, ValidationError) as exc:
            raise DataError(f"{path}: unreadable window store: {exc}") from None
        self.ecg, self.ppg, self.mask = arrays["ecg"], arrays["ppg"], arrays["mask"]
        self.quality, self.start_s = arrays["quality"], arrays["start_s"]
        self.record_index, self.valid_n = arrays["record_index"], arrays["valid_n"]
        labels = path / "window_labels.npy"
        self.window_labels = np.load(labels, mmap_mode="r") if labels.exists() else None

    def __len__(self) -> int:
        return self.manifest.n_windows

    def subject_ids(self) -> list[str]:
        return sorted({r.subject_id for r in self.manifest.records})

    def subjects(self, *, only: Iterable[str] | None = None) -> list[SubjectWindows]:
        """Windows grouped by subject, in subject-id order.

        A subject whose windows are contiguous in the store (one record, or adjacent records)
        gets views of the memory-mapped signal arrays, so a site of thousands of subjects is
        not loaded into memory; others get copies of their rows.
        """
        wanted = set(only) if only is not None else None
        by_subject: dict[str, list[int]] = {}
        for i, rec in enumerate(self.manifest.records):
            if wanted is None or rec.subject_id in wanted:
                by_subject.setdefault(rec.subject_id, []).append(i)
        score = QUALITY_FIELDS.index("score")
        record_index = np.asarray(self.record_index)
        bounds = np.searchsorted(record_index, np.arange(len(self.manifest.records) + 1))
        out = []
        for subject_id in sorted(by_subject):
            # windows are stored record after record: a subject is a few contiguous ranges,
            # and a single range stays a view of the memory map (read only when drawn)
            ranges = [(bounds[i], bounds[i + 1]) for i in by_subject[subject_id]]
            ranges = [r for r in ranges if r[1] > r[0]]
            if not ranges:
                continue
            rows: slice | np.ndarray = np.concatenate([np.arange(a, b) for a, b in ranges])
            if len(rows) == ranges[-1][1] - ranges[0][0]:
                rows = slice(ranges[0][0], ranges[-1][1])
            out.append(
                SubjectWindows(
                    subject_id=subject_id,
                    ecg=np.asarray(self.ecg[rows]),
                    ppg=np.asarray(self.ppg[rows]),
                    mask=np.asarray(self.mask[rows]),
                    quality=np.asarray(self.quality[rows, :, score]),
                    start_s=np.asarray(self.start_s[rows]),
                    record_index=np.asarray(self.record_index[rows]),
                    valid_n=np.asarray(self.valid_n[rows]),
                )
            )
        return out


def build_store(
    data_dir: Path,
    *,
    cache_dir: Path,
    config: PreprocessConfig = PreprocessConfig(),
    subject_map: dict[str, str] | None = None,
    workers: int | None = None,
    on_record: Callable[[str], None] | None = None,
    reader: ReaderConfig = ReaderConfig(),
) -> WindowStore:
    """Open the store for `data_dir` + `config`, building it first if the cache has none.

    The folder's format is detected (or named by `reader`); bad files are skipped and listed in
    the manifest's failures; a site with no usable record raises DataError. `on_record` is
    called with each unit of reading's id as it finishes (for progress).
    """
    data_dir = Path(data_dir).resolve()
    source = open_source(data_dir, reader)
    key = store_key(data_dir, source, config, Path(cache_dir))
    path = Path(cache_dir) / key
    if (path / "manifest.json").exists():
        store = WindowStore(path)
        if _subjects_match(store.manifest, subject_map):
            log.info("window store cache hit: %s", path)
            return store
    _write_store(path, key, source, config, subject_map or {}, workers=workers, on_record=on_record)
    return WindowStore(path)


def _subjects_match(manifest: StoreManifest, subject_map: dict[str, str] | None) -> bool:
    mapping = subject_map or {}
    return all(
        r.subject_id == mapping.get(r.record_id, r.default_subject) for r in manifest.records
    )


def store_key(data_dir: Path, source: Source, config: PreprocessConfig, cache_dir: Path) -> str:
    """sha256 over (record and label file names, their content digests) and the configs."""
    files = sorted({f for item in source.items for f in item.files} | set(source.label_files))
    digests = file_digests(files, memo_path=cache_dir / "digests.json")
    configs = f"{config.digest()}:{source.config.model_dump_json()}:{source.format}"
    h = hashlib.sha256(f"v{STORE_VERSION}:{configs}".encode())
    for f in files:
        h.update(f"{f.relative_to(data_dir).as_posix()}={digests[f]};".encode())
    return h.hexdigest()[:24]


def record_files(header: Path) -> list[Path]:
    """The header and every file it references (signal files, segment headers and theirs)."""
    try:
        lines = [ln.split() for ln in header.read_text(errors="replace").splitlines()]
    except OSError:
        return [header]
    lines = [ln for ln in lines if ln and not ln[0].startswith("#")]
    files = [header]
    if not lines:
        return files
    multi_segment = "/" in lines[0][0]
    for ln in lines[1:]:
        name = ln[0]
        if name == "~":
            continue
        if multi_segment:
            files += record_files(header.parent / f"{name}.hea")
        elif (header.parent / name) not in files:
            files.append(header.parent / name)
    return files


def file_digests(files: list[Path], *, memo_path: Path) -> dict[Path, str]:
    """Content sha256 of each file, memoised by (path, size, mtime_ns) like git's index."""
    try:
        memo: dict[str, list] = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    stats = {f: f.stat() for f in files if f.exists()}

    def digest(f: Path) -> str:
        st = stats.get(f)
        if st is None:
            return "missing"
        hit = memo.get(str(f))
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit[2]
        with open(f, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()

    with ThreadPoolExecutor(max_workers=2) as pool:
        out = dict(zip(files, pool.map(digest, files), strict=True))
    fresh = {
        str(f): [stats[f].st_size, stats[f].st_mtime_ns, d] for f, d in out.items() if f in stats
    }
    if fresh != {k: v for k, v in memo.items() if k in fresh}:
        memo.update(fresh)
        atomic_write_text(memo_path, json.dumps(memo))
    return out


def _process_item(
    item: Item, fmt: str, data_dir: Path, reader: ReaderConfig, config: PreprocessConfig
) -> list[RecordResult]:
    """Every record of one unit of reading, preprocessed; one failure if it is unreadable."""
    try:
        raws = read_item(fmt, item, data_dir, reader, config.aliases)
    except RecordError as exc:
        return [RecordResult(item.item_id, problem=exc.problem)]
    return [_process_record(raw, config) for raw in raws]


def _process_record(raw: RawRecord, config: PreprocessConfig) -> RecordResult:
    try:
        windows = preprocess_record(raw, config)
    except RecordError as exc:
        return RecordResult(raw.record_id, problem=exc.problem)
    if len(windows) == 0:
        if windows.dropped.get(DROP_TOO_SHORT):
            problem = f"too short: {raw.duration_s:.1f} s < minimum {config.min_duration_s:g} s"
            return RecordResult(raw.record_id, problem=problem)
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(windows.dropped.items())) or "none"
        return RecordResult(raw.record_id, problem=f"no usable windows (dropped {reasons})")
    chans = {m.value: getattr(raw, m.value) for m in MODALITIES}
    summary = {
        "record_id": raw.record_id,
        "default_subject": raw.subject_id or raw.record_id,
        "duration_s": raw.duration_s,
        "channels": {m: (c.name if c else None) for m, c in chans.items()},
        "fs_hz": {m: (c.fs_hz if c else None) for m, c in chans.items()},
        "n_windows": len(windows),
        "n_padded": int((windows.valid_samples() < windows.ecg.shape[1]).sum()),
        "dropped": windows.dropped,
    }
    return RecordResult(
        raw.record_id, windows=windows, summary=summary, window_labels=raw.window_labels
    )


def _results(
    source: Source, config: PreprocessConfig, *, workers: int | None
) -> Iterator[list[RecordResult]]:
    """Results per unit of reading, in order, as they finish (never all held at once)."""
    items = source.items
    args = (source.format, source.data_dir, source.config, config)  # small: pickled per item
    workers = workers or min(len(items), os.cpu_count() or 1)
    if workers <= 1 or len(items) < 4:
        for item in items:
            yield _process_item(item, *args)
        return
    ctx = mp.get_context("fork")  # workers need numpy/scipy/wfdb only; fork starts in ~ms
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(_process_item, item, *args))
            if len(pending) >= 16 * workers:  # a bounded window of work in flight
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


NPY_HEADER_BYTES = 128  # a v1.0 .npy header padded to this size, rewritten with the final shape


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A .npy v1.0 header of exactly NPY_HEADER_BYTES for `dtype` and `shape`."""
    text = repr({"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                 "fortran_order": False, "shape": shape})  # fmt: skip
    pad = NPY_HEADER_BYTES - 10 - len(text) - 1
    if pad < 0:
        raise ValueError(f"shape {shape} does not fit a {NPY_HEADER_BYTES}-byte .npy header")
    body = (text + " " * pad + "\n").encode("latin1")
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body


class _ArrayWriter:
    """Append window arrays to .npy files as records finish (bounded memory); the headers are
    rewritten with the final row count at the end."""

    def __init__(self, folder: Path, window_n: int) -> None:
        self.folder, self.n = folder, 0
        self.spec = {
            "ecg": (np.float32, (window_n,)),
            "ppg": (np.float32, (window_n,)),
            "mask": (np.bool_, (len(MODALITIES),)),
            "quality": (np.float32, (len(MODALITIES), len(QUALITY_FIELDS))),
            "start_s": (np.float64, ()),
            "record_index": (np.int32, ()),
            "valid_n": (np.int32, ()),
        }
        self.files = {name: open(folder / f"{name}.npy", "wb") for name in self.spec}  # noqa: SIM115
        for name, fh in self.files.items():
            fh.write(_npy_header(self.spec[name][0], (0, *self.spec[name][1])))

    def add(self, w: Windows, record_index: int) -> None:
        arrays = {
            "ecg": w.ecg, "ppg": w.ppg, "mask": w.mask, "quality": _quality_array(w),
            "start_s": w.start_s, "record_index": np.full(len(w), record_index),
            "valid_n": w.valid_samples(),
        }  # fmt: skip
        for name, arr in arrays.items():
            dtype, _ = self.spec[name]
            self.files[name].write(np.ascontiguousarray(arr, dtype=dtype).tobytes())
        self.n += len(w)

    def finish(self) -> None:
        """Rewrite each file's header with the number of rows written."""
        for name, fh in self.files.items():
            dtype, shape = self.spec[name]
            fh.seek(0)
            fh.write(_npy_header(dtype, (self.n, *shape)))
            fh.close()


def _write_store(
    path: Path,
    key: str,
    source: Source,
    config: PreprocessConfig,
    subject_map: dict[str, str],
    *,
    workers: int | None,
    on_record: Callable[[str], None] | None,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=path.parent))
    try:
        writer = _ArrayWriter(tmp, config.window_samples)
        summaries: list[RecordSummary] = []
        failures = [RecordFailure(record_id=f, problem=p) for f, p in source.skipped]
        window_labels: dict[str, list[str]] = {}  # column -> value per window so far
        for item, results in zip(
            source.items, _results(source, config, workers=workers), strict=True
        ):
            for r in results:
                if r.windows is None:
                    failures.append(RecordFailure(record_id=r.record_id, problem=r.problem or ""))
                    continue
                summary = RecordSummary(**r.summary, subject_id="")
                summary.subject_id = subject_map.get(summary.record_id, summary.default_subject)
                summary.labels = source.labels.record.get(summary.record_id, {})
                for column in set(window_labels) | set(r.window_labels):
                    values = window_labels.setdefault(column, [""] * writer.n)
                    values.extend([r.window_labels.get(column, "")] * len(r.windows))
                writer.add(r.windows, len(summaries))
                summaries.append(summary)
            if on_record:
                on_record(item.item_id)
        writer.finish()
        if not summaries:
            detail = f"; first: {failures[0].record_id}: {failures[0].problem}" if failures else ""
            raise DataError(f"{source.data_dir}: no usable record ({len(failures)} failed{detail})")
        columns = sorted(window_labels)
        table = np.zeros((writer.n, 0), dtype="<U1")
        if columns:
            table = np.array([window_labels[c] for c in columns], dtype=str).T
        np.save(tmp / "window_labels.npy", table)
        manifest = StoreManifest(
            key=key,
            data_dir=str(source.data_dir),
            format=source.format,
            config=config,
            records=summaries,
            failures=failures,
            n_windows=writer.n,
            label_levels=dict(sorted(source.labels.levels.items())),
            subject_labels=_subject_labels(summaries, source),
            window_label_columns=columns,
            label_problems=[
                RecordFailure(record_id=f, problem=p) for f, p in source.labels.problems
            ],
        )
        (tmp / "manifest.json").write_text(manifest.model_dump_json(indent=1))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _subject_labels(summaries: list[RecordSummary], source: Source) -> dict[str, dict[str, str]]:
    """Subject -> its labels: rows keyed by subject, or by one of its records (header labels)."""
    out: dict[str, dict[str, str]] = {}
    for r in summaries:
        row = source.labels.subject.get(r.subject_id) or source.labels.subject.get(r.record_id)
        if row and r.subject_id not in out:
            out[r.subject_id] = row
    return dict(sorted(out.items()))


def _quality_array(w: Windows) -> np.ndarray:
    per_mod = [
        np.stack([getattr(w.quality[m], f) for f in QUALITY_FIELDS], axis=-1) for m in MODALITIES
    ]
    return np.stack(per_mod, axis=1).astype(np.float32)  # (n, 2, 5)


def label_rows(store: WindowStore) -> tuple[list[str], list[dict[str, str]]]:
    """The store's labels as one table at its most specific level, for a site's labels CSV.

    Columns ``record``, ``subject`` (and ``start_s`` when there are window labels: one row per
    window, joined to window fingerprints by record and start), then every label column;
    subject and record labels are repeated on each of their rows. ``([], [])`` without labels.
    """
    m = store.manifest
    if not m.label_levels:
        return [], []
    columns = sorted(m.label_levels)
    windowed = bool(m.window_label_columns)
    head = ["record", "subject", *(["start_s"] if windowed else []), *columns]
    rows: list[dict[str, str]] = []
    per_record = [
        {**m.subject_labels.get(r.subject_id, {}), **r.labels, "record": r.record_id,
         "subject": r.subject_id}
        for r in m.records
    ]  # fmt: skip
    if not windowed:
        return head, [{c: row.get(c, "") for c in head} for row in per_record]
    table = np.asarray(store.window_labels)
    record_index, start_s = np.asarray(store.record_index), np.asarray(store.start_s)
    for i in range(len(store)):
        row = dict(per_record[int(record_index[i])])
        row.update(zip(m.window_label_columns, table[i].tolist(), strict=True))
        row["start_s"] = f"{float(start_s[i]):g}"
        rows.append({c: row.get(c, "") for c in head})
    return head, rows


def write_labels_csv(store: WindowStore, path: Path) -> int:
    """Write `label_rows` to `path` (atomically); returns the number of rows (0: no labels)."""
    import csv
    import io

    head, rows = label_rows(store)
    if not head:
        return 0
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=head, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(Path(path), buf.getvalue())
    return len(rows)
