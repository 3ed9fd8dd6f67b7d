"""Readers of the formats sites hold: real public cohorts (subsets), an EDF fixture, bad input.

The public cohorts are read from $BIOFP_SHARED_DATA/public as their publishers ship them; a test
of a cohort is skipped (with the reason) only when its folder is absent.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from conftest import shared_data_dir
from fpkit import run_cli
from typer.testing import CliRunner

from biofp_cli.cli import app
from biofp_core.errors import DataError
from biofp_core.signals.formats import ReaderConfig, TextSegConfig, open_source
from biofp_core.site import load_site_config
from biofp_core.store import build_store, label_rows
from biofp_core.validate import validate_site

PUBLIC = shared_data_dir() / "public"
CINC, LIU, PPGBP = PUBLIC / "cinc2017", PUBLIC / "liu2022-ppg-arrhythmia", PUBLIC / "ppg-bp"
LIU_FILE = "MPA_181220181216.mat"  # 199 segments


def needs(folder: Path) -> None:
    if not folder.is_dir():
        pytest.skip(f"public cohort folder {folder} is absent (set BIOFP_SHARED_DATA)")


def link(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src)
    return dst


def write_edf(path: Path, labels: list[str], fs_hz: float = 250.0, seconds: int = 30) -> None:
    import edfio

    t = np.arange(int(fs_hz * seconds)) / fs_hz
    signals = [
        edfio.EdfSignal(np.sin(2 * np.pi * 1.2 * t) + 0.1 * k, sampling_frequency=fs_hz, label=lb)
        for k, lb in enumerate(labels)
    ]
    edfio.Edf(signals, patient=edfio.Patient(code="P042")).write(path)


# ---- the four cohorts as shipped --------------------------------------------------------------


@pytest.mark.parametrize(
    ("folder", "fmt", "items", "levels"),
    [
        ("bidmc", "wfdb", 106, {"age": "subject", "sex": "subject"}),
        ("public/cinc2017", "wfdb", 3000, {"rhythm": "record"}),
        ("public/liu2022-ppg-arrhythmia", "matseg", 28, {"rhythm": "window"}),
        ("public/ppg-bp", "textseg", 657, {"hypertension": "subject", "diabetes": "subject"}),
    ],
)
def test_each_folder_is_detected_with_its_labels(
    folder: str, fmt: str, items: int, levels: dict[str, str]
) -> None:
    path = shared_data_dir() / folder
    needs(path)
    source = open_source(path)
    assert (source.format, len(source.items), source.skipped) == (fmt, items, [])
    assert levels.items() <= source.labels.levels.items()
    assert source.labels.problems == []


def test_cinc_records_short_ones_padded_with_record_labels(tmp_path: Path) -> None:
    needs(CINC)
    data = tmp_path / "cinc"
    for name in ("A00003", "A00005", "A02179", "A05493"):  # 60 s, 30 s, 9.4 s, 9.05 s
        for suffix in (".hea", ".mat"):
            link(CINC / f"{name}{suffix}", data / f"{name}{suffix}")
    link(CINC / "REFERENCE.csv", data / "REFERENCE.csv")
    store = build_store(data, cache_dir=tmp_path / "cache")
    m = store.manifest
    by_id = {r.record_id: r for r in m.records}
    assert m.format == "wfdb" and set(by_id) == {"A00003", "A00005", "A02179", "A05493"}
    assert by_id["A00003"].n_windows == 6 and by_id["A00003"].n_padded == 0
    assert by_id["A02179"].n_windows == 1 and by_id["A02179"].n_padded == 1
    assert by_id["A00003"].labels == {"rhythm": "N"} and by_id["A00005"].labels == {"rhythm": "A"}
    assert by_id["A02179"].fs_hz == {"ecg": 300.0, "ppg": None}
    short = np.asarray(store.record_index) == list(by_id).index("A02179")
    assert np.asarray(store.valid_n)[short].tolist() == [round(2832 / 300 * 125)]
    assert np.all(np.asarray(store.ecg)[short][0, 1181:] == 0)
    head, rows = label_rows(store)
    assert head == ["record", "subject", "rhythm"] and len(rows) == 4


def test_liu_segments_are_records_with_window_labels(tmp_path: Path) -> None:
    needs(LIU)
    data = tmp_path / "liu"
    link(LIU / "valid_testDataset" / LIU_FILE, data / LIU_FILE)
    link(LIU / "README.md", data / "README.md")
    store = build_store(data, cache_dir=tmp_path / "cache")
    m = store.manifest
    raw = scipy.io.loadmat(LIU / "valid_testDataset" / LIU_FILE)
    n = len(raw["labels"])
    assert (m.format, len(m.records), store.subject_ids()) == ("matseg", n, ["MPA_181220181216"])
    assert m.window_label_columns == ["rhythm"] and m.label_levels == {"rhythm": "window"}
    names = ["sinus", "PVC", "PAC", "VT", "SVT", "AF"]
    expected = [names[int(v)] for v in raw["labels"].reshape(-1)]
    got = [str(v) for v in np.asarray(store.window_labels)[:, 0]]
    kept = [int(r.record_id.rsplit("/", 1)[1]) - 1 for r in m.records]
    assert got == [expected[i] for i in kept]
    head, rows = label_rows(store)
    assert head == ["record", "subject", "start_s", "rhythm"] and len(rows) == len(store)
    assert {r["start_s"] for r in rows} == {"0"}


def test_ppgbp_text_segments_padded_with_sheet_labels(tmp_path: Path) -> None:
    needs(PPGBP)
    data = tmp_path / "ppgbp"
    for f in ["2_1", "2_2", "2_3", "3_1", "6_1"]:
        link(PPGBP / "Data" / f"{f}.txt", data / "Data" / f"{f}.txt")
    link(PPGBP / "Data" / "PPG-BP dataset.xlsx", data / "Data" / "PPG-BP dataset.xlsx")
    store = build_store(data, cache_dir=tmp_path / "cache")
    m = store.manifest
    assert (m.format, len(store), m.n_padded) == ("textseg", 5, 5)
    assert store.subject_ids() == ["2", "3", "6"]
    assert m.subject_labels["2"]["hypertension"] == "Stage 2 hypertension"
    assert m.subject_labels["2"]["age"] == "45"
    assert m.records[0].fs_hz["ppg"] == 1000.0
    assert np.asarray(store.valid_n).tolist() == [262] * 5  # 2.1 s at 125 Hz
    # the window store's subjects carry the padding to the models
    subject = store.subjects(only=["2"])[0]
    assert subject.valid_samples().tolist() == [262, 262, 262]


def test_edf_fixture_is_read_with_its_patient(tmp_path: Path) -> None:
    data = tmp_path / "edf"
    data.mkdir()
    write_edf(data / "night1.edf", ["EEG Fz", "ECG II", "Pleth"])
    write_edf(data / "eeg-only.edf", ["EEG Fz", "EEG Cz"])
    (data / "broken.edf").write_bytes(b"0       not an edf header")
    store = build_store(data, cache_dir=tmp_path / "cache")
    m = store.manifest
    assert m.format == "edf" and [r.record_id for r in m.records] == ["night1"]
    rec = m.records[0]
    assert rec.subject_id == "P042" and rec.channels == {"ecg": "ECG II", "ppg": "Pleth"}
    assert rec.fs_hz == {"ecg": 250.0, "ppg": 250.0} and rec.n_windows == 3
    problems = {f.record_id: f.problem for f in m.failures}
    assert problems["eeg-only"] == "no ECG or PPG channel (channels: EEG Fz, EEG Cz)"
    assert problems["broken"].startswith("unreadable EDF file")


# ---- bad input -----------------------------------------------------------------------------------


def test_bad_files_are_one_line_each_and_the_rest_works(tmp_path: Path) -> None:
    data = tmp_path / "site"
    data.mkdir()
    t = np.arange(1000) / 100
    good = np.stack([np.sin(2 * np.pi * 1.1 * t), np.sin(2 * np.pi * 1.3 * t)])
    scipy.io.savemat(data / "p1.mat", {"ppgseg": good, "labels": np.array([[0], [5]])})
    scipy.io.savemat(data / "p2.mat", {"other": good})  # .mat without the expected arrays
    scipy.io.savemat(data / "p3.mat", {"ppgseg": good[:, :150], "labels": [[1], [2]]})  # 1.5 s
    (data / "p4.mat").write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    (data / "9_1.txt").write_text("1 2 3\n")  # a text segment in a .mat folder: mixed formats
    store = build_store(data, cache_dir=tmp_path / "cache")
    m = store.manifest
    assert m.format == "matseg" and len(store) == 2
    problems = {f.record_id: f.problem for f in m.failures}
    assert problems["p2"] == "no array 'ppgseg' (has: other)"
    assert problems["p3/00001"] == "too short: 1.5 s < minimum 2 s"
    assert problems["p4"].startswith("unreadable MATLAB file")
    assert problems["9_1.txt"] == "a textseg file in a matseg folder (mixed formats): skipped"
    assert all("\n" not in p for p in problems.values())
    assert [str(v) for v in np.asarray(store.window_labels)[:, 0]] == ["sinus", "AF"]


def test_text_segments_and_label_sheet_problems(tmp_path: Path) -> None:
    data = tmp_path / "site"
    data.mkdir()
    rng = np.random.default_rng(0)
    for name in ("7_1", "7_2", "8_1"):
        (data / f"{name}.txt").write_text("\t".join(f"{v:.3f}" for v in rng.normal(size=3000)))
    (data / "8_2.txt").write_text("1.0\t2.0\tn/a\t4.0")
    (data / "labels.csv").write_text("id,hypertension\n7,Normal\n8,Stage 1\n")
    store = build_store(data, cache_dir=tmp_path / "cache")
    m = store.manifest
    assert len(m.records) == 3 and store.subject_ids() == ["7", "8"]
    assert {f.record_id: f.problem for f in m.failures} == {"8_2": "non-numeric value 'n/a'"}
    assert m.label_levels == {}  # the sheet has no subject_ID column: no labels
    named = ReaderConfig(textseg=TextSegConfig(label_sheet="labels.csv", fs_hz=1000.0))
    store = build_store(data, cache_dir=tmp_path / "cache", reader=named)
    problems = [p.problem for p in store.manifest.label_problems]
    assert problems == ["no key column 'subject_ID': labels ignored"]
    keyed = ReaderConfig(textseg=TextSegConfig(label_sheet="labels.csv", label_key="id"))
    store = build_store(data, cache_dir=tmp_path / "cache", reader=keyed)
    assert store.manifest.subject_labels == {
        "7": {"hypertension": "Normal"},
        "8": {"hypertension": "Stage 1"},
    }


def test_nothing_usable_is_one_line_and_exit_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "site"
    data.mkdir()
    (data / "notes.md").write_text("no signals here")
    with pytest.raises(DataError, match="no records found"):
        open_source(data)
    scipy.io.savemat(data / "p2.mat", {"other": np.zeros((2, 10))})
    monkeypatch.setenv("BIOFP_CACHE_DIR", str(tmp_path / "cache"))
    code, err = run_cli("site", "validate", "--data", str(data))
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1
    assert "no usable record" in lines[0] and "p2: no array 'ppgseg'" in lines[0]


def test_validate_prints_what_each_format_read(tmp_path: Path) -> None:
    needs(PPGBP)
    data = tmp_path / "ppgbp"
    for f in ["2_1", "2_2", "3_1"]:
        link(PPGBP / "Data" / f"{f}.txt", data / "Data" / f"{f}.txt")
    shutil.copy(PPGBP / "Data" / "PPG-BP dataset.xlsx", data / "Data" / "PPG-BP dataset.xlsx")
    env = {"BIOFP_CACHE_DIR": str(tmp_path / "cache"), "COLUMNS": "200"}
    result = CliRunner().invoke(app, ["site", "validate", "--data", str(data)], env=env)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "format textseg: 3 records, 2 subjects; modality: ppg 3; rate: ppg 1000 Hz" in out
    assert "windows: 3 kept (3 padded), dropped: none" in out
    assert "labels found: subject: age, bmi" in out and "hypertension" in out


def test_site_toml_maps_arrays_to_modalities_and_rates(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    t = np.arange(2500) / 250
    ecg = np.stack([np.sin(2 * np.pi * 1.2 * t)] * 3)
    ppg = np.stack([np.sin(2 * np.pi * 1.2 * t[::2])] * 3)  # 125 Hz
    scipy.io.savemat(data / "w1.mat", {"ecg_seg": ecg, "ppg_seg": ppg, "af": [[0], [1], [1]]})
    toml = tmp_path / "site.toml"
    toml.write_text(
        f'name = "west"\ndata_dir = "data"\ncache_dir = "{tmp_path / "cache"}"\n'
        '[reader]\nformat = "matseg"\n[reader.matseg]\n'
        'signals = { ecg_seg = { modality = "ecg", fs_hz = 250.0 }, '
        'ppg_seg = { modality = "ppg", fs_hz = 125.0 } }\n'
        'labels = { af = "af" }\nvalues = { af = { "0" = "no", "1" = "yes" } }\n'
    )
    report = validate_site(load_site_config(toml))
    assert report.summary is not None and report.summary.format == "matseg"
    assert report.summary.modalities == {"ecg+ppg": 3}
    assert report.summary.rates_hz == {"ecg": [250.0], "ppg": [125.0]}
    assert report.summary.label_levels == {"af": "window"}
    assert report.windows == 3 and report.subjects == 1


def test_site_labels_writes_the_labels_csv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    needs(CINC)
    data = tmp_path / "cinc"
    for name in ("A00003", "A00005"):
        for suffix in (".hea", ".mat"):
            link(CINC / f"{name}{suffix}", data / f"{name}{suffix}")
    link(CINC / "REFERENCE.csv", data / "REFERENCE.csv")
    monkeypatch.setenv("BIOFP_CACHE_DIR", str(tmp_path / "cache"))
    code, err = run_cli("site", "labels", "--data", str(data), "--out", str(tmp_path / "l.csv"))
    assert code == 0, err
    lines = (tmp_path / "l.csv").read_text().splitlines()
    assert lines == ["record,subject,rhythm", "A00003,A00003,N", "A00005,A00005,A"]
