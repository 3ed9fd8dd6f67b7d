"""Labels for probes, keyed by the same pseudonyms as the released fingerprints.

A site's labels CSV names raw subjects and records; the site pseudonymises them with its own key
(`SiteKey`), so labels and fingerprints meet without a name ever leaving. A CSV already keyed by
``record_pseudonym`` or ``subject_pseudonym`` needs no key. The join column is the most specific
one present: record, then subject. With both, every record's subject must agree with the
fingerprint file's. A CSV keyed by record that also has a ``start_s`` column labels WINDOWS
(a label per segment or window): its rows join window fingerprints by record and start, and
probes on it run per window, with folds still disjoint by subject.

A task's kind is inferred from its column: all numbers in {0, 1} -> binary; other numbers ->
regression; text -> binary (2 values) or multiclass; numbers mixed with text is an error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from biofp_core.errors import ConfigError, DataError
from biofp_core.fingerprints.pseudonyms import SiteKey
from biofp_core.fingerprints.table import FingerprintTable
from biofp_core.site import read_csv_rows

TaskKind = Literal["binary", "multiclass", "regression"]
TASK_KINDS: tuple[str, ...] = ("binary", "multiclass", "regression")
# label column -> (join key, raw: needs the site key), most specific first
KEY_COLUMNS: dict[str, tuple[Literal["subject", "record"], bool]] = {
    "record_pseudonym": ("record", False),
    "record": ("record", True),
    "subject_pseudonym": ("subject", False),
    "subject": ("subject", True),
}
START_COLUMN = "start_s"  # with a record key: labels per window
ID_COLUMNS = frozenset(KEY_COLUMNS) | {"site", START_COLUMN}


def window_id(record: str, start_s: float | str) -> str:
    """The join key of a window: its record (pseudonym) and start, e.g. 'r1b2@20'."""
    return f"{record}@{float(start_s):g}"


@dataclass(frozen=True)
class LabelRows:
    """Label rows keyed by pseudonym (record or subject), read from one or more CSV files."""

    source: str  # the file(s), for messages
    key: Literal["subject", "record", "window"]
    columns: tuple[str, ...]
    rows: dict[str, dict[str, str]]  # pseudonym -> {column: cell}
    subject_of: dict[str, str]  # record pseudonym -> subject pseudonym (when both are given)
    raw_ids: dict[str, str]  # pseudonym -> id as written in the file (for messages only)


@dataclass(frozen=True)
class TaskLabels:
    """One task's labels: a class index or a value per pseudonym."""

    task: str
    kind: TaskKind
    key: Literal["subject", "record", "window"]
    values: dict[str, float]  # pseudonym -> class index (classes) or value (regression)
    classes: tuple[str, ...]  # class names, index order; () for regression


def _key_column(path: Path, columns: list[str]) -> str:
    found = next((c for c in KEY_COLUMNS if c in columns), None)
    if found is None:
        raise DataError(
            f"{path}: missing key column, one of {', '.join(KEY_COLUMNS)} "
            f"(has: {', '.join(columns)})"
        )
    return found


def _pseudonymiser(path: Path, column: str, key: SiteKey | None) -> Callable[[str], str]:
    """Raw id -> pseudonym for a raw id column; identity for a pseudonym column."""
    kind, raw = KEY_COLUMNS[column]
    if not raw:
        return str
    if key is None:
        raise ConfigError(
            f"{path}: labels name raw {kind}s; give the site (--config or --site-dir) so they can "
            "be pseudonymised with its key"
        )
    return key.record if kind == "record" else key.subject


def _check_cells(path: Path, line: int, row: dict, expected: int) -> None:
    """A row with more or fewer cells than the header would shift or drop labels silently."""
    extra = row.get(None)  # csv.DictReader puts surplus cells under the key None
    missing = [k for k, v in row.items() if k is not None and v is None]
    if extra or missing:
        found = expected + len(extra or ()) - len(missing)
        raise DataError(f"{path}: line {line}: {found} cells, the header has {expected}")


