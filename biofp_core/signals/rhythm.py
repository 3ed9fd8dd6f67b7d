"""Beat-interval statistics of a window: what M2AE needs to see and keep about rhythm.

Patch tokens of 1 s each hold about one beat, and masked or cross-modal reconstruction never needs
the rhythm of a window (a hidden patch is visible in the other modality), so an encoder of patches
alone keeps little of what separates atrial fibrillation from sinus rhythm. M2AE therefore
(1) adds one *rhythm token* per modality built from ``rhythm_features`` (the tachogram summary
RR-based detectors and wearable foundation models use; optionally the window's mean beat), and
(2) like PaPaGei-S, which regresses PPG morphology indices from its embedding, regresses beat
statistics (``statistics_of``: rate and irregularity, or any of ``BEAT_STATS``) from every
fingerprint. Both are computed from the window itself: no label is used.

Beats are those of the quality index (:func:`biofp_core.signals.quality.detect_beats`): QRS
complexes in ECG, systolic upstrokes in PPG; z-scored windows at 125 Hz. A window with fewer
than ``MIN_BEATS`` beats has no statistics (all features 0, ``ok`` False).
"""

from __future__ import annotations

import numpy as np

from biofp_core.signals.quality import detect_beats
from biofp_core.signals.types import Modality

FS_HZ = 125.0
MIN_BEATS = 5
RHYTHM_FEATURES = (
    "valid",  # 1 when the window has >= MIN_BEATS beats
    "beats",  # beats / 15
    "mean_rr",  # mean beat interval (s)
    "sdnn",  # 5 x SD of the intervals / mean
    "rmssd",  # 5 x RMS of successive differences / mean
    "madnn",  # 5 x mean |successive difference| / mean
    "pnn50",  # share of successive differences > 50 ms
    "range",  # (max - min interval) / mean
)
STAT_NAMES = ("irregularity", "rate")  # rmssd feature; (heart rate - 75 bpm) / 25
# Every statistic a model may regress: STAT_NAMES, then these rhythm features as they are.
BEAT_STATS = (*STAT_NAMES, "sdnn", "madnn", "pnn50", "range")


TEMPLATE_S = (-0.25, 0.55)  # the mean beat's span around each fiducial (s)


def rhythm_features(
    windows: np.ndarray, *, modality: Modality | str, fs_hz: float = FS_HZ,
    template_points: int = 0, valid_n: np.ndarray | None = None,
) -> np.ndarray:  # fmt: skip
    """Features (n, len(RHYTHM_FEATURES) + template_points) float32 of windows (n, L),
    vectorised over windows; with ``template_points``, the window's mean beat follows
    (:func:`mean_beat`, over the first ``valid_n`` (n,) samples: padding is no beat's)."""
    n = len(windows)
    windows = np.asarray(windows, dtype=np.float32)
    rows, at = detect_beats(windows, modality=modality, fs_hz=fs_hz)
    same = rows[1:] == rows[:-1]  # consecutive beats of one window
    rr, rr_rows = np.diff(at)[same] / fs_hz, rows[1:][same]  # beat intervals (s)
    same = rr_rows[1:] == rr_rows[:-1]
    d, d_rows = np.abs(np.diff(rr)[same]), rr_rows[1:][same]  # |successive differences| (s)
    beats = np.bincount(rows, minlength=n).astype(np.float64)
    n_rr, n_d = np.maximum(beats - 1, 1), np.maximum(beats - 2, 1)
    mean_rr = np.bincount(rr_rows, rr, minlength=n) / n_rr
    var_rr = np.maximum(np.bincount(rr_rows, rr * rr, minlength=n) / n_rr - mean_rr**2, 0.0)
    big, small = np.full(n, -np.inf), np.full(n, np.inf)
    np.maximum.at(big, rr_rows, rr)
    np.minimum.at(small, rr_rows, rr)
    ok = beats >= MIN_BEATS
    scale = np.where(ok, mean_rr, 1.0)
    features = np.stack(
        [
            np.ones(n),
            beats / 15.0,
            mean_rr,
            5.0 * np.sqrt(var_rr) / scale,
            5.0 * np.sqrt(np.bincount(d_rows, d * d, minlength=n) / n_d) / scale,
            5.0 * np.bincount(d_rows, d, minlength=n) / n_d / scale,
            np.bincount(d_rows, d > 0.05, minlength=n) / n_d,
            np.where(ok, big - small, 0.0) / scale,
        ],
        axis=1,
    )
    features[~ok] = 0.0
    features = np.clip(features, 0.0, 5.0)
    if template_points:
        template = mean_beat(
            windows, rows, at, points=template_points, fs_hz=fs_hz, valid_n=valid_n
        )
        features = np.concatenate([features, np.where(ok[:, None], template, 0.0)], axis=1)
    return features.astype(np.float32)


