"""Federated pretraining end to end: the real ClientApp and ServerApp in Flower's simulation
engine (Ray), real Opacus DP-SGD, the sites' ledgers and audit logs, checkpoints and resume.

Sizes are tiny (3 sites x 3 subjects x 1 min, a 3k-parameter SiamQuality, 2 local steps) so
each simulation takes ~20 s on 2 cores, most of it Ray and ClientApp start-up.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flowerkit import initial_arrays, instruction, site_context
from flwr.app import Message, MessageType
from fpkit import BIOFP
from safetensors.numpy import load_file

from biofp_core.artifacts import load_model, save_model
from biofp_core.audit import AuditLog, arrays_sha256
from biofp_core.errors import ArtifactError, ConfigError
from biofp_core.privacy.ledger import PrivacyLedger, initialise_site_state
from biofp_core.protocol import (
    ARRAYS_KEY,
    COMPRESSION,
    LOCAL_STEPS,
    LR,
    METRICS_KEY,
    PACKED_KEY,
    REPLY_KEYS,
    RUN_KEY,
    SCALES_KEY,
    SERVER_ROUND,
    EvaluateReplyMetrics,
    RunConfig,
    TrainReplyMetrics,
    is_allowed_reply_metric_key,
)
from client.app import app as client_app
from client.charged import cache_path
from server.checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from server.report import RunReport
from server.rounds import FederationError
from server.rundir import RunDirectory, read_run_key
from simulations.config import (
    RunSummary,
    SimulationConfig,
    SyntheticPretraining,
    load_simulation_config,
)
from simulations.pretrain import pretrained_model, pretraining_config
from simulations.run import simulate
from strategies.registry import build_strategy

TINY_MODEL = json.dumps(
    {"stem_channels": 8, "stage_channels": [8, 8], "groups": 4, "proj_dim": 16,
     "pred_hidden": 8, "fingerprint_dim": 8}
)  # fmt: skip
TINY_RUN = {
    "model": "siamquality", "model-options": TINY_MODEL, "local-steps": 2, "batch-subjects": 2,
    "bag-size": 2, "noise-multiplier": 3.0, "wait-timeout-s": 30.0, "round-timeout-s": 300.0,
}  # fmt: skip

EVAL_REPLY_KEYS = {k for k in REPLY_KEYS["evaluate"] if k != "refused"}  # an answer

TINY_SITE_LIMITS = {"min_train_subjects": 1}  # tiny emulated sites loosen the default


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fed-cache")


def sim_config(cache_dir: Path, out: Path, sites_dir: Path, **run: object) -> SimulationConfig:
    """A tiny simulation: 3 sites of 3 one-minute subjects each."""
    return load_simulation_config(
        None, sites=3, synth_sites=3, synth_subjects_per_site=3, synth_minutes=1.0,
        site_privacy=TINY_SITE_LIMITS,
        cache_dir=cache_dir, out=out, sites_dir=sites_dir, run={**TINY_RUN, **run},
    )  # fmt: skip


def timed_simulate(cfg: SimulationConfig) -> RunSummary:
    started = time.monotonic()
    try:
        return simulate(cfg)
    finally:
        print(f"simulation of {cfg.run.num_rounds} rounds: {time.monotonic() - started:.1f} s")


def final_arrays(out: Path) -> dict[str, np.ndarray]:
    return load_file(str(out / "model.safetensors"))


def ledgers(sites_dir: Path) -> dict[str, PrivacyLedger]:
    return {d.name: PrivacyLedger.at(d / "state") for d in sorted(sites_dir.glob("site_*"))}


@pytest.fixture(scope="module")
def base_run(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> SimulationConfig:
    """3 sites x 2 rounds, uninterrupted."""
    root = tmp_path_factory.mktemp("base")
    cfg = sim_config(cache_dir, root / "run", root / "sites", **{"num-rounds": 2})
    summary = timed_simulate(cfg)
    assert summary.status == "completed", summary.error
    return cfg


def test_three_sites_two_rounds_change_the_global_weights(base_run: SimulationConfig) -> None:
    report = RunReport.read(base_run.out)
    assert report is not None and report.status == "completed"
    assert [r.server_round for r in report.rounds] == [1, 2]
    assert all(r.contributed == 3 and r.failed == r.refused == 0 for r in report.rounds)
    initial = {k: v.numpy() for k, v in base_run.run.build_model().state_dict().items()}
    round_1 = load_checkpoint(checkpoint_path(base_run.out, 1)).arrays
    final = final_arrays(base_run.out)
    assert final.keys() == initial.keys()
    assert any(not np.allclose(initial[k], round_1[k]) for k in initial)
    assert any(not np.allclose(round_1[k], final[k]) for k in initial)
    _, card = load_model(base_run.out / "model")
    assert card.training.rounds == 2 and card.data.sites == 3  # the ServerApp's own card:
    assert card.data.subjects == 3 * 2  # the training subjects the sites reported (1 held out)
    assert card.privacy is not None and len(card.privacy.sites) == 3


def test_epsilon_grows_across_rounds_runs_and_processes(
    base_run: SimulationConfig, cache_dir: Path
) -> None:
    sites_dir = base_run.site_root
    first = {  # ε reported after each round's training (DP-SGD + its noisy metrics)
        name: [e.epsilon_after for e in lg.entries if e.kind == "train"]
        for name, lg in ledgers(sites_dir).items()
    }
    assert len(first) == 3
    for name, eps in first.items():
        assert len(eps) == 2 and 0 < eps[0] < eps[1]
        kinds = [e.kind for e in ledgers(sites_dir)[name].entries]
        assert kinds == ["train", "evaluate"] * 2  # every round, all charged
    report = RunReport.read(base_run.out)
    assert report is not None
    card_max = load_model(base_run.out / "model")[1].privacy.max_epsilon
    assert card_max == pytest.approx(max(e[-1] for e in first.values()))
    second = sim_config(cache_dir, base_run.out.parent / "run2", sites_dir, **{"num-rounds": 1})
    assert timed_simulate(second).status == "completed"
    code = (
        "import json, sys; from biofp_core.privacy.ledger import PrivacyLedger; "
        "print(json.dumps({d: PrivacyLedger.at(d + '/state').epsilon(delta=1e-5) "
        "for d in sys.argv[1:]}))"
    )
    dirs = [str(sites_dir / name) for name in first]
    fresh = json.loads(subprocess.check_output([sys.executable, "-c", code, *dirs], text=True))
    for name, eps in first.items():
        ledger = PrivacyLedger.at(sites_dir / name / "state")
        assert len({e.run_id for e in ledger.entries}) == 2
        assert [e.kind for e in ledger.entries].count("train") == 3
        assert fresh[str(sites_dir / name)] == pytest.approx(ledger.epsilon(delta=1e-5))
        assert fresh[str(sites_dir / name)] > eps[-1]


def test_every_audited_reply_holds_only_allowed_keys(base_run: SimulationConfig) -> None:
    for name in ledgers(base_run.site_root):
        entries = AuditLog.at(base_run.site_root / name / "state").entries()
        kinds = [e.message_type for e in entries]
        assert kinds.count("train") == kinds.count("evaluate") >= 2  # one of each per round
        for entry in entries:
            if entry.message_type == "train":
                assert entry.arrays_sha256 and entry.payload_bytes > 0
                assert all(is_allowed_reply_metric_key(k) for k in entry.metric_keys)
            else:
                assert entry.arrays_sha256 is None
                assert set(entry.metric_keys) == EVAL_REPLY_KEYS


def test_resume_continues_at_the_next_round_with_the_same_weights(
    base_run: SimulationConfig, cache_dir: Path, tmp_path: Path
) -> None:
    """A run stopped after round 1 and started again continues from round 1's checkpoint under
    the same run key (seeded noise is keyed by run key, so another run draws other noise)."""
    out, sites_dir = tmp_path / "run", tmp_path / "sites"
    assert timed_simulate(sim_config(cache_dir, out, sites_dir, **{"num-rounds": 1})).rounds == 1
    after_round_1 = load_checkpoint(checkpoint_path(out, 1)).arrays
    summary = timed_simulate(sim_config(cache_dir, out, sites_dir, **{"num-rounds": 2}))
    report = RunReport.read(out)
    assert report is not None and report.resumed_from_round == 1
    assert summary.rounds == 2 and [r.server_round for r in report.rounds] == [1, 2]
    assert load_checkpoint(checkpoint_path(out, 1)).arrays.keys() == after_round_1.keys()
    for name, value in after_round_1.items():  # round 1 was not trained again
        np.testing.assert_array_equal(load_checkpoint(checkpoint_path(out, 1)).arrays[name], value)
    run_key = read_run_key(out)
    assert run_key is not None
    for ledger in ledgers(sites_dir).values():  # two processes, two Flower runs, one run key
        trained = [e.key for e in ledger.entries if e.kind == "train"]
        assert trained == [(run_key, 1, "train"), (run_key, 2, "train")]
    resumed = final_arrays(out)
    assert any(not np.allclose(resumed[k], after_round_1[k]) for k in after_round_1)  # round 2


def test_a_site_over_budget_refuses_while_the_others_finish(
    cache_dir: Path, tmp_path: Path
) -> None:
    sites_dir = tmp_path / "sites"
    initialise_site_state(sites_dir / "site_01" / "state", name="site_01")
    spent = PrivacyLedger.at(sites_dir / "site_01" / "state")
    spent.charge(run_id="earlier-study", server_round=1, noise_multiplier=0.8, sample_rate=1.0,
                 steps=40, delta=1e-5)  # fmt: skip
    before = spent.epsilon(delta=1e-5)
    assert before > 8.0
    summary = timed_simulate(
        sim_config(cache_dir, tmp_path / "run", sites_dir, **{"num-rounds": 2})
    )
    assert summary.status == "completed" and summary.refused_replies == 2
    report = RunReport.read(tmp_path / "run")
    assert report is not None
    assert all(r.contributed == 2 and r.refused == 1 for r in report.rounds)
    refused = [s for r in report.rounds for s in r.sites if s.status == "refused"]
    assert all(s.epsilon == pytest.approx(before) and s.budget_exhausted for s in refused)
    assert len(PrivacyLedger.at(sites_dir / "site_01" / "state").entries) == 1  # nothing charged
    audit = AuditLog.at(sites_dir / "site_01" / "state").entries()
    notes = [e.note for e in audit if e.note and e.message_type == "train"]
    assert len(notes) == 2 and all("budget" in n and "\n" not in n for n in notes)
    card = load_model(tmp_path / "run" / "model")[1]
    assert card.privacy is not None and len(card.privacy.sites) == 2  # contributors only


def test_budget_aware_fedadam_over_int8_updates_in_the_simulation_engine(
    cache_dir: Path, tmp_path: Path
) -> None:
    """The composition asked for by run config (fedadam + int8 + budget-aware) in the real apps:
    the site over budget refuses round 1 and is not sampled in round 2; the moments and the
    exclusion are in the checkpoint."""
    sites_dir = tmp_path / "sites"
    initialise_site_state(sites_dir / "site_01" / "state", name="site_01")
    PrivacyLedger.at(sites_dir / "site_01" / "state").charge(
        run_id="earlier-study", server_round=1, noise_multiplier=0.8, sample_rate=1.0, steps=40,
        delta=1e-5,
    )  # fmt: skip
    run = {"num-rounds": 2, "strategy": "fedadam", "compression": "int8", "budget-aware": True,
           "fraction-evaluate": 0.0}  # fmt: skip
    summary = timed_simulate(sim_config(cache_dir, tmp_path / "run", sites_dir, **run))
    assert summary.status == "completed", summary.error
    report = RunReport.read(tmp_path / "run")
    assert report is not None
    first, second = report.rounds
    assert (first.sampled, first.contributed, first.refused, first.excluded) == (3, 2, 1, 1)
    assert (second.sampled, second.contributed, second.refused, second.excluded) == (2, 2, 0, 1)
    full = sum(v.nbytes for v in final_arrays(tmp_path / "run").values())
    assert all(0 < s.payload_bytes < 0.3 * full for s in second.sites)  # int8 deltas
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert checkpoint is not None and set(checkpoint.strategy_arrays) == {"m_t", "v_t"}
    refused = next(s.node_id for s in first.sites if s.status == "refused")
    assert checkpoint.meta.strategy_state == {"excluded_node_ids": [refused]}


def test_too_few_sites_fail_with_a_clear_timeout(cache_dir: Path, tmp_path: Path) -> None:
    cfg = sim_config(
        cache_dir, tmp_path / "run", tmp_path / "sites",
        **{"num-rounds": 1, "min-sites": 4, "wait-timeout-s": 2.0},
    )  # fmt: skip
    with pytest.raises(FederationError, match=r"timed out after 2 s .* 3 of the 4 required"):
        timed_simulate(cfg)
    summary = RunSummary.model_validate_json((tmp_path / "run" / "summary.json").read_bytes())
    assert summary.status == "failed" and "timed out" in (summary.error or "")


# ---- the ClientApp called directly on real Messages -----------------------------------------


def sent_arrays(reply: Message) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in reply.content.array_records[ARRAYS_KEY].items()}


@pytest.fixture(scope="module")
def site_toml(base_run: SimulationConfig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of one emulated site's config with its own (empty) state folder."""
    source = base_run.site_root / "site_00"
    target = tmp_path_factory.mktemp("direct") / "site.toml"
    text = (source / "site.toml").read_text().replace('"data"', f'"{source / "data"}"')
    text = text.replace('"labels.csv"', f'"{source / "labels.csv"}"')
    target.write_text(text)
    initialise_site_state(target.parent / "state", name="site_00")
    return target


