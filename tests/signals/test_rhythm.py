"""Beat statistics: rate and irregularity of pulse trains with a known answer; real BIDMC."""

from __future__ import annotations

import numpy as np
import pytest

from biofp_core.signals.rhythm import (
    RHYTHM_FEATURES,
    STAT_NAMES,
    TEMPLATE_S,
    beat_statistics,
    mean_beat,
    paired_statistics,
    rhythm_features,
    statistics_of,
)
from biofp_core.store import WindowStore

FS_HZ = 125.0
L = 1250


def pulses(beat_times_s: np.ndarray) -> np.ndarray:
    """A z-scored train of narrow Gaussian pulses at the given times, 10 s at 125 Hz."""
    t = np.arange(L) / FS_HZ
    x = np.exp(-0.5 * ((t[:, None] - beat_times_s[None, :]) / 0.03) ** 2).sum(axis=1)
    return ((x - x.mean()) / x.std()).astype(np.float32)


def test_regular_rhythm_has_its_rate_and_no_irregularity() -> None:
    stats, ok = beat_statistics(pulses(np.arange(0.2, 10.0, 0.8))[None], modality="ppg")  # 75 bpm
    assert ok.tolist() == [True] and stats.shape == (1, len(STAT_NAMES))
    irregularity, rate = stats[0]
    assert irregularity == pytest.approx(0.0, abs=0.05)
    assert 25.0 * rate + 75.0 == pytest.approx(75.0, abs=1.5)


def test_irregular_rhythm_scores_higher_and_flat_windows_have_none() -> None:
    rng = np.random.default_rng(0)
    irregular = np.cumsum(rng.uniform(0.45, 1.15, 20)) + 0.1
    stats, ok = beat_statistics(
        np.stack([pulses(irregular[irregular < 9.9]), np.zeros(L)]), modality="ppg"
    )
    assert ok.tolist() == [True, False]
    rr = np.diff(irregular[irregular < 9.9])
    expected = 5 * np.sqrt(np.mean(np.diff(rr) ** 2)) / rr.mean()
    assert stats[0, 0] == pytest.approx(expected, rel=0.05)
    assert stats[0, 0] > 1.0 and (stats[1] == 0).all()


def test_named_statistics_are_the_rhythm_features() -> None:
    """BEAT_STATS beyond rate and irregularity are the rhythm features themselves, in order."""
    rng = np.random.default_rng(1)
    beats = np.cumsum(rng.uniform(0.5, 1.1, 16)) + 0.1
    features = rhythm_features(pulses(beats[beats < 9.9])[None], modality="ppg")
    stats, ok = statistics_of(features, ("pnn50", "irregularity", "sdnn"))
    assert ok.tolist() == [True] and stats.shape == (1, 3)
    column = {n: features[0, RHYTHM_FEATURES.index(n)] for n in ("pnn50", "rmssd", "sdnn")}
    assert stats[0].tolist() == pytest.approx([column["pnn50"], column["rmssd"], column["sdnn"]])
    assert 0.5 < stats[0, 0] <= 1.0  # most successive differences exceed 50 ms


def test_mean_beat_is_the_pulse_around_each_fiducial() -> None:
    """The template holds the pulse's own samples around its beats; flat windows get zeros."""
    x = np.stack([pulses(np.arange(0.6, 9.9, 0.8)), np.zeros(L, dtype=np.float32)])
    features = rhythm_features(x, modality="ppg", template_points=9)
    assert features.shape == (2, len(RHYTHM_FEATURES) + 9)
    assert (features[1] == 0).all()
    plain = rhythm_features(x, modality="ppg")
    assert np.array_equal(features[:, : len(RHYTHM_FEATURES)], plain)  # the same statistics
    rows, at = np.zeros(3, dtype=int), np.array([100, 200, 1240])  # the last beat's span is cut
    offsets = np.round(np.linspace(*TEMPLATE_S, 5) * FS_HZ).astype(int)
    ramp = np.tile(np.arange(L, dtype=np.float32) / L, (1, 1))
    template = mean_beat(ramp, rows, at, points=5)
    assert template.shape == (1, 5)
    assert template[0] == pytest.approx((150 + offsets) / L)  # mean of beats at 100 and 200
    assert mean_beat(ramp, rows[:0], at[:0], points=5).tolist() == [[0.0] * 5]
    short = mean_beat(ramp, rows, at, points=5, valid_n=np.array([200 + offsets[-1]]))
    assert short[0] == pytest.approx((100 + offsets) / L)  # the beat at 200 runs into padding


def test_paired_statistics_average_present_modalities() -> None:
    regular, faster = pulses(np.arange(0.2, 10.0, 1.0)), pulses(np.arange(0.2, 10.0, 0.5))
    ecg = np.stack([regular, regular, np.zeros(L)])
    ppg = np.stack([faster, np.zeros(L), np.zeros(L)])
    mask = np.array([[True, True], [True, False], [False, False]])
    features = [  # as M2AE.loss builds them: an absent modality has no features
        np.where(mask[:, m, None], rhythm_features(x, modality=name), 0.0)
        for m, (name, x) in enumerate((("ecg", ecg), ("ppg", ppg)))
    ]
    stats, ok = paired_statistics(*features)
    assert ok.tolist() == [True, True, False]
    bpm = 25.0 * stats[:, 1] + 75.0
    assert bpm[0] == pytest.approx(90.0, abs=2.0)  # mean of 60 and 120 bpm
    assert bpm[1] == pytest.approx(60.0, abs=1.0)  # ECG only: the absent PPG is ignored


def test_bidmc_ecg_and_ppg_agree_on_the_rate(bidmc_store: WindowStore) -> None:
    both = np.flatnonzero(bidmc_store.mask.all(axis=1))[::10]  # every record, ~10 windows each
    ecg, ok_ecg = beat_statistics(np.asarray(bidmc_store.ecg[both]), modality="ecg")
    ppg, ok_ppg = beat_statistics(np.asarray(bidmc_store.ppg[both]), modality="ppg")
    ok = ok_ecg & ok_ppg
    assert ok.mean() > 0.8
    bpm_ecg, bpm_ppg = 25.0 * ecg[ok, 1] + 75.0, 25.0 * ppg[ok, 1] + 75.0
    assert ((bpm_ppg > 40) & (bpm_ppg < 160)).all()
    assert np.median(np.abs(bpm_ecg - bpm_ppg)) < 3.0  # the same heart seen by both sensors


def test_rhythm_features_of_regular_and_irregular_trains() -> None:
    rng = np.random.default_rng(1)
    irregular = np.cumsum(rng.uniform(0.45, 1.15, 20)) + 0.1
    windows = np.stack(
        [pulses(np.arange(0.2, 10.0, 0.8)), pulses(irregular[irregular < 9.9]), np.zeros(L)]
    )
    f = dict(zip(RHYTHM_FEATURES, rhythm_features(windows, modality="ppg").T, strict=True))
    assert f["valid"].tolist() == [1.0, 1.0, 0.0]
    assert f["beats"][0] == pytest.approx(13 / 15)
    assert f["mean_rr"][0] == pytest.approx(0.8, abs=0.01)
    assert f["sdnn"][0] < 0.05 and f["pnn50"][0] == 0.0 and f["range"][0] < 0.05
    for name in ("sdnn", "rmssd", "madnn", "pnn50", "range"):
        assert f[name][1] > f[name][0] + 0.3, name  # irregular scores clearly higher
    assert (rhythm_features(windows, modality="ppg")[2] == 0).all()  # no beats: all zero
