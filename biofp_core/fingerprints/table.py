"""FingerprintTable: fingerprint rows with their ids, level, modality and quality, as numpy arrays.

Before a release the id columns hold the site's raw subject and record ids (in memory only);
in a released table and in a file they hold pseudonyms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np

LEVELS = ("window", "record")
MODALITY_CHOICES = ("paired", "ecg", "ppg")
MIXED = "mixed"  # a record whose windows were embedded from different modalities


@dataclass(frozen=True)
class FingerprintTable:
    """N rows; every array has N as its first dimension."""

    subject: np.ndarray  # (N,) str: subject id or pseudonym
    record: np.ndarray  # (N,) str: record id or pseudonym
    level: np.ndarray  # (N,) str: "window" or "record"
    modality: np.ndarray  # (N,) str: "paired", "ecg", "ppg" (or "mixed" for a record)
    quality: np.ndarray  # (N,) float32: SQI score in [0, 1] of the windows behind the row
    n_windows: np.ndarray  # (N,) int32: windows averaged into the row (1 for a window)
    fp: np.ndarray  # (N, D) float32
    start_s: np.ndarray | None = None  # (N,) float64: a window's start in its record; NaN else

    def __post_init__(self) -> None:
        n = len(self.fp)
        if self.start_s is None:
            object.__setattr__(self, "start_s", np.full(n, np.nan))
        for f in fields(self):
            if len(getattr(self, f.name)) != n:
                raise ValueError(f"column {f.name} has {len(getattr(self, f.name))} rows, not {n}")
        if self.fp.ndim != 2:
            raise ValueError(f"fp must be (N, D), got shape {self.fp.shape}")

    def __len__(self) -> int:
        return len(self.fp)

    @property
    def dim(self) -> int:
        return int(self.fp.shape[1])

    def take(self, rows: np.ndarray) -> FingerprintTable:
        """The rows at `rows` (indices or a boolean mask), in that order."""
        return FingerprintTable(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    def at_level(self, level: str) -> FingerprintTable:
        return self.take(self.level == level)

    def with_fp(self, fp: np.ndarray) -> FingerprintTable:
        return replace(self, fp=np.asarray(fp, dtype=np.float32))


def concat(tables: Sequence[FingerprintTable]) -> FingerprintTable:
    """Rows of every table, in order; all must have the same fingerprint size."""
    if not tables:
        raise ValueError("concat needs at least one table")
    if len({t.dim for t in tables}) > 1:
        raise ValueError(f"fingerprint sizes differ: {sorted({t.dim for t in tables})}")
    names = [f.name for f in fields(FingerprintTable)]
    return FingerprintTable(**{n: np.concatenate([getattr(t, n) for t in tables]) for n in names})


def record_means(windows: FingerprintTable) -> FingerprintTable:
    """One row per record: the mean fingerprint and quality of its window rows.

    A record's modality is its windows' modality, or "mixed" when they differ. Records come out
    in the order of their first window.
    """
    windows = windows.at_level("window")
    records, first, inverse = np.unique(windows.record, return_index=True, return_inverse=True)
    order = np.argsort(first)  # keep the store's record order
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    group = rank[inverse]  # (N,) record position of each window
    counts = np.bincount(group, minlength=len(records))
    by_record = np.argsort(group, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    fp = np.add.reduceat(windows.fp[by_record].astype(np.float64), starts, axis=0)  # (R, D)
    quality = np.bincount(group, weights=np.nan_to_num(windows.quality), minlength=len(records))
    kinds, code = np.unique(windows.modality.astype(str), return_inverse=True)
    distinct = np.bincount(
        np.unique(group * len(kinds) + code) // len(kinds), minlength=len(records)
    )
    modality = np.where(distinct == 1, kinds[code[first[order]]], MIXED).astype(object)
    return FingerprintTable(
        subject=windows.subject[first[order]],
        record=records[order],
        level=np.full(len(records), "record", dtype=object),
        modality=modality,
        quality=(quality / counts).astype(np.float32),
        n_windows=counts.astype(np.int32),
        fp=(fp / counts[:, None]).astype(np.float32),
    )
