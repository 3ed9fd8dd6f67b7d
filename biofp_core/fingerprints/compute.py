"""Per-window fingerprints of a site's window store, by batch inference with a loaded model.

Modality: "ecg" or "ppg" embeds every window that has that signal from it alone; "paired" embeds
windows with both signals from both, and falls back to the signal a window has when the other is
missing (the `modality` column says which was used). Window quality is the SQI score of the signal
used; for a paired window, the lower of the two (the weaker signal bounds the fingerprint).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from biofp_core.errors import ConfigError, DataError
from biofp_core.fingerprints.table import MODALITY_CHOICES, FingerprintTable
from biofp_core.models.base import BioFPModel
from biofp_core.store import QUALITY_FIELDS, WindowStore

log = logging.getLogger(__name__)

BATCH_WINDOWS = 256


def _groups(mask: np.ndarray, modality: str) -> dict[str, np.ndarray]:
    """Window indices embedded from each modality; mask (N, 2) = [has_ecg, has_ppg]."""
    ecg, ppg = mask[:, 0], mask[:, 1]
    if modality == "ecg":
        chosen = {"ecg": ecg}
    elif modality == "ppg":
        chosen = {"ppg": ppg}
    else:
        chosen = {"paired": ecg & ppg, "ecg": ecg & ~ppg, "ppg": ppg & ~ecg}
    return {m: np.flatnonzero(sel) for m, sel in chosen.items() if sel.any()}


def _quality(store: WindowStore, rows: np.ndarray, modality: str) -> np.ndarray:
    score = np.asarray(store.quality[rows, :, QUALITY_FIELDS.index("score")])  # (n, 2)
    if modality == "ecg":
        return score[:, 0]
    if modality == "ppg":
        return score[:, 1]
    return np.minimum(score[:, 0], score[:, 1])


@torch.inference_mode()
def _embed(
    model: BioFPModel, store: WindowStore, rows: np.ndarray, modality: str, batch: int,
    on_batch: Callable[[int], None] | None,
) -> np.ndarray:  # fmt: skip
    """Fingerprints (len(rows), D) of the windows at `rows`, embedded from `modality`."""
    use_ecg, use_ppg = modality in ("paired", "ecg"), modality in ("paired", "ppg")
    out = np.empty((len(rows), model.config.fingerprint_dim), dtype=np.float32)
    for start in range(0, len(rows), batch):
        idx = rows[start : start + batch]
        ecg = torch.from_numpy(np.asarray(store.ecg[idx])) if use_ecg else None
        ppg = torch.from_numpy(np.asarray(store.ppg[idx])) if use_ppg else None
        valid = np.asarray(store.valid_n[idx])
        valid_n = torch.from_numpy(valid) if (valid < store.ecg.shape[1]).any() else None
        fp = model.fingerprint(ecg=ecg, ppg=ppg, valid_n=valid_n)
        out[start : start + len(idx)] = fp.float().numpy()
        if on_batch is not None:
            on_batch(len(idx))
    return out


def window_fingerprints(
    store: WindowStore,
    model: BioFPModel,
    *,
    modality: str = "paired",
    batch_windows: int = BATCH_WINDOWS,
    on_batch: Callable[[int], None] | None = None,
) -> FingerprintTable:
    """One row per usable window, in store order, with the site's RAW ids (never export these).

    Parameters
    ----------
    store
        The site's window store.
    model
        A loaded model; it is put in eval mode.
    modality
        "paired", "ecg" or "ppg" (see the module docstring).
    batch_windows
        Windows per forward pass.
    on_batch
        Called with the number of windows of each batch done (progress).

    Raises
    ------
    DataError
        When no window has the requested signal.
    """
    if modality not in MODALITY_CHOICES:
        raise ConfigError(f"unknown modality {modality!r}; valid: {', '.join(MODALITY_CHOICES)}")
    mask = np.asarray(store.mask, dtype=bool)
    groups = _groups(mask, modality)
    if not groups:
        raise DataError(f"{store.path}: no window has a {modality} signal")
    model.eval()
    rows = np.sort(np.concatenate(list(groups.values())))
    position = np.searchsorted(rows, np.arange(len(mask)))  # store index -> output row
    fp = np.empty((len(rows), model.config.fingerprint_dim), dtype=np.float32)
    quality = np.empty(len(rows), dtype=np.float32)
    used = np.empty(len(rows), dtype=object)
    for m, idx in groups.items():
        fp[position[idx]] = _embed(model, store, idx, m, batch_windows, on_batch)
        quality[position[idx]] = _quality(store, idx, m)
        used[position[idx]] = m
    records = store.manifest.records
    record_index = np.asarray(store.record_index)[rows]
    log.info("embedded %d windows of %s (%s)", len(rows), store.path, modality)
    return FingerprintTable(
        subject=np.array([records[i].subject_id for i in record_index], dtype=object),
        record=np.array([records[i].record_id for i in record_index], dtype=object),
        level=np.full(len(rows), "window", dtype=object),
        modality=used,
        quality=quality,
        n_windows=np.ones(len(rows), dtype=np.int32),
        fp=fp,
        start_s=np.asarray(store.start_s[rows], dtype=np.float64),
    )