def test_a_training_reply_holds_arrays_and_allowed_metrics_only(site_toml: Path) -> None:
    run = RunConfig.from_run_config({**TINY_RUN, "out-dir": str(site_toml.parent)})
    msg = instruction(run, MessageType.TRAIN, **{SERVER_ROUND: 1, LOCAL_STEPS: 2})
    reply = client_app(msg, site_context(run, site_toml))
    assert not reply.has_error(), reply.error
    assert set(reply.content.keys()) == {ARRAYS_KEY, METRICS_KEY}
    assert not reply.content.config_records
    metrics = dict(reply.content.metric_records[METRICS_KEY])
    assert all(is_allowed_reply_metric_key(k) for k in metrics)
    parsed = TrainReplyMetrics.from_metrics(metrics)
    assert parsed.num_examples > 0 and 0 < parsed.epsilon < 8 and not parsed.refused
    sent = sent_arrays(reply)
    assert sent.keys() == set(msg.content[ARRAYS_KEY].keys())
    entry = AuditLog.at(site_toml.parent / "state").entries()[-1]
    assert entry.arrays_sha256 == arrays_sha256(sent) and entry.run_id == "7"
    assert entry.payload_bytes == parsed.payload_bytes and set(entry.metric_keys) == set(metrics)


def test_a_replayed_round_is_sent_again_unchanged_and_charged_once(
    site_toml: Path, tmp_path: Path
) -> None:
    toml = tmp_path / "site.toml"  # the same data, a fresh state folder (ledger, audit, cache)
    toml.write_text(site_toml.read_text())
    state = tmp_path / "state"
    initialise_site_state(state, name="site_00")
    run = RunConfig.from_run_config(TINY_RUN)
    config = {SERVER_ROUND: 1, LOCAL_STEPS: 2, RUN_KEY: "run-a1"}
    first = client_app(instruction(run, MessageType.TRAIN, **config), site_context(run, toml))
    assert not first.has_error(), first.error
    charged = PrivacyLedger.at(state)
    assert [e.key for e in charged.entries if e.kind == "train"] == [("run-a1", 1, "train")]
    epsilon = charged.epsilon(delta=1e-5)
    assert cache_path(state, "run-a1", "train", 1).exists()

    # the server crashed and the run was resubmitted: a new Flower run id, the same run key,
    # the same global arrays (its last checkpoint)
    replay = client_app(instruction(run, MessageType.TRAIN, run_id=8, **config),
                        site_context(run, toml, run_id=8))  # fmt: skip
    assert not replay.has_error(), replay.error
    ledger = PrivacyLedger.at(state)
    assert [e.key for e in ledger.entries if e.kind == "train"] == [("run-a1", 1, "train")]
    assert ledger.epsilon(delta=1e-5) == epsilon
    assert arrays_sha256(sent_arrays(replay)) == arrays_sha256(sent_arrays(first))
    assert dict(replay.content[METRICS_KEY]) == dict(first.content[METRICS_KEY])
    audit = AuditLog.at(state).entries()
    assert [(e.run_id, e.server_round, e.message_type) for e in audit] == [
        ("run-a1", 1, "train")
    ] * 2
    assert audit[0].note is None and audit[0].arrays_sha256 == audit[1].arrays_sha256
    assert audit[1].note is not None and audit[1].note.startswith("replay:")
    assert "nothing new trained or charged" in audit[1].note

    # the same (run key, round) with other global arrays, or another instruction: refused
    other = {k: v + np.ones_like(v) if v.dtype.kind == "f" else v
             for k, v in initial_arrays(run).items()}  # fmt: skip
    for msg, why in [
        (instruction(run, MessageType.TRAIN, run_id=9, arrays=other, **config), "global arrays"),
        (instruction(run, MessageType.TRAIN, run_id=9, **{**config, LR: 0.5}), "instruction"),
    ]:
        refused = client_app(msg, site_context(run, toml, run_id=9))
        assert not refused.has_error(), refused.error
        assert set(refused.content.keys()) == {METRICS_KEY}  # metrics only, no arrays
        parsed = TrainReplyMetrics.from_metrics(dict(refused.content[METRICS_KEY]))
        assert parsed.refused and not parsed.budget_exhausted and parsed.num_examples == 0
        assert parsed.epsilon == pytest.approx(epsilon)
        note = AuditLog.at(state).entries()[-1].note or ""
        assert note.startswith("refused:") and "already charged" in note and why in note, note
    ledger.reload()
    assert [e.key for e in ledger.entries if e.kind == "train"] == [
        ("run-a1", 1, "train")
    ]  # no new charge
    assert ledger.epsilon(delta=1e-5) == epsilon


