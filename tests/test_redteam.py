"""Red team against the fix for issue 10, as regression tests: each test is an attack that
worked against the first fix and now fails. A curious coordinator sends crafted Messages to the
real ClientApp, or a site's files are edited by hand; the helpers are those of
``tests/test_attacks.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from flowerkit import instruction, site_context
from fpkit import run_cli, site_config, tiny_cohort
from test_attacks import ATTACK_RUN, METRICS_KEY, TINY, train

from biofp_core.audit import AUDIT_FILENAME, AuditLog
from biofp_core.privacy.ledger import (
    LEDGER_FILENAME,
    MARKER_FILENAME,
    PrivacyLedger,
    PrivacyLedgerError,
)
from biofp_core.protocol import RUN_KEY, SERVER_ROUND, RunConfig, TrainReplyMetrics
from biofp_core.site import load_site_config
from client.app import app as client_app


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_cohort(tmp_path_factory.mktemp("cohort"), sites=1, subjects=4)


# ---- (c) the ledger fails open: hand edits and a moved state folder --------------------------


def _charged_round(run: RunConfig, toml: Path, server_round: int) -> TrainReplyMetrics:
    arrays = {k: v.numpy() for k, v in run.build_model().state_dict().items()}
    reply = train(run, toml, arrays, server_round)
    assert not reply.has_error(), reply.error
    return TrainReplyMetrics.from_metrics(dict(reply.content[METRICS_KEY]))


def test_an_emptied_ledger_with_a_rechained_marker_and_no_audit_log_is_refused(
    cohort: Path, tmp_path: Path
) -> None:
    """The only witness of a careful forger (empty ledger, marker reset to the genesis hash,
    which anyone can compute from the site id in site.json) is the audit log; making its lines
    unparseable used to pass `verify` (they were skipped as torn), and the site trained again
    from ε = 0. Only a crash tears a line, and only the last one: `verify` now refuses."""
    site_config(tmp_path, cohort / "site_00", cache=tmp_path / "cache")
    toml, state = tmp_path / "site.toml", tmp_path / "state"
    run = RunConfig.from_run_config(
        {**ATTACK_RUN, "model-options": json.dumps(TINY), "batch-subjects": 8}
    )
    first = _charged_round(run, toml, 1)
    assert first.epsilon > 0

    ledger = state / LEDGER_FILENAME
    doc = json.loads(ledger.read_text())
    ledger.write_text(json.dumps({**doc, "entries": []}))
    marker = json.loads((state / MARKER_FILENAME).read_text())
    import hashlib

    genesis = hashlib.sha256(f"biofp-ledger:{marker['site_id']}".encode()).hexdigest()
    (state / MARKER_FILENAME).write_text(json.dumps({**marker, "ledger_head": genesis,
                                                     "entries": 0}))  # fmt: skip
    audit = state / AUDIT_FILENAME
    audit.write_bytes(b"x" + audit.read_bytes().replace(b"\n", b"\nx"))  # every line torn

    with pytest.raises(PrivacyLedgerError, match=r"line 1 of .* no crash tore it"):
        PrivacyLedger.at(state).verify()
    reply = train(run, toml, {k: v.numpy() for k, v in run.build_model().state_dict().items()}, 2)
    fresh = (
        reply.has_error()
        or TrainReplyMetrics.from_metrics(dict(reply.content[METRICS_KEY])).refused
    )
    assert fresh, "a forged-empty ledger trained again from ε = 0"


def test_moving_the_data_folder_does_not_give_the_site_a_fresh_budget(
    cohort: Path, tmp_path: Path
) -> None:
    """The default state folder is ``.biofp-<data folder name>`` beside the data: moving or
    renaming the data folder (a routine storage change) points the site at an empty folder, and
    `biofp site init` (which the refusal tells the operator to run, and which `biofp client
    start` used to run by itself) initialised it: every ε spent was forgotten. The records are
    now bound to their state folder (a registry in the cache folder): `site init` refuses, in
    one line naming the old folder; pointing `state_dir` there finds the ε spent; `--new-site`
    (a separate site, said loudly) is the only way to a second budget."""
    data = tmp_path / "north-data"
    shutil.copytree(cohort / "site_00", data)
    toml = tmp_path / "site.toml"
    body = (f'name = "north"\ncache_dir = "{tmp_path / "cache"}"\n'
            f'[privacy]\nepsilon = 8.0\nmin_train_subjects = 1\n[release]\n')  # fmt: skip
    toml.write_text(f'data_dir = "{data}"\n' + body)
    assert run_cli("site", "init", "--config", str(toml))[0] == 0
    run = RunConfig.from_run_config(
        {**ATTACK_RUN, "model-options": json.dumps(TINY), "batch-subjects": 8}
    )
    spent = _charged_round(run, toml, 1).epsilon
    assert spent > 0

    moved = tmp_path / "north-data-2027"
    data.rename(moved)
    toml.write_text(f'data_dir = "{moved}"\n' + body)
    code, err = run_cli("site", "init", "--config", str(toml))
    after = load_site_config(toml).resolved_state_dir()
    fresh = code == 0 and PrivacyLedger.at(after).entries == []
    assert not fresh, f"site init started a fresh ledger at {after}; ε {spent:.3g} forgotten"
    old = tmp_path / ".biofp-north-data"
    assert code == 1 and err.count("\n") == 1 and f'state_dir = "{old}"' in err, err
    assert not (after / MARKER_FILENAME).exists()  # nothing initialised

    toml.write_text(f'data_dir = "{moved}"\nstate_dir = "{old}"\n' + body)  # as the error says
    assert run_cli("site", "init", "--config", str(toml))[0] == 0  # the same ledger, re-bound
    assert PrivacyLedger.at(old).epsilon(delta=1e-5) == pytest.approx(spent)

    toml.write_text(f'data_dir = "{moved}"\n' + body)  # a truly separate site, said loudly
    assert run_cli("site", "init", "--config", str(toml), "--new-site")[0] == 0
    assert PrivacyLedger.at(after).initialised and PrivacyLedger.at(after).entries == []


# ---- (e) the probe's sensitivity: one subject moves every group -----------------------------


def _probe_value(n: int, fp: np.ndarray, y: np.ndarray) -> float:
    """The noise-free (σ = 0) private probe of the first `n` subjects, one record each."""
    from biofp_core.evaluation.federated import private_site_probe
    from biofp_core.evaluation.labels import TaskLabels
    from biofp_core.fingerprints.table import FingerprintTable

    ids = np.array([f"p{i:03d}" for i in range(n)], dtype=object)
    table = FingerprintTable(
        subject=ids, record=ids.copy(), level=np.array(["record"] * n, dtype=object),
        modality=np.array(["ecg"] * n, dtype=object), quality=np.ones(n, np.float32),
        n_windows=np.ones(n, np.int32), fp=fp[:n].astype(np.float32),
    )  # fmt: skip
    labels = TaskLabels("t", "binary", "subject", {ids[i]: float(y[i]) for i in range(n)},
                        ("0", "1"))  # fmt: skip
    return private_site_probe(table, labels, groups=4, noise_multiplier=0.0,
                              rng=np.random.default_rng(0), seed=0).value  # fmt: skip


def test_one_subject_moves_the_private_probe_by_at_most_its_charged_sensitivity() -> None:
    """`private_site_probe` adds N(0, (σR/m)²), i.e. it assumes one subject moves the mean of
    the m group metrics by at most R/m (one group). The groups used to be a permutation of
    ``len(subjects)`` applied to the subjects in sorted order, with m from the subject count:
    adding one subject reassigned about half of the others (16 vs 17 subjects moved the mean by
    ~0.40 > 0.25). Now m is the site's setting and a subject's group a hash of its own
    pseudonym: one subject changes one group."""
    rng = np.random.default_rng(4)
    y = np.array([0, 1] * 9)
    fp = rng.normal(size=(17, 3)) + 1.5 * y[:17, None] * np.array([1, 0, 0])
    bound = 1.0 / (16 // 4)
    moved = abs(_probe_value(16, fp, y) - _probe_value(17, fp, y))
    assert moved <= bound, f"one subject moved the probe by {moved:.3f} > R/m = {bound}"


# ---- (a) a noisy release still carries exact, patient-derived columns ------------------------


def test_a_noisy_window_level_release_does_not_give_back_the_withheld_window_counts(
    cohort: Path, tmp_path: Path
) -> None:
    """Under a noisy policy `n_windows` is withheld (0) and `quality` too (NaN); at
    ``level = "window"`` every window used to be a row keyed by its record's pseudonym, so
    counting rows per record gave each record's exact window count back (how many windows
    survived the site's quality screening), and `modality` said which sensors each window had.
    Now a subject releases at most the policy's ``max_vectors_per_subject`` (default 1) rows,
    and `modality` is the release's on every row."""
    from biofp_core.fingerprints.parquet import read_fingerprints
    from biofp_core.protocol import ARRAYS_KEY, FINGERPRINTS_ARRAY, QUERY_FINGERPRINT
    from biofp_core.validate import open_site_store

    site = site_config(tmp_path, cohort / "site_00", cache=tmp_path / "cache",
                       release='level = "window"\nclip_norm = 1.0\nepsilon = 2.0')  # fmt: skip
    run = RunConfig.from_run_config({**ATTACK_RUN, "model-options": json.dumps(TINY)})
    arrays = {k: v.numpy() for k, v in run.build_model().state_dict().items()}
    reply = client_app(
        instruction(run, QUERY_FINGERPRINT, arrays=arrays, **{SERVER_ROUND: 1, RUN_KEY: "w"}),
        site_context(run, tmp_path / "site.toml"),
    )
    assert not reply.has_error(), reply.error
    path = tmp_path / "released.parquet"
    path.write_bytes(reply.content[ARRAYS_KEY][FINGERPRINTS_ARRAY].numpy().tobytes())
    table, _ = read_fingerprints(path)
    assert (table.n_windows == 0).all()  # withheld ...
    windows = table.level.astype(str) == "window"
    recounted = sorted(np.unique(table.record[windows].astype(str), return_counts=True)[1])
    store = open_site_store(site)
    truth = sorted(np.unique(np.asarray(store.record_index), return_counts=True)[1])
    # ... and given back, exactly, by the rows themselves
    assert recounted != truth, f"window counts per record recovered exactly: {recounted}"
    assert set(recounted) == {1} and set(table.modality.astype(str)) == {"paired"}


