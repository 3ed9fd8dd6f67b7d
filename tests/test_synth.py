"""Synthetic cohort: layout, labels, determinism, WFDB bytes, labels seen in signals, CLI."""

from __future__ import annotations

import csv
import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import wfdb
from scipy.signal import butter, filtfilt, find_peaks
from scipy.stats import spearmanr

from biofp_core.config import DEFAULT_ECG_ALIASES, DEFAULT_PPG_ALIASES
from biofp_core.errors import ConfigError, DataError
from biofp_core.synth import LABEL_COLUMNS, simulate_subject, site_profile, write_cohort
from biofp_core.synth.cohort import draw_demographics

SITES, SUBJECTS, MINUTES, SEED = 2, 4, 1.0, 0
BIOFP = Path(sys.executable).with_name("biofp")


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _sha256_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort") / "out"
    summary = write_cohort(out, sites=SITES, subjects_per_site=SUBJECTS, minutes=MINUTES, seed=SEED)
    assert summary.records == SITES * SUBJECTS
    assert summary.hours == pytest.approx(SITES * SUBJECTS * MINUTES / 60)
    assert summary.paths == [out / "site_00", out / "site_01"]
    return out


@pytest.fixture(scope="module")
def labels(cohort: Path) -> list[dict[str, str]]:
    return _read_csv(cohort / "labels.csv")


# --- layout, channels, labels ------------------------------------------------------------------


def test_records_have_site_rate_channels_and_length(cohort: Path) -> None:
    for site, fs_hz in ((0, 125), (1, 250)):
        site_dir = cohort / f"site_{site:02d}"
        names = sorted(p.name for p in site_dir.iterdir())
        stems = [f"s{site:02d}_{i:03d}" for i in range(SUBJECTS)]
        assert names == sorted([f"{s}.{e}" for s in stems for e in ("dat", "hea")] + ["labels.csv"])
        expected = [name for name, _ in site_profile(site).channels]
        for stem in stems:
            header = wfdb.rdheader(str(site_dir / stem))
            assert header.fs == fs_hz
            assert header.sig_len == int(MINUTES * 60 * fs_hz)
            assert header.sig_name == expected
            assert header.fmt == ["16"] * len(expected)
            assert re.fullmatch(r"<age>: \d+ <sex>: [MF]", header.comments[0])
    assert wfdb.rdheader(str(cohort / "site_00" / "s00_000")).sig_name == ["RESP", "PLETH", "II"]
    assert wfdb.rdheader(str(cohort / "site_01" / "s01_000")).sig_name == ["ECG II,", "PPG"]


@pytest.mark.parametrize("site", range(8))
def test_every_site_profile_names_one_ecg_and_one_ppg_alias(site: int) -> None:
    profile = site_profile(site)
    assert profile.fs_hz == (125.0, 250.0, 500.0)[site % 3]
    norm = [_norm(name) for name, _ in profile.channels]
    roles = [role for _, role in profile.channels]
    assert [n in DEFAULT_ECG_ALIASES for n in norm] == [r == "ecg" for r in roles]
    assert [n in DEFAULT_PPG_ALIASES for n in norm] == [r == "ppg" for r in roles]
    assert roles.count("ecg") == roles.count("ppg") == 1


def test_channel_layouts_differ_between_sites() -> None:
    layouts = {tuple(name for name, _ in site_profile(s).channels) for s in range(4)}
    assert len(layouts) == 4
    ecg_positions = {[r for _, r in site_profile(s).channels].index("ecg") for s in range(4)}
    assert len(ecg_positions) > 1  # channel order differs too


def test_labels_csv_columns_rows_and_site_copies(
    cohort: Path, labels: list[dict[str, str]]
) -> None:
    with (cohort / "labels.csv").open() as f:
        assert tuple(next(csv.reader(f))) == LABEL_COLUMNS
    assert len(labels) == SITES * SUBJECTS
    assert len({r["subject"] for r in labels}) == len(labels)
    for row in labels:
        assert row["af"] in {"0", "1"} and row["hypertension"] in {"0", "1"}
        assert row["sex"] in {"M", "F"}
        assert 30 <= int(row["age"]) <= 85
        assert 10.0 <= float(row["resp_rate_bpm"]) <= 20.0
        assert 95.0 <= float(row["sbp_mmhg"]) <= 195.0
        assert (float(row["sbp_mmhg"]) > 140.0) == (row["hypertension"] == "1")
        header = wfdb.rdheader(str(cohort / row["site"] / row["record"]))
        assert header.comments[0] == f"<age>: {row['age']} <sex>: {row['sex']}"
    for site in ("site_00", "site_01"):
        site_rows = _read_csv(cohort / site / "labels.csv")
        assert site_rows == [r for r in labels if r["site"] == site]
        assert len(site_rows) == SUBJECTS