def read_labels(path: Path, *, key: SiteKey | None = None) -> LabelRows:
    """Read a labels CSV and key its rows by pseudonym.

    Raises
    ------
    DataError
        Unreadable file, no key column, a row with more or fewer cells than the header, an
        empty or duplicated id.
    ConfigError
        Raw ids but no site key.
    """
    path = Path(path)
    columns, rows = read_csv_rows(path)
    column = _key_column(path, columns)
    join: Literal["subject", "record", "window"] = KEY_COLUMNS[column][0]
    windowed = join == "record" and START_COLUMN in columns
    to_pseudonym = _pseudonymiser(path, column, key)
    subject_col = next((c for c in ("subject_pseudonym", "subject") if c in columns), None)
    if join != "record" or windowed:
        subject_col = None
    to_subject = _pseudonymiser(path, subject_col, key) if subject_col else str
    keyed: dict[str, dict[str, str]] = {}
    raw_ids: dict[str, str] = {}
    subject_of: dict[str, str] = {}
    for line, row in enumerate(rows, start=2):
        _check_cells(path, line, row, len(columns))
        cells = {k.strip(): (v or "").strip() for k, v in row.items() if isinstance(k, str)}
        raw = cells.get(column, "")
        if not raw:
            raise DataError(f"{path}: line {line}: empty {column}")
        pseudonym = to_pseudonym(raw)
        if windowed:
            try:
                pseudonym = window_id(pseudonym, cells.get(START_COLUMN, ""))
            except ValueError:
                start = cells.get(START_COLUMN, "")
                raise DataError(f"{path}: line {line}: start_s {start!r} is not a number") from None
            raw = f"{raw}@{cells[START_COLUMN]}"
        if pseudonym in keyed:
            raise DataError(f"{path}: line {line}: duplicate {column} {raw!r}")
        keyed[pseudonym], raw_ids[pseudonym] = cells, raw
        if subject_col is not None:
            subject_of[pseudonym] = to_subject(cells.get(subject_col, ""))
    if windowed:
        join = "window"
    return LabelRows(str(path), join, tuple(columns), keyed, subject_of, raw_ids)


def merge_labels(parts: Sequence[LabelRows]) -> LabelRows:
    """One LabelRows from several sites' (their pseudonyms differ, so their rows never clash)."""
    if not parts:
        raise ValueError("merge_labels needs at least one part")
    if len({p.key for p in parts}) > 1:
        raise DataError("labels files are keyed differently (record vs subject): use one key")
    columns = tuple(dict.fromkeys(c for p in parts for c in p.columns))
    rows: dict[str, dict[str, str]] = {}
    for p in parts:
        rows.update(p.rows)
    return LabelRows(
        source=", ".join(p.source for p in parts),
        key=parts[0].key,
        columns=columns,
        rows=rows,
        subject_of={k: v for p in parts for k, v in p.subject_of.items()},
        raw_ids={k: v for p in parts for k, v in p.raw_ids.items()},
    )


def check_against(labels: LabelRows, table: FingerprintTable) -> None:
    """Every labelled id must be in the fingerprints, with the same subject for each record.

    Raises
    ------
    DataError
        Naming the labels file and an example of an unknown id or a disagreeing subject.
    """
    known = set(_ids(table, labels.key))
    unknown = sorted(labels.raw_ids[p] for p in labels.rows if p not in known)
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:3])
        raise DataError(
            f"{labels.source}: {len(unknown)} {labels.key}(s) in the labels are not in the "
            f"fingerprints (another site, or labels of other data), e.g. {shown}"
        )
    subject_of_record = dict(zip(table.record.astype(str), table.subject.astype(str), strict=True))
    for record, subject in labels.subject_of.items():
        if subject_of_record.get(record, subject) != subject:
            raise DataError(
                f"{labels.source}: record {labels.raw_ids[record]!r} has another subject in the "
                "fingerprints (was the site's subject map set when they were exported?)"
            )


def _number(cell: str) -> float | None:
    try:
        value = float(cell)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _infer_kind(path: str, task: str, cells: dict[str, str]) -> TaskKind:
    numbers = {p: _number(c) for p, c in cells.items()}
    text = [c for p, c in cells.items() if numbers[p] is None]
    if text and len(text) < len(cells):
        raise DataError(
            f"{path}: column {task!r} mixes numbers and text (e.g. {text[0]!r}); "
            "fix the cell or give the task's kind"
        )
    if text:
        return "binary" if len(set(text)) <= 2 else "multiclass"
    return "binary" if set(numbers.values()) <= {0.0, 1.0} else "regression"