# ---- (a)/(d) probe refusals and the probe's kind depend on one patient's label ---------------


def _site_with_af(cohort: Path, root: Path, af_of_subject_1: str) -> Path:
    """A copy of site_00 whose patient subj_00_001 has `af` = `af_of_subject_1`."""
    data = root / "data"
    shutil.copytree(cohort / "site_00", data)
    lines = (data / "labels.csv").read_text().splitlines()
    header = lines[0].split(",")
    col = header.index("af")
    for i, line in enumerate(lines):
        cells = line.split(",")
        if cells[0] == "subj_00_001":
            cells[col] = af_of_subject_1
            lines[i] = ",".join(cells)
    (data / "labels.csv").write_text("\n".join(lines) + "\n")
    site_config(root, data, cache=root / "cache", release="clip_norm = 1.0\nepsilon = 2.0")
    return root / "site.toml"


def test_whether_a_probe_is_answered_and_its_kind_do_not_depend_on_one_patients_label(
    cohort: Path, tmp_path: Path
) -> None:
    """`task_labels` refused a task whose labelled patients all shared one class, and inferred
    the task's kind from the values (all in {0, 1} -> binary, else regression). Both left the
    site exactly: one patient's `af` label (1, 0 or 2, the other three patients 0) decided
    between answered as binary, refused for free, or answered as regression. Now the kind is
    the site's setting (``[tasks]``), a group with one class counts as the baseline, a value
    that is not a class is unlabelled: the answer is always a charged binary probe."""
    from biofp_core.protocol import PROBE_TASK, QUERY_PROBE, ProbeReplyMetrics

    run = RunConfig.from_run_config({**ATTACK_RUN, "model-options": json.dumps(TINY)})
    arrays = {k: v.numpy() for k, v in run.build_model().state_dict().items()}
    answers, counts = {}, set()
    for af in ("1", "0", "2"):
        toml = _site_with_af(cohort, tmp_path / f"af{af}", af)
        config = {SERVER_ROUND: 1, PROBE_TASK: "af", RUN_KEY: "probe-af"}
        reply = client_app(
            instruction(run, QUERY_PROBE, arrays=arrays, **config), site_context(run, toml)
        )
        assert not reply.has_error(), reply.error
        metrics = ProbeReplyMetrics.from_metrics(dict(reply.content[METRICS_KEY]))
        charged = len(PrivacyLedger.at(toml.parent / "state").entries)
        answers[af] = (metrics.refused, metrics.kind, charged)
        counts.add((metrics.rows, metrics.subjects))
    # what leaves must not be a function of one patient's label unless noise covers it
    outcomes = {(refused, kind) for refused, kind, _ in answers.values()}
    assert len(outcomes) == 1, f"one patient's label decides the reply: {answers}"
    assert outcomes == {(False, "binary")} and {c for *_, c in answers.values()} == {1}
    assert counts == {(4, 4)}  # the site's records and subjects, labelled (as a class) or not


