"""Safetensors files that check themselves: tensors plus a pydantic header in the metadata that
carries the sha256 of every tensor (:func:`biofp_core.audit.arrays_sha256`).

Written durably (:func:`biofp_core.fsutil.atomic_write_bytes`); read back only when the header
validates and the tensors still match their sha256. Used for the server's round checkpoints and
for a site's cached training replies.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as save_safetensors

from biofp_core.audit import arrays_sha256
from biofp_core.errors import ArtifactError
from biofp_core.fsutil import atomic_write_bytes

META_KEY = "biofp"  # the safetensors metadata key holding the header


Header = TypeVar("Header", bound=BaseModel)


def write_checked(path: Path, tensors: dict[str, np.ndarray], header: BaseModel) -> None:
    """Write `tensors` with `header` durably; the caller sets ``header.sha256`` to
    ``arrays_sha256(tensors)`` (it usually has it already), which reading checks."""
    contiguous = {name: np.ascontiguousarray(value) for name, value in tensors.items()}
    blob = save_safetensors(contiguous, metadata={META_KEY: header.model_dump_json()})
    atomic_write_bytes(path, blob)


def read_checked(
    path: Path, header_type: type[Header], *, what: str
) -> tuple[Header, dict[str, np.ndarray]]:
    """(header, tensors) of a file written by :func:`write_checked`.

    Raises
    ------
    ArtifactError
        One line naming the file and `what` it should be: unreadable, no header, a header that
        does not validate, or tensors that do not match their sha256.
    """
    path = Path(path)
    try:
        with safe_open(str(path), framework="np") as fh:
            raw = (fh.metadata() or {}).get(META_KEY)
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
    except (OSError, SafetensorError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:160]
        raise ArtifactError(f"{path}: corrupted {what}, unreadable ({reason})") from None
    if raw is None:
        raise ArtifactError(f"{path}: not a BioFP {what} (no '{META_KEY}' metadata)")
    try:
        header = header_type.model_validate_json(raw)
    except ValidationError as exc:
        reason = exc.errors()[0]["msg"]
        raise ArtifactError(f"{path}: corrupted {what} metadata ({reason})") from None
    if arrays_sha256(tensors) != getattr(header, "sha256", None):
        raise ArtifactError(f"{path}: corrupted {what} (tensors do not match their sha256)")
    return header, tensors
