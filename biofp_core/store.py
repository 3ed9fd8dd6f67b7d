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
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from biofp_core import __version__
from biofp_core.config import PreprocessConfig
from biofp_core.errors import DataError, RecordError
from biofp_core.fsutil import atomic_write_text
from biofp_core.signals.preprocess import preprocess_record
from biofp_core.signals.read import find_records, read_record
from biofp_core.signals.types import MODALITIES, SubjectWindows, Windows

log = logging.getLogger(__name__)

STORE_VERSION = 1
QUALITY_FIELDS = ("flat_frac", "clip_frac", "skewness", "template_corr", "score")
ARRAY_NAMES = ("ecg", "ppg", "mask", "quality", "start_s", "record_index")


class RecordSummary(BaseModel):
    """What one record contributed to the store."""

    model_config = ConfigDict(extra="forbid")

    record_id: str
    subject_id: str
    duration_s: float
    channels: dict[str, str | None]  # modality -> header channel name
    fs_hz: dict[str, float | None]  # modality -> original rate
    n_windows: int
    dropped: dict[str, int]


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
    config: PreprocessConfig
    records: list[RecordSummary]
    failures: list[RecordFailure]
    n_windows: int

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
        self.record_index = arrays["record_index"]

    def __len__(self) -> int:
        return self.manifest.n_windows

    def subject_ids(self) -> list[str]:
        return sorted({r.subject_id for r in self.manifest.records})

    def subjects(self, *, only: Iterable[str] | None = None) -> list[SubjectWindows]:
        """Windows grouped by subject (arrays loaded into memory), in subject-id order."""
        wanted = set(only) if only is not None else None
        by_subject: dict[str, list[int]] = {}
        for i, rec in enumerate(self.manifest.records):
            if wanted is None or rec.subject_id in wanted:
                by_subject.setdefault(rec.subject_id, []).append(i)
        score = QUALITY_FIELDS.index("score")
        out = []
        for subject_id in sorted(by_subject):
            rows = np.flatnonzero(np.isin(self.record_index, by_subject[subject_id]))
            if len(rows) == 0:
                continue
            out.append(
                SubjectWindows(
                    subject_id=subject_id,
                    ecg=np.asarray(self.ecg[rows]),
                    ppg=np.asarray(self.ppg[rows]),
                    mask=np.asarray(self.mask[rows]),
                    quality=np.asarray(self.quality[rows, :, score]),
                    start_s=np.asarray(self.start_s[rows]),
                    record_index=np.asarray(self.record_index[rows]),
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
) -> WindowStore:
    """Open the store for `data_dir` + `config`, building it first if the cache has none.

    Bad records are skipped and listed in the manifest's failures; a site with no usable record
    raises DataError. `on_record` is called with each record id as it finishes (for progress).
    """
    data_dir = Path(data_dir).resolve()
    headers = find_records(data_dir)
    key = store_key(data_dir, headers, config, Path(cache_dir))
    path = Path(cache_dir) / key
    if (path / "manifest.json").exists():
        store = WindowStore(path)
        if _subjects_match(store.manifest, subject_map):
            log.info("window store cache hit: %s", path)
            return store
    results = _process_all(headers, data_dir, config, workers=workers, on_record=on_record)
    _write_store(path, key, data_dir, config, results, subject_map or {})
    return WindowStore(path)


def _subjects_match(manifest: StoreManifest, subject_map: dict[str, str] | None) -> bool:
    mapping = subject_map or {}
    return all(r.subject_id == mapping.get(r.record_id, r.record_id) for r in manifest.records)


def store_key(
    data_dir: Path, headers: list[Path], config: PreprocessConfig, cache_dir: Path
) -> str:
    """sha256 over (record file names, their content digests) and the config digest."""
    files = sorted({f for h in headers for f in record_files(h)})
    digests = file_digests(files, memo_path=cache_dir / "digests.json")
    h = hashlib.sha256(f"v{STORE_VERSION}:{config.digest()}".encode())
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


def _process_one(header: Path, data_dir: Path, config: PreprocessConfig) -> RecordResult:
    record_id = header.relative_to(data_dir).with_suffix("").as_posix()
    try:
        raw = read_record(header, aliases=config.aliases, data_dir=data_dir)
        windows = preprocess_record(raw, config)
    except RecordError as exc:
        return RecordResult(record_id, problem=exc.problem)
    if len(windows) == 0:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(windows.dropped.items())) or "none"
        return RecordResult(record_id, problem=f"no usable windows (dropped {reasons})")
    chans = {m.value: getattr(raw, m.value) for m in MODALITIES}
    summary = {
        "record_id": raw.record_id,
        "duration_s": raw.duration_s,
        "channels": {m: (c.name if c else None) for m, c in chans.items()},
        "fs_hz": {m: (c.fs_hz if c else None) for m, c in chans.items()},
        "n_windows": len(windows),
        "dropped": windows.dropped,
    }
    return RecordResult(raw.record_id, windows=windows, summary=summary)