def test_a_task_the_site_did_not_declare_is_refused_uncharged(cohort: Path, tmp_path: Path) -> None:
    """A refusal is free, so it may depend only on the site's configuration: `age` is a label
    column, but this site's [tasks] declares `af` only."""
    from biofp_core.protocol import PROBE_TASK, QUERY_PROBE, ProbeReplyMetrics

    site_config(tmp_path, cohort / "site_00", cache=tmp_path / "cache",
                release="clip_norm = 1.0\nepsilon = 2.0", tasks='af = "binary"\n')  # fmt: skip
    run = RunConfig.from_run_config({**ATTACK_RUN, "model-options": json.dumps(TINY)})
    arrays = {k: v.numpy() for k, v in run.build_model().state_dict().items()}
    config = {SERVER_ROUND: 1, PROBE_TASK: "age", RUN_KEY: "undeclared"}
    reply = client_app(
        instruction(run, QUERY_PROBE, arrays=arrays, **config),
        site_context(run, tmp_path / "site.toml"),
    )
    assert ProbeReplyMetrics.from_metrics(dict(reply.content[METRICS_KEY])).refused
    assert PrivacyLedger.at(tmp_path / "state").entries == []
    note = AuditLog.at(tmp_path / "state").entries()[-1].note or ""
    assert "not declared in its site.toml [tasks]" in note


