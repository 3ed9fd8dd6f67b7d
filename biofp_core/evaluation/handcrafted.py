"""A hand-crafted feature vector of a window: the baseline a learned fingerprint must beat.

Per modality (ECG, PPG; zeros for an absent one), from the same z-scored 125 Hz windows the
encoder sees (padding past ``valid_n`` ignored):

- beat intervals: :func:`biofp_core.signals.rhythm.rhythm_features` (beats, mean RR, SDNN,
  RMSSD, mean |ΔRR|, pNN50, range) plus heart rate in bpm;
- morphology: the mean beat (``TEMPLATE_S`` around each fiducial, QRS centre in ECG, systolic
  upstroke in PPG) resampled to ``TEMPLATE_POINTS`` points, its peak-to-peak amplitude, the
  correlation of single beats with it (beat-to-beat regularity of shape), and the time from the
  fiducial to the template's maximum and minimum;
- the window's spectrum: the share of power in 0–0.5, 0.5–1, 1–2, 2–4, 4–8, 8–16 and 16+ Hz,
  skewness, kurtosis and the zero-crossing rate of its first difference.

Everything is numpy; no label and no training is involved.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np

from biofp_core.signals.quality import detect_beats
from biofp_core.signals.rhythm import FS_HZ, RHYTHM_FEATURES, TEMPLATE_S, rhythm_features

MODALITIES = ("ecg", "ppg")
TEMPLATE_POINTS = 16
BANDS_HZ = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, np.inf)
MORPHOLOGY = ("template_ptp", "beat_corr", "t_max", "t_min")
BAND_NAMES = tuple(f"band_{a:g}_{b:g}" for a, b in pairwise(BANDS_HZ))
SPECTRUM = (*BAND_NAMES, "skew", "kurtosis", "diff_zero_cross")


def feature_names() -> list[str]:
    """Names of the columns of :func:`handcrafted_features`, ECG block then PPG block."""
    one = [
        *RHYTHM_FEATURES,
        "hr_bpm",
        *(f"template_{i}" for i in range(TEMPLATE_POINTS)),
        *MORPHOLOGY,
        *SPECTRUM,
    ]
    return [f"{m}_{name}" for m in MODALITIES for name in one]


def _spectrum(x: np.ndarray, fs_hz: float) -> np.ndarray:
    """Band power shares, skewness, kurtosis, zero-crossing rate of the slope (one window)."""
    x = x - x.mean()
    power = np.abs(np.fft.rfft(x)) ** 2
    freq = np.fft.rfftfreq(len(x), 1.0 / fs_hz)
    total = power.sum()
    shares = [
        power[(freq >= a) & (freq < b)].sum() / total if total > 0 else 0.0
        for a, b in pairwise(BANDS_HZ)
    ]
    sd = x.std()
    z = x / sd if sd > 0 else x
    slope = np.diff(x)
    crossings = np.mean(np.signbit(slope[1:]) != np.signbit(slope[:-1])) if len(slope) > 1 else 0.0
    return np.array([*shares, (z**3).mean(), (z**4).mean() - 3.0, crossings])


def _morphology(x: np.ndarray, beats: np.ndarray, fs_hz: float) -> np.ndarray:
    """Mean-beat template (TEMPLATE_POINTS), its amplitude, beat-to-template correlation and the
    times of its extremes; zeros with fewer than two complete beats."""
    before, after = round(-TEMPLATE_S[0] * fs_hz), round(TEMPLATE_S[1] * fs_hz)
    beats = beats[(beats >= before) & (beats + after <= len(x))]
    out = np.zeros(TEMPLATE_POINTS + len(MORPHOLOGY))
    if len(beats) < 2:
        return out
    segments = np.stack([x[b - before : b + after] for b in beats])  # (n, S)
    template = segments.mean(axis=0)
    grid = np.linspace(0, len(template) - 1, TEMPLATE_POINTS)
    out[:TEMPLATE_POINTS] = np.interp(grid, np.arange(len(template)), template)
    t = template - template.mean()
    s = segments - segments.mean(axis=1, keepdims=True)
    denom = np.sqrt((s * s).sum(axis=1) * (t * t).sum())
    corr = np.where(denom > 0, (s @ t) / np.where(denom > 0, denom, 1.0), 0.0)
    out[TEMPLATE_POINTS:] = [
        np.ptp(template),
        corr.mean(),
        (np.argmax(template) - before) / fs_hz,
        (np.argmin(template) - before) / fs_hz,
    ]
    return out


def modality_features(
    windows: np.ndarray, *, modality: str, valid_n: np.ndarray | None = None, fs_hz: float = FS_HZ
) -> np.ndarray:
    """Features (n, F) float32 of windows (n, L) of one modality; padding past valid_n ignored."""
    windows = np.asarray(windows, dtype=np.float32)
    n, length = windows.shape
    lengths = np.full(n, length) if valid_n is None else np.clip(np.asarray(valid_n), 0, length)
    rhythm = rhythm_features(windows, modality=modality, fs_hz=fs_hz)  # padding: flat, no beats
    rows, at = detect_beats(windows, modality=modality, fs_hz=fs_hz)
    mean_rr = rhythm[:, RHYTHM_FEATURES.index("mean_rr")]
    hr = np.where(mean_rr > 0, 60.0 / np.where(mean_rr > 0, mean_rr, 1.0), 0.0)
    rest = np.zeros((n, TEMPLATE_POINTS + len(MORPHOLOGY) + len(SPECTRUM)))
    bounds = np.searchsorted(rows, np.arange(n + 1))
    for i in range(n):
        x = windows[i, : max(int(lengths[i]), 8)].astype(np.float64)
        beats = at[bounds[i] : bounds[i + 1]]
        rest[i] = np.concatenate(
            [_morphology(x, beats[beats < len(x)], fs_hz), _spectrum(x, fs_hz)]
        )
    return np.concatenate([rhythm, hr[:, None], rest], axis=1).astype(np.float32)


def handcrafted_features(
    ecg: np.ndarray, ppg: np.ndarray, mask: np.ndarray, *, valid_n: np.ndarray | None = None,
    fs_hz: float = FS_HZ,
) -> np.ndarray:  # fmt: skip
    """Feature vectors (n, 2F) of windows: ECG block then PPG block (zeros where mask (n, 2) says
    the window lacks the signal). Column names: :func:`feature_names`."""
    mask = np.asarray(mask, dtype=bool)
    blocks = []
    for m, (name, x) in enumerate(zip(MODALITIES, (ecg, ppg), strict=True)):
        block = np.zeros((len(mask), len(feature_names()) // 2), dtype=np.float32)
        rows = np.flatnonzero(mask[:, m])
        if len(rows):
            vn = None if valid_n is None else np.asarray(valid_n)[rows]
            block[rows] = modality_features(
                np.asarray(x)[rows], modality=name, valid_n=vn, fs_hz=fs_hz
            )
        blocks.append(block)
    return np.nan_to_num(np.concatenate(blocks, axis=1), nan=0.0, posinf=0.0, neginf=0.0)
