"""Preprocessing: resampling, gap filling, band-pass, windowing, z-score and the record pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import wfdb
from scipy import signal

from biofp_core.config import PreprocessConfig
from biofp_core.errors import ConfigError, RecordError
from biofp_core.signals.preprocess import (
    bandpass,
    interpolate_gaps,
    preprocess_record,
    resample_to,
    slice_windows,
    window_starts,
    zscore,
)
from biofp_core.signals.types import Channel, Modality, RawRecord

FS_HZ = 125.0
WIN = 1250
ECG_BAND = (0.5, 40.0)


def _sine(freq_hz: float, *, fs_hz: float, duration_s: float, amp: float = 1.0) -> np.ndarray:
    return amp * np.sin(2 * np.pi * freq_hz * np.arange(round(duration_s * fs_hz)) / fs_hz)


def _pulses(*, fs_hz: float, duration_s: float, period_s: float = 0.8) -> np.ndarray:
    """A beat-like train of narrow Gaussian pulses (both modalities can use it)."""
    t = np.arange(round(duration_s * fs_hz)) / fs_hz
    phase = (t % period_s) - period_s / 2
    return np.exp(-0.5 * (phase / 0.03) ** 2) + 0.2 * np.sin(2 * np.pi * 0.3 * t)


def _record(ecg: np.ndarray | None, ppg: np.ndarray | None, *, fs_hz: float = FS_HZ) -> RawRecord:
    def channel(x: np.ndarray | None, name: str) -> Channel | None:
        return None if x is None else Channel(name=name, fs_hz=fs_hz, samples=x)

    return RawRecord(record_id="synthetic", ecg=channel(ecg, "II"), ppg=channel(ppg, "PLETH"))


def _bidmc(path: Path) -> RawRecord:
    rec = wfdb.rdrecord(str(path))

    def channel(name: str) -> Channel:
        samples = rec.p_signal[:, rec.sig_name.index(name)]
        return Channel(name=name, fs_hz=float(rec.fs), samples=samples)

    return RawRecord(record_id=path.name, ecg=channel("II,"), ppg=channel("PLETH,"))


# --- resample_to --------------------------------------------------------------------------------


@pytest.mark.parametrize("fs_in_hz", [250.0, 500.0, 62.4725, 999.56])
def test_resample_keeps_length_frequency_amplitude_and_timing(fs_in_hz: float) -> None:
    duration_s = 60.0
    x = 0.3 + _sine(5.0, fs_hz=fs_in_hz, duration_s=duration_s, amp=1.5)
    y = resample_to(x, fs_in_hz=fs_in_hz, fs_out_hz=FS_HZ)
    assert len(y) == round(len(x) * FS_HZ / fs_in_hz)
    spectrum = np.abs(np.fft.rfft(y - y.mean()))
    peak_hz = np.fft.rfftfreq(len(y), 1 / FS_HZ)[np.argmax(spectrum)]
    assert peak_hz == pytest.approx(5.0, rel=0.01)
    mid = y[250:-250]
    assert (mid.max() - mid.min()) / 2 == pytest.approx(1.5, rel=0.02)
    expected = 0.3 + _sine(5.0, fs_hz=FS_HZ, duration_s=len(y) / FS_HZ, amp=1.5)
    assert np.abs(y - expected)[250:-250].max() < 0.03  # sample k sits at k / 125 s


def test_resample_is_identity_at_equal_rates() -> None:
    x = np.random.default_rng(0).normal(size=1000)
    np.testing.assert_array_equal(resample_to(x, fs_in_hz=125.0, fs_out_hz=125.0), x)


def test_resample_rejects_bad_rates() -> None:
    with pytest.raises(ValueError, match="positive"):
        resample_to(np.zeros(10), fs_in_hz=0.0, fs_out_hz=125.0)


# --- bandpass -----------------------------------------------------------------------------------


def _gain(freq_hz: float, band_hz: tuple[float, float]) -> float:
    x = _sine(freq_hz, fs_hz=FS_HZ, duration_s=120.0)
    y = bandpass(x, fs_hz=FS_HZ, band_hz=band_hz, order=2)
    return float(y[2500:-2500].std() / x[2500:-2500].std())


def test_bandpass_passes_5hz_and_rejects_drift_and_mains() -> None:
    assert _gain(5.0, ECG_BAND) == pytest.approx(1.0, abs=0.02)
    assert _gain(5.0, (0.5, 12.0)) == pytest.approx(1.0, abs=0.03)
    assert _gain(0.05, ECG_BAND) < 0.01
    assert _gain(60.0, ECG_BAND) < 0.01
    assert _gain(40.0, (0.5, 12.0)) < 0.01


def test_bandpass_has_zero_phase() -> None:
    x = np.random.default_rng(1).normal(size=round(60 * FS_HZ))
    y = bandpass(x, fs_hz=FS_HZ, band_hz=ECG_BAND, order=2)
    lags = np.arange(-20, 21)
    xcorr = [np.dot(x[50:-50], np.roll(y, lag)[50:-50]) for lag in lags]
    assert lags[int(np.argmax(xcorr))] == 0
    sine = _sine(5.0, fs_hz=FS_HZ, duration_s=20.0)
    np.testing.assert_allclose(
        bandpass(sine, fs_hz=FS_HZ, band_hz=ECG_BAND, order=2)[500:-500], sine[500:-500], atol=0.02
    )


def test_bandpass_equals_sosfiltfilt_on_1d_and_2d() -> None:
    sos = signal.butter(2, ECG_BAND, btype="bandpass", fs=FS_HZ, output="sos")
    x = np.random.default_rng(2).normal(size=(3, 2000)) + 4.0
    np.testing.assert_allclose(
        bandpass(x, fs_hz=FS_HZ, band_hz=ECG_BAND, order=2),
        signal.sosfiltfilt(sos, x, axis=-1),
        atol=1e-12,
    )
    np.testing.assert_allclose(
        bandpass(x[0], fs_hz=FS_HZ, band_hz=ECG_BAND, order=2),
        signal.sosfiltfilt(sos, x[0]),
        atol=1e-12,
    )


def test_bandpass_rejects_band_above_nyquist() -> None:
    with pytest.raises(ConfigError, match="Nyquist"):
        bandpass(np.zeros(100), fs_hz=50.0, band_hz=ECG_BAND, order=2)


# --- interpolate_gaps ---------------------------------------------------------------------------


def test_short_gaps_are_filled_exactly_linearly() -> None:
    x = _sine(1.0, fs_hz=FS_HZ, duration_s=10.0)
    gappy = x.copy()
    gappy[300:360] = np.nan  # 0.48 s
    gappy[700:702] = np.nan
    filled, invalid = interpolate_gaps(gappy, fs_hz=FS_HZ, max_gap_s=1.0)
    assert not invalid.any() and not np.isnan(filled).any()
    line = np.interp(np.arange(300, 360), [299, 360], [x[299], x[360]])
    np.testing.assert_allclose(filled[300:360], line, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(filled[:300], x[:300])
    ramp = np.arange(100.0)
    ramp_gappy = ramp.copy()
    ramp_gappy[10:40] = np.nan
    np.testing.assert_allclose(interpolate_gaps(ramp_gappy, fs_hz=FS_HZ, max_gap_s=1.0)[0], ramp)


def test_long_gaps_are_filled_but_marked_invalid() -> None:
    x = _sine(1.0, fs_hz=FS_HZ, duration_s=20.0)
    x[125:250] = np.nan  # exactly 1 s: still short
    x[1000:1126] = np.nan  # 126 samples: long
    x[2000:2300] = np.nan
    filled, invalid = interpolate_gaps(x, fs_hz=FS_HZ, max_gap_s=1.0)
    assert not np.isnan(filled).any()
    expected = np.zeros(len(x), dtype=bool)
    expected[1000:1126] = expected[2000:2300] = True
    np.testing.assert_array_equal(invalid, expected)


def test_gaps_at_the_edges_and_all_nan() -> None:
    x = np.arange(10.0)
    x[:3] = np.nan
    x[-2:] = np.nan
    filled, invalid = interpolate_gaps(x, fs_hz=FS_HZ, max_gap_s=1.0)
    np.testing.assert_array_equal(filled, [3, 3, 3, 3, 4, 5, 6, 7, 7, 7])
    assert not invalid.any()
    filled, invalid = interpolate_gaps(np.full(5, np.nan), fs_hz=FS_HZ, max_gap_s=1.0)
    assert (filled == 0).all() and invalid.all()


# --- windows and z-score ------------------------------------------------------------------------


def test_window_starts_and_slicing() -> None:
    assert len(window_starts(60001, window_n=WIN, hop_n=WIN)) == 48
    starts = window_starts(60001, window_n=WIN, hop_n=625)
    assert len(starts) == 95 and starts[-1] + WIN <= 60001
    assert len(window_starts(1249, window_n=WIN, hop_n=WIN)) == 0
    x = np.arange(3000.0)
    w = slice_windows(x, starts=np.array([0, 1000, 2500]), window_n=WIN)
    assert w.shape == (3, WIN)
    np.testing.assert_array_equal(w[1], x[1000:2250])
    assert (w[2, 500:] == 0).all()  # past the end: zero-padded


def test_zscore_gives_zero_mean_unit_std_and_guards_flat_rows() -> None:
    rng = np.random.default_rng(3)
    windows = np.vstack([5.0 + 3.0 * rng.normal(size=(4, WIN)), np.full((1, WIN), 2.0)])
    z = zscore(windows)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z[:4].mean(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(z[:4].std(axis=1), 1, atol=1e-5)
    assert (z[4] == 0).all()


# --- preprocess_record: real records ------------------------------------------------------------


@pytest.fixture(scope="module")
def bidmc01(bidmc_dir: Path) -> RawRecord:
    return _bidmc(bidmc_dir / "bidmc01")


def test_bidmc_record_gives_48_aligned_zscored_windows(bidmc01: RawRecord) -> None:
    w = preprocess_record(bidmc01)
    assert len(w) == 48 and w.dropped == {}
    assert w.ecg.shape == w.ppg.shape == (48, WIN) and w.ecg.dtype == np.float32
    assert w.mask.shape == (48, 2) and w.mask[:, 0].all()
    assert w.mask[:, 1].sum() == 47  # PLETH at 90-100 s is a sample-and-hold staircase: flat
    assert not w.mask[9, 1] and (w.ppg[9] == 0).all()
    np.testing.assert_allclose(w.start_s, np.arange(48) * 10.0)
    for col, x in enumerate((w.ecg, w.ppg)):
        kept = x[w.mask[:, col]]
        np.testing.assert_allclose(kept.mean(axis=1), 0, atol=1e-4)
        np.testing.assert_allclose(kept.std(axis=1), 1, atol=1e-4)
    for col, modality in enumerate(Modality):
        np.testing.assert_array_equal(np.isfinite(w.quality[modality].score), w.mask[:, col])


def test_bidmc_windows_match_filtering_the_record_directly(bidmc01: RawRecord) -> None:
    w = preprocess_record(bidmc01)
    ecg = bandpass(bidmc01.ecg.samples, fs_hz=FS_HZ, band_hz=ECG_BAND, order=2)
    np.testing.assert_allclose(w.ecg[7], zscore(ecg[None, 7 * WIN : 8 * WIN])[0], atol=1e-5)


def test_smaller_hop_gives_more_overlapping_windows(bidmc01: RawRecord) -> None:
    w = preprocess_record(bidmc01, PreprocessConfig(hop_s=5.0))
    assert len(w) == 95
    np.testing.assert_allclose(w.start_s[:3], [0.0, 5.0, 10.0])
    np.testing.assert_array_equal(w.ecg[2], preprocess_record(bidmc01).ecg[1])


def test_bidmc05_flat_pleth_masks_ppg_only(bidmc_dir: Path) -> None:
    w = preprocess_record(_bidmc(bidmc_dir / "bidmc05"))  # ~2 s of flat PLETH at 126 s
    assert len(w) == 48 and w.dropped == {}
    row = int(np.flatnonzero(w.start_s == 120.0)[0])
    assert w.mask[row].tolist() == [True, False]
    assert (w.ppg[row] == 0).all() and np.isnan(w.quality[Modality.PPG].score[row])
    assert w.mask[:, 0].all()


# --- preprocess_record: synthetic records -------------------------------------------------------


def test_flat_segment_masks_the_modality_then_drops_the_window() -> None:
    ecg = _pulses(fs_hz=FS_HZ, duration_s=60.0)
    ppg = _pulses(fs_hz=FS_HZ, duration_s=60.0, period_s=0.9)
    ppg[2 * WIN + 100 : 2 * WIN + 500] = ppg[2 * WIN + 100]  # 3.2 s = 32 % flat in window 2
    w = preprocess_record(_record(ecg, ppg))
    assert len(w) == 6 and w.dropped == {}
    assert w.mask[2].tolist() == [True, False] and w.mask[[0, 1, 3, 4, 5]].all()
    assert (w.ppg[2] == 0).all()
    assert np.isnan(w.quality[Modality.PPG].flat_frac[2])

    ecg[2 * WIN : 2 * WIN + 400] = 0.0
    w = preprocess_record(_record(ecg, ppg))
    assert len(w) == 5 and w.dropped == {"flat": 1}
    np.testing.assert_allclose(w.start_s, [0, 10, 30, 40, 50])


def test_flat_below_threshold_is_kept_with_its_flat_fraction() -> None:
    ppg = _pulses(fs_hz=FS_HZ, duration_s=30.0)
    ppg[WIN + 200 : WIN + 450] = ppg[WIN + 200]  # 20 %
    w = preprocess_record(_record(None, ppg))
    assert w.mask[:, 1].all()
    assert w.quality[Modality.PPG].flat_frac[1] == pytest.approx(0.2, abs=0.01)


def test_long_nan_gap_masks_or_drops_short_gap_is_filled() -> None:
    ecg = _pulses(fs_hz=FS_HZ, duration_s=50.0)
    ppg = _pulses(fs_hz=FS_HZ, duration_s=50.0, period_s=0.9)
    ecg[WIN + 300 : WIN + 360] = np.nan  # 0.48 s: interpolated
    ecg[3 * WIN + 100 : 3 * WIN + 400] = np.nan  # 2.4 s: long
    w = preprocess_record(_record(ecg, ppg))
    assert len(w) == 5 and w.mask[:, 1].all()
    assert w.mask[:, 0].tolist() == [True, True, True, False, True]
    assert np.isfinite(w.ecg).all() and (w.ecg[3] == 0).all()

    ppg[3 * WIN + 1000 : 3 * WIN + 1200] = np.nan
    w = preprocess_record(_record(ecg, ppg))
    assert len(w) == 4 and w.dropped == {"nan_gap": 1}


@pytest.mark.parametrize("present", [Modality.ECG, Modality.PPG])
def test_single_modality_record_masks_the_missing_one(present: Modality) -> None:
    x = _pulses(fs_hz=FS_HZ, duration_s=35.0)
    raw = _record(x, None) if present is Modality.ECG else _record(None, x)
    w = preprocess_record(raw)
    col = 0 if present is Modality.ECG else 1
    assert len(w) == 3
    assert w.mask[:, col].all() and not w.mask[:, 1 - col].any()
    absent = Modality.PPG if present is Modality.ECG else Modality.ECG
    assert (getattr(w, absent.value) == 0).all()
    assert np.isnan(w.quality[absent].score).all()
    assert np.isfinite(w.quality[present].score).all()


def test_shorter_modality_is_masked_where_it_ends() -> None:
    ecg = _pulses(fs_hz=FS_HZ, duration_s=60.0)
    ppg = _pulses(fs_hz=FS_HZ, duration_s=35.0)
    w = preprocess_record(_record(ecg, ppg))
    assert len(w) == 6
    assert w.mask[:, 0].all()
    assert w.mask[:, 1].tolist() == [True, True, True, False, False, False]


def test_record_shorter_than_a_window_is_padded() -> None:
    w = preprocess_record(_record(_pulses(fs_hz=FS_HZ, duration_s=9.0), None))
    assert len(w) == 1 and w.ecg.shape == (1, WIN) and w.mask.tolist() == [[True, False]]
    assert w.valid_samples().tolist() == [round(9.0 * 125)]
    assert np.all(w.ecg[0, 9 * 125 :] == 0) and np.std(w.ecg[0, : 9 * 125]) == pytest.approx(
        1, 0.01
    )


def test_record_shorter_than_the_minimum_duration() -> None:
    w = preprocess_record(_record(_pulses(fs_hz=FS_HZ, duration_s=1.5), None))
    assert len(w) == 0 and w.dropped == {"too_short": 1}
    assert w.ecg.shape == (0, WIN) and w.mask.shape == (0, 2)
    cfg = PreprocessConfig(min_duration_s=1.0)
    assert len(preprocess_record(_record(_pulses(fs_hz=FS_HZ, duration_s=1.5), None), cfg)) == 1


def test_record_without_samples_is_a_record_error() -> None:
    with pytest.raises(RecordError, match="no ECG or PPG"):
        preprocess_record(_record(np.zeros(0), None))


def test_modalities_at_odd_rates_stay_aligned() -> None:
    duration_s = 40.0
    ecg = _pulses(fs_hz=249.89, duration_s=duration_s, period_s=1.0)
    ppg = _pulses(fs_hz=62.4725, duration_s=duration_s, period_s=1.0)
    raw = RawRecord(
        record_id="mixed",
        ecg=Channel(name="II", fs_hz=249.89, samples=ecg),
        ppg=Channel(name="PLETH", fs_hz=62.4725, samples=ppg),
    )
    w = preprocess_record(raw)
    assert len(w) == 4 and w.mask.all()
    ref_x = _pulses(fs_hz=FS_HZ, duration_s=duration_s, period_s=1.0)
    ref = preprocess_record(_record(ref_x, ref_x))
    for got in (w.ecg, w.ppg):
        for i in range(4):  # each pulse sits where the 125 Hz reference puts it
            lag = np.argmax(signal.correlate(got[i], ref.ecg[i], mode="full")) - (WIN - 1)
            assert abs(lag) <= 1
