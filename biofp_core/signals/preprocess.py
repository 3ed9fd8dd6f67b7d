"""Raw records to 10 s windows at 125 Hz: gap filling, resampling, band-pass, windowing, z-score.

Per modality: short NaN gaps are interpolated and long ones filled linearly but marked invalid;
the signal is resampled to ``cfg.fs_hz`` (polyphase) and band-passed (zero-phase Butterworth).
Flatness and clipping are judged on the unfiltered signal brought to ``cfg.fs_hz`` by linear
interpolation, which keeps flat runs and rails exact (a polyphase filter would ripple them).
Windows of ``cfg.window_s`` start every ``cfg.hop_s`` over the longest modality; ECG and PPG
windows cover the same seconds. A modality is masked out of a window it does not cover, or where
the window holds a long-gap sample or is flatter than ``cfg.max_flat_frac``; a window left with no
modality is dropped and counted by reason. Kept windows are z-scored per modality; quality comes
from :mod:`biofp_core.signals.quality`.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

import numpy as np
from scipy import signal

from biofp_core.config import PreprocessConfig
from biofp_core.errors import ConfigError, RecordError
from biofp_core.signals import quality
from biofp_core.signals.types import (
    MODALITIES,
    Channel,
    Modality,
    QualityIndex,
    RawRecord,
    Windows,
)

RATIO_REL_TOL = 1e-6  # resampling ratio approximated to this relative error (3.6 ms per hour)
MAX_RATIO_DENOMINATOR = 1 << 16
MIN_STD = 1e-8  # windows with a smaller std (physical units) z-score to zeros

DROP_NAN_GAP = "nan_gap"
DROP_FLAT = "flat"
DROP_TOO_SHORT = "too_short"
MIN_PAD_SAMPLES = 16  # a padded window holds at least this many samples (filters need some)


# --- resampling ---------------------------------------------------------------------------------


def _same_rate(fs_a_hz: float, fs_b_hz: float) -> bool:
    return bool(np.isclose(fs_a_hz, fs_b_hz, rtol=RATIO_REL_TOL, atol=0.0))


def _rational_ratio(ratio: float) -> tuple[int, int]:
    """Smallest-denominator ``up/down`` within RATIO_REL_TOL of ``ratio``."""
    den = 1
    while True:
        frac = Fraction(ratio).limit_denominator(den)
        if abs(float(frac) / ratio - 1.0) <= RATIO_REL_TOL or den >= MAX_RATIO_DENOMINATOR:
            return frac.numerator, frac.denominator
        den *= 2


@lru_cache(maxsize=32)
def _polyphase_filter(up: int, down: int) -> np.ndarray:
    """The anti-aliasing FIR resample_poly would design (cached: design dominates the cost)."""
    max_rate = max(up, down)
    return signal.firwin(2 * 10 * max_rate + 1, 1.0 / max_rate, window=("kaiser", 5.0))


def resample_to(x: np.ndarray, *, fs_in_hz: float, fs_out_hz: float) -> np.ndarray:
    """Resample a 1-D signal with a polyphase filter (identity when the rates are equal).

    The rate ratio is approximated by a fraction ``up/down`` (relative error <= 1e-6), and the
    output has exactly ``round(len(x) * fs_out_hz / fs_in_hz)`` samples, sample ``k`` at
    ``k / fs_out_hz`` seconds. Edges are padded linearly, so offsets do not ring.

    Parameters
    ----------
    x
        ``(T,)`` finite samples.
    fs_in_hz, fs_out_hz
        Input and output sampling rates.

    Returns
    -------
    np.ndarray
        ``(round(T * fs_out_hz / fs_in_hz),)`` float64.
    """
    x = np.asarray(x, dtype=np.float64)
    if fs_in_hz <= 0 or fs_out_hz <= 0:
        raise ValueError(f"sampling rates must be positive, got {fs_in_hz} and {fs_out_hz}")
    if _same_rate(fs_in_hz, fs_out_hz):
        return x
    n_out = round(len(x) * fs_out_hz / fs_in_hz)
    if len(x) < 2:
        return np.full(n_out, x[0] if len(x) else 0.0)
    up, down = _rational_ratio(fs_out_hz / fs_in_hz)
    y = signal.resample_poly(x, up, down, window=_polyphase_filter(up, down), padtype="line")
    if len(y) >= n_out:
        return y[:n_out]
    return np.concatenate((y, np.full(n_out - len(y), y[-1])))


def _resample_linear(x: np.ndarray, *, fs_in_hz: float, fs_out_hz: float) -> np.ndarray:
    """Linear interpolation onto the output grid: keeps flat runs and rails exactly (for SQI)."""
    if _same_rate(fs_in_hz, fs_out_hz):
        return x
    n_out = round(len(x) * fs_out_hz / fs_in_hz)
    return np.interp(np.arange(n_out) * (fs_in_hz / fs_out_hz), np.arange(len(x)), x)


def _resample_mask(mask: np.ndarray, *, fs_in_hz: float, fs_out_hz: float) -> np.ndarray:
    """Conservative mask resampling: an output sample is set if any neighbouring input one is."""
    if _same_rate(fs_in_hz, fs_out_hz) or not mask.any():
        n_out = round(len(mask) * fs_out_hz / fs_in_hz)
        return mask if len(mask) == n_out else np.zeros(n_out, dtype=bool)
    return _resample_linear(mask.astype(np.float64), fs_in_hz=fs_in_hz, fs_out_hz=fs_out_hz) > 0


# --- gaps, filtering, windows --------------------------------------------------------------------


def interpolate_gaps(
    x: np.ndarray, *, fs_hz: float, max_gap_s: float
) -> tuple[np.ndarray, np.ndarray]:
    """Fill NaN runs by linear interpolation; flag the runs longer than ``max_gap_s``.

    Every NaN is filled (linearly between the neighbouring valid samples; by the nearest valid
    sample at the record's edges) so that filters can run; runs of more than
    ``round(max_gap_s * fs_hz)`` samples stay flagged as invalid.

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        ``(filled, invalid)``: ``(T,)`` float64 without NaN, and ``(T,)`` bool, True in long gaps.
        An all-NaN signal becomes zeros, all invalid.
    """
    x = np.asarray(x, dtype=np.float64)
    nan = np.isnan(x)
    if not nan.any():
        return x, np.zeros(len(x), dtype=bool)
    if nan.all():
        return np.zeros(len(x)), np.ones(len(x), dtype=bool)
    idx = np.arange(len(x))
    filled = x.copy()
    filled[nan] = np.interp(idx[nan], idx[~nan], x[~nan])
    edges = np.diff(nan.astype(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    long = (ends - starts) > round(max_gap_s * fs_hz)
    invalid = np.zeros(len(x), dtype=bool)
    for start, end in zip(starts[long], ends[long], strict=True):
        invalid[start:end] = True
    return filled, invalid


@lru_cache(maxsize=32)
def _butter_sos(
    fs_hz: float, low_hz: float, high_hz: float, order: int
) -> tuple[np.ndarray, np.ndarray]:
    """Band-pass sections and their steady-state initial conditions (cached per band)."""
    if not 0 < low_hz < high_hz < fs_hz / 2:
        raise ConfigError(
            f"band {low_hz}-{high_hz} Hz must satisfy 0 < low < high < Nyquist ({fs_hz / 2} Hz)"
        )
    sos = signal.butter(order, [low_hz, high_hz], btype="bandpass", fs=fs_hz, output="sos")
    return sos, signal.sosfilt_zi(sos)


def bandpass(
    x: np.ndarray, *, fs_hz: float, band_hz: tuple[float, float], order: int
) -> np.ndarray:
    """Zero-phase Butterworth band-pass along the last axis.

    Second-order sections run forward then backward exactly as ``scipy.signal.sosfiltfilt``
    does (odd extension, steady-state initial conditions; same output), with the design and
    initial conditions cached per band. The magnitude response is the square of an ``order``
    Butterworth's, the phase zero. Raises ConfigError when the band does not fit below Nyquist.
    """
    sos, zi = _butter_sos(float(fs_hz), float(band_hz[0]), float(band_hz[1]), int(order))
    x = np.asarray(x, dtype=np.float64)
    pad = min(3 * (2 * len(sos) + 1), x.shape[-1] - 1)
    if pad < 1:
        return x.copy()
    first, last = x[..., :1], x[..., -1:]
    ext = np.concatenate(
        (2 * first - x[..., pad:0:-1], x, 2 * last - x[..., -2 : -pad - 2 : -1]), axis=-1
    )
    zi = zi.reshape(zi.shape[:1] + (1,) * (x.ndim - 1) + zi.shape[1:])  # (sections, ..., 2)
    y, _ = signal.sosfilt(sos, ext, axis=-1, zi=zi * ext[..., :1])
    y = np.ascontiguousarray(y[..., ::-1])
    y, _ = signal.sosfilt(sos, y, axis=-1, zi=zi * y[..., :1])
    return y[..., pad:-pad][..., ::-1].copy()


def window_starts(n_samples: int, *, window_n: int, hop_n: int) -> np.ndarray:
    """Start indices of every whole window of ``window_n`` samples, ``hop_n`` apart. ``(N,)``."""
    if window_n <= 0 or hop_n <= 0:
        raise ValueError(f"window and hop must be positive, got {window_n} and {hop_n}")
    if n_samples < window_n:
        return np.zeros(0, dtype=np.int64)
    return np.arange(0, n_samples - window_n + 1, hop_n, dtype=np.int64)


def slice_windows(x: np.ndarray, *, starts: np.ndarray, window_n: int) -> np.ndarray:
    """Copy the windows ``x[s : s + window_n]`` for each start into an ``(N, window_n)`` array.

    Windows that run past the end of ``x`` are zero-padded (callers mask them out).
    """
    x = np.asarray(x)
    need = int(starts.max()) + window_n if len(starts) else 0
    if need > len(x):
        x = np.concatenate((x, np.zeros(need - len(x), dtype=x.dtype)))
    if len(starts) == 0:
        return np.zeros((0, window_n), dtype=x.dtype)
    return np.lib.stride_tricks.sliding_window_view(x, window_n)[starts]


def zscore(windows: np.ndarray, *, min_std: float = MIN_STD) -> np.ndarray:
    """Per-row z-score as float32; rows with std below ``min_std`` become zeros. ``(N, L)``."""
    centred = np.asarray(windows, dtype=np.float64)
    centred = centred - centred.mean(axis=1, keepdims=True)
    std = np.sqrt(np.einsum("ij,ij->i", centred, centred) / max(centred.shape[1], 1))
    scale = np.divide(1.0, std, out=np.zeros_like(std), where=std > min_std)
    return (centred * scale[:, None]).astype(np.float32)


# --- the pipeline --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Track:
    """One modality at the target rate: filtered signal, raw signal (for SQI), long-gap mask."""

    filtered: np.ndarray  # (T,) float64, band-passed
    raw: np.ndarray  # (T,) float64, gaps filled, not filtered
    invalid: np.ndarray  # (T,) bool, True in long NaN gaps


def _prepare_channel(
    channel: Channel, *, band_hz: tuple[float, float], cfg: PreprocessConfig
) -> _Track:
    """Gap-fill, resample to ``cfg.fs_hz`` and band-pass one channel."""
    filled, invalid = interpolate_gaps(
        channel.samples, fs_hz=channel.fs_hz, max_gap_s=cfg.max_gap_s
    )
    rates = {"fs_in_hz": channel.fs_hz, "fs_out_hz": cfg.fs_hz}
    filtered = bandpass(
        resample_to(filled, **rates), fs_hz=cfg.fs_hz, band_hz=band_hz, order=cfg.filter_order
    )
    return _Track(
        filtered=filtered,
        raw=_resample_linear(filled, **rates),
        invalid=_resample_mask(invalid, **rates),
    )


@dataclass(frozen=True)
class _Judged:
    """One modality sliced on the record's window grid, with the verdict per window."""

    filtered: np.ndarray  # (N, L) float32 band-passed windows (zeros past the modality's end)
    raw: np.ndarray  # (N, L) raw windows
    flat_frac: np.ndarray  # (N,)
    gap: np.ndarray  # (N,) bool, covered and holds a long-gap sample
    valid: np.ndarray  # (N,) bool, covered, no long gap, not too flat


def _judge_track(track: _Track, *, starts: np.ndarray, cfg: PreprocessConfig) -> _Judged:
    """Slice one modality on the shared window grid and decide which windows it can serve."""
    window_n = cfg.window_samples
    covered = starts + window_n <= len(track.filtered)
    gap = np.zeros(len(starts), dtype=bool)
    if track.invalid.any():
        gap_cum = np.concatenate(([0], np.cumsum(track.invalid, dtype=np.int64)))
        end = np.minimum(starts + window_n, len(track.invalid))
        gap = (gap_cum[end] - gap_cum[np.minimum(starts, end)] > 0) & covered
    raw = slice_windows(track.raw, starts=starts, window_n=window_n)
    flat = quality.flat_frac(raw, fs_hz=cfg.fs_hz)
    return _Judged(
        filtered=slice_windows(track.filtered.astype(np.float32), starts=starts, window_n=window_n),
        raw=raw,
        flat_frac=flat,
        gap=gap,
        valid=covered & ~gap & (flat <= cfg.max_flat_frac),
    )


def _drop_reasons(judged: dict[Modality, _Judged], keep: np.ndarray) -> dict[str, int]:
    """Count dropped windows by reason: a long gap in any modality wins over flatness."""
    any_gap = np.logical_or.reduce([j.gap for j in judged.values()])
    counts = {
        DROP_NAN_GAP: int((~keep & any_gap).sum()),
        DROP_FLAT: int((~keep & ~any_gap).sum()),
    }
    return {reason: count for reason, count in counts.items() if count}


def _zscored(j: _Judged | None, *, keep: np.ndarray, window_n: int) -> np.ndarray:
    """``(kept, L)`` float32: z-scored windows where the modality is valid, zeros elsewhere."""
    out = np.zeros((int(keep.sum()), window_n), dtype=np.float32)
    if j is not None:
        out[j.valid[keep]] = zscore(j.filtered[j.valid])  # valid windows are always kept
    return out


def _modality_quality(
    j: _Judged | None, *, keep: np.ndarray, modality: Modality, fs_hz: float
) -> QualityIndex:
    """SQI of the kept windows where this modality is valid; NaN elsewhere."""
    q = quality.empty_quality(int(keep.sum()))
    if j is None or not j.valid.any():
        return q
    sub = quality.window_quality(
        j.raw[j.valid],
        j.filtered[j.valid],
        modality=modality,
        fs_hz=fs_hz,
        flat=j.flat_frac[j.valid],
    )
    rows = j.valid[keep]
    for name in ("flat_frac", "clip_frac", "skewness", "template_corr", "score"):
        getattr(q, name)[rows] = getattr(sub, name)
    return q


def _empty_windows(record_id: str, *, window_n: int, dropped: dict[str, int]) -> Windows:
    return Windows(
        record_id=record_id,
        ecg=np.zeros((0, window_n), dtype=np.float32),
        ppg=np.zeros((0, window_n), dtype=np.float32),
        mask=np.zeros((0, len(MODALITIES)), dtype=bool),
        start_s=np.zeros(0),
        quality={m: quality.empty_quality(0) for m in MODALITIES},
        dropped=dropped,
    )


def _present_channels(raw: RawRecord) -> dict[Modality, Channel]:
    channels = {m: getattr(raw, m.value) for m in MODALITIES}
    present = {m: ch for m, ch in channels.items() if ch is not None and len(ch.samples)}
    if not present:
        raise RecordError(raw.record_id, "no ECG or PPG samples")
    return present


def _padded(raw: RawRecord, cfg: PreprocessConfig, n_samples: int) -> Windows:
    """A record shorter than a window: one window of its whole length, zero-padded at the end.

    Filtering, flatness and quality are judged on the record's own samples; ``valid_n`` says how
    many of the window's samples are signal (models keep the rest out of attention and loss).
    """
    whole_s = n_samples / cfg.fs_hz
    short = preprocess_record(raw, cfg.model_copy(update={"window_s": whole_s, "hop_s": whole_s}))
    window_n = cfg.window_samples
    pad = ((0, 0), (0, window_n - short.ecg.shape[1]))
    return Windows(
        record_id=short.record_id,
        ecg=np.pad(short.ecg, pad),
        ppg=np.pad(short.ppg, pad),
        mask=short.mask,
        start_s=short.start_s,
        quality=short.quality,
        dropped=short.dropped,
        valid_n=np.full(len(short), short.ecg.shape[1], dtype=np.int32),
    )


def preprocess_record(raw: RawRecord, cfg: PreprocessConfig = PreprocessConfig()) -> Windows:
    """Turn one record into z-scored windows at ``cfg.fs_hz`` with masks, quality and drop counts.

    Windows start every ``cfg.hop_s`` from 0 s over the longest modality. Where ``mask`` is False
    for a modality, its window is all zeros and its ``quality`` entries are NaN. A dropped window
    counts as ``"nan_gap"`` if any modality had a long gap there, else ``"flat"``. A record
    shorter than one window but at least ``cfg.min_duration_s`` long gives one window padded
    with zeros after its ``valid_n`` samples; a shorter one gives no windows and
    ``dropped == {"too_short": 1}``.

    Raises
    ------
    RecordError
        The record has no ECG or PPG samples.
    """
    channels = _present_channels(raw)
    bands = {Modality.ECG: cfg.ecg_band_hz, Modality.PPG: cfg.ppg_band_hz}
    window_n = cfg.window_samples
    n_samples = max(round(len(ch.samples) * cfg.fs_hz / ch.fs_hz) for ch in channels.values())
    starts = window_starts(n_samples, window_n=window_n, hop_n=round(cfg.hop_s * cfg.fs_hz))
    if len(starts) == 0:
        if n_samples < max(round(cfg.min_duration_s * cfg.fs_hz), MIN_PAD_SAMPLES):
            return _empty_windows(raw.record_id, window_n=window_n, dropped={DROP_TOO_SHORT: 1})
        return _padded(raw, cfg, n_samples)
    judged = {
        m: _judge_track(_prepare_channel(ch, band_hz=bands[m], cfg=cfg), starts=starts, cfg=cfg)
        for m, ch in channels.items()
    }
    none = np.zeros(len(starts), dtype=bool)
    mask = np.stack([judged[m].valid if m in judged else none for m in MODALITIES], axis=1)
    keep = mask.any(axis=1)
    z = {m: _zscored(judged.get(m), keep=keep, window_n=window_n) for m in MODALITIES}
    return Windows(
        record_id=raw.record_id,
        ecg=z[Modality.ECG],
        ppg=z[Modality.PPG],
        mask=mask[keep],
        start_s=starts[keep] / cfg.fs_hz,
        quality={
            m: _modality_quality(judged.get(m), keep=keep, modality=m, fs_hz=cfg.fs_hz)
            for m in MODALITIES
        },
        dropped=_drop_reasons(judged, keep),
    )
