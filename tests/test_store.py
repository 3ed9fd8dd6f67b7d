"""The window store: all of BIDMC, cache hits and misses, subject mapping, bad records."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_records

from biofp_core.config import PreprocessConfig
from biofp_core.errors import DataError
from biofp_core.store import QUALITY_FIELDS, WindowStore, build_store, record_files


def test_every_bidmc_record_yields_paired_windows(bidmc_store: WindowStore) -> None:
    m = bidmc_store.manifest
    ids = {r.record_id for r in m.records}
    assert ids == {f"bidmc{i:02d}" for i in range(1, 54)}
    for r in m.records:
        assert 44 <= r.n_windows <= 48, r
        assert r.fs_hz == {"ecg": 125.0, "ppg": 125.0}
        assert r.channels["ecg"].strip(",").upper() == "II"
    # the numerics records (bidmcNNn) are skipped with a reason, not fatal
    assert {f.record_id for f in m.failures} == {f"bidmc{i:02d}n" for i in range(1, 54)}
    assert all("no ECG or PPG" in f.problem for f in m.failures)
    assert bidmc_store.ecg.shape == (m.n_windows, 1250)
    assert bidmc_store.quality.shape == (m.n_windows, 2, len(QUALITY_FIELDS))
    assert bidmc_store.mask.mean() > 0.95
    assert 6.5 < m.hours < 7.2


def test_windows_are_zscored_and_carry_their_record(bidmc_store: WindowStore) -> None:
    both = np.flatnonzero(bidmc_store.mask.all(axis=1))[:200]
    ppg = np.asarray(bidmc_store.ppg[both])
    np.testing.assert_allclose(ppg.mean(axis=1), 0, atol=1e-3)
    np.testing.assert_allclose(ppg.std(axis=1), 1, atol=1e-2)
    rec = bidmc_store.record_index
    assert np.all(np.diff(rec) >= 0)  # records stored contiguously, in manifest order
    first = np.asarray(bidmc_store.start_s[rec == 0])
    np.testing.assert_allclose(np.diff(first)[:5], 10.0)


def test_subjects_group_windows(bidmc_store: WindowStore) -> None:
    subjects = bidmc_store.subjects(only=["bidmc01", "bidmc02"])
    assert [s.subject_id for s in subjects] == ["bidmc01", "bidmc02"]
    s = subjects[0]
    assert s.ecg.shape == (len(s), 1250) and s.quality.shape == (len(s), 2)
    assert np.nanmax(s.quality) <= 1.0 and np.nanmin(s.quality) >= 0.0


def test_second_build_is_a_cache_hit(tmp_path: Path, bidmc_dir: Path) -> None:
    data = copy_records(bidmc_dir, tmp_path / "data", ["bidmc01", "bidmc02", "bidmc03"])
    seen: list[str] = []
    first = build_store(data, cache_dir=tmp_path / "cache", on_record=seen.append)
    assert sorted(seen) == ["bidmc01", "bidmc02", "bidmc03"]
    mtime = (first.path / "manifest.json").stat().st_mtime_ns
    seen.clear()
    second = build_store(data, cache_dir=tmp_path / "cache", on_record=seen.append)
    assert seen == [] and second.path == first.path
    assert (second.path / "manifest.json").stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(second.ppg, first.ppg)


def test_config_or_content_change_builds_a_new_store(tmp_path: Path, bidmc_dir: Path) -> None:
    data = copy_records(bidmc_dir, tmp_path / "data", ["bidmc01", "bidmc02"])
    cache = tmp_path / "cache"
    base = build_store(data, cache_dir=cache)
    half_hop = build_store(data, cache_dir=cache, config=PreprocessConfig(hop_s=5.0))
    assert half_hop.path != base.path
    assert len(half_hop) > 1.8 * len(base)
    dat = data / "bidmc02.dat"
    raw = bytearray(dat.read_bytes())
    raw[1000:1010] = bytes(10)  # same size, and we keep the old mtime: only the content differs
    st = dat.stat()
    dat.write_bytes(bytes(raw))
    os.utime(dat, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert build_store(data, cache_dir=cache).path != base.path


def test_subject_map_groups_records(tmp_path: Path, bidmc_dir: Path) -> None:
    data = copy_records(bidmc_dir, tmp_path / "data", ["bidmc01", "bidmc02", "bidmc03"])
    mapping = {"bidmc01": "patient-a", "bidmc02": "patient-a", "bidmc03": "patient-b"}
    store = build_store(data, cache_dir=tmp_path / "cache", subject_map=mapping)
    subjects = store.subjects()
    assert [s.subject_id for s in subjects] == ["patient-a", "patient-b"]
    assert set(np.unique(subjects[0].record_index)) == {0, 1}


def test_bad_record_is_skipped_not_the_site(tmp_path: Path, bidmc_dir: Path) -> None:
    data = copy_records(bidmc_dir, tmp_path / "data", ["bidmc01", "bidmc02"])
    (data / "bidmc02.dat").unlink()
    store = build_store(data, cache_dir=tmp_path / "cache")
    assert [r.record_id for r in store.manifest.records] == ["bidmc01"]
    (failure,) = store.manifest.failures
    assert failure.record_id == "bidmc02" and "bidmc02.dat" in failure.problem


def test_site_without_usable_records_fails_clearly(tmp_path: Path, bidmc_dir: Path) -> None:
    data = copy_records(bidmc_dir, tmp_path / "data", ["bidmc01n"])
    with pytest.raises(DataError, match="no usable record") as exc:
        build_store(data, cache_dir=tmp_path / "cache")
    assert "\n" not in str(exc.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no records found"):
        build_store(tmp_path / "empty", cache_dir=tmp_path / "cache")


def test_record_files_follow_segments(samples_dir: Path) -> None:
    files = record_files(samples_dir / "multi-segment" / "041s" / "041s.hea")
    assert {f.name for f in files} >= {"041s.hea", "041s01.hea", "041s01.dat", "041s02.dat"}
    assert {f.name for f in record_files(samples_dir / "a103l.hea")} == {"a103l.hea", "a103l.mat"}