def task_labels(labels: LabelRows, task: str, *, kind: TaskKind | None = None) -> TaskLabels:
    """The labels of one task (a column); empty cells are unlabelled.

    Raises
    ------
    DataError
        Missing column, no labelled row, non-numeric values for regression, a single class, or
        more than two classes for a binary task.
    """
    if task in ID_COLUMNS or task not in labels.columns:
        valid = ", ".join(c for c in labels.columns if c not in ID_COLUMNS)
        raise DataError(f"{labels.source}: no task column {task!r} (tasks: {valid})")
    cells = {p: row.get(task, "") for p, row in labels.rows.items()}
    cells = {p: c for p, c in cells.items() if c != ""}
    if not cells:
        raise DataError(f"{labels.source}: column {task!r} has no value")
    kind = kind or _infer_kind(labels.source, task, cells)
    if kind == "regression":
        values = {p: _number(c) for p, c in cells.items()}
        bad = next((cells[p] for p, v in values.items() if v is None), None)
        if bad is not None:
            raise DataError(f"{labels.source}: column {task!r} must be numeric, got {bad!r}")
        return TaskLabels(task, kind, labels.key, values, ())  # type: ignore[arg-type]
    classes = tuple(sorted(set(cells.values()), key=lambda c: (_number(c) is None, _number(c), c)))
    if len(classes) < 2:
        raise DataError(
            f"{labels.source}: task {task!r} has a single class ({classes[0]!r}): "
            "nothing to predict"
        )
    if kind == "binary" and len(classes) > 2:
        raise DataError(f"{labels.source}: task {task!r} has {len(classes)} classes, not 2")
    index = {c: float(i) for i, c in enumerate(classes)}
    return TaskLabels(task, kind, labels.key, {p: index[c] for p, c in cells.items()}, classes)


def _ids(table: FingerprintTable, key: str) -> np.ndarray:
    """Each row's join id for labels keyed by `key` (a window's is record@start)."""
    if key == "window":
        return np.array(
            [window_id(r, s) for r, s in zip(table.record.astype(str), table.start_s, strict=True)]
        )
    return (table.record if key == "record" else table.subject).astype(str)


def _class_index(classes: tuple[str, ...]) -> Callable[[str], float | None]:
    """Cell -> class index (by name, or by number when both are numbers); None: not a class."""
    by_name = {c: float(i) for i, c in enumerate(classes)}
    by_number = {_number(c): float(i) for i, c in enumerate(classes) if _number(c) is not None}

    def index(cell: str) -> float | None:
        if cell in by_name:
            return by_name[cell]
        number = _number(cell)
        return by_number.get(number) if number is not None else None

    return index


def declared_task_labels(
    labels: LabelRows, task: str, *, kind: TaskKind, classes: tuple[str, ...]
) -> TaskLabels:
    """The labels of a task whose kind and classes the site declared (``[tasks]``): nothing here
    depends on the label values but the values themselves. A cell that is not a number (for
    regression) or not one of `classes` is unlabelled; no value is an error.

    Raises
    ------
    DataError
        The labels file has no column `task` (a setting of the file, not a label).
    """
    if task in ID_COLUMNS or task not in labels.columns:
        raise DataError(f"{labels.source}: no task column {task!r}")
    cells = {p: row.get(task, "") for p, row in labels.rows.items()}
    convert = _number if kind == "regression" else _class_index(classes)
    values = {p: convert(c) for p, c in cells.items() if c != ""}
    kept = {p: v for p, v in values.items() if v is not None}
    return TaskLabels(task, kind, labels.key, kept, () if kind == "regression" else classes)


def join(
    table: FingerprintTable, labels: TaskLabels, *, level: str = "record"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X, y, groups) of the labelled rows at `level`: fingerprints, labels, subject pseudonyms.

    Window labels always join window rows (whatever `level`).
    """
    rows = table.at_level("window" if labels.key == "window" else level)
    ids = _ids(rows, labels.key)
    keep = np.array([i in labels.values for i in ids], dtype=bool)
    if not keep.any():
        raise DataError(
            f"task {labels.task!r}: no {level}-level fingerprint has a label "
            "(labels pseudonymised with another site's key?)"
        )
    y = np.array([labels.values[i] for i in ids[keep]])
    return rows.fp[keep], y, rows.subject[keep].astype(str)