def test_a_noisy_release_is_calibrated_to_a_public_cap_not_to_its_own_data(
    cohort: Path, tmp_path: Path
) -> None:
    """`prepare_release` calibrated the charge to k = the most vectors any one subject had in
    THIS data (`per_subject.max()`), and wrote k into the file; k is patient data (the longest
    stay's window count), and a charge that depends on the data it protects is not a DP charge.
    k is now the policy's ``max_vectors_per_subject`` (default 1), vectors beyond it dropped."""
    from biofp_core.fingerprints.parquet import read_fingerprints
    from biofp_core.protocol import ARRAYS_KEY, FINGERPRINTS_ARRAY, QUERY_FINGERPRINT
    from biofp_core.validate import open_site_store

    site = site_config(tmp_path, cohort / "site_00", cache=tmp_path / "cache",
                       release='level = "window"\nclip_norm = 1.0\nepsilon = 2.0')  # fmt: skip
    run = RunConfig.from_run_config({**ATTACK_RUN, "model-options": json.dumps(TINY)})
    arrays = {k: v.numpy() for k, v in run.build_model().state_dict().items()}
    reply = client_app(
        instruction(run, QUERY_FINGERPRINT, arrays=arrays, **{SERVER_ROUND: 1, RUN_KEY: "k"}),
        site_context(run, tmp_path / "site.toml"),
    )
    assert not reply.has_error(), reply.error
    path = tmp_path / "released.parquet"
    path.write_bytes(reply.content[ARRAYS_KEY][FINGERPRINTS_ARRAY].numpy().tobytes())
    _, meta = read_fingerprints(path)
    store = open_site_store(site)
    records = store.manifest.records
    subjects = [records[i].subject_id for i in np.asarray(store.record_index)]
    most = int(np.unique(subjects, return_counts=True)[1].max())
    assert meta.vectors_per_subject != most, f"k = {most}, the data's own maximum, was sent"
    assert meta.vectors_per_subject == 1 == meta.release.max_vectors_per_subject


# ---- charged answers cached under one file name for two keys ---------------------------------


def test_two_charged_keys_never_share_a_cache_file(tmp_path: Path) -> None:
    """``<run key>-<kind>-round-N`` with ``:`` written ``-``: run "r" probing task "evaluate"
    and run "r-probe" evaluating were one file, so one answer could be sent for the other."""
    from biofp_core.privacy.ledger import initialise_site_state
    from biofp_core.protocol import RunConfig
    from biofp_core.site import SiteConfig
    from client.charged import Answer, answered_before, charging, keep_answer
    from client.session import SiteSession
    from client.site_data import SiteRef

    initialise_site_state(tmp_path, name="north")
    site = SiteConfig(name="north", data_dir=tmp_path, state_dir=tmp_path)
    ref, run = SiteRef(site_config=tmp_path / "site.toml"), RunConfig.from_run_config({})
    keys = [("r", "probe:evaluate"), ("r-probe", "evaluate")]
    sessions = [SiteSession(site, ref, run, run_key, 1) for run_key, _ in keys]
    for n, (session, (run_key, kind)) in enumerate(zip(sessions, keys, strict=True)):
        entry = session.ledger.charge(run_id=run_key, server_round=1, kind=kind,
                                      noise_multiplier=5.0, sample_rate=1.0, steps=1,
                                      delta=1e-5)  # fmt: skip
        keep_answer(session, kind, global_arrays={}, instruction="{}",
                    answer=Answer({"n": n}, {}, entry))  # fmt: skip
    for n, (session, (_, kind)) in enumerate(zip(sessions, keys, strict=True)):
        with charging(session):
            got = answered_before(session, kind, global_arrays={}, instruction="{}")
        assert got is not None and got.metrics == {"n": n}
    assert len([p for p in (tmp_path / "replies").iterdir() if p.name != ".lock"]) == 2
