"""Fingerprint export: pseudonyms, modality fallback, release policy, ledger, audit, file format."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import wfdb
from fpkit import BIOFP, run_cli, site_config, tiny_artifact, tiny_cohort

from biofp_core.artifacts import ModelCard, load_model
from biofp_core.audit import AuditLog
from biofp_core.errors import ConfigError, DataError, PrivacyBudgetError
from biofp_core.evaluation import TaskLabels, evaluate_table
from biofp_core.fingerprints.compute import window_fingerprints
from biofp_core.fingerprints.export import export_fingerprints
from biofp_core.fingerprints.parquet import META_KEY, read_fingerprints, to_parquet_bytes
from biofp_core.fingerprints.policy import (
    ReleasePolicy,
    _gaussian_delta,
    analytic_gaussian_sigma,
    calibrate_noise,
)
from biofp_core.fingerprints.pseudonyms import KEY_FILENAME, SiteKey
from biofp_core.fingerprints.release import clip_rows, commit_release, prepare_release
from biofp_core.fingerprints.table import FingerprintTable, record_means
from biofp_core.privacy.ledger import PrivacyLedger, initialise_site_state
from biofp_core.site import PrivacyBudget
from biofp_core.validate import open_site_store


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fp")
    return {
        "root": root,
        "cohort": tiny_cohort(root / "cohort"),
        "model": tiny_artifact(root / "model" / "m2ae"),
        "cache": root / "cache",
    }


def raw_names(data_dir: Path) -> set[str]:
    with open(data_dir / "labels.csv") as fh:
        rows = list(csv.DictReader(fh))
    return {r["subject"] for r in rows} | {r["record"] for r in rows} | {data_dir.name}


def test_export_holds_no_raw_name_anywhere(world: dict[str, Path], tmp_path: Path) -> None:
    data = world["cohort"] / "site_00"
    site = site_config(
        tmp_path, data, name="site_00", cache=world["cache"], release='level = "window"'
    )
    out = tmp_path / "fp.parquet"
    report = export_fingerprints(site, model_path=world["model"], out=out)
    blob = out.read_bytes()
    table, meta = read_fingerprints(out)
    texts = [blob, json.dumps(meta.model_dump(mode="json")).encode()]
    texts += [str(v).encode() for col in (table.subject, table.record) for v in col]
    for name in raw_names(data):  # subject, record and site names
        assert all(name.encode() not in t for t in texts), name
    assert len(table.subject[0]) == 32 and int(table.subject[0], 16) >= 0  # hex pseudonyms
    windows, records = table.at_level("window"), table.at_level("record")
    assert len(records) == 4 and len(windows) == records.n_windows.sum() == report.rows - 4
    assert set(windows.modality) == {"paired"} and table.dim == meta.fingerprint_dim == 16
    assert np.allclose(records.fp[0], windows.fp[windows.record == records.record[0]].mean(0))
    assert meta.model_weights_sha256 == load_model(world["model"])[1].weights_sha256


def test_same_subject_same_pseudonym_other_site_other(
    world: dict[str, Path], tmp_path: Path
) -> None:
    data = world["cohort"] / "site_00"
    north = site_config(tmp_path / "north", data, cache=world["cache"])
    south = site_config(tmp_path / "south", data, name="south", cache=world["cache"])
    tables = {}
    for name, site in (("n1", north), ("n2", north), ("s", south)):
        export_fingerprints(site, model_path=world["model"], out=tmp_path / f"{name}.parquet")
        tables[name] = read_fingerprints(tmp_path / f"{name}.parquet")
    (n1, m1), (n2, m2), (s, ms) = tables["n1"], tables["n2"], tables["s"]
    assert list(n1.subject) == list(n2.subject) and m1.site == m2.site
    assert not set(n1.subject) & set(s.subject) and not set(n1.record) & set(s.record)
    assert m1.site != ms.site
    key_file = north.resolved_state_dir() / KEY_FILENAME
    assert key_file.stat().st_mode & 0o777 == 0o600
    key = SiteKey.load(north.resolved_state_dir())
    assert key.subject("subj_00_000") in set(n1.subject) and key.subject("x") != key.record("x")


def test_key_file_is_created_once_and_checked(tmp_path: Path) -> None:
    first = SiteKey.load_or_create(tmp_path / "state")
    assert SiteKey.load_or_create(tmp_path / "state").subject("a") == first.subject("a")
    (tmp_path / "state" / KEY_FILENAME).write_text("not hex\n")
    with pytest.raises(ConfigError, match="corrupt pseudonym key"):
        SiteKey.load(tmp_path / "state")
    with pytest.raises(ConfigError, match="no pseudonym key"):
        SiteKey.load(tmp_path / "elsewhere")


def write_ecg_only_record(data_dir: Path, name: str) -> None:
    """An extra record of one lead-II channel (no PPG) at 125 Hz for 40 s."""
    t = np.arange(40 * 125) / 125.0
    ecg = np.sin(2 * np.pi * 1.2 * t) ** 15 + 0.01 * np.sin(2 * np.pi * 7 * t)
    wfdb.wrsamp(name, fs=125, units=["mV"], sig_name=["II"], p_signal=ecg[:, None],
                fmt=["16"], write_dir=str(data_dir))  # fmt: skip
    with open(data_dir / "labels.csv", "a") as fh:
        fh.write(f"subj_ecg,{data_dir.name},{name},0,0,50,F,70.0,15.0,120.0\n")


def test_paired_falls_back_per_window_and_matches_the_model(
    world: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    data = shutil.copytree(world["cohort"] / "site_01", tmp_path / "data")
    write_ecg_only_record(data, "ecgonly")
    site = site_config(tmp_path, data, cache=tmp_path / "cache")
    store = open_site_store(site)
    model, _ = load_model(world["model"])
    paired = window_fingerprints(store, model, modality="paired")
    assert len(paired) == len(store)
    by_record = {r: set(paired.modality[paired.record == r]) for r in set(paired.record)}
    assert by_record.pop("ecgonly") == {"ecg"} and all(m == {"paired"} for m in by_record.values())
    assert record_means(paired).modality.tolist().count("ecg") == 1
    ppg = window_fingerprints(store, model, modality="ppg")
    assert "ecgonly" not in set(ppg.record) and len(ppg) == int(np.asarray(store.mask)[:, 1].sum())
    i = int(np.flatnonzero(paired.record == "ecgonly")[0])
    j = int(np.flatnonzero(np.asarray(store.mask).all(axis=1))[0])
    ecg, ppg = (torch.from_numpy(np.array(x[[i, j]])) for x in (store.ecg, store.ppg))
    with torch.inference_mode():  # row k is window k, embedded as documented
        want_i = model.fingerprint(ecg=ecg[:1])[0].numpy()
        want_j = model.fingerprint(ecg=ecg[1:], ppg=ppg[1:])[0].numpy()
    assert np.allclose(paired.fp[i], want_i, atol=1e-5)
    assert np.allclose(paired.fp[j], want_j, atol=1e-5)
    assert paired.quality[j] == pytest.approx(float(np.min(store.quality[j, :, -1])))


# ---- release policy on constructed fingerprints with a known answer -----------------------------

CARD = ModelCard(model="m2ae", fingerprint_dim=8, weights_sha256="ab" * 32)


def separable_windows(n_subjects: int = 60, per_subject: int = 3) -> tuple[FingerprintTable, dict]:
    """Window rows whose first coordinate is +-1 by the subject's class: a probe gets AUROC 1."""
    rng = np.random.default_rng(0)
    label = rng.integers(0, 2, n_subjects)
    subject = np.repeat([f"patient-{i}" for i in range(n_subjects)], per_subject).astype(object)
    fp = 0.05 * rng.normal(size=(len(subject), 8))
    fp[:, 0] += np.repeat(2.0 * label - 1.0, per_subject)
    table = FingerprintTable(
        subject=subject, record=np.array([f"rec-{s}" for s in subject], dtype=object),
        level=np.full(len(subject), "window", dtype=object),
        modality=np.full(len(subject), "paired", dtype=object),
        quality=np.ones(len(subject), np.float32), n_windows=np.ones(len(subject), np.int32),
        fp=fp.astype(np.float32),
    )  # fmt: skip
    return table, {f"patient-{i}": float(label[i]) for i in range(n_subjects)}