def test_prevalences_age_links_and_site_heterogeneity() -> None:
    demos = {site: draw_demographics(seed=7, site=site, subjects_per_site=25) for site in range(80)}
    everyone = [d for ds in demos.values() for d in ds]
    af = np.array([d.af for d in everyone])
    htn = np.array([d.hypertension for d in everyone])
    age = np.array([d.age for d in everyone])
    assert 0.27 < af.mean() < 0.33
    assert 0.37 < htn.mean() < 0.43
    assert np.mean([d.sex == "F" for d in everyone]) == pytest.approx(0.5, abs=0.02)
    assert age.min() >= 30 and age.max() <= 85
    assert age[af].mean() > age[~af].mean() + 3  # AF and hypertension rise with age
    assert age[htn].mean() > age[~htn].mean() + 3
    site_af = {s: np.mean([d.af for d in ds]) for s, ds in demos.items()}
    lab = np.mean([v for s, v in site_af.items() if s % 4 == 2])
    icu = np.mean([v for s, v in site_af.items() if s % 4 == 0])
    assert lab > icu + 0.15  # per-site prevalence 40 % vs 20 %


# --- bytes: determinism and WFDB compatibility ---------------------------------------------------


def test_same_arguments_give_identical_bytes(cohort: Path, tmp_path: Path) -> None:
    again = write_cohort(
        tmp_path / "again", sites=SITES, subjects_per_site=SUBJECTS, minutes=MINUTES, seed=SEED
    )
    first, second = _sha256_tree(cohort), _sha256_tree(again.out_dir)
    assert len(first) == 2 + SITES * (1 + 2 * SUBJECTS)  # manifest, labels, per site labels + recs
    assert first == second
    other = write_cohort(tmp_path / "other", sites=1, subjects_per_site=1, minutes=MINUTES, seed=1)
    dat = "site_00/s00_000.dat"
    assert _sha256_tree(other.out_dir)[dat] != first[dat]


def test_fast_dat_writer_matches_wfdb_wrsamp(cohort: Path, tmp_path: Path) -> None:
    for stem in ("site_00/s00_001", "site_01/s01_002"):
        rec = wfdb.rdrecord(str(cohort / stem), physical=False)
        name = Path(stem).name
        wfdb.wrsamp(
            name, fs=rec.fs, units=rec.units, sig_name=rec.sig_name, d_signal=rec.d_signal,
            fmt=rec.fmt, adc_gain=rec.adc_gain, baseline=rec.baseline, comments=rec.comments,
            write_dir=str(tmp_path),
        )  # fmt: skip
        for ext in (".dat", ".hea"):
            ours = (cohort / f"{stem}{ext}").read_bytes()
            assert ours == (tmp_path / f"{name}{ext}").read_bytes(), ext


def test_rewrite_replaces_previous_cohort_but_refuses_foreign_dirs(tmp_path: Path) -> None:
    out = tmp_path / "c"
    write_cohort(out, sites=2, subjects_per_site=2, minutes=0.1, seed=0)
    summary = write_cohort(out, sites=1, subjects_per_site=1, minutes=0.1, seed=0)
    assert summary.records == 1
    assert not (out / "site_01").exists()
    assert sorted(p.name for p in (out / "site_00").iterdir()) == [
        "labels.csv", "s00_000.dat", "s00_000.hea",
    ]  # fmt: skip
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty"):
        write_cohort(foreign, sites=1, subjects_per_site=1, minutes=0.1, seed=0)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(DataError, match="not a directory"):
        write_cohort(foreign / "notes.txt", sites=1, subjects_per_site=1, minutes=0.1, seed=0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"sites": 0}, "sites"),
        ({"subjects_per_site": 0}, "subjects_per_site"),
        ({"minutes": 0.0}, "minutes"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_arguments_raise_one_line_config_error(
    kwargs: dict, field: str, tmp_path: Path
) -> None:
    args = {"sites": 1, "subjects_per_site": 1, "minutes": 0.1, "seed": 0} | kwargs
    with pytest.raises(ConfigError, match=field) as info:
        write_cohort(tmp_path / "x", **args)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "x").exists()


# --- labels recoverable from the signals read back -----------------------------------------------


def _invalid(x: np.ndarray, fs_hz: float) -> np.ndarray:
    """NaN samples and flat runs of >= 0.1 s (dropouts)."""
    win = int(0.1 * fs_hz)
    still = np.r_[False, np.diff(np.nan_to_num(x)) == 0].astype(float)
    return np.isnan(x) | (np.convolve(still, np.ones(win), "same") >= win - 1)


