"""Site data formats: find the records of a data folder and read them, whatever the format.

A site points ``site.toml`` at its folder; ``[reader] format = "auto"`` (the default) detects the
format from the files, or a site names it. Formats:

- ``wfdb``: WFDB records (``.hea`` + ``.dat``/``.mat``/FLAC ...), e.g. BIDMC and CinC 2017. Record
  labels from a ``REFERENCE.csv`` beside them (no header: ``record,class``; CinC's); subject labels
  (age, sex, ...) from ``<key>: value`` header comments (BIDMC's).
- ``matseg``: MATLAB files of segment arrays, one file per subject, one row per segment, each
  segment a record (e.g. Liu 2022: ``ppgseg`` n x 1000 at 100 Hz + ``labels`` n x 1, a label per
  segment, i.e. per window). Which array holds which modality at which rate, and which arrays
  are labels, is the site's choice (``[reader.matseg]``); ``preset = "liu2022"`` is Liu's.
- ``textseg``: one segment per text file (numbers separated by white space), the subject in the
  file name, labels per subject in a spreadsheet (``.xlsx`` or ``.csv``) joined on a key column
  (``[reader.textseg]``; ``preset = "ppg-bp"`` is PPG-BP's: 1 kHz PPG, ``<subject>_<n>.txt``,
  ``PPG-BP dataset.xlsx`` keyed by ``subject_ID``).
- ``edf``: EDF/EDF+ files (``.edf``, ``.bdf``) read with edfio; ECG and PPG picked by channel
  alias as in WFDB; the subject is the EDF+ patient code when there is one.

Every reader is tolerant: a file it cannot use raises `RecordError` (one line: file and problem)
and the window store skips and lists it. A folder holding several formats is read as its
majority format; files of the others are listed as skipped, each with the reason.
"""

from __future__ import annotations

import csv
import functools
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from biofp_core.config import ChannelAliases
from biofp_core.errors import DataError, RecordError
from biofp_core.signals.channels import rank_channels
from biofp_core.signals.read import find_records, read_record
from biofp_core.signals.types import Channel, RawRecord

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("wfdb", "matseg", "textseg", "edf")
FormatName = Literal["auto", "wfdb", "matseg", "textseg", "edf"]
Level = Literal["subject", "record", "window"]
LEVELS: tuple[str, ...] = ("subject", "record", "window")
EDF_SUFFIXES = (".edf", ".bdf")
SHEET_SUFFIXES = (".xlsx", ".csv")
_NOT_ALNUM = re.compile(r"[^a-z0-9]+")
_UNITS = re.compile(r"\([^)]*\)")  # 'Sex(M/F)', 'BMI(kg/m^2)'

_HEADER_FIELD = re.compile(r"<(\w+)>:\s*([^<]*)")

MISSING = frozenset({"?", "na", "n/a", "nan", "none", "unknown"})  # header values: no label
# Liu et al. 2022: label codes of `labels` in each MPA_<id>.mat
LIU_RHYTHMS = {"0": "sinus", "1": "PVC", "2": "PAC", "3": "VT", "4": "SVT", "5": "AF"}


def column_name(name: str) -> str:
    """A label column name as BioFP uses it, units dropped: 'Age(year)' -> 'age'."""
    name = _UNITS.sub("", str(name)) or str(name)
    return _NOT_ALNUM.sub("_", name.lower()).strip("_")


class SegmentArray(BaseModel):
    """One array of segments: its modality and sampling rate."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    modality: Literal["ecg", "ppg"]
    fs_hz: float = Field(gt=0)


MATSEG_PRESETS: dict[str, dict] = {
    "liu2022": {
        "signals": {"ppgseg": {"modality": "ppg", "fs_hz": 100.0}},
        "labels": {"labels": "rhythm"},
        "values": {"rhythm": LIU_RHYTHMS},
    }
}
TEXTSEG_PRESETS: dict[str, dict] = {
    "ppg-bp": {
        "modality": "ppg",
        "fs_hz": 1000.0,
        "name_pattern": r"(?P<subject>[A-Za-z0-9]+)_(?P<segment>\d+)",
        "label_key": "subject_ID",
    }
}


def _with_preset(raw: object, presets: dict[str, dict]) -> object:
    """A preset's values under the keys a site gives itself."""
    if isinstance(raw, dict) and raw.get("preset") in presets:
        return {**presets[raw["preset"]], **raw}
    return raw


