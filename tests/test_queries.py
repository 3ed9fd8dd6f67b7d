"""The query messages after the last round: released fingerprints and federated evaluation.

One simulation (3 synthetic sites x 3 one-minute subjects, a tiny M2AE, 1 round; the real
ClientApp and ServerApp in Flower's engine) answers the fingerprint query and two probe queries;
site_01 has spent its budget before and refuses the noisy release. The ClientApp is also called
directly on real Messages for the replay and policy cases, and the aggregation of probe replies is
checked against the pooled metric at the unit level.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
from flowerkit import instruction, site_context
from flwr.app import Message, MetricRecord, RecordDict
from fpkit import TINY, site_config, tiny_cohort

from biofp_core.artifacts import load_model
from biofp_core.audit import AuditLog, arrays_sha256
from biofp_core.errors import ConfigError
from biofp_core.evaluation import SiteProbe, site_probe
from biofp_core.evaluation.labels import TASK_KINDS, TaskLabels
from biofp_core.fingerprints.parquet import read_fingerprints
from biofp_core.fingerprints.policy import ReleasePolicy
from biofp_core.fingerprints.pseudonyms import SiteKey
from biofp_core.fingerprints.release import RELEASE_MESSAGE
from biofp_core.fingerprints.table import FingerprintTable
from biofp_core.privacy.ledger import PrivacyLedger, initialise_site_state
from biofp_core.protocol import (
    ARRAYS_KEY,
    FINGERPRINTS_ARRAY,
    METRICS_KEY,
    PROBE_KINDS,
    PROBE_VALUE,
    QUERY_FINGERPRINT,
    QUERY_PROBE,
    RUN_KEY,
    SERVER_ROUND,
    FingerprintReplyMetrics,
    ProbeReplyMetrics,
    RunConfig,
    is_allowed_reply_key,
)
from client.app import app as client_app
from server.queries import FederatedEval, combine_probes, probe_answer
from server.rundir import read_run_key
from simulations.run import SimulationConfig, load_simulation_config, simulate

TINY_RUN = {
    "model": "m2ae", "model-options": json.dumps(TINY), "local-steps": 1, "batch-subjects": 2,
    "bag-size": 2, "noise-multiplier": 3.0, "wait-timeout-s": 30.0, "round-timeout-s": 300.0,
}  # fmt: skip
NOISY = ReleasePolicy(clip_norm=1.0, epsilon=4.0)  # record means clipped to 1, ε = 4 per vector

TINY_SITE_LIMITS = {"min_train_subjects": 1}  # tiny emulated sites loosen the default


# ---- one simulation: 3 sites, 1 round, then the queries --------------------------------------


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> SimulationConfig:
    root = tmp_path_factory.mktemp("queries")
    initialise_site_state(root / "sites" / "site_01" / "state", name="site_01")
    spent = PrivacyLedger.at(root / "sites" / "site_01" / "state")
    spent.charge(run_id="earlier-study", server_round=1, noise_multiplier=0.8, sample_rate=1.0,
                 steps=40, delta=1e-5)  # fmt: skip
    cfg = load_simulation_config(
        None, sites=3, synth_sites=3, synth_subjects_per_site=3, synth_minutes=1.0,
        site_privacy=TINY_SITE_LIMITS,
        cache_dir=root / "cache", out=root / "run", sites_dir=root / "sites", release=NOISY,
        run={**TINY_RUN, "num-rounds": 1, "collect-fingerprints": True,
             "probe-tasks": "age,no_such_column"},
    )  # fmt: skip
    started = time.monotonic()
    summary = simulate(cfg)
    print(f"simulation with queries: {time.monotonic() - started:.1f} s")
    assert summary.status == "completed", summary.error
    return cfg


def site_dirs(cfg: SimulationConfig) -> dict[str, Path]:
    return {d.name: d for d in sorted(cfg.site_root.glob("site_*"))}


def node_of_site(cfg: SimulationConfig, result: FederatedEval) -> dict[str, int]:
    """Which node released which site's file (the file names the site's pseudonym only)."""
    pseudonym = {SiteKey.load(d / "state").site: name for name, d in site_dirs(cfg).items()}
    found = {}
    for node_id, answer in result.fingerprints.items():
        if answer.path is not None:
            found[pseudonym[read_fingerprints(Path(answer.path))[1].site]] = node_id
    return found


def test_released_fingerprints_are_pseudonymous_files_of_the_final_model(
    sim: SimulationConfig,
) -> None:
    result = FederatedEval.read(sim.out)
    assert result.server_round == 1 and result.run_key == read_run_key(sim.out)
    card = load_model(sim.out / "model")[1]
    assert result.model_weights_sha256 == card.weights_sha256
    assert sorted(a.status for a in result.fingerprints.values()) == ["ok", "ok", "refused"]
    nodes = node_of_site(sim, result)
    assert sorted(nodes) == ["site_00", "site_02"]
    raw_names = {"site_00", "site_01", "site_02"}
    for d in site_dirs(sim).values():
        lines = (d / "labels.csv").read_text().splitlines()[1:]
        raw_names |= {cell for line in lines for cell in line.split(",")[:2]}  # record, subject
    for name, node_id in nodes.items():
        answer = result.fingerprints[node_id]
        path = Path(answer.path or "")
        assert path == sim.out / "fingerprints" / f"node-{node_id}.parquet"
        table, meta = read_fingerprints(path)
        assert len(table) == answer.rows == 3 and set(table.level) == {"record"}
        assert meta.release == NOISY and (meta.noise_sigma or 0) > 0
        assert meta.model_weights_sha256 == card.weights_sha256
        assert np.all(np.linalg.norm(table.fp, axis=1) > 1.0)  # clipped to 1, then noised
        data = path.read_bytes()
        assert answer.bytes == len(data) and answer.sha256 == hashlib.sha256(data).hexdigest()
        leaked = [n for n in raw_names if n.encode() in data]
        assert not leaked, f"raw ids in the released file of {name}: {leaked}"
        release = [e for e in AuditLog.at(site_dirs(sim)[name] / "state").entries()
                   if e.message_type == RELEASE_MESSAGE]  # fmt: skip
        assert [e.arrays_sha256 for e in release] == [answer.sha256]  # the site's own record


def test_a_site_over_budget_refuses_the_noisy_release_while_the_others_answer(
    sim: SimulationConfig,
) -> None:
    result = FederatedEval.read(sim.out)
    refused = [a for a in result.fingerprints.values() if a.status == "refused"]
    assert len(refused) == 1 and refused[0].path is None and refused[0].rows == 0
    run_key = read_run_key(sim.out)
    for name, d in site_dirs(sim).items():
        ledger = PrivacyLedger.at(d / "state")
        releases = [e.key for e in ledger.entries if e.kind == "release"]
        if name == "site_01":
            assert [e.run_id for e in ledger.entries] == ["earlier-study"]  # nothing charged
            assert refused[0].epsilon == pytest.approx(ledger.epsilon(delta=1e-5))
            note = next(e.note for e in AuditLog.at(d / "state").entries()
                        if e.message_type == QUERY_FINGERPRINT)  # fmt: skip
            assert note is not None and note.startswith("refused:") and "budget" in note
            assert "\n" not in note
        else:
            assert releases == [(run_key, 1, "release")]
    assert not list((sim.out / "fingerprints").glob(".*.part"))  # nothing half-written


def test_federated_probe_combines_the_sites_scalars_and_refusals_are_kept(
    sim: SimulationConfig,
) -> None:
    result = FederatedEval.read(sim.out)
    age = result.tasks["age"]  # declared `age = "regression"` in every emulated site's [tasks]
    statuses = sorted(a.status for a in age.sites.values())
    assert statuses == ["ok", "ok", "refused"]  # site_01 is over budget: a probe is charged
    probes = [a.probe for a in age.sites.values() if a.probe is not None]
    fed = age.federated
    assert fed is not None and fed.metric == "relative_mae" and not fed.pooled_equivalent
    assert fed.sites == 2 and fed.rows == sum(p.rows for p in probes) == 6
    assert {p.baseline for p in probes} == {1.0}  # the public constant of a regression probe
    for name, d in site_dirs(sim).items():
        charged = [e.kind for e in PrivacyLedger.at(d / "state").entries if e.kind.startswith("p")]
        assert charged == ([] if name == "site_01" else ["probe:age"]), name
    weighted = sum(p.value * p.rows for p in probes) / fed.rows
    assert fed.value == pytest.approx(weighted, rel=1e-12)
    missing = result.tasks["no_such_column"]
    assert missing.federated is None and missing.error == "no site probed the task"
    assert {a.status for a in missing.sites.values()} == {"refused"}


def test_every_query_reply_is_audited_once_with_allowed_keys_only(sim: SimulationConfig) -> None:
    result = FederatedEval.read(sim.out)
    nodes = node_of_site(sim, result)
    for name, d in site_dirs(sim).items():
        entries = AuditLog.at(d / "state").entries()
        queries = [e for e in entries if e.message_type.startswith("query")]
        kinds = sorted(e.message_type for e in queries)
        assert kinds == [QUERY_FINGERPRINT, QUERY_PROBE, QUERY_PROBE], name  # one per reply
        for entry in queries:
            assert entry.metric_keys and all(
                is_allowed_reply_key(entry.message_type, k) for k in entry.metric_keys
            )
        released = next(e for e in queries if e.message_type == QUERY_FINGERPRINT)
        if name in nodes:
            data = Path(result.fingerprints[nodes[name]].path or "").read_bytes()
            sent = {FINGERPRINTS_ARRAY: np.frombuffer(data, dtype=np.uint8)}
            assert released.arrays_sha256 == arrays_sha256(sent)
            assert released.payload_bytes == len(data)
        else:
            assert released.arrays_sha256 is None and released.payload_bytes == 0


# ---- the ClientApp called directly on real query Messages -----------------------------------


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_cohort(tmp_path_factory.mktemp("cohort"), sites=1, subjects=4)


def test_a_repeated_fingerprint_query_resends_the_charged_release(
    cohort: Path, tmp_path: Path
) -> None:
    release = "clip_norm = 1.0\nepsilon = 2.0"
    site = site_config(tmp_path, cohort / "site_00", cache=tmp_path / "cache", release=release)
    toml, state = tmp_path / "site.toml", site.resolved_state_dir()
    run = RunConfig.from_run_config(TINY_RUN)
    config = {SERVER_ROUND: 3, RUN_KEY: "run-q1"}
    first = client_app(instruction(run, QUERY_FINGERPRINT, **config), site_context(run, toml))
    again = client_app(instruction(run, QUERY_FINGERPRINT, **config), site_context(run, toml))
    for reply in (first, again):
        assert not reply.has_error(), reply.error
        assert set(reply.content.keys()) == {ARRAYS_KEY, METRICS_KEY}
    blobs = [r.content[ARRAYS_KEY][FINGERPRINTS_ARRAY].numpy() for r in (first, again)]
    assert blobs[0].dtype == np.uint8 and np.array_equal(blobs[0], blobs[1])  # no new noise
    metrics = FingerprintReplyMetrics.from_metrics(dict(again.content[METRICS_KEY]))
    assert metrics.rows == 4 and metrics.payload_bytes == blobs[0].nbytes and not metrics.refused
    ledger = PrivacyLedger.at(state)
    assert [e.key for e in ledger.entries] == [("run-q1", 3, "release")]  # charged once
    assert metrics.epsilon == pytest.approx(ledger.epsilon(delta=1e-5)) and metrics.epsilon > 0
    audit = [e for e in AuditLog.at(state).entries() if e.message_type == QUERY_FINGERPRINT]
    assert len(audit) == 2 and (audit[1].note or "").startswith("replay:")

    other = {k: v.numpy() + 1.0 if v.is_floating_point() else v.numpy()
             for k, v in run.build_model().state_dict().items()}  # fmt: skip
    refused = client_app(
        instruction(run, QUERY_FINGERPRINT, arrays=other, **config), site_context(run, toml)
    )
    assert not refused.has_error(), refused.error
    assert set(refused.content.keys()) == {METRICS_KEY}  # nothing released
    assert FingerprintReplyMetrics.from_metrics(dict(refused.content[METRICS_KEY])).refused
    note = AuditLog.at(state).entries()[-1].note or ""
    assert note.startswith("refused:") and "other global weights" in note
    assert len(PrivacyLedger.at(state).entries) == 1


def test_a_site_without_a_release_policy_refuses_to_release_and_to_probe(
    cohort: Path, tmp_path: Path
) -> None:
    data = cohort / "site_00"
    toml = tmp_path / "site.toml"
    toml.write_text(
        f'name = "north"\ndata_dir = "{data}"\ncache_dir = "{tmp_path / "cache"}"\n'
        f'state_dir = "{tmp_path / "state"}"\nlabels_csv = "{data / "labels.csv"}"\n'
    )  # no [release] section: this site never agreed to release fingerprints
    run = RunConfig.from_run_config(TINY_RUN)
    refused = client_app(
        instruction(run, QUERY_FINGERPRINT, **{SERVER_ROUND: 1}), site_context(run, toml)
    )
    assert not refused.has_error(), refused.error
    assert set(refused.content.keys()) == {METRICS_KEY}
    parsed = FingerprintReplyMetrics.from_metrics(dict(refused.content[METRICS_KEY]))
    assert parsed.refused and parsed.rows == 0 and parsed.epsilon == 0
    note = AuditLog.at(tmp_path / "state").entries()[-1].note or ""
    assert "no [release] policy" in note
    assert not list((tmp_path / "state").glob("replies/*@release@*"))

    probed = client_app(
        instruction(run, QUERY_PROBE, **{SERVER_ROUND: 1, "probe-task": "sbp_mmhg"}),
        site_context(run, toml),
    )
    assert not probed.has_error(), probed.error
    assert set(probed.content.keys()) == {METRICS_KEY}  # no array, no probe scalar
    assert ProbeReplyMetrics.from_metrics(dict(probed.content[METRICS_KEY])).refused
    entries = AuditLog.at(tmp_path / "state").entries()
    assert [e.message_type for e in entries] == [QUERY_FINGERPRINT, QUERY_PROBE]
    assert "no [release] policy" in (entries[-1].note or "")
    assert PrivacyLedger.at(tmp_path / "state").entries == []  # nothing charged


# ---- the server's side of the probe query, at the unit level --------------------------------


def site_table(rng: np.random.Generator, n: int, site: str) -> tuple[FingerprintTable, dict]:
    """A record-level table of `n` subjects (one record each) and a target linear in it."""
    fp = rng.normal(size=(n, 4)).astype(np.float32)
    ids = np.array([f"{site}-r{i}" for i in range(n)], dtype=object)
    table = FingerprintTable(
        subject=np.array([f"{site}-s{i}" for i in range(n)], dtype=object), record=ids,
        level=np.full(n, "record", dtype=object), modality=np.full(n, "paired", dtype=object),
        quality=np.ones(n, np.float32), n_windows=np.ones(n, np.int32), fp=fp,
    )  # fmt: skip
    target = fp @ np.array([1.0, -2.0, 0.5, 0.0]) + rng.normal(scale=0.5, size=n)
    return table, dict(zip(ids, target.tolist(), strict=True))


def reply_to(probe: SiteProbe) -> Message:
    """The probe reply a site sends, as the server receives it."""
    metrics = ProbeReplyMetrics(kind=probe.kind, value=probe.value, baseline=probe.baseline,
                                rows=probe.rows, subjects=probe.subjects).to_metrics()  # fmt: skip
    sent = instruction(RunConfig.from_run_config(TINY_RUN), QUERY_PROBE, arrays={})
    return Message(RecordDict({METRICS_KEY: MetricRecord(metrics)}), reply_to=sent)


def test_federated_probes_are_row_weighted_and_flagged_as_not_pooled() -> None:
    """Sites send relative MAE (MAE over the mean predictor's) and AUROC: the server's row-weighted
    mean is not the pooled metric, and says so."""
    rng = np.random.default_rng(7)
    answers, rows = {}, []
    for node_id, n in ((11, 8), (12, 13), (13, 21)):  # unequal sites: weights matter
        table, values = site_table(rng, n, f"n{node_id}")
        labels = TaskLabels("sbp", "regression", "record", values, ())
        answers[node_id] = probe_answer("sbp", reply_to(site_probe(table, labels)))
        rows.append(n)
    fed = combine_probes("sbp", answers).federated
    assert fed is not None and fed.metric == "relative_mae" and not fed.pooled_equivalent
    assert fed.rows == 42 and fed.sites == 3
    site_values = [a.probe.value for a in answers.values() if a.probe]
    weighted = sum(v * n for v, n in zip(site_values, rows, strict=True)) / sum(rows)
    assert fed.value == pytest.approx(weighted, rel=1e-12)
    assert fed.value != pytest.approx(float(np.mean(site_values)))  # not the unweighted mean

    binary = {}
    for node_id in (11, 12):
        table, values = site_table(rng, 12, f"b{node_id}")
        cls = {k: float(v > 0) for k, v in values.items()}
        labels = TaskLabels("af", "binary", "record", cls, ("0", "1"))
        binary[node_id] = probe_answer("af", reply_to(site_probe(table, labels)))
    auroc = combine_probes("af", binary).federated
    assert auroc is not None and auroc.metric == "auroc" and not auroc.pooled_equivalent


def test_an_invalid_probe_reply_is_a_failure_not_a_score() -> None:
    probe = SiteProbe(task="age", kind="regression", metric="mae", value=3.0, baseline=4.0,
                      rows=5, subjects=5)  # fmt: skip
    reply = reply_to(probe)
    reply.content[METRICS_KEY][PROBE_VALUE] = float("nan")
    reply.content[METRICS_KEY]["subject-ids"] = 1.0  # a key no site may send
    answer = probe_answer("age", reply)
    assert answer.status == "failed" and answer.probe is None
    assert "subject-ids" in (answer.reason or "") and "\n" not in (answer.reason or "")
    assert combine_probes("age", {3: answer}).federated is None
    assert PROBE_KINDS == TASK_KINDS  # the kind travels as its index


def test_probe_tasks_are_checked_when_the_run_config_is_parsed(tmp_path: Path) -> None:
    from biofp_cli.commands.simulate import main as simulate_cli

    assert RunConfig.from_run_config({"probe-tasks": " af, age ,af"}).probe_task_list == [
        "af", "age",
    ]  # fmt: skip
    with pytest.raises(ConfigError, match=r"probe-tasks: empty task name") as exc:
        RunConfig.from_run_config({"probe-tasks": "af,,age"})
    assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match=r"probe-tasks: empty task name"):  # the CLI flag
        simulate_cli(["--collect-fingerprints", "--probe-tasks", "af,,age", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())  # refused before anything ran
