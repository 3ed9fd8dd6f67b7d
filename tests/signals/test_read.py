"""WFDB reader: channel choice, every shared record, odd formats, and damaged records."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import wfdb

from biofp_core.config import ChannelAliases
from biofp_core.errors import DataError, RecordError
from biofp_core.signals.channels import normalise_name, pick_channels, rank_channels
from biofp_core.signals.read import find_records, read_record

P000878 = "multi-segment/p000878/p000878-2137-10-26-16-57"


def _one_line_naming(exc: pytest.ExceptionInfo[Exception], file_name: str) -> str:
    """The message, after checking it is one line and names `file_name`."""
    message = str(exc.value)
    assert "\n" not in message
    assert file_name in message
    return message


# ---- channel names -------------------------------------------------------------------------


def test_normalise_name_strips_case_and_punctuation() -> None:
    assert normalise_name("II,") == "ii"
    assert normalise_name("PLETH,") == "pleth"
    assert normalise_name(" ECG Lead-II ") == "ecgleadii"
    assert normalise_name(",;") == ""


def test_pick_channels_prefers_lead_ii_whatever_the_order() -> None:
    aliases = ChannelAliases()
    assert pick_channels(["RESP,", "PLETH,", "V,", "AVR,", "II,"], aliases) == (4, 1)
    assert pick_channels(["II,", "PLETH,", "RESP,", "V,", "AVR,"], aliases) == (0, 1)
    # no lead II: alias-list order ('i' before 'iii'), not channel order
    assert pick_channels(["III", "I", "V", "PLETH"], aliases) == (1, 3)
    assert pick_channels(["ECG", "Pleth"], aliases) == (0, 1)


def test_pick_channels_absent_modalities_and_numerics() -> None:
    aliases = ChannelAliases()
    assert pick_channels(["HR,", "PULSE,", "RESP,", "SpO2,"], aliases) == (None, None)
    assert pick_channels(["RESP", "PPG"], aliases) == (None, 1)
    assert pick_channels([], aliases) == (None, None)


def test_rank_channels_lists_fallbacks_best_first() -> None:
    ecg, ppg = rank_channels(["V", "II", "PLETH", "I", "pleth"], ChannelAliases())
    assert ecg == (1, 3, 0)  # II, then I ('i' precedes 'v' in the alias list), then V
    assert ppg == (2, 4)
    custom = ChannelAliases(ecg=("v", "i"), ppg=("ppg",))
    assert rank_channels(["I", "V", "PLETH", "II"], custom) == ((3, 1, 0), ())


# ---- finding records -----------------------------------------------------------------------


def test_find_records_bidmc_lists_waveform_and_numerics_records(bidmc_dir: Path) -> None:
    records = find_records(bidmc_dir)
    stems = [p.stem for p in records]
    assert len(records) == 106
    assert records == sorted(records)
    assert all(p.suffix == ".hea" for p in records)
    assert "bidmc01" in stems and "bidmc01n" in stems and "bidmc53n" in stems


def test_find_records_skips_segment_and_layout_headers(samples_dir: Path) -> None:
    found = [
        p.relative_to(samples_dir).with_suffix("").as_posix() for p in find_records(samples_dir)
    ]
    assert found == [
        "a103l",
        "mixedsignals",
        "multi-segment/041s/041s",
        P000878,
        "v102s",
    ]


def test_find_records_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no WFDB records"):
        find_records(tmp_path)
    (tmp_path / "notes.txt").write_text("not a record")
    with pytest.raises(DataError, match="no WFDB records") as exc:
        find_records(tmp_path)
    _one_line_naming(exc, str(tmp_path))
    with pytest.raises(DataError, match="not found"):
        find_records(tmp_path / "missing")


# ---- BIDMC ---------------------------------------------------------------------------------


def test_every_bidmc_record_gives_lead_ii_and_pleth(bidmc_dir: Path) -> None:
    headers = [p for p in find_records(bidmc_dir) if re.fullmatch(r"bidmc\d\d", p.stem)]
    assert len(headers) == 53
    ecg_positions = set()
    for header in headers:
        raw = read_record(header, data_dir=bidmc_dir)
        assert raw.record_id == header.stem
        assert raw.ecg is not None and raw.ppg is not None
        assert (raw.ecg.name, raw.ppg.name) == ("II,", "PLETH,")
        for channel in (raw.ecg, raw.ppg):
            assert channel.fs_hz == 125.0
            assert channel.samples.shape == (60001,)
            assert channel.samples.dtype == np.float64
        assert raw.duration_s == pytest.approx(480.008)
        assert any("<age>" in c for c in raw.comments)
        ecg_positions.add(raw.all_channels.index("II,"))
    assert len(ecg_positions) > 1  # channel order differs between records


def test_bidmc_channel_order_and_values_match_wfdb(bidmc_dir: Path) -> None:
    first = read_record(bidmc_dir / "bidmc01.hea")
    second = read_record(bidmc_dir / "bidmc02.hea")
    assert first.all_channels == ("RESP,", "PLETH,", "V,", "AVR,", "II,")
    assert second.all_channels == ("II,", "PLETH,", "RESP,", "V,", "AVR,")
    assert (first.ecg.units, first.ppg.units) == ("mV", "NU")
    full = wfdb.rdrecord(str(bidmc_dir / "bidmc01")).p_signal  # every channel, wfdb's way
    np.testing.assert_array_equal(first.ecg.samples, full[:, 4])
    np.testing.assert_array_equal(first.ppg.samples, full[:, 1])


def test_bidmc_numerics_records_have_no_ecg_or_ppg(bidmc_dir: Path) -> None:
    headers = [p for p in find_records(bidmc_dir) if p.stem.endswith("n")]
    assert len(headers) == 53
    for header in headers:
        with pytest.raises(RecordError, match="no ECG or PPG channel") as exc:
            read_record(header)
        assert "HR, PULSE, RESP" in _one_line_naming(exc, header.name)


# ---- wfdb-samples: odd formats -------------------------------------------------------------


def test_a103l_signals_in_mat_file(samples_dir: Path) -> None:
    raw = read_record(samples_dir / "a103l.hea", data_dir=samples_dir)
    assert raw.record_id == "a103l"
    assert (raw.ecg.name, raw.ppg.name) == ("II", "PLETH")
    assert raw.ecg.fs_hz == raw.ppg.fs_hz == 250.0
    assert raw.ecg.samples.shape == (82500,)
    assert raw.comments == ("Asystole", "False alarm")
    full = wfdb.rdrecord(str(samples_dir / "a103l")).p_signal
    np.testing.assert_array_equal(raw.ppg.samples, full[:, 2])


def test_v102s_format_212_keeps_nans(samples_dir: Path) -> None:
    raw = read_record(samples_dir / "v102s.hea")
    assert raw.ecg.fs_hz == 250.0 and raw.ecg.samples.shape == (75000,)
    assert np.isnan(raw.ecg.samples).sum() == 3
    assert np.isnan(raw.ppg.samples).sum() == 17
    assert np.isfinite(raw.ppg.samples).sum() == 75000 - 17


def test_mixedsignals_flac_keeps_each_channel_rate(samples_dir: Path) -> None:
    raw = read_record(samples_dir / "mixedsignals.hea")
    assert (raw.ecg.name, raw.ppg.name) == ("II", "Pleth")
    assert raw.ecg.fs_hz == pytest.approx(62.4725 * 4)
    assert raw.ppg.fs_hz == pytest.approx(62.4725 * 2)
    assert raw.ecg.samples.shape == (57600,) and raw.ppg.samples.shape == (28800,)
    assert raw.ecg.duration_s == pytest.approx(raw.ppg.duration_s)
    assert np.isnan(raw.ecg.samples).any() and not np.isnan(raw.ecg.samples).all()


def test_041s_multi_segment_ecg_at_500_hz(samples_dir: Path) -> None:
    header = samples_dir / "multi-segment/041s/041s.hea"
    raw = read_record(header, data_dir=samples_dir)
    assert raw.record_id == "multi-segment/041s/041s"
    assert raw.all_channels == ("III", "I", "V", "ABP", "PAP", "PLETH", "RESP")
    assert (raw.ecg.name, raw.ecg.fs_hz, raw.ecg.samples.shape) == ("I", 500.0, (8000,))
    assert (raw.ppg.name, raw.ppg.fs_hz, raw.ppg.samples.shape) == ("PLETH", 125.0, (2000,))
    joined = wfdb.rdrecord(str(header.with_suffix("")), smooth_frames=False).e_p_signal
    np.testing.assert_array_equal(raw.ecg.samples, joined[1])
    np.testing.assert_array_equal(raw.ppg.samples, joined[5])


def test_p000878_incomplete_multi_segment_record(samples_dir: Path) -> None:
    header = samples_dir / f"{P000878}.hea"
    with pytest.raises(RecordError, match="incomplete multi-segment record: 30 of 32") as exc:
        read_record(header)
    _one_line_naming(exc, header.name)


def test_variable_layout_joins_segments_with_nan_gaps(samples_dir: Path, tmp_path: Path) -> None:
    """p000878's two present segments behind a gap: 0001 has PLETH only, 0002 has II too."""
    source = samples_dir / "multi-segment/p000878"
    for name in ("3269321_layout", "3269321_0001", "3269321_0002"):
        for suffix in (".hea", ".dat"):
            if (source / f"{name}{suffix}").exists():
                (tmp_path / f"{name}{suffix}").write_bytes(
                    (source / f"{name}{suffix}").read_bytes()
                )
    (tmp_path / "p1.hea").write_text(
        "p1/4 4 125 7500\n3269321_layout 0\n~ 3750\n3269321_0001 2000\n3269321_0002 1750\n"
    )
    assert find_records(tmp_path) == [tmp_path / "p1.hea"]
    raw = read_record(tmp_path / "p1.hea")
    assert (raw.ecg.name, raw.ppg.name) == ("II", "PLETH")
    assert raw.ecg.samples.shape == raw.ppg.samples.shape == (7500,)
    assert np.isnan(raw.ecg.samples[:5750]).all()  # gap, then a segment without II
    assert np.isnan(raw.ppg.samples[:3750]).all()  # gap
    first = wfdb.rdrecord(str(tmp_path / "3269321_0001")).p_signal  # PLETH
    second = wfdb.rdrecord(str(tmp_path / "3269321_0002")).p_signal  # II, PLETH
    np.testing.assert_array_equal(raw.ppg.samples[3750:5750], first[:, 0])
    np.testing.assert_array_equal(raw.ppg.samples[5750:], second[:, 1])
    np.testing.assert_array_equal(raw.ecg.samples[5750:], second[:, 0])
    assert np.isfinite(raw.ecg.samples[5750:]).sum() == 1750 - 137  # format 80 invalid samples