def _process_all(
    headers: list[Path],
    data_dir: Path,
    config: PreprocessConfig,
    *,
    workers: int | None,
    on_record: Callable[[str], None] | None,
) -> list[RecordResult]:
    workers = workers or min(len(headers), os.cpu_count() or 1)
    if workers <= 1 or len(headers) < 4:
        results = []
        for h in headers:
            results.append(_process_one(h, data_dir, config))
            if on_record:
                on_record(results[-1].record_id)
        return results
    ctx = mp.get_context("fork")  # workers need numpy/scipy/wfdb only; fork starts in ~ms
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = [pool.submit(_process_one, h, data_dir, config) for h in headers]
        results = []
        for fut in futures:
            results.append(fut.result())
            if on_record:
                on_record(results[-1].record_id)
    return results


def _write_store(
    path: Path,
    key: str,
    data_dir: Path,
    config: PreprocessConfig,
    results: list[RecordResult],
    subject_map: dict[str, str],
) -> None:
    ok = [r for r in results if r.windows is not None]
    failures = [RecordFailure(record_id=r.record_id, problem=r.problem or "") for r in results]
    failures = [f for f, r in zip(failures, results, strict=True) if r.windows is None]
    if not ok:
        detail = f"; first: {failures[0].record_id}: {failures[0].problem}" if failures else ""
        raise DataError(f"{data_dir}: no usable record ({len(failures)} failed{detail})")
    summaries = [
        RecordSummary(**r.summary, subject_id=subject_map.get(r.record_id, r.record_id)) for r in ok
    ]
    arrays = _concat([r.windows for r in ok])
    manifest = StoreManifest(
        key=key,
        data_dir=str(data_dir),
        config=config,
        records=summaries,
        failures=failures,
        n_windows=len(arrays["start_s"]),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=path.parent))
    try:
        for name, arr in arrays.items():
            np.save(tmp / f"{name}.npy", arr)
        (tmp / "manifest.json").write_text(manifest.model_dump_json(indent=1))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _concat(windows: list[Windows]) -> dict[str, np.ndarray]:
    def quality(w: Windows) -> np.ndarray:
        per_mod = [
            np.stack([getattr(w.quality[m], f) for f in QUALITY_FIELDS], axis=-1)
            for m in MODALITIES
        ]
        return np.stack(per_mod, axis=1).astype(np.float32)  # (n, 2, 5)

    return {
        "ecg": np.concatenate([w.ecg for w in windows]).astype(np.float32, copy=False),
        "ppg": np.concatenate([w.ppg for w in windows]).astype(np.float32, copy=False),
        "mask": np.concatenate([w.mask for w in windows]).astype(bool, copy=False),
        "quality": np.concatenate([quality(w) for w in windows]),
        "start_s": np.concatenate([w.start_s for w in windows]).astype(np.float64, copy=False),
        "record_index": np.concatenate(
            [np.full(len(w), i, dtype=np.int32) for i, w in enumerate(windows)]
        ),
    }