def test_a_round_asked_twice_at_once_trains_and_charges_once(
    site_toml: Path, tmp_path: Path
) -> None:
    """Two deliveries of one instruction racing (e.g. a SuperNode retry): one trains, the other
    waits on the site's training lock and is answered from the cached reply (the replay's audit
    note may be missing: both replies are audited at once)."""
    from concurrent.futures import ThreadPoolExecutor

    toml = tmp_path / "site.toml"
    toml.write_text(site_toml.read_text())
    initialise_site_state(tmp_path / "state", name="site_00")
    run = RunConfig.from_run_config(TINY_RUN)
    config = {SERVER_ROUND: 1, LOCAL_STEPS: 2, RUN_KEY: "run-race"}

    arrays = initial_arrays(run)  # built here: torch's global RNG is not for two threads
    deliveries = [
        (instruction(run, MessageType.TRAIN, run_id=i, arrays=arrays, **config),
         site_context(run, toml, run_id=i))
        for i in (31, 32)
    ]  # fmt: skip
    with ThreadPoolExecutor(max_workers=2) as pool:
        replies = list(pool.map(lambda d: client_app(*d), deliveries))
    assert not any(r.has_error() for r in replies), [r.error for r in replies if r.has_error()]
    ledger = PrivacyLedger.at(tmp_path / "state")
    assert [e.key for e in ledger.entries if e.kind == "train"] == [("run-race", 1, "train")]
    assert arrays_sha256(sent_arrays(replies[0])) == arrays_sha256(sent_arrays(replies[1]))
    audit = AuditLog.at(tmp_path / "state").entries()  # both replies audited, the same arrays
    assert len(audit) == 2 and audit[0].arrays_sha256 == audit[1].arrays_sha256