# ---- damaged records -----------------------------------------------------------------------


@pytest.fixture
def bidmc_copy(bidmc_dir: Path, tmp_path: Path) -> Path:
    """bidmc01 copied (writable) as record 'rec' in tmp_path; returns the header path."""
    header = (bidmc_dir / "bidmc01.hea").read_text().replace("bidmc01", "rec")
    (tmp_path / "rec.hea").write_text(header)
    (tmp_path / "rec.dat").write_bytes((bidmc_dir / "bidmc01.dat").read_bytes())
    return tmp_path / "rec.hea"


def test_copy_reads_like_the_original(bidmc_copy: Path) -> None:
    raw = read_record(bidmc_copy, data_dir=bidmc_copy.parent)
    assert raw.record_id == "rec" and raw.ecg.samples.shape == (60001,)


def test_missing_signal_file(bidmc_copy: Path) -> None:
    bidmc_copy.with_suffix(".dat").unlink()
    with pytest.raises(RecordError, match=r"missing signal file rec\.dat") as exc:
        read_record(bidmc_copy)
    _one_line_naming(exc, "rec.hea")


def test_truncated_signal_file(bidmc_copy: Path) -> None:
    dat = bidmc_copy.with_suffix(".dat")
    dat.write_bytes(dat.read_bytes()[: 10 * 30000 + 3])  # 5 channels x 2 bytes per frame
    with pytest.raises(RecordError, match="truncated: expected 60001 samples, found 30000") as e:
        read_record(bidmc_copy)
    _one_line_naming(e, "rec.hea")