class MatSegConfig(BaseModel):
    """``[reader.matseg]``: which arrays of each .mat file are signals and which labels.

    The defaults are the ``liu2022`` preset; ``preset = "liu2022"`` fills every key the site
    does not set from it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    preset: Literal["liu2022"] | None = None
    signals: dict[str, SegmentArray] = {"ppgseg": SegmentArray(modality="ppg", fs_hz=100.0)}
    labels: dict[str, str] = {"labels": "rhythm"}  # array -> label column (one per segment)
    values: dict[str, dict[str, str]] = {"rhythm": LIU_RHYTHMS}  # column -> code -> name

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, raw: object) -> object:
        return _with_preset(raw, MATSEG_PRESETS)


class TextSegConfig(BaseModel):
    """``[reader.textseg]``: one segment per text file, labels per subject in a sheet.

    The defaults are the ``ppg-bp`` preset; ``preset = "ppg-bp"`` fills every key the site does
    not set from it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    preset: Literal["ppg-bp"] | None = None
    modality: Literal["ecg", "ppg"] = "ppg"
    fs_hz: float = Field(1000.0, gt=0)
    name_pattern: str = r"(?P<subject>[A-Za-z0-9]+)_(?P<segment>\d+)"  # file stem, full match
    label_sheet: str | None = Field(
        None, description="sheet file name (default: the first .xlsx/.csv with the key column)"
    )
    label_key: str = "subject_ID"  # the sheet's subject column

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, raw: object) -> object:
        return _with_preset(raw, TEXTSEG_PRESETS)

    @model_validator(mode="after")
    def _check_pattern(self) -> TextSegConfig:
        try:
            groups = re.compile(self.name_pattern).groupindex
        except re.error as exc:
            raise ValueError(f"name_pattern: {exc}") from None
        if "subject" not in groups:
            raise ValueError("name_pattern needs a (?P<subject>...) group")
        return self