def _r_peaks(ecg: np.ndarray, fs_hz: float) -> np.ndarray:
    b, a = butter(2, [8.0, min(30.0, 0.4 * fs_hz)], btype="band", fs=fs_hz)
    y = filtfilt(b, a, np.nan_to_num(ecg - np.nanmedian(ecg)))
    peaks, _ = find_peaks(y, height=0.35 * np.percentile(y, 99.5), distance=int(0.25 * fs_hz))
    return peaks


def _measure(path: Path) -> tuple[float, float, float]:
    """(RR irregularity, mean HR in bpm, median R -> PPG max-upslope delay in s) of a record."""
    rec = wfdb.rdrecord(str(path))
    names = [_norm(n) for n in rec.sig_name]
    ecg = rec.p_signal[:, next(i for i, n in enumerate(names) if n in DEFAULT_ECG_ALIASES)]
    ppg = rec.p_signal[:, next(i for i, n in enumerate(names) if n in DEFAULT_PPG_ALIASES)]
    fs = rec.fs
    peaks = _r_peaks(ecg, fs)
    bad_ecg = np.r_[0, np.cumsum(_invalid(ecg, fs))]
    clean = bad_ecg[peaks[1:] + 1] == bad_ecg[peaks[:-1]]  # no dropout inside the interval
    rr_s = np.where(clean, np.diff(peaks) / fs, np.nan)
    irregularity = float(np.nanmedian(np.abs(np.diff(rr_s)) / rr_s[1:]))
    slope = np.gradient(np.nan_to_num(ppg))
    bad_ppg = np.r_[0, np.cumsum(_invalid(ppg, fs))]
    delays = []
    for p in peaks:
        lo, hi = p + int(0.1 * fs), p + int(0.55 * fs)
        if hi < len(ppg) and bad_ppg[hi] == bad_ppg[lo]:
            delays.append((lo + np.argmax(slope[lo:hi]) - p) / fs)
    return irregularity, 60.0 / float(np.nanmean(rr_s)), float(np.median(delays))


def test_labels_are_recoverable_from_the_written_signals(
    cohort: Path, labels: list[dict[str, str]]
) -> None:
    measured = [_measure(cohort / r["site"] / r["record"]) for r in labels]
    irregular = np.array([m[0] for m in measured])
    af = np.array([r["af"] == "1" for r in labels])
    assert af.any() and (~af).any()
    assert irregular[af].min() > 2 * irregular[~af].max()  # AF: irregularly irregular RR
    assert irregular[af].min() > 0.1 and irregular[~af].max() < 0.06
    for (_, hr_bpm, _), row in zip(measured, labels, strict=True):
        assert hr_bpm == pytest.approx(float(row["mean_hr_bpm"]), abs=3.0), row["record"]
    sbp = [float(r["sbp_mmhg"]) for r in labels]
    rho = spearmanr(sbp, [m[2] for m in measured]).statistic
    assert rho < -0.7  # higher blood pressure -> shorter pulse arrival time


def test_simulate_subject_returns_arrays_and_ground_truth() -> None:
    sim = simulate_subject(seed=3, site=2, subject=1, subjects_per_site=4, minutes=0.5)
    sig = sim.signals
    assert sig.fs_hz == 500.0
    assert sig.ecg_mv.shape == sig.ppg_nu.shape == sig.resp_nu.shape == (15000,)
    assert sig.r_peaks_s.min() >= 0 and sig.r_peaks_s.max() < 30
    pat_s = sig.pulse_onsets_s - sig.r_peaks_s
    assert np.all((pat_s > 0.1) & (pat_s < 0.5))
    rr_s = np.diff(sig.r_peaks_s)
    assert 60 / rr_s.mean() == pytest.approx(sim.labels.mean_hr_bpm)
    cv = rr_s.std() / rr_s.mean()
    assert (cv > 0.1) if sim.labels.af else (cv < 0.08)
    again = simulate_subject(seed=3, site=2, subject=1, subjects_per_site=4, minutes=0.5)
    np.testing.assert_array_equal(again.signals.ppg_nu, sig.ppg_nu)