def release_auroc(policy: ReleasePolicy, key: SiteKey, seed: int = 0) -> tuple[float, object]:
    windows, labels = separable_windows()
    prepared = prepare_release(windows, card=CARD, policy=policy, key=key, modality="paired",
                               default_delta=1e-5, seed=seed)  # fmt: skip
    task = TaskLabels("af", "binary", "subject",
                      {key.subject(s): v for s, v in labels.items()}, ("0", "1"))  # fmt: skip
    return evaluate_table(prepared.table, task, n_boot=0).value, prepared


def test_small_epsilon_noise_degrades_the_probe_and_is_charged(tmp_path: Path) -> None:
    initialise_site_state(tmp_path / "state", name="north")
    key = SiteKey.load_or_create(tmp_path / "state")
    clean, _ = release_auroc(ReleasePolicy(clip_norm=1.0), key)
    noisy, prepared = release_auroc(ReleasePolicy(clip_norm=1.0, epsilon=0.5), key)
    assert clean == 1.0 and noisy < 0.75
    budget = PrivacyBudget(epsilon=10.0)
    report, _ = commit_release(prepared, state_dir=tmp_path / "state", budget=budget, out=None)
    assert report.charged and report.noise_sigma == pytest.approx(
        analytic_gaussian_sigma(epsilon=0.5, delta=1e-5, sensitivity=2.0)
    )
    ledger = PrivacyLedger.at(tmp_path / "state")
    first = ledger.epsilon(delta=budget.delta)
    assert [e.kind for e in ledger.entries] == ["release"] and first > 0.5  # whole contribution
    assert ledger.entries[0].noise_multiplier == pytest.approx(report.noise_sigma / 2.0)
    commit_release(prepared, state_dir=tmp_path / "state", budget=budget, out=None)
    ledger.reload()
    assert ledger.epsilon(delta=budget.delta) > first  # a second release composes