def test_unknown_format(bidmc_copy: Path) -> None:
    bidmc_copy.write_text(bidmc_copy.read_text().replace("rec.dat 16 ", "rec.dat 99 "))
    with pytest.raises(RecordError, match="unreadable header: unknown signal format 99") as exc:
        read_record(bidmc_copy)
    _one_line_naming(exc, "rec.hea")


@pytest.mark.parametrize("rate", ["abc", "125Hz", "0"])
def test_bad_sampling_rate(bidmc_copy: Path, rate: str) -> None:
    bidmc_copy.write_text(bidmc_copy.read_text().replace("rec 5 125 ", f"rec 5 {rate} ", 1))
    with pytest.raises(RecordError, match=f"unreadable header: sampling rate '{rate}'") as exc:
        read_record(bidmc_copy)
    _one_line_naming(exc, "rec.hea")


def test_missing_header(tmp_path: Path) -> None:
    with pytest.raises(RecordError, match="header file not found") as exc:
        read_record(tmp_path / "ghost.hea")
    _one_line_naming(exc, "ghost.hea")


def _write(tmp_path: Path, name: str, sig_name: list[str], columns: list[np.ndarray]) -> Path:
    n = len(sig_name)
    wfdb.wrsamp(
        name,
        fs=125,
        units=["mV"] * n,
        sig_name=sig_name,
        p_signal=np.column_stack(columns),
        fmt=["16"] * n,
        adc_gain=[1000.0] * n,  # explicit: wfdb cannot derive a gain from an all-NaN channel
        baseline=[0] * n,
        write_dir=str(tmp_path),
    )
    return tmp_path / f"{name}.hea"