# --- CLI ------------------------------------------------------------------------------------------


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIOFP), *args], capture_output=True, text=True, timeout=60,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_cli_synth_writes_cohort_and_prints_table(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    args = ("data", "synth", "--out", str(out), "--sites", "2", "--subjects-per-site", "1")
    proc = _run(*args, "--minutes", "0.2", "--seed", "5")
    assert proc.returncode == 0, proc.stderr
    assert "site_01" in proc.stdout and "ECG II," in proc.stdout
    assert (out / "site_01" / "s01_000.dat").stat().st_size == 2 * 2 * int(0.2 * 60 * 250)
    assert len(_read_csv(out / "labels.csv")) == 2


def test_cli_synth_bad_arguments_fail_with_one_line(tmp_path: Path) -> None:
    proc = _run("data", "synth", "--out", str(tmp_path / "bad"), "--sites", "0")
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("error:") and "sites" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_cli_download_offline_fails_fast_with_one_line(tmp_path: Path) -> None:
    offline = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    offline |= {"https_proxy": offline["HTTPS_PROXY"], "http_proxy": offline["HTTP_PROXY"]}
    start = time.monotonic()
    proc = _run("data", "download", "bidmc", "--out", str(tmp_path / "bidmc"), env=offline)
    assert time.monotonic() - start < 30
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("error: could not download bidmc from PhysioNet:")
    assert "Traceback" not in proc.stderr
    unknown = _run("data", "download", "nosuchdb", "--out", str(tmp_path / "x"))
    assert unknown.returncode == 1 and "unknown database" in unknown.stderr


def test_ectopic_beats_are_premature_wide_or_reset_and_change_nothing_without_them() -> None:
    from dataclasses import replace

    from biofp_core.synth.physiology import (
        PAC,
        PVC,
        place_ectopic_beats,
        render_ecg_mv,
        render_ppg_nu,
    )

    plain = simulate_subject(seed=3, site=0, subject=0, subjects_per_site=8, minutes=1.0)
    two, three = (np.random.SeedSequence(3, spawn_key=(0, 0)).spawn(n) for n in (2, 3))
    assert [c.generate_state(4).tolist() for c in two] == [
        c.generate_state(4).tolist() for c in three[:2]
    ]  # the ectopy stream is a third child: the physiology and signal streams are as before
    phys = replace(plain.physiology, af=False, ectopic_per_min=20.0, pvc_share=0.5)
    r_s = np.arange(0.0, 60.0, phys.mean_rr_s)
    ectopic, kinds = place_ectopic_beats(r_s, phys=phys, rng=np.random.default_rng(0))
    pvc, pac = np.flatnonzero(kinds == PVC), np.flatnonzero(kinds == PAC)
    assert len(pvc) >= 3 and len(pac) >= 3 and not np.any((kinds[1:] > 0) & (kinds[:-1] > 0))
    for i in np.concatenate((pvc, pac)):  # coupled at 55-75 % of the preceding interval
        assert 0.55 <= (ectopic[i] - ectopic[i - 1]) / (r_s[i] - r_s[i - 1]) <= 0.75
    for i in pvc[pvc + 1 < len(r_s)]:  # a compensatory pause: the two intervals span two RRs
        assert ectopic[i + 1] - ectopic[i - 1] == pytest.approx(r_s[i + 1] - r_s[i - 1])
    i = pac[0]  # a PAC resets the rhythm: the next beat comes earlier than the sinus one
    assert r_s[i + 1] - ectopic[i + 1] == pytest.approx(0.8 * (r_s[i] - ectopic[i]))
    assert ectopic[-1] >= r_s[-1] and len(ectopic) >= len(r_s)  # beats still reach the end
    af = replace(phys, af=True)
    none, none_kinds = place_ectopic_beats(r_s, phys=af, rng=np.random.default_rng(0))
    assert np.array_equal(none, r_s) and not none_kinds.any()  # AF: no ectopy drawn
    fs = 500.0
    t = np.arange(int(60 * fs)) / fs
    ecg = render_ecg_mv(t_s=t, fs_hz=fs, r_s=ectopic, phys=phys, kinds=kinds)
    ppg, onset = render_ppg_nu(n=len(t), fs_hz=fs, r_s=ectopic, phys=phys,
                               rng=np.random.default_rng(1), kinds=kinds)  # fmt: skip

    def qrs_width_s(i: int) -> float:
        at = round(ectopic[i] * fs)
        seg = ecg[at - 50 : at + 50]
        return float(np.sum(seg > 0.5 * seg.max()) / fs)

    def pulse(i: int) -> float:
        at = round(onset[i] * fs)
        return float(ppg[at : at + int(0.3 * fs)].max() - ppg[at])

    inner = range(2, len(kinds) - 2)
    normal = [i for i in inner if not kinds[i - 1 : i + 2].any()][:10]
    wide = [i for i in pvc if i in inner]
    assert min(qrs_width_s(i) for i in wide) > 2 * max(qrs_width_s(i) for i in normal)
    assert max(pulse(i) for i in wide) < 0.6 * min(pulse(i) for i in normal)
