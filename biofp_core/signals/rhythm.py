"""Beat statistics of a window: self-supervised targets that make a fingerprint encode rhythm.

Masked and cross-modal reconstruction never needs the rhythm of a window (a hidden patch is
visible in the other modality), so an encoder trained on it alone ignores what separates atrial
fibrillation from sinus rhythm. Like PaPaGei-S, which regresses PPG morphology indices from its
embedding, M2AE regresses statistics computed from the window itself: no label is used.

Per window of z-scored ECG or PPG at 125 Hz, from its beats (QRS complexes, systolic upstrokes):
- ``irregularity``: RMSSD / mean of the beat intervals (sinus ~0.02, AF ~0.2-0.4), scaled x5;
- ``rate``: (heart rate - 75 bpm) / 25.
A window with fewer than ``MIN_BEATS`` peaks has no statistics (``ok`` False).
"""

from __future__ import annotations

import numpy as np

from biofp_core.signals.quality import detect_beats
from biofp_core.signals.types import Modality

FS_HZ = 125.0
MIN_BEATS = 5
STAT_NAMES = ("irregularity", "rate")


def beat_statistics(
    windows: np.ndarray, *, modality: Modality | str, fs_hz: float = FS_HZ
) -> tuple[np.ndarray, np.ndarray]:
    """Statistics (n, 2) float32 of windows (n, L) and ok (n,) bool, see the module docstring.

    Vectorised over windows: the beats are those of the quality index (`detect_beats`).
    """
    n = len(windows)
    rows, at = detect_beats(np.asarray(windows, dtype=np.float32), modality=modality, fs_hz=fs_hz)
    same = rows[1:] == rows[:-1]  # consecutive beats of one window
    rr, rr_rows = np.diff(at)[same] / fs_hz, rows[1:][same]  # beat intervals (s)
    same = rr_rows[1:] == rr_rows[:-1]
    d, d_rows = np.diff(rr)[same], rr_rows[1:][same]  # successive differences (s)
    beats = np.bincount(rows, minlength=n)
    ok = beats >= MIN_BEATS
    mean_rr = np.bincount(rr_rows, rr, minlength=n) / np.maximum(beats - 1, 1)
    msd = np.bincount(d_rows, d * d, minlength=n) / np.maximum(beats - 2, 1)
    stats = np.zeros((n, len(STAT_NAMES)), dtype=np.float32)
    stats[ok, 0] = 5.0 * np.minimum(np.sqrt(msd[ok]) / mean_rr[ok], 1.0)
    stats[ok, 1] = (60.0 / mean_rr[ok] - 75.0) / 25.0
    return stats, ok


def window_statistics(ecg: np.ndarray, ppg: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, ...]:
    """Statistics (n, 2) of paired windows: the mean over the modalities present and usable.

    ecg, ppg (n, L); mask (n, 2) [has_ecg, has_ppg]. Returns (stats (n, 2), ok (n,)).
    """
    total = np.zeros((len(mask), len(STAT_NAMES)), dtype=np.float32)
    count = np.zeros(len(mask), dtype=np.float32)
    for m, (modality, windows) in enumerate(((Modality.ECG, ecg), (Modality.PPG, ppg))):
        present = np.flatnonzero(mask[:, m])
        stats, ok = beat_statistics(windows[present], modality=modality)
        total[present[ok]] += stats[ok]
        count[present[ok]] += 1
    ok = count > 0
    total[ok] /= count[ok, None]
    return total, ok