def mean_beat(
    windows: np.ndarray, rows: np.ndarray, at: np.ndarray, *, points: int, fs_hz: float = FS_HZ,
    valid_n: np.ndarray | None = None,
) -> np.ndarray:  # fmt: skip
    """The mean beat (n, points) of each window: ``points`` samples evenly spaced over
    ``TEMPLATE_S`` around every fiducial whose span lies inside the window's signal (its first
    ``valid_n`` samples; all of it without), averaged; zeros for a window without one. Values
    as the (z-scored) windows, clipped to ±5."""
    n, length = windows.shape
    end = np.full(n, length) if valid_n is None else np.minimum(np.asarray(valid_n), length)
    offsets = np.round(np.linspace(TEMPLATE_S[0], TEMPLATE_S[1], points) * fs_hz).astype(int)
    inside = (at + offsets[0] >= 0) & (at + offsets[-1] < end[rows])
    rows, at = rows[inside], at[inside]
    sums = np.zeros((n, points))
    np.add.at(sums, rows, windows[rows[:, None], at[:, None] + offsets[None]])
    counts = np.bincount(rows, minlength=n)[:, None]
    return np.clip(sums / np.maximum(counts, 1), -5.0, 5.0)


def statistics_of(
    features: np.ndarray, names: tuple[str, ...] = STAT_NAMES
) -> tuple[np.ndarray, np.ndarray]:
    """Statistics (..., len(names)) float32 (``BEAT_STATS`` names) and ok (...,) of rhythm
    features (..., F)."""
    ok = features[..., 0] > 0
    mean_rr = np.where(ok, features[..., RHYTHM_FEATURES.index("mean_rr")], 1.0)
    columns = {
        "irregularity": features[..., RHYTHM_FEATURES.index("rmssd")],
        "rate": np.where(ok, (60.0 / mean_rr - 75.0) / 25.0, 0.0),
    }
    stats = [columns[n] if n in columns else features[..., RHYTHM_FEATURES.index(n)] for n in names]
    return np.stack(stats, axis=-1).astype(np.float32), ok


def beat_statistics(
    windows: np.ndarray, *, modality: Modality | str, fs_hz: float = FS_HZ
) -> tuple[np.ndarray, np.ndarray]:
    """Statistics (n, 2) float32 (``STAT_NAMES``) of windows (n, L) and ok (n,) bool."""
    return statistics_of(rhythm_features(windows, modality=modality, fs_hz=fs_hz))


def paired_statistics(
    ecg_features: np.ndarray, ppg_features: np.ndarray, names: tuple[str, ...] = STAT_NAMES
) -> tuple[np.ndarray, np.ndarray]:
    """Statistics (..., len(names)) of paired windows from each modality's rhythm features
    (..., F): the mean over the modalities with enough beats (an absent modality has none).
    Returns (stats, ok).
    """
    s_ecg, ok_ecg = statistics_of(ecg_features, names)
    s_ppg, ok_ppg = statistics_of(ppg_features, names)
    count = ok_ecg.astype(np.float32) + ok_ppg
    total = s_ecg * ok_ecg[..., None] + s_ppg * ok_ppg[..., None]
    return (total / np.maximum(count, 1.0)[..., None]).astype(np.float32), count > 0