def test_a_compressed_reply_is_an_int8_delta(site_toml: Path) -> None:
    run = RunConfig.from_run_config(
        {**TINY_RUN, "strategy": "compressed", "compression": "int8", "dp": False}
    )
    ctx = site_context(run, site_toml, run_id=17)  # another run: round 1 of run 7 is charged
    infinite = site_toml.with_name("site-nodp.toml")  # its own state: an unprotected round
    text = site_toml.read_text().replace("epsilon = 8.0", "epsilon = inf")  # makes ε infinite
    infinite.write_text(text.replace('state_dir = "state"', 'state_dir = "state-nodp"'))
    initialise_site_state(infinite.parent / "state-nodp", name="site_00")
    ctx.node_config["site-config"] = str(infinite)
    msg = instruction(run, MessageType.TRAIN, run_id=17, **{SERVER_ROUND: 1, COMPRESSION: "int8"})
    reply = client_app(msg, ctx)
    assert not reply.has_error(), reply.error
    sent = reply.content.array_records[ARRAYS_KEY]
    assert set(sent) == {PACKED_KEY, SCALES_KEY}  # one packed int8 array + one of scales
    n_params = sum(a.numpy().size for a in msg.content[ARRAYS_KEY].values())
    assert sent[PACKED_KEY].numpy().dtype == np.int8
    assert sent[PACKED_KEY].numpy().shape == (n_params,)
    assert sent[SCALES_KEY].numpy().shape == (len(msg.content[ARRAYS_KEY]),)
    full_bytes = sum(a.numpy().nbytes for a in msg.content[ARRAYS_KEY].values())
    payload = TrainReplyMetrics.from_metrics(dict(reply.content[METRICS_KEY])).payload_bytes
    assert payload < 0.3 * full_bytes
    assert "biofp-error-feedback" in ctx.state.array_records  # residual kept at the site