class ReaderConfig(BaseModel):
    """``[reader]`` of site.toml: the folder's format and format options."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: FormatName = "auto"
    record_labels: str = Field(
        "REFERENCE.csv", description="wfdb: headerless CSV of record,label beside the records"
    )
    record_label_column: str = "rhythm"
    matseg: MatSegConfig = MatSegConfig()
    textseg: TextSegConfig = TextSegConfig()


@dataclass(frozen=True)
class Item:
    """One unit of reading: a WFDB header, a .mat file, a text file or an EDF file."""

    item_id: str  # path relative to the data folder, without suffix
    path: Path
    files: tuple[Path, ...]  # every file whose content it depends on (for cache keys)


@dataclass
class SiteLabels:
    """Labels found beside the data, per level; problems are one line each."""

    subject: dict[str, dict[str, str]] = field(default_factory=dict)
    record: dict[str, dict[str, str]] = field(default_factory=dict)
    levels: dict[str, Level] = field(default_factory=dict)  # column -> level
    files: list[Path] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (file, problem)


@dataclass
class Source:
    """A site's data folder as read: its format, units of reading, skipped files and labels.

    `label_files` are the files labels may come from (cheap: for cache keys); `labels` reads
    them on first use only, so reopening a cached store parses no spreadsheet.
    """

    data_dir: Path
    format: str
    items: list[Item]
    skipped: list[tuple[str, str]]  # (file relative to data_dir, reason)
    config: ReaderConfig
    label_files: list[Path] = field(default_factory=list)

    @functools.cached_property
    def labels(self) -> SiteLabels:
        return _labels(self.format, self.data_dir, self.items, self.config)


# ---- detection ------------------------------------------------------------------------------


def _rel(path: Path, data_dir: Path) -> str:
    return path.relative_to(data_dir).as_posix()


def _candidates(data_dir: Path, cfg: ReaderConfig) -> tuple[dict[str, list[Path]], list[Item]]:
    """Files that look like records of each format, and the WFDB records as items (their
    signal files, e.g. CinC's .mat, belong to them and are not MATLAB segment files)."""
    files = sorted(
        (p for p in data_dir.rglob("*") if p.is_file() and not p.name.startswith(".")), key=str
    )
    has_headers = any(p.suffix == ".hea" for p in files)
    wfdb = [_item(h, data_dir, "wfdb") for h in find_records(data_dir)] if has_headers else []
    claimed = {f for item in wfdb for f in item.files}
    pattern = re.compile(cfg.textseg.name_pattern)
    found = {
        "wfdb": [item.path for item in wfdb],
        "matseg": [p for p in files if p.suffix == ".mat" and p not in claimed],
        "textseg": [p for p in files if p.suffix == ".txt" and pattern.fullmatch(p.stem)],
        "edf": [p for p in files if p.suffix.lower() in EDF_SUFFIXES],
    }
    return found, wfdb


def open_source(data_dir: Path, config: ReaderConfig = ReaderConfig()) -> Source:
    """Detect (or take) the folder's format, list its records and read its labels.

    Raises
    ------
    DataError
        The folder is missing or holds nothing any reader can use.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        problem = "not a directory" if data_dir.exists() else "data directory not found"
        raise DataError(f"{data_dir}: {problem}")
    found, wfdb_items = _candidates(data_dir, config)
    present = {f: paths for f, paths in found.items() if paths}
    if config.format != "auto":
        fmt = config.format
        if not found[fmt]:
            raise DataError(f"{data_dir}: no {fmt} records found")
    elif not present:
        raise DataError(
            f"{data_dir}: no records found (looked for WFDB .hea, .mat segment files, "
            "<subject>_<n>.txt segment files and .edf/.bdf)"
        )
    else:  # the majority format; ties go to FORMATS order
        fmt = max(present, key=lambda f: (len(present[f]), -FORMATS.index(f)))
    skipped = [
        (_rel(p, data_dir), f"a {other} file in a {fmt} folder (mixed formats): skipped")
        for other, paths in present.items()
        if other != fmt
        for p in paths
    ]
    if skipped:
        log.warning("%s: %d files of other formats than %s skipped", data_dir, len(skipped), fmt)
    items = wfdb_items if fmt == "wfdb" else [_item(p, data_dir, fmt) for p in found[fmt]]
    return Source(data_dir, fmt, items, skipped, config, _label_files(fmt, data_dir, config))


def _label_files(fmt: str, data_dir: Path, cfg: ReaderConfig) -> list[Path]:
    """Every file labels of this format may be read from (headers are record files already)."""
    if fmt == "wfdb":
        path = data_dir / cfg.record_labels
        return [path] if path.is_file() else []
    if fmt == "textseg":
        if cfg.textseg.label_sheet is not None:
            path = data_dir / cfg.textseg.label_sheet
            return [path] if path.is_file() else []
        return sorted(p for p in data_dir.rglob("*") if p.suffix in SHEET_SUFFIXES and p.is_file())
    return []


def _item(path: Path, data_dir: Path, fmt: str) -> Item:
    item_id = path.relative_to(data_dir).with_suffix("").as_posix()
    if fmt == "wfdb":
        from biofp_core.store import record_files  # the store knows WFDB's file graph

        return Item(item_id, path, tuple(record_files(path)))
    return Item(item_id, path, (path,))


# ---- reading -----------------------------------------------------------------------------------


def read_item(
    fmt: str, item: Item, data_dir: Path, config: ReaderConfig, aliases: ChannelAliases
) -> list[RawRecord]:
    """The records of one unit of reading (a .mat file holds many segments).

    Raises
    ------
    RecordError
        The file is unusable; one line naming it and the problem.
    """
    if fmt == "wfdb":
        return [read_record(item.path, aliases=aliases, data_dir=data_dir)]
    if fmt == "matseg":
        return _read_matseg(item, config.matseg)
    if fmt == "textseg":
        return [_read_textseg(item, config.textseg)]
    if fmt == "edf":
        return [_read_edf(item, aliases)]
    raise ValueError(f"unknown format {fmt!r}")


def _channel(name: str, fs_hz: float, samples: np.ndarray) -> Channel:
    return Channel(name=name, fs_hz=float(fs_hz), samples=np.asarray(samples, dtype=np.float64))


def _read_matseg(item: Item, cfg: MatSegConfig) -> list[RawRecord]:
    """One record per segment row of each signal array; label arrays give window labels."""
    import scipy.io

    try:
        arrays = scipy.io.loadmat(str(item.path))
    except NotImplementedError:
        raise RecordError(item.path, "MATLAB v7.3 (HDF5) file: save it with -v7") from None
    except Exception as exc:  # scipy raises ValueError, TypeError, OSError ... on bad files
        raise RecordError(item.path, f"unreadable MATLAB file: {_short(exc)}") from None
    names = sorted(k for k in arrays if not k.startswith("__"))
    missing = [a for a in cfg.signals if a not in arrays]
    if len(missing) == len(cfg.signals):
        wanted = ", ".join(repr(a) for a in cfg.signals)
        raise RecordError(item.path, f"no array {wanted} (has: {', '.join(names) or 'none'})")
    segments: dict[str, np.ndarray] = {}
    for name, spec in cfg.signals.items():
        if name not in arrays:
            continue
        a = np.asarray(arrays[name])
        if a.ndim == 1 or (a.ndim == 2 and 1 in a.shape and a.shape[0] == 1):
            a = a.reshape(1, -1)
        if a.ndim != 2 or not np.issubdtype(a.dtype, np.number):
            raise RecordError(item.path, f"array {name!r} is not a numeric (segments x samples)")
        segments[spec.modality] = a.astype(np.float64)
    counts = {len(a) for a in segments.values()}
    if len(counts) > 1:
        raise RecordError(item.path, f"signal arrays hold different segment counts {counts}")
    n = counts.pop()
    labels: dict[str, list[str]] = {}
    for array, column in cfg.labels.items():
        if array not in arrays:
            continue
        values = np.asarray(arrays[array]).reshape(-1)
        if len(values) != n:
            problem = f"label array {array!r} has {len(values)} values for {n} segments"
            raise RecordError(item.path, problem)
        names_of = cfg.values.get(column, {})
        labels[column] = [names_of.get(_cell(v), _cell(v)) for v in values]
    arrays_of = {m: next(a for a, s in cfg.signals.items() if s.modality == m) for m in segments}
    rate = {s.modality: s.fs_hz for s in cfg.signals.values()}
    subject = item.path.stem
    records = []
    for i in range(n):
        chans = {
            m: _channel(arrays_of[m], rate[m], segments[m][i])
            for m in ("ecg", "ppg")
            if m in segments
        }
        records.append(
            RawRecord(
                record_id=f"{item.item_id}/{i + 1:05d}",
                ecg=chans.get("ecg"),
                ppg=chans.get("ppg"),
                all_channels=tuple(arrays_of.values()),
                subject_id=subject,
                window_labels={c: v[i] for c, v in labels.items()},
            )
        )
    return records


def _cell(value: object) -> str:
    """A label cell as text: integral floats lose their '.0', None becomes ''."""
    if value is None:
        return ""
    if isinstance(value, float | np.floating):
        if not np.isfinite(value):
            return ""
        if float(value).is_integer():
            return str(int(value))
    if isinstance(value, np.integer):
        return str(int(value))
    return str(value).strip()


def _read_textseg(item: Item, cfg: TextSegConfig) -> RawRecord:
    """One segment: numbers separated by white space (tabs, spaces, newlines)."""
    try:
        tokens = item.path.read_text(encoding="utf-8", errors="replace").split()
    except OSError as exc:
        raise RecordError(item.path, f"unreadable file: {exc.strerror}") from None
    if not tokens:
        raise RecordError(item.path, "empty file")
    try:
        samples = np.array(tokens, dtype=np.float64)
    except ValueError:
        bad = next(t for t in tokens if not _is_number(t))
        raise RecordError(item.path, f"non-numeric value {bad[:20]!r}") from None
    match = re.fullmatch(cfg.name_pattern, item.path.stem)
    subject = match.group("subject") if match else item.path.stem
    chan = _channel(item.path.name, cfg.fs_hz, samples)
    return RawRecord(
        record_id=item.item_id,
        ecg=chan if cfg.modality == "ecg" else None,
        ppg=chan if cfg.modality == "ppg" else None,
        all_channels=(item.path.name,),
        subject_id=subject,
    )


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _read_edf(item: Item, aliases: ChannelAliases) -> RawRecord:
    """ECG and PPG channels of an EDF/EDF+/BDF file (physical units, own rates)."""
    import edfio

    try:
        edf = edfio.read_edf(item.path) if item.path.suffix.lower() == ".edf" else None
        if edf is None:
            edf = edfio.read_bdf(item.path)
    except Exception as exc:  # edfio raises ValueError, EdfError, OSError ... on bad files
        raise RecordError(item.path, f"unreadable EDF file: {_short(exc)}") from None
    signals = [s for s in edf.signals]
    names = [s.label for s in signals]
    ecg_idx, ppg_idx = rank_channels(names, aliases)
    if not ecg_idx and not ppg_idx:
        listed = ", ".join(n for n in names if n) or "none"
        raise RecordError(item.path, f"no ECG or PPG channel (channels: {listed})")

    def channel(idx: tuple[int, ...]) -> Channel | None:
        for i in idx:
            s = signals[i]
            data = np.asarray(s.data, dtype=np.float64)
            if len(data) and not np.isnan(data).all():
                return Channel(s.label, float(s.sampling_frequency), data, s.physical_dimension)
        return None

    ecg, ppg = channel(ecg_idx), channel(ppg_idx)
    if ecg is None and ppg is None:
        raise RecordError(item.path, "ECG/PPG channels hold no samples")
    subject = None
    try:
        code = edf.patient.code
        subject = code if code and code.upper() != "X" else None
    except Exception:  # not EDF+ compliant patient field: the file is its own subject
        subject = None
    return RawRecord(
        record_id=item.item_id, ecg=ecg, ppg=ppg, all_channels=tuple(names), subject_id=subject
    )


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:160] or type(exc).__name__


# ---- labels ------------------------------------------------------------------------------------


def _labels(fmt: str, data_dir: Path, items: list[Item], cfg: ReaderConfig) -> SiteLabels:
    labels = SiteLabels()
    if fmt == "wfdb":
        _reference_labels(data_dir, items, cfg, labels)
        _header_labels(items, labels)
    elif fmt == "matseg":
        for column in cfg.matseg.labels.values():
            labels.levels[column] = "window"
    elif fmt == "textseg":
        _sheet_labels(data_dir, items, cfg.textseg, labels)
    return labels


def _reference_labels(
    data_dir: Path, items: list[Item], cfg: ReaderConfig, labels: SiteLabels
) -> None:
    """Record labels from a headerless ``record,label`` CSV (CinC's REFERENCE.csv)."""
    path = data_dir / cfg.record_labels
    if not path.is_file():
        return
    known = {i.item_id for i in items}
    rows: dict[str, dict[str, str]] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            for row in csv.reader(fh):
                if len(row) >= 2 and row[0].strip() in known:
                    rows[row[0].strip()] = {cfg.record_label_column: row[1].strip()}
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        labels.problems.append((path.name, f"unreadable labels: {_short(exc)}"))
        return
    if not rows:
        labels.problems.append((path.name, "names none of the records: ignored"))
        return
    labels.record.update(rows)
    labels.levels[cfg.record_label_column] = "record"
    labels.files.append(path)


def _header_labels(items: list[Item], labels: SiteLabels) -> None:
    """Subject labels from WFDB header comments ``<age>: 88 <sex>: M`` (BIDMC's)."""
    found: dict[str, dict[str, str]] = {}
    for item in items:
        try:
            text = item.path.read_text(encoding="ascii", errors="ignore")
        except OSError:
            continue
        comments = " ".join(ln.lstrip("#") for ln in text.splitlines() if ln.startswith("#"))
        fields = {
            column_name(k): v.strip()
            for k, v in _HEADER_FIELD.findall(comments)
            if len(v.split()) == 1 and "://" not in v and v.strip().lower() not in MISSING
        }
        if fields:
            found[item.item_id] = fields
    if found:
        labels.subject.update(found)  # keyed by record id: the store maps them to subjects
        for column in {c for f in found.values() for c in f}:
            labels.levels[column] = "subject"


def _sheet_rows(path: Path) -> list[list[str]]:
    """Every row of the first worksheet of an .xlsx, or of a .csv, as text cells."""
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as fh:
            return [[c.strip() for c in row] for row in csv.reader(fh)]
    import openpyxl

    book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    try:
        sheet = book.worksheets[0]
        return [[_cell(c) for c in row] for row in sheet.iter_rows(values_only=True)]
    finally:
        book.close()


def _sheet_labels(
    data_dir: Path, items: list[Item], cfg: TextSegConfig, labels: SiteLabels
) -> None:
    """Subject labels from the label sheet, joined on `cfg.label_key`."""
    if cfg.label_sheet is not None:
        sheets = [data_dir / cfg.label_sheet]
        if not sheets[0].is_file():
            labels.problems.append((cfg.label_sheet, "label sheet not found"))
            return
    else:
        sheets = sorted(
            p for p in data_dir.rglob("*") if p.suffix in SHEET_SUFFIXES and p.is_file()
        )
        sheets.sort(key=lambda p: (p.suffix != ".xlsx", len(p.parts), p.name))
    subjects = {
        m.group("subject")
        for i in items
        if (m := re.fullmatch(cfg.name_pattern, i.path.stem)) is not None
    }
    key = column_name(cfg.label_key)
    for sheet in sheets:
        try:
            rows = _sheet_rows(sheet)
        except Exception as exc:  # openpyxl/zipfile/csv errors on bad files
            labels.problems.append((_rel(sheet, data_dir), f"unreadable sheet: {_short(exc)}"))
            continue
        header_at = next(
            (i for i, row in enumerate(rows[:20]) if key in {column_name(c) for c in row}), None
        )
        if header_at is None:
            if cfg.label_sheet is not None or sheet.suffix == ".xlsx":
                problem = f"no key column {cfg.label_key!r}: labels ignored"
                labels.problems.append((_rel(sheet, data_dir), problem))
            continue
        header = [column_name(c) for c in rows[header_at]]
        at = header.index(key)
        table: dict[str, dict[str, str]] = {}
        for row in rows[header_at + 1 :]:
            if at < len(row) and row[at] in subjects:
                table[row[at]] = {
                    c: (row[j] if j < len(row) else "")
                    for j, c in enumerate(header)
                    if c and j != at and c != "num"
                }
        if not table:
            problem = f"no row of {cfg.label_key!r} names a subject of the data: ignored"
            labels.problems.append((_rel(sheet, data_dir), problem))
            continue
        labels.subject.update(table)
        for column in {c for r in table.values() for c in r}:
            labels.levels[column] = "subject"
        labels.files.append(sheet)
        return
