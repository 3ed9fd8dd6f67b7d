"""Hand-crafted window features on real BIDMC records: rate, shape, absent signals, padding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import copy_records

from biofp_core.evaluation.handcrafted import feature_names, handcrafted_features
from biofp_core.store import build_store

RECORDS = ["bidmc01", "bidmc02"]


@pytest.fixture(scope="module")
def store(bidmc_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    data = copy_records(bidmc_dir, tmp_path_factory.mktemp("hc-data"), RECORDS)
    return build_store(data, cache_dir=tmp_path_factory.mktemp("hc-cache"))


def _monitor_hr(bidmc_dir: Path, record: str, starts: np.ndarray) -> np.ndarray:
    import wfdb

    num = wfdb.rdrecord(str(bidmc_dir / f"{record}n"))
    names = [n.rstrip(",").strip() for n in num.sig_name]
    hr = num.p_signal[:, names.index("HR")]
    return np.array([np.nanmean(hr[int(s) : int(s) + 10]) for s in starts])


def test_beat_rate_of_both_signals_matches_the_monitor(store, bidmc_dir: Path) -> None:
    names = feature_names()
    rows = np.flatnonzero(np.asarray(store.mask).all(axis=1))[:24]
    X = handcrafted_features(store.ecg[rows], store.ppg[rows], store.mask[rows])
    assert X.shape == (len(rows), len(names)) and np.isfinite(X).all()
    records = store.manifest.records
    record = records[int(store.record_index[rows[0]])].record_id
    same = np.array([records[int(i)].record_id == record for i in store.record_index[rows]])
    monitor = _monitor_hr(bidmc_dir, record, np.asarray(store.start_s[rows][same]))
    ecg_hr = X[same, names.index("ecg_hr_bpm")]
    ppg_hr = X[same, names.index("ppg_hr_bpm")]
    assert np.median(np.abs(ecg_hr - monitor)) < 5.0  # bpm
    assert np.median(np.abs(ppg_hr - ecg_hr)) < 5.0
    # a real beat template: a large peak-to-peak amplitude, beats alike in shape
    assert np.median(X[:, names.index("ecg_template_ptp")]) > 1.0
    assert np.median(X[:, names.index("ppg_beat_corr")]) > 0.8


def test_an_absent_signal_is_a_zero_block_and_padding_is_ignored(store) -> None:
    names = feature_names()
    half = len(names) // 2
    row = int(np.flatnonzero(np.asarray(store.mask).all(axis=1))[3])
    ecg, ppg = np.asarray(store.ecg[[row]]), np.asarray(store.ppg[[row]])
    only_ppg = handcrafted_features(ecg, ppg, np.array([[False, True]]))
    assert not only_ppg[0, :half].any() and only_ppg[0, half:].any()
    # the first 6 s of the window, zero-padded to 10 s: features of the 6 s alone
    n = 750
    padded = np.zeros_like(ppg)
    padded[:, :n] = ppg[:, :n]
    with_valid = handcrafted_features(ecg, padded, np.array([[False, True]]), valid_n=[n])
    beats_6s = with_valid[0, names.index("ppg_beats")] * 15
    beats_10s = only_ppg[0, names.index("ppg_beats")] * 15
    assert 0.4 * beats_10s <= beats_6s <= 0.75 * beats_10s
    spectrum = [names.index(f"ppg_{c}") for c in ("skew", "kurtosis", "diff_zero_cross")]
    alone = handcrafted_features(ecg[:, :n], ppg[:, :n], np.array([[False, True]]))
    np.testing.assert_allclose(with_valid[0, spectrum], alone[0, spectrum], rtol=1e-4)