def test_an_evaluation_reply_holds_the_held_out_loss_only(site_toml: Path) -> None:
    run = RunConfig.from_run_config(TINY_RUN)
    reply = client_app(instruction(run, MessageType.EVALUATE, **{SERVER_ROUND: 1}),
                       site_context(run, site_toml))  # fmt: skip
    assert not reply.has_error(), reply.error
    assert set(reply.content.keys()) == {METRICS_KEY}
    assert set(reply.content[METRICS_KEY].keys()) == EVAL_REPLY_KEYS
    answer = EvaluateReplyMetrics.from_metrics(dict(reply.content[METRICS_KEY]))  # the server's
    assert not answer.refused and answer.num_examples > 0  # model of it


def test_a_site_without_usable_data_replies_with_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "broken.hea").write_text("broken 1 125 1250\nbroken.dat 16 200 16 0\n")
    (tmp_path / "site.toml").write_text(
        f'name = "empty"\ndata_dir = "data"\ncache_dir = "{tmp_path / "cache"}"\n'
    )
    run = RunConfig.from_run_config(TINY_RUN)
    msg = instruction(run, MessageType.TRAIN, **{SERVER_ROUND: 1})
    reply = client_app(msg, site_context(run, tmp_path / "site.toml"))
    assert reply.has_error()
    reason = reply.error.reason or ""
    assert "the site cannot answer this message" in reason and "\n" not in reason
    assert str(tmp_path) not in reason and "broken" not in reason  # details stay at the site
    entry = AuditLog.at(tmp_path / ".biofp-data").entries()[-1]
    assert entry.arrays_sha256 is None and entry.note is not None
    assert entry.note.startswith("error: DataError:") and "no usable record" in entry.note


