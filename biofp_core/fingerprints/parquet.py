"""The fingerprint file: one Parquet table plus a `FingerprintMeta` JSON in the schema metadata.

Columns: ``subject_pseudonym``, ``record_pseudonym``, ``level`` ("record" | "window"),
``modality`` ("paired" | "ecg" | "ppg" | "mixed"), ``quality`` (float32), ``n_windows`` (int32)
``fp`` (fixed-size list<float32> of D) and ``start_s`` (float64: a window row's start in its
record, NaN on record rows; files written before it have no such column). The file is written
uncompressed: float32 fingerprints barely compress, and a plain file lets an auditor grep it for
names.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from biofp_core import __version__
from biofp_core.config import parse_versioned
from biofp_core.errors import DataError
from biofp_core.fingerprints.policy import ReleasePolicy
from biofp_core.fingerprints.table import FingerprintTable

FORMAT = "biofp-fingerprints"
FORMAT_VERSION = 1
META_KEY = b"biofp"
ID_COLUMNS = {"subject": "subject_pseudonym", "record": "record_pseudonym"}
COLUMNS = ("subject_pseudonym", "record_pseudonym", "level", "modality", "quality", "n_windows",
           "fp")  # fmt: skip


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class FingerprintMeta(BaseModel):
    """What a fingerprint file is: the model, the site (pseudonym), the release and its privacy."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["biofp-fingerprints"] = FORMAT
    format_version: int = FORMAT_VERSION
    code_version: str = Field(__version__, description="biofp_core that wrote the file")
    created_at: str = Field(default_factory=_utc_now, description="UTC ISO 8601")
    model: str = Field(description="registry name of the model, e.g. 'm2ae'")
    model_weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    model_code_version: str = Field(description="code version in the model card")
    fingerprint_dim: int = Field(ge=1)
    modality: Literal["paired", "ecg", "ppg"]
    site: str = Field(description="the site's pseudonym")
    release: ReleasePolicy
    noise_sigma: float | None = Field(None, ge=0, description="noise std per coordinate")
    noise_delta: float | None = Field(None, description="δ per vector the noise is calibrated to")
    vectors_per_subject: int = Field(
        ge=1, description="k: the policy's cap on the released vectors of one subject"
    )
    charged_noise_multiplier: float | None = Field(None, description="σ / (2C·√k) in the ledger")
    site_epsilon: float | None = Field(
        None, description="site's ledger ε after this release (noise-free releases add none: no DP)"
    )
    site_delta: float | None = None
    subjects: int = Field(ge=0)
    records: int = Field(ge=0)
    rows: int = Field(ge=0)


def to_parquet_bytes(table: FingerprintTable, meta: FingerprintMeta) -> bytes:
    """The file's bytes: `table` (its ids must already be pseudonyms) and `meta`."""
    if table.dim != meta.fingerprint_dim:
        raise ValueError(f"fingerprints have {table.dim} dims, meta says {meta.fingerprint_dim}")
    flat = pa.array(np.ascontiguousarray(table.fp, dtype=np.float32).reshape(-1))
    arrow = pa.table(
        {
            "subject_pseudonym": pa.array(table.subject.astype(str), pa.string()),
            "record_pseudonym": pa.array(table.record.astype(str), pa.string()),
            "level": pa.array(table.level.astype(str), pa.string()),
            "modality": pa.array(table.modality.astype(str), pa.string()),
            "quality": pa.array(table.quality, pa.float32()),
            "n_windows": pa.array(table.n_windows, pa.int32()),
            "fp": pa.FixedSizeListArray.from_arrays(flat, table.dim),
            "start_s": pa.array(np.asarray(table.start_s, dtype=np.float64), pa.float64()),
        }
    ).replace_schema_metadata({META_KEY: meta.model_dump_json().encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(arrow, sink, compression="none")
    return sink.getvalue().to_pybytes()


def _read_arrow(path: Path) -> pa.Table:
    if not path.is_file():
        raise DataError(f"{path}: fingerprint file not found")
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        reason = " ".join(str(exc).split())[:160]
        raise DataError(f"{path}: not a readable Parquet file ({reason})") from None


def _read_meta(path: Path, arrow: pa.Table) -> FingerprintMeta:
    raw = (arrow.schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise DataError(f"{path}: not a BioFP fingerprint file (no '{META_KEY.decode()}' metadata)")
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise DataError(f"{path}: fingerprint metadata is not valid JSON") from None
    return parse_versioned(
        FingerprintMeta, doc, newest=FORMAT_VERSION, path=path, what="fingerprint metadata",
        error=DataError,
    )  # fmt: skip


def _column(path: Path, arrow: pa.Table, name: str, kind: pa.DataType) -> np.ndarray:
    column = arrow.column(name)
    if column.type != kind:
        raise DataError(f"{path}: column {name} has type {column.type}, expected {kind}")
    if column.null_count:
        raise DataError(f"{path}: column {name} has {column.null_count} missing values")
    if pa.types.is_string(kind):
        return np.array(column.to_pylist(), dtype=object)
    if pa.types.is_fixed_size_list(kind):  # (N, D) without a Python object per row
        flat = column.combine_chunks().flatten().to_numpy()
        return flat.reshape(len(column), kind.list_size)
    return column.to_numpy()


def read_fingerprints(path: Path) -> tuple[FingerprintTable, FingerprintMeta]:
    """Read and check a fingerprint file.

    Raises
    ------
    DataError
        One line naming the file: missing, not Parquet, not a BioFP file, a newer format, columns
        missing or of the wrong type, a fingerprint size other than the metadata's, or no rows.
    """
    path = Path(path)
    arrow = _read_arrow(path)
    meta = _read_meta(path, arrow)
    missing = [c for c in COLUMNS if c not in arrow.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
    if arrow.num_rows == 0:
        raise DataError(f"{path}: empty fingerprint file (no rows)")
    d = meta.fingerprint_dim
    fp = _column(path, arrow, "fp", pa.list_(pa.float32(), d))
    columns = {key: _column(path, arrow, name, pa.string()) for key, name in ID_COLUMNS.items()} | {
        name: _column(path, arrow, name, pa.string()) for name in ("level", "modality")
    }
    table = FingerprintTable(
        **columns,
        quality=_column(path, arrow, "quality", pa.float32()),
        n_windows=_column(path, arrow, "n_windows", pa.int32()),
        fp=fp.astype(np.float32, copy=False),
        start_s=(
            arrow.column("start_s").to_numpy().astype(np.float64)
            if "start_s" in arrow.column_names
            else None
        ),
    )
    return table, meta
