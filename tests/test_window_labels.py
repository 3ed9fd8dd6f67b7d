"""Window-level labels: a labels CSV with start_s joins window fingerprints by record + start,
the probe runs per window with folds disjoint by subject, and window rows keep start_s in the
released Parquet file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from biofp_core.artifacts import ModelCard
from biofp_core.errors import DataError
from biofp_core.evaluation.federated import site_probe
from biofp_core.evaluation.labels import join, read_labels, task_labels
from biofp_core.fingerprints.parquet import read_fingerprints
from biofp_core.fingerprints.policy import ReleasePolicy
from biofp_core.fingerprints.pseudonyms import SiteKey
from biofp_core.fingerprints.release import commit_release, prepare_release
from biofp_core.fingerprints.table import FingerprintTable
from biofp_core.site import PrivacyBudget

CARD = ModelCard(model="m2ae", fingerprint_dim=4, weights_sha256="cd" * 32)


def windows(n_subjects: int = 12, per_record: int = 6) -> tuple[FingerprintTable, np.ndarray]:
    """One record per subject; window k of every record is 'AF' when k is odd, and the first
    fingerprint coordinate says so: a per-window probe separates them, a per-record one cannot."""
    rng = np.random.default_rng(1)
    n = n_subjects * per_record
    subject = np.repeat([f"p{i}" for i in range(n_subjects)], per_record).astype(object)
    k = np.tile(np.arange(per_record), n_subjects)
    af = k % 2 == 1
    fp = 0.05 * rng.normal(size=(n, 4))
    fp[:, 0] += np.where(af, 1.0, -1.0)
    table = FingerprintTable(
        subject=subject, record=np.array([f"r-{s}" for s in subject], dtype=object),
        level=np.full(n, "window", dtype=object), modality=np.full(n, "ppg", dtype=object),
        quality=np.ones(n, np.float32), n_windows=np.ones(n, np.int32),
        fp=fp.astype(np.float32), start_s=k * 10.0,
    )  # fmt: skip
    return table, af


def test_window_labels_join_by_record_and_start_and_probe_per_window(tmp_path: Path) -> None:
    key = SiteKey.load_or_create(tmp_path / "state")
    table, af = windows()
    released = prepare_release(
        table, card=CARD, policy=ReleasePolicy(level="window"), key=key, modality="ppg",
        default_delta=1e-5,
    ).table  # fmt: skip
    csv = tmp_path / "labels.csv"
    lines = ["record,subject,start_s,rhythm"] + [
        f"{r},{s},{t:g},{'AF' if a else 'sinus'}"
        for r, s, t, a in zip(table.record, table.subject, table.start_s, af, strict=True)
    ]
    csv.write_text("\n".join(lines) + "\n")
    rows = read_labels(csv, key=key)
    assert rows.key == "window" and len(rows.rows) == len(table)
    task = task_labels(rows, "rhythm")
    X, y, groups = join(released, task)
    assert X.shape == (len(table), 4) and len(np.unique(groups)) == 12
    assert y.sum() == af.sum()
    probe = site_probe(released, task, folds=3, repeats=1)
    assert probe.rows == len(table) and probe.subjects == 12 and probe.value > 0.95


def test_bad_start_s_is_one_line(tmp_path: Path) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text("record_pseudonym,start_s,rhythm\nabc,ten,AF\n")
    with pytest.raises(DataError, match="line 2: start_s 'ten' is not a number"):
        read_labels(csv)


def test_window_rows_keep_start_s_in_the_parquet_file(tmp_path: Path) -> None:
    key = SiteKey.load_or_create(tmp_path / "state")
    table, _ = windows(n_subjects=3, per_record=4)
    prepared = prepare_release(
        table, card=CARD, policy=ReleasePolicy(level="window"), key=key, modality="ppg",
        default_delta=1e-5,
    )  # fmt: skip
    out = tmp_path / "fp.parquet"
    commit_release(prepared, state_dir=tmp_path / "state", budget=PrivacyBudget(), out=out)
    back, _ = read_fingerprints(out)
    win = back.at_level("window")
    assert sorted(win.start_s.tolist()) == sorted(table.start_s.tolist())
    assert np.isnan(back.at_level("record").start_s).all()