# ---- checkpoints, run directory and configs -----------------------------------------------------


def test_a_corrupted_checkpoint_is_refused_and_the_previous_one_kept(tmp_path: Path) -> None:
    run = RunConfig.from_run_config({**TINY_RUN, "strategy": "fedadam"})
    strategy = build_strategy(run.strategy, **run.strategy_kwargs())
    arrays = {k: v.numpy() for k, v in run.build_model().state_dict().items()}
    strategy.m_t = {k: np.ones_like(v) for k, v in arrays.items()}
    for rnd in (1, 2):
        save_checkpoint(tmp_path, server_round=rnd, arrays=arrays, strategy=strategy,
                        strategy_name="fedadam", model_name=run.model, keep=2)  # fmt: skip
    second = checkpoint_path(tmp_path, 2)
    blob = bytearray(second.read_bytes())
    blob[-5] ^= 0xFF  # one flipped bit pattern in the last tensor's data
    second.write_bytes(bytes(blob))
    with pytest.raises(ArtifactError) as exc:
        load_checkpoint(second)
    assert "corrupted checkpoint" in str(exc.value) and "\n" not in str(exc.value)
    resumed = latest_checkpoint(tmp_path)
    assert resumed is not None and resumed.server_round == 1 and second.exists()
    assert set(resumed.strategy_arrays) == {"m_t"}
    checkpoint_path(tmp_path, 1).write_bytes(b"\x00" * 10)  # truncated as well
    with pytest.raises(ArtifactError, match="no valid checkpoint left"):
        latest_checkpoint(tmp_path)


def test_a_run_directory_keeps_its_run_key_across_restarts(tmp_path: Path) -> None:
    run = RunConfig.from_run_config({**TINY_RUN, "out-dir": str(tmp_path)})
    strategy = build_strategy(run.strategy, **run.strategy_kwargs())
    first = RunDirectory(run, strategy)
    first.start()
    assert first.run_key is not None and read_run_key(tmp_path) == first.run_key
    again = RunDirectory(run, strategy)
    again.start()
    assert again.run_key == first.run_key
    (tmp_path / "run.json").write_text("{")
    with pytest.raises(ArtifactError, match=r"run\.json: corrupt run key file") as exc:
        RunDirectory(run, strategy).start()
    assert "\n" not in str(exc.value)
    assert read_run_key(tmp_path / "elsewhere") is None


def test_a_run_directory_refuses_to_resume_another_model(tmp_path: Path) -> None:
    run = RunConfig.from_run_config({**TINY_RUN, "out-dir": str(tmp_path)})
    strategy = build_strategy(run.strategy, **run.strategy_kwargs())
    done, arrays = RunDirectory(run, strategy).start()
    assert done == 0 and len(arrays) > 0
    other = run.model_copy(update={"model": "m2ae", "model_options": "{}"})
    with pytest.raises(ConfigError, match="other model, model-options"):
        RunDirectory(other, strategy).start()


