"""Signal quality indices: each component on synthetic windows, the score, real BIDMC windows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import wfdb
from scipy.stats import skew as scipy_skew

from biofp_core.signals import quality
from biofp_core.signals.preprocess import bandpass, preprocess_record
from biofp_core.signals.types import Channel, Modality, RawRecord

FS_HZ = 125.0
WIN = 1250
BANDS = {Modality.ECG: (0.5, 40.0), Modality.PPG: (0.5, 12.0)}


def _bumps(t: np.ndarray, centres: np.ndarray, width_s: float, amp: float) -> np.ndarray:
    return amp * np.exp(-0.5 * ((t[:, None] - centres[None, :]) / width_s) ** 2).sum(axis=1)


def _beats(duration_s: float, hr_bpm: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(0.3, duration_s, 60.0 / hr_bpm)
    return t + rng.normal(0.0, 0.02, t.size)  # a little heart-rate variability


def synth_ecg(duration_s: float, *, hr_bpm: float = 72.0, seed: int = 0) -> np.ndarray:
    """Lead-II-like ECG in mV at 125 Hz: P, Q, R, S and T waves as Gaussian bumps."""
    t = np.arange(round(duration_s * FS_HZ)) / FS_HZ
    r = _beats(duration_s, hr_bpm, seed)
    return (
        _bumps(t, r - 0.16, 0.025, 0.12)
        + _bumps(t, r - 0.02, 0.008, -0.1)
        + _bumps(t, r, 0.01, 1.0)
        + _bumps(t, r + 0.025, 0.008, -0.2)
        + _bumps(t, r + 0.28, 0.05, 0.3)
    )


def synth_ppg(duration_s: float, *, hr_bpm: float = 72.0, seed: int = 0) -> np.ndarray:
    """Pleth-like pulse at 125 Hz: systolic and dicrotic waves plus slow respiratory drift."""
    t = np.arange(round(duration_s * FS_HZ)) / FS_HZ
    onset = _beats(duration_s, hr_bpm, seed) + 0.2
    drift = 0.1 * np.sin(2 * np.pi * 0.25 * t)
    return _bumps(t, onset + 0.12, 0.07, 1.0) + _bumps(t, onset + 0.4, 0.09, 0.4) + drift


SYNTH = {Modality.ECG: synth_ecg, Modality.PPG: synth_ppg}


def _windows(x: np.ndarray, modality: Modality) -> tuple[np.ndarray, np.ndarray]:
    """(raw, filtered) windows of a 125 Hz signal, as the pipeline would cut them."""
    n = len(x) // WIN
    filtered = bandpass(x, fs_hz=FS_HZ, band_hz=BANDS[modality], order=2)
    return x[: n * WIN].reshape(n, WIN), filtered[: n * WIN].reshape(n, WIN)


def _noisy(x: np.ndarray, *, noise_to_signal: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return x + rng.normal(0.0, noise_to_signal * x.std(), x.size)


# --- flat_frac / clip_frac / skewness ------------------------------------------------------------


def test_flat_frac_counts_samples_in_long_flat_runs() -> None:
    t = np.arange(WIN) / FS_HZ
    clean = np.sin(2 * np.pi * 1.3 * t)
    flat30 = clean.copy()
    flat30[400:775] = 0.42  # 375 samples = 30 % of the window
    short_plateaus = clean.copy()
    for start in range(0, WIN - 10, 100):
        short_plateaus[start : start + 10] = short_plateaus[start]  # 0.08 s: too short to count
    constant = np.full(WIN, 3.3)
    frac = quality.flat_frac(np.stack([clean, flat30, short_plateaus, constant]))
    assert frac[0] == 0.0
    assert frac[1] == pytest.approx(375 / WIN, abs=2 / WIN)
    assert frac[2] == 0.0
    assert frac[3] == 1.0


def test_flat_frac_tolerates_rounding_but_not_signal() -> None:
    t = np.arange(WIN) / FS_HZ
    x = 5.0 + np.sin(2 * np.pi * 1.0 * t)
    x[100:400] = 5.0 + 1e-9 * np.random.default_rng(0).normal(size=300)  # "flat" up to noise
    assert quality.flat_frac(x[None])[0] == pytest.approx(300 / WIN, abs=2 / WIN)


def test_clip_frac_flags_saturation() -> None:
    t = np.arange(WIN) / FS_HZ
    sine = np.sin(2 * np.pi * 1.2 * t)
    ppg = synth_ppg(10.0)
    windows = np.stack([sine, ppg, np.clip(sine, -0.6, 0.6), np.minimum(ppg, 0.7 * ppg.max())])
    frac = quality.clip_frac(windows)
    assert frac[0] < 0.08  # a pure sine dwells near its extremes; real beats vary
    assert frac[1] < 0.02
    assert frac[2] > 0.4
    assert frac[3] > 0.1


def test_skewness_matches_scipy_and_guards_constant_rows() -> None:
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.gamma(2.0, size=(3, WIN)), np.full((1, WIN), 7.0)])
    got = quality.skewness(x)
    np.testing.assert_allclose(got[:3], scipy_skew(x[:3], axis=1), rtol=1e-10)
    assert got[3] == 0.0
    np.testing.assert_allclose(quality.skewness(x.astype(np.float32))[:3], got[:3], rtol=1e-4)


def test_clean_ppg_is_positively_skewed() -> None:
    _, filtered = _windows(synth_ppg(40.0), Modality.PPG)
    assert (quality.skewness(filtered) > 0.5).all()


# --- beats and template correlation --------------------------------------------------------------


@pytest.mark.parametrize("modality", list(Modality))
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_detect_beats_finds_each_beat_once(modality: Modality, sign: float) -> None:
    _, filtered = _windows(SYNTH[modality](40.0, hr_bpm=72.0), modality)
    rows, at = quality.detect_beats(sign * filtered, modality=modality)
    per_window = np.bincount(rows, minlength=len(filtered))
    assert ((per_window >= 11) & (per_window <= 13)).all()  # 72 bpm = 12 beats per 10 s
    gaps = np.diff(at)[np.diff(rows) == 0] / FS_HZ
    assert np.all(np.abs(gaps - 60 / 72) < 0.15)  # consecutive, none missed or doubled


def test_detect_beats_places_ecg_fiducial_on_the_qrs() -> None:
    duration_s = 10.0
    x = synth_ecg(duration_s, seed=3)
    r_true = _beats(duration_s, 72.0, 3) * FS_HZ
    _, filtered = _windows(x, Modality.ECG)
    _, at = quality.detect_beats(filtered, modality=Modality.ECG)
    nearest = np.min(np.abs(at[:, None] - r_true[None, :]), axis=1)
    assert (nearest <= 2).all()  # within 16 ms of the R peak


@pytest.mark.parametrize("modality", list(Modality))
def test_template_corr_high_for_clean_low_for_noise(modality: Modality) -> None:
    x = SYNTH[modality](40.0, seed=2)
    _, clean = _windows(x, modality)
    _, noisy = _windows(_noisy(x, noise_to_signal=2.0, seed=4), modality)
    _, pure_noise = _windows(np.random.default_rng(5).normal(size=len(x)), modality)
    tc_clean = quality.template_corr(clean, modality=modality)
    tc_noisy = quality.template_corr(noisy, modality=modality)
    tc_pure = quality.template_corr(pure_noise, modality=modality)
    assert (tc_clean > 0.9).all()
    assert (tc_noisy < tc_clean - 0.3).all()
    assert tc_pure.max() < 0.7


def test_template_corr_is_zero_without_beats() -> None:
    windows = np.stack([np.zeros(WIN), np.full(WIN, 2.0)])
    for modality in Modality:
        assert (quality.template_corr(windows, modality=modality) == 0.0).all()


# --- combined score and the batch entry point ----------------------------------------------------


@pytest.mark.parametrize("modality", list(Modality))
def test_score_ranks_clean_above_noisy(modality: Modality) -> None:
    x = SYNTH[modality](40.0, seed=6)
    clean = quality.window_quality(*_windows(x, modality), modality=modality)
    noisy_x = _noisy(x, noise_to_signal=2.0, seed=7)
    noisy = quality.window_quality(*_windows(noisy_x, modality), modality=modality)
    assert (clean.score > 0.8).all()
    assert (noisy.score < clean.score - 0.4).all()
    assert (clean.template_corr > noisy.template_corr).all()
    for q in (clean, noisy):
        assert ((q.score >= 0) & (q.score <= 1)).all()


@pytest.mark.parametrize("modality", list(Modality))
def test_score_is_monotone_in_each_component(modality: Modality) -> None:
    grid = np.linspace(0.0, 1.0, 21)
    base = {"flat": 0.05, "clip": 0.02, "skew": 0.4, "corr": 0.85}

    def score(name: str, values: np.ndarray) -> np.ndarray:
        args = {k: np.full(values.shape, v) for k, v in base.items()} | {name: values}
        return quality.combined_score(**args, modality=modality)

    assert (np.diff(score("flat", grid)) <= 0).all() and score("flat", grid)[-1] == 0.0
    assert (np.diff(score("clip", grid)) <= 0).all() and score("clip", grid)[-1] == 0.0
    assert (np.diff(score("corr", grid)) >= 0).all() and score("corr", grid)[-1] > 0.7
    assert (np.diff(score("skew", np.linspace(-2, 2, 21))) >= 0).all()


def test_window_quality_treats_windows_independently() -> None:
    ecg = synth_ecg(30.0, seed=8)
    ecg[1250:2500] = _noisy(ecg[1250:2500], noise_to_signal=3.0, seed=9)
    raw, filtered = _windows(ecg, Modality.ECG)
    batch = quality.window_quality(raw, filtered, modality=Modality.ECG)
    for i in range(len(raw)):
        one = quality.window_quality(raw[i : i + 1], filtered[i : i + 1], modality=Modality.ECG)
        assert one.score[0] == pytest.approx(batch.score[i], abs=1e-9)
        assert one.template_corr[0] == pytest.approx(batch.template_corr[i], abs=1e-9)
    assert batch.score[1] < batch.score[0]


def test_window_quality_of_no_windows_is_empty() -> None:
    empty = np.zeros((0, WIN))
    q = quality.window_quality(empty, empty, modality=Modality.PPG)
    assert all(len(v) == 0 for v in vars(q).values())


# --- real data ---------------------------------------------------------------------------------


def _bidmc(path: Path) -> RawRecord:
    rec = wfdb.rdrecord(str(path))

    def channel(name: str) -> Channel:
        return Channel(
            name=name, fs_hz=float(rec.fs), samples=rec.p_signal[:, rec.sig_name.index(name)]
        )

    return RawRecord(record_id=path.name, ecg=channel("II,"), ppg=channel("PLETH,"))


def test_bidmc_windows_mostly_score_high(bidmc_dir: Path) -> None:
    names = [f"bidmc{i:02d}" for i in range(1, 54, 4)]  # 14 records across the set
    windows = [preprocess_record(_bidmc(bidmc_dir / name)) for name in names]
    for modality in Modality:
        score = np.concatenate([w.quality[modality].score for w in windows])
        score = score[np.isfinite(score)]
        assert len(score) > 600
        assert np.median(score) > 0.8
        assert np.mean(score > 0.5) > 0.85


def test_bidmc05_flat_pleth_shows_in_quality(bidmc_dir: Path) -> None:
    w = preprocess_record(_bidmc(bidmc_dir / "bidmc05"))
    ppg_flat = w.quality[Modality.PPG].flat_frac
    assert np.nanmax(ppg_flat) > 0.05
    assert np.nanmax(w.quality[Modality.ECG].flat_frac) < 0.05