def test_window_level_noise_is_charged_for_the_policys_cap_and_drops_what_is_beyond_it(
    tmp_path: Path,
) -> None:
    """k is the policy's public cap, never the data's own most windows per subject: each
    subject's windows beyond it are dropped, and the noise and the charge are sized for k."""
    key = SiteKey.load_or_create(tmp_path)
    windows, _ = separable_windows(per_subject=3)
    policy = ReleasePolicy(level="window", clip_norm=1.0, epsilon=1.0, max_vectors_per_subject=2)
    prepared = prepare_release(windows, card=CARD, policy=policy, key=key, modality="paired",
                               default_delta=1e-5, seed=0)  # fmt: skip
    cal = prepared.calibration
    assert cal is not None and cal.vectors_per_subject == 2
    assert cal.noise_multiplier == pytest.approx(cal.sigma / (2.0 * math.sqrt(2)))
    win = prepared.table.at_level("window")
    assert set(np.unique(win.subject.astype(str), return_counts=True)[1]) == {2}  # 3 -> 2 kept
    assert set(prepared.table.modality) == {"paired"} and not prepared.table.n_windows.any()
    records = prepared.table.at_level("record")  # post-processed from the noised windows
    assert np.allclose(records.fp[0], win.fp[win.record == records.record[0]].mean(0), atol=1e-6)
    again = prepare_release(windows, card=CARD, policy=policy, key=key, modality="paired",
                            default_delta=1e-5, seed=1)  # fmt: skip
    assert list(again.table.record) == list(prepared.table.record)  # the same rows, by pseudonym


def test_release_over_budget_is_refused_and_writes_nothing(
    world: dict[str, Path], tmp_path: Path
) -> None:
    data = world["cohort"] / "site_00"
    site = site_config(tmp_path, data, cache=world["cache"], budget=0.5,
                       release="clip_norm = 1.0\nepsilon = 1.0")  # fmt: skip
    out = tmp_path / "fp.parquet"
    out.write_bytes(b"previous release")
    with pytest.raises(PrivacyBudgetError, match="would be exceeded"):
        export_fingerprints(site, model_path=world["model"], out=out)
    assert out.read_bytes() == b"previous release"
    assert PrivacyLedger.at(site.resolved_state_dir()).entries == []
    assert AuditLog.at(site.resolved_state_dir()).entries() == []
    new = tmp_path / "new.parquet"
    code, err = run_cli("fingerprint", "--model", str(world["model"]), "--config",
                        str(tmp_path / "site.toml"), "--out", str(new))  # fmt: skip
    assert code == 1 and not new.exists()
    assert err.count("\n") == 1 and "budget" in err and "Traceback" not in err


def test_every_release_is_audited_with_its_bytes_and_hash(
    world: dict[str, Path], tmp_path: Path
) -> None:
    site = site_config(tmp_path, world["cohort"] / "site_01", cache=world["cache"],
                       release="clip_norm = 5.0\nepsilon = 4.0")  # fmt: skip
    outs = [tmp_path / "a.parquet", tmp_path / "b.parquet"]
    for out in outs:
        export_fingerprints(site, model_path=world["model"], out=out, seed=1)
    entries = AuditLog.at(site.resolved_state_dir()).entries()
    assert [e.message_type for e in entries] == ["fingerprint-release"] * 2
    for entry, out in zip(entries, outs, strict=True):
        assert entry.arrays_sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
        assert entry.payload_bytes == out.stat().st_size and "rows=4" in (entry.note or "")
    ledger_eps = PrivacyLedger.at(site.resolved_state_dir()).entries[-1].epsilon_after
    assert (
        entries[1].epsilon == pytest.approx(ledger_eps) and entries[1].epsilon > entries[0].epsilon
    )
    assert read_fingerprints(outs[1])[1].site_epsilon == pytest.approx(ledger_eps)