def test_a_run_starts_from_its_initial_model_and_its_card_says_so(tmp_path: Path) -> None:
    run = RunConfig.from_run_config({**TINY_RUN, "out-dir": str(tmp_path / "run"), "seed": 7})
    pretrained = RunConfig.from_run_config({**TINY_RUN, "seed": 3}).build_model()
    path = save_model(pretrained, tmp_path / "pretrained")
    _, card = load_model(path)
    started = run.model_copy(update={"initial_model": str(path)})
    strategy = build_strategy(run.strategy, **run.strategy_kwargs())
    directory = RunDirectory(started, strategy)
    done, arrays = directory.start()
    sent = {k: np.asarray(v.numpy()) for k, v in arrays.items()}
    ours = pretrained.state_dict()
    assert done == 0 and sent.keys() == ours.keys()
    assert all(np.array_equal(sent[k], ours[k].numpy()) for k in ours)  # not the seed-7 init
    seeded = run.build_model().state_dict()
    assert not all(np.array_equal(sent[k], seeded[k].numpy()) for k in seeded)
    _, final = load_model(directory.finish(arrays))
    assert final.training.initialised_from == card.weights_sha256
    wider = json.dumps({**json.loads(TINY_MODEL), "fingerprint_dim": 16})
    other = run.model_copy(update={"initial_model": str(path), "model_options": wider})
    with pytest.raises(
        ArtifactError,
        match=r"pretrained\.safetensors: initial-model has another "
        r"architecture than the run's model-options: fingerprint_dim 8 \(run: 16\)",
    ):
        other.build_initial_model()
    missing = run.model_copy(update={"initial_model": str(tmp_path / "nope.safetensors")})
    with pytest.raises(ArtifactError, match=r"nope\.card\.json: artifact file is missing"):
        missing.build_initial_model()


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"strategy": "fedsgd"}, "unknown strategy 'fedsgd'; valid: fedavg, fedprox"),
        ({"model": "resnet"}, "unknown model 'resnet'; valid: m2ae, siamquality"),
        ({"compression": "int4"}, "unknown compression 'int4'; valid: none, fp16, int8"),
        ({"budget-aware": "maybe"}, "budget-aware: Input should be a valid boolean"),
        ({"num-rounds": 0}, "num-rounds"),
        ({"rounds": 3}, "rounds: unknown key"),
    ],
)
def test_bad_run_configs_fail_at_parse_time(config: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        RunConfig.from_run_config(config)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_a_bad_simulation_config_names_the_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "sim.toml"
    path.write_text('sites = 2\npartition = "round-robin"\n[run]\nnum-rounds = 1\n')
    with pytest.raises(ConfigError, match=r"sim\.toml: partition: unknown partitioner"):
        load_simulation_config(path)
    path.write_text('[run]\nmodel = "vit"\n')
    with pytest.raises(ConfigError, match="unknown model 'vit'; valid: m2ae, siamquality"):
        load_simulation_config(path)


def test_simulate_help_and_a_bad_flag() -> None:
    help_run = subprocess.run([*BIOFP, "simulate", "--help"], capture_output=True, text=True)
    assert help_run.returncode == 0
    for flag in ("--sites", "--rounds", "--strategy", "--model", "--no-dp", "--epsilon", "--out"):
        assert flag in help_run.stdout
    bad = subprocess.run([*BIOFP, "simulate", "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stderr.strip().count("\n") == 0 and "No such option" in bad.stderr
    code = "import sys, biofp_cli.cli; print('flwr' in sys.modules)"
    assert subprocess.check_output([sys.executable, "-c", code], text=True).strip() == "False"


def test_the_pyproject_run_config_is_the_default_run_config() -> None:
    import tomllib

    from conftest import ROOT

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app = pyproject["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "server.app:app", "clientapp": "client.app:app"}
    assert RunConfig.from_run_config(app["config"]) == RunConfig()


@pytest.mark.filterwarnings("ignore:DPConfig.seed is set")  # seeded noise: a simulation's choice
def test_centralized_baseline_trains_the_same_model_on_pooled_data(
    cache_dir: Path, tmp_path: Path
) -> None:
    cfg = sim_config(cache_dir, tmp_path / "run", tmp_path / "sites", **{"num-rounds": 1})
    summary = simulate(cfg.model_copy(update={"centralized": True}))
    assert summary.mode == "centralized" and summary.status == "completed"
    assert summary.eval_loss is not None and (summary.max_epsilon or 0) > 0
    _, card = load_model(tmp_path / "run" / "model")
    assert card.training.strategy == "centralized" and card.training.local_steps == 3 * 1 * 2
    assert card.data.subjects == 9 and card.privacy is not None
    assert all(not site.ledger.entries for site in summary.sites)  # no site was charged


@pytest.mark.filterwarnings("ignore:DPConfig.seed is set")  # seeded noise: a simulation's choice
def test_a_pretrain_block_starts_the_run_from_cached_synthetic_weights(
    cache_dir: Path, tmp_path: Path
) -> None:
    pretrain = SyntheticPretraining(sites=2, subjects_per_site=2, minutes=1.0, steps=2,
                                    batch_subjects=2)  # fmt: skip
    cfg = sim_config(cache_dir, tmp_path / "run", tmp_path / "sites", **{"num-rounds": 1})
    cfg = cfg.model_copy(update={"centralized": True, "pretrain": pretrain})
    simulate(cfg)
    pre = pretraining_config(cfg)
    assert pre.dataset == "synthetic" and not pre.run.dp and pre.out.parent.parent == cache_dir
    _, pre_card = load_model(pre.out / "model")
    assert pre_card.privacy is None and pre_card.training.local_steps == 2
    assert pre_card.data.sites == 1 and pre_card.data.subjects == 4  # simulated subjects only
    _, card = load_model(tmp_path / "run" / "model")
    assert card.training.initialised_from == pre_card.weights_sha256
    written = (pre.out / "model.safetensors").stat().st_mtime_ns
    again = pretrained_model(cfg, simulate)  # the cached weights, reused (not trained again)
    assert again == pre.out / "model.safetensors" and again.stat().st_mtime_ns == written
    other = pretraining_config(cfg.model_copy(update={"pretrain": pretrain.model_copy(
        update={"steps": 3})}))  # fmt: skip
    assert other.out != pre.out


def test_biofp_pretrain_writes_weights_a_run_can_start_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fpkit import run_biofp

    from biofp_core.synth.physiology import ECTOPY_MODEL

    monkeypatch.setenv("BIOFP_CACHE_DIR", str(tmp_path / "cache"))
    code, out, err = run_biofp(
        "pretrain", "--out", str(tmp_path / "pre"), "--model", "siamquality",
        "--model-options", TINY_MODEL, "--steps", "2", "--sites", "1",
        "--subjects-per-site", "2", "--minutes", "0.5", "--ectopic-per-min", "2",
    )  # fmt: skip
    assert code == 0, err
    cohorts = [p.name for p in (tmp_path / "cache" / "cohorts").iterdir()]
    assert cohorts == [f"synth-1x2-0.5min-seed0-ectopy2v{ECTOPY_MODEL}"]  # with ectopy
    path = tmp_path / "pre" / "model.safetensors"
    assert f'initial-model = "{path}"' in " ".join(out.split())
    _, card = load_model(path)
    assert card.privacy is None and card.data.subjects == 2 and card.training.local_steps == 2
    run = RunConfig.from_run_config({**TINY_RUN, "initial-model": str(path)})
    _, sha = run.build_initial_model()
    assert sha == card.weights_sha256
    code, _, err = run_biofp("pretrain", "--out", str(tmp_path / "x"), "--model-options", "[1]")
    assert code == 1 and err.strip() == "error: run config: model-options: must be a JSON object"


def test_a_wfdb_folder_is_split_by_subject_into_sites(bidmc_dir: Path, tmp_path: Path) -> None:
    from conftest import copy_records

    from simulations.cohort import wfdb_cohort, write_sites
    from simulations.partition import partition_iid
    from simulations.site_toml import SiteSettings

    data = copy_records(bidmc_dir, tmp_path / "bidmc", ["bidmc01", "bidmc02", "bidmc03"])
    labels = tmp_path / "labels.csv"
    labels.write_text("record,subject,sex\nbidmc01,p1,F\nbidmc02,p1,F\nbidmc03,p2,M\n")
    cohort = wfdb_cohort(data, labels)
    assert cohort.subjects == ["p1", "p2"] and cohort.label("sex") == {"p1": "F", "p2": "M"}
    partition = partition_iid(cohort.subjects, num_sites=2, seed=0)
    settings = SiteSettings(cache_dir=tmp_path / "cache", epsilon=5.0, delta=1e-6)
    tomls = write_sites(cohort, partition, tmp_path / "sites", settings)
    from biofp_core.site import load_site_config

    records = {}
    for toml in tomls:
        site = load_site_config(toml)
        assert site.privacy.epsilon == 5.0 and site.privacy.delta == 1e-6
        records[site.name] = sorted(p.stem for p in site.data_dir.glob("*.hea"))
    assert sorted(records.values()) == [["bidmc01", "bidmc02"], ["bidmc03"]]