def test_all_nan_channels(tmp_path: Path) -> None:
    wave = np.sin(np.arange(1250) / 20)
    nan = np.full(1250, np.nan)
    header = _write(tmp_path, "allnan", ["RESP", "II", "PLETH"], [wave, nan, nan])
    with pytest.raises(RecordError, match="all-NaN") as exc:
        read_record(header)
    assert "II, PLETH" in _one_line_naming(exc, "allnan.hea")


def test_all_nan_lead_ii_falls_back_to_next_ecg_lead(tmp_path: Path) -> None:
    wave = np.sin(np.arange(1250) / 20)
    nan = np.full(1250, np.nan)
    header = _write(tmp_path, "fallback", ["V", "II", "PLETH"], [wave, nan, nan])
    raw = read_record(header)
    assert raw.ecg.name == "V" and raw.ppg is None
    np.testing.assert_allclose(raw.ecg.samples, wave, atol=1e-3)


def test_no_ecg_or_ppg_channel(tmp_path: Path) -> None:
    wave = np.sin(np.arange(1250) / 20)
    header = _write(tmp_path, "other", ["RESP", "ABP"], [wave, wave])
    with pytest.raises(RecordError, match=r"no ECG or PPG channel \(channels: RESP, ABP\)") as e:
        read_record(header)
    _one_line_naming(e, "other.hea")


def test_multi_segment_with_missing_signal_file(samples_dir: Path, tmp_path: Path) -> None:
    for path in (samples_dir / "multi-segment/041s").iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    (tmp_path / "041s02.dat").unlink()
    with pytest.raises(RecordError, match=r"segment 041s02: missing signal file 041s02\.dat") as e:
        read_record(tmp_path / "041s.hea")
    _one_line_naming(e, "041s.hea")