def test_cli_fingerprint_then_evaluate(world: dict[str, Path], tmp_path: Path) -> None:
    data = world["cohort"] / "site_00"
    site_config(tmp_path, data, cache=world["cache"])
    out = tmp_path / "fp.parquet"
    cfg = str(tmp_path / "site.toml")
    run = subprocess.run([*BIOFP, "fingerprint", "--model", str(world["model"]), "--config", cfg,
                          "--out", str(out), "--modality", "ppg"],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "released 4 fingerprints" in run.stdout and read_fingerprints(out)[1].modality == "ppg"
    run = subprocess.run([*BIOFP, "evaluate", "--fingerprints", str(out), "--labels",
                          str(data / "labels.csv"), "--task", "age", "--config", cfg, "--folds",
                          "2", "--bootstrap", "20", "--json", str(tmp_path / "e.json")],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "e.json").read_text())["results"][0]
    assert result["metric"] == "mae" and result["subjects"] == 4 and result["kind"] == "regression"


# ---- policy arithmetic and the file format -----------------------------------------------------


@pytest.mark.parametrize("epsilon", [0.1, 0.5, 1.0, 3.0, 20.0])
def test_analytic_gaussian_is_exact_and_beats_the_classic_bound(epsilon: float) -> None:
    sigma = analytic_gaussian_sigma(epsilon=epsilon, delta=1e-5, sensitivity=2.0)
    assert _gaussian_delta(sigma, epsilon=epsilon, sensitivity=2.0) <= 1e-5
    assert _gaussian_delta(sigma * 0.99, epsilon=epsilon, sensitivity=2.0) > 1e-5
    if epsilon <= 1.0:  # the classic bound Δ·√(2 ln(1.25/δ))/ε (Dwork & Roth, Theorem A.1)
        assert sigma < 2.0 * math.sqrt(2.0 * math.log(1.25 / 1e-5)) / epsilon


def test_policy_validation_and_calibration(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="epsilon needs clip_norm"):
        ReleasePolicy(epsilon=1.0)
    assert (
        calibrate_noise(ReleasePolicy(clip_norm=1.0), vectors_per_subject=3, default_delta=1e-5)
        is None
    )
    cal = calibrate_noise(ReleasePolicy(clip_norm=0.5, epsilon=2.0, delta=1e-6),
                          vectors_per_subject=4, default_delta=1e-5)  # fmt: skip
    assert cal is not None and cal.delta == 1e-6 and cal.sensitivity == 1.0
    assert cal.noise_multiplier == pytest.approx(cal.sigma / 2.0)
    with pytest.raises(ConfigError, match="release"):
        site_config(tmp_path, tmp_path, cache=tmp_path, release="epsilon = 1.0")
    fp = np.array([[3.0, 4.0], [0.3, 0.4]])
    assert np.allclose(clip_rows(fp, 1.0), [[0.6, 0.8], [0.3, 0.4]])


def test_bad_fingerprint_files_are_one_line_errors(tmp_path: Path) -> None:
    windows, _ = separable_windows(n_subjects=4)
    key = SiteKey.load_or_create(tmp_path)
    prepared = prepare_release(windows, card=CARD, policy=ReleasePolicy(), key=key,
                               modality="paired", default_delta=1e-5)  # fmt: skip
    _, blob = commit_release(prepared, state_dir=tmp_path, budget=PrivacyBudget(), out=None)
    good = pq.read_table(pa.BufferReader(blob))
    cases = {
        "garbage.parquet": b"PAR1 not really",
        "plain.parquet": good.replace_schema_metadata({}),
        "empty.parquet": good.slice(0, 0),
        "newer.parquet": good.replace_schema_metadata(
            {META_KEY: json.dumps({"format_version": 99}).encode()}),
    }  # fmt: skip
    needles = {"garbage.parquet": "not a readable Parquet", "plain.parquet": "not a BioFP",
               "empty.parquet": "empty fingerprint file", "newer.parquet": "newer"}  # fmt: skip
    for name, content in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            pq.write_table(content, path)
        with pytest.raises(DataError, match=needles[name]) as err:
            read_fingerprints(path)
        assert "\n" not in str(err.value) and str(path) in str(err.value)
    meta = read_fingerprints(_write(tmp_path / "ok.parquet", blob))[1]
    with pytest.raises(ValueError, match="dims"):
        to_parquet_bytes(prepared.table, meta.model_copy(update={"fingerprint_dim": 9}))


def _write(path: Path, blob: bytes) -> Path:
    path.write_bytes(blob)
    os.chmod(path, 0o644)
    return path
