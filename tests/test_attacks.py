"""A curious coordinator against the real ClientApp: crafted weights, configs and hand edits.

Each attack is first run against the OLD behaviour's shape (what a site used to send: the exact
loss of the crafted model on the site's own subjects, computed here with the same code) to show
that it really reads raw samples; then against the ClientApp on real Messages, where it must fail:
no recovery (correlation < 0.5 with the true samples for every message the site answers), a
refusal, or a charged ledger entry per answer.

The evaluation attack: M2AE with 5 s patches (two per window, one hidden per modality), no
modality dropout and only the reconstruction term; every weight zero except the ECG decoder's
output bias, set to t·e_p. The decoder then outputs that bias for every patch, so the held-out
loss is L(t) = (Σx² + t² - 2t·x_p) / (2·625) + const and L(t) - L(0) reveals x_p, one
preprocessed ECG sample of the held-out patient per message.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flowerkit import NODE_ID, RUN_ID, instruction, site_context
from flwr.app import Context, Message, RecordDict
from fpkit import TINY, site_config, tiny_cohort

from biofp_core.audit import AuditLog
from biofp_core.fingerprints.parquet import read_fingerprints
from biofp_core.privacy.ledger import (
    LEDGER_FILENAME,
    MARKER_FILENAME,
    PrivacyLedger,
    initialise_site_state,
)
from biofp_core.protocol import (
    ARRAYS_KEY,
    EVAL_LOSS,
    FINGERPRINTS_ARRAY,
    METRICS_KEY,
    PROBE_TASK,
    QUERY_FINGERPRINT,
    QUERY_PROBE,
    RUN_KEY,
    SERVER_ROUND,
    TRAIN_LOSS,
    FingerprintReplyMetrics,
    ProbeReplyMetrics,
    RunConfig,
    TrainReplyMetrics,
)
from biofp_core.training import subject_losses
from client.app import app as client_app
from client.site_data import SiteRef, load_site_data

PATCH = 625  # samples per patch: two patches per 10 s window at 125 Hz
ATTACK_OPTIONS = {
    **TINY, "patch_samples": PATCH, "modality_dropout": 0.0, "align_weight": 0.0,
    "stats_weight": 0.0, "cross_weight": 0.0, "rhythm_token": False,
}  # fmt: skip
ATTACK_RUN = {
    "model": "m2ae", "model-options": json.dumps(ATTACK_OPTIONS), "bag-size": 1,
    "holdout-fraction": 0.25, "local-steps": 1, "batch-subjects": 1, "seed": 0,
    "noise-multiplier": 1.0,
}  # fmt: skip
SAMPLES = 60  # samples the attacker tries to read (one message each, plus one for L(0))


def crafted(run: RunConfig, t: float = 0.0, p: int = 0) -> dict[str, np.ndarray]:
    """Every weight zero but the ECG decoder's output bias, t·e_p."""
    arrays = {k: np.zeros_like(v.numpy()) for k, v in run.build_model().state_dict().items()}
    arrays["decoders.ecg.head.bias"][p] = t
    return arrays


def recover(losses: list[float], t: float = 1.0) -> np.ndarray:
    """x_p from L(0) then L(t·e_p), p = 0, 1, ...: x_p = (t² - 2·PATCH·ΔL) / (2t)."""
    base, probes = losses[0], np.asarray(losses[1:])
    return (t * t - 2 * PATCH * (probes - base)) / (2 * t)


def best_match(recovered: np.ndarray, ecg: np.ndarray) -> float:
    """Highest correlation of `recovered` with any patch start of any window (B, L)."""
    n = len(recovered)
    segments = np.concatenate([ecg[:, :n], ecg[:, PATCH : PATCH + n]])
    return max(float(np.corrcoef(recovered, s)[0, 1]) for s in segments)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_cohort(tmp_path_factory.mktemp("cohort"), sites=1, subjects=4)


def evaluate_attack(run: RunConfig, toml: Path) -> tuple[list[float], list[str]]:
    """Send L(0), L(e_0), L(e_1)... until the site stops answering; rotate the run key when the
    site caps queries per run. Returns the losses answered and every refusal note."""
    losses, notes, key = [], [], 0
    for _ in range(4 * SAMPLES):  # bounded; the site's budget ends it well before
        p = max(len(losses) - 1, 0) % SAMPLES
        arrays = crafted(run, t=1.0 if losses else 0.0, p=p)
        config = {SERVER_ROUND: len(losses) + 1, RUN_KEY: f"curious-{key}"}
        reply = client_app(
            instruction(run, "evaluate", arrays=arrays, **config), site_context(run, toml)
        )
        assert not reply.has_error(), reply.error
        metrics = dict(reply.content[METRICS_KEY])
        if EVAL_LOSS in metrics:
            losses.append(float(metrics[EVAL_LOSS]))
            continue
        state = toml.parent / "state"
        notes.append(AuditLog.at(state).entries()[-1].note or "")
        if "max_charged_queries" not in notes[-1]:
            break  # the budget, not the cap: the site will not answer again
        key += 1
    return losses, notes


def test_exact_held_out_loss_read_raw_ecg_and_the_noisy_charged_one_does_not(
    cohort: Path, tmp_path: Path
) -> None:
    site = site_config(tmp_path, cohort / "site_00", cache=tmp_path / "cache", budget=3.6)
    toml, state = tmp_path / "site.toml", site.resolved_state_dir()
    run = RunConfig.from_run_config(ATTACK_RUN)
    holdout = load_site_data(SiteRef(site_config=toml), holdout_fraction=0.25).holdout
    assert len(holdout) == 1

    def exact(arrays: dict[str, np.ndarray]) -> float:  # the old evaluate reply
        model = run.build_model()
        model.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
        rows, _ = subject_losses(model, holdout, bag_size=1, seed=run.seed)
        return float(rows[:, 0].mean())

    old = [exact(crafted(run, 0.0))]
    old += [exact(crafted(run, 1.0, p)) for p in range(SAMPLES)]
    truth = recover(old)
    assert best_match(truth, holdout[0].ecg) > 0.999  # the exact loss reads the patient's ECG

    losses, notes = evaluate_attack(run, toml)
    answered = len(losses)
    assert answered >= 40 and notes and "budget" in notes[-1]  # answers until the budget ends
    recovered = recover(losses)[:SAMPLES]
    n = len(recovered)  # |corr| of n unrelated samples: sd 1/√n, so < 0.5 by over 3.5 sd
    assert abs(float(np.corrcoef(recovered, truth[:n])[0, 1])) < 0.5
    ledger = PrivacyLedger.at(state)
    evaluations = [e for e in ledger.entries if e.kind == "evaluate"]
    assert len(evaluations) == answered  # one charged entry per answer
    assert all(e.noise_multiplier == site.privacy.eval_noise for e in evaluations)
    paid = {e.ledger_entry for e in AuditLog.at(state).entries() if e.message_type == "evaluate"}
    assert {e.hash for e in evaluations} <= paid


def test_the_same_evaluation_asked_again_gets_the_same_answer_not_new_noise(
    cohort: Path, tmp_path: Path
) -> None:
    site_config(tmp_path, cohort / "site_00", cache=tmp_path / "cache")
    toml, run = tmp_path / "site.toml", RunConfig.from_run_config(ATTACK_RUN)
    ask = {SERVER_ROUND: 1, RUN_KEY: "again"}
    first, second = (
        client_app(
            instruction(run, "evaluate", arrays=crafted(run), **ask), site_context(run, toml)
        )
        for _ in range(2)
    )
    assert first.content[METRICS_KEY][EVAL_LOSS] == second.content[METRICS_KEY][EVAL_LOSS]
    assert len(PrivacyLedger.at(tmp_path / "state").entries) == 1  # charged once
    other = client_app(
        instruction(run, "evaluate", arrays=crafted(run, 1.0), **ask), site_context(run, toml)
    )
    assert other.content[METRICS_KEY]["refused"] == 1  # other weights under a charged key
    assert len(PrivacyLedger.at(tmp_path / "state").entries) == 1


def train(run: RunConfig, toml: Path, arrays: dict, server_round: int) -> Message:
    config = {SERVER_ROUND: server_round, RUN_KEY: "curious-train"}
    return client_app(instruction(run, "train", arrays=arrays, **config), site_context(run, toml))


def test_exact_training_loss_needs_one_training_patient_and_gets_neither(
    cohort: Path, tmp_path: Path
) -> None:
    one_patient = RunConfig.from_run_config(
        {**ATTACK_RUN, "holdout-fraction": 0.75, "noise-multiplier": 1e4}
    )
    site_config(tmp_path, cohort / "site_00", cache=tmp_path / "cache", privacy="")
    toml = tmp_path / "site.toml"
    reply = train(one_patient, toml, crafted(one_patient), 1)
    metrics = TrainReplyMetrics.from_metrics(dict(reply.content[METRICS_KEY]))
    assert metrics.refused and not metrics.budget_exhausted  # refused by a limit, not spent
    note = AuditLog.at(tmp_path / "state").entries()[-1].note or ""
    assert "max_holdout_fraction" in note
    assert PrivacyLedger.at(tmp_path / "state").entries == []

    # a site that loosens its limits still sends only a noisy, charged loss
    loose = "min_train_subjects = 1\nmax_holdout_fraction = 0.8\n"
    site_config(tmp_path / "loose", cohort / "site_00", cache=tmp_path / "cache", privacy=loose,
                budget=2.0)  # fmt: skip
    toml = tmp_path / "loose" / "site.toml"
    holdout = load_site_data(SiteRef(site_config=toml), holdout_fraction=0.75)
    assert len(holdout.train) == 1
    losses, rounds = [], 0
    while len(losses) <= 8:
        rounds += 1
        t, p = (1.0, len(losses) - 1) if losses else (0.0, 0)
        reply = train(one_patient, toml, crafted(one_patient, t, p), rounds)
        assert not reply.has_error(), reply.error
        metrics = TrainReplyMetrics.from_metrics(dict(reply.content[METRICS_KEY]))
        if metrics.refused:
            break
        losses.append(float(reply.content[METRICS_KEY][TRAIN_LOSS]))
    ledger = PrivacyLedger.at(tmp_path / "loose" / "state")
    charged = [e for e in ledger.entries if e.kind == "train"]
    assert len(charged) == len(losses) >= 3  # each loss paid for
    spread = float(np.std(np.diff(losses)))
    assert spread > 100 * (1.0 / PATCH)  # noise swamps the 1/1250-scale signal of one sample


def charge_one(state: Path) -> None:
    PrivacyLedger.at(state).charge(run_id="r1", server_round=1, noise_multiplier=1.0,
                                   sample_rate=0.5, steps=4, delta=1e-5)  # fmt: skip


def rewrite(path: Path, edit: object) -> None:
    doc = json.loads(path.read_text())
    edit(doc)  # type: ignore[operator]
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("tamper", ["missing", "emptied", "sigma-raised", "entry-dropped"])
def test_a_tampered_ledger_refuses_every_charged_action(
    cohort: Path, tmp_path: Path, tamper: str
) -> None:
    site = site_config(tmp_path, cohort / "site_00", cache=tmp_path / "cache")
    state, toml = site.resolved_state_dir(), tmp_path / "site.toml"
    run = RunConfig.from_run_config(ATTACK_RUN)
    reply = client_app(
        instruction(run, "evaluate", arrays=crafted(run), **{SERVER_ROUND: 1, RUN_KEY: "k"}),
        site_context(run, toml),
    )
    assert EVAL_LOSS in reply.content[METRICS_KEY]  # one charged, audited answer
    charge_one(state)
    ledger_path = state / LEDGER_FILENAME
    if tamper == "missing":
        ledger_path.unlink()
    elif tamper == "emptied":
        rewrite(ledger_path, lambda d: d.update(entries=[]))
    elif tamper == "sigma-raised":
        rewrite(ledger_path, lambda d: d["entries"][-1].update(noise_multiplier=100.0))
    else:  # a careful forger: empty ledger, re-chained marker; only the audit log tells
        rewrite(ledger_path, lambda d: d.update(entries=[]))
        site_id = json.loads((state / MARKER_FILENAME).read_text())["site_id"]
        genesis = hashlib.sha256(f"biofp-ledger:{site_id}".encode()).hexdigest()
        rewrite(state / MARKER_FILENAME, lambda d: d.update(ledger_head=genesis, entries=0))
    with pytest.raises(Exception) as exc:
        PrivacyLedger.at(state).verify()
    assert "\n" not in str(exc.value) and "restore" in str(exc.value)
    before = ledger_path.read_bytes() if ledger_path.exists() else None
    arrays = {k: v.numpy() for k, v in run.build_model().state_dict().items()}
    trained = train(run, toml, arrays, 5)
    assert trained.has_error() and "ledger" in trained.error.reason
    assert "/" not in trained.error.reason  # no path leaves the site
    after = ledger_path.read_bytes() if ledger_path.exists() else None
    assert before == after  # nothing charged, nothing reset
    assert "error" in (AuditLog.at(state).entries()[-1].note or "")


def test_renaming_the_site_does_not_move_its_ledger(cohort: Path, tmp_path: Path) -> None:
    data = cohort / "site_00"
    toml = tmp_path / "site.toml"
    toml.write_text(f'name = "north"\ndata_dir = "{data}"\ncache_dir = "{tmp_path / "c"}"\n')
    from biofp_core.site import load_site_config

    first = load_site_config(toml).resolved_state_dir()
    toml.write_text(f'name = "renamed"\ndata_dir = "{data}"\ncache_dir = "{tmp_path / "c"}"\n')
    assert load_site_config(toml).resolved_state_dir() == first
    assert "north" not in first.name


def test_uninitialised_site_state_refuses_and_init_refuses_to_hide_sent_messages(
    cohort: Path, tmp_path: Path
) -> None:
    site = site_config(tmp_path, cohort / "site_00", cache=tmp_path / "cache", init=False)
    toml, run = tmp_path / "site.toml", RunConfig.from_run_config(ATTACK_RUN)
    reply = client_app(
        instruction(run, "evaluate", arrays=crafted(run), **{SERVER_ROUND: 1}),
        site_context(run, toml),
    )
    assert reply.has_error() and "ledger" in reply.error.reason
    state = site.resolved_state_dir()
    assert AuditLog.at(state).entries()  # the error was audited ...
    with pytest.raises(Exception, match="audit log records sent messages"):
        initialise_site_state(state, name="north")  # ... so a fresh ledger cannot hide it


def test_a_noisy_release_covers_every_column(cohort: Path, tmp_path: Path) -> None:
    site_config(tmp_path, cohort / "site_00", cache=tmp_path / "cache",
                release="clip_norm = 1.0\nepsilon = 2.0")  # fmt: skip
    run = RunConfig.from_run_config({**ATTACK_RUN, "model-options": json.dumps(TINY)})
    arrays = {k: v.numpy() for k, v in run.build_model().state_dict().items()}
    reply = client_app(
        instruction(run, QUERY_FINGERPRINT, arrays=arrays, **{SERVER_ROUND: 1}),
        site_context(run, tmp_path / "site.toml"),
    )
    assert not FingerprintReplyMetrics.from_metrics(dict(reply.content[METRICS_KEY])).refused
    blob = reply.content[ARRAYS_KEY][FINGERPRINTS_ARRAY].numpy().tobytes()
    path = tmp_path / "released.parquet"
    path.write_bytes(blob)
    table, meta = read_fingerprints(path)
    assert (meta.noise_sigma or 0) > 0
    assert np.isnan(table.quality).all() and (table.n_windows == 0).all()  # withheld
    assert np.isnan(table.start_s).all() and set(table.modality) == {"paired"}


def test_a_noise_free_policy_releases_nothing_through_flower(cohort: Path, tmp_path: Path) -> None:
    site_config(tmp_path, cohort / "site_00", cache=tmp_path / "cache", release='level = "record"')
    run = RunConfig.from_run_config({**ATTACK_RUN, "model-options": json.dumps(TINY)})
    arrays = {k: v.numpy() for k, v in run.build_model().state_dict().items()}
    reply = client_app(
        instruction(run, QUERY_FINGERPRINT, arrays=arrays, **{SERVER_ROUND: 1}),
        site_context(run, tmp_path / "site.toml"),
    )
    assert set(reply.content.keys()) == {METRICS_KEY}
    assert FingerprintReplyMetrics.from_metrics(dict(reply.content[METRICS_KEY])).refused


def probe(run: RunConfig, toml: Path, task: str, server_round: int) -> Message:
    arrays = {k: v.numpy() for k, v in run.build_model().state_dict().items()}
    config = {SERVER_ROUND: server_round, PROBE_TASK: task, RUN_KEY: "probe-run"}
    return client_app(
        instruction(run, QUERY_PROBE, arrays=arrays, **config), site_context(run, toml)
    )


def test_probes_need_a_release_policy_are_charged_and_give_no_label_statistics(
    cohort: Path, tmp_path: Path
) -> None:
    run = RunConfig.from_run_config({**ATTACK_RUN, "model-options": json.dumps(TINY)})
    site_config(tmp_path / "closed", cohort / "site_00", cache=tmp_path / "cache")
    closed = tmp_path / "closed" / "site.toml"
    toml_text = closed.read_text()
    closed.write_text(toml_text.replace("[release]\n", ""))  # no [release] section at all
    refused = ProbeReplyMetrics.from_metrics(
        dict(probe(run, closed, "age", 1).content[METRICS_KEY])
    )
    assert refused.refused and PrivacyLedger.at(tmp_path / "closed" / "state").entries == []

    site_config(tmp_path / "open", cohort / "site_00", cache=tmp_path / "cache",
                release="clip_norm = 1.0\nepsilon = 2.0")  # fmt: skip
    toml, state = tmp_path / "open" / "site.toml", tmp_path / "open" / "state"
    answers = [ProbeReplyMetrics.from_metrics(dict(probe(run, toml, "age", r).content[METRICS_KEY]))
               for r in (1, 2)]  # fmt: skip
    assert all(not a.refused for a in answers)
    assert {a.baseline for a in answers} == {1.0}  # a public constant, not a label statistic
    assert all(0.0 <= (a.value or 0) <= 2.0 for a in answers)
    probes = [e for e in PrivacyLedger.at(state).entries if e.kind == "probe:age"]
    assert len(probes) == 2  # one charge per answer
    again = ProbeReplyMetrics.from_metrics(dict(probe(run, toml, "age", 2).content[METRICS_KEY]))
    assert again == answers[1] and len(PrivacyLedger.at(state).entries) == 2  # cached


def test_refusals_say_exhausted_only_when_the_spending_refuses(
    cohort: Path, tmp_path: Path
) -> None:
    site_config(tmp_path, cohort / "site_00", cache=tmp_path / "cache", budget=0.5)
    run = RunConfig.from_run_config({**ATTACK_RUN, "model-options": json.dumps(TINY),
                                     "local-steps": 50})  # fmt: skip
    arrays = {k: v.numpy() for k, v in run.build_model().state_dict().items()}
    metrics = TrainReplyMetrics.from_metrics(
        dict(train(run, tmp_path / "site.toml", arrays, 1).content[METRICS_KEY])
    )
    assert metrics.refused and metrics.epsilon == 0.0
    assert not metrics.budget_exhausted  # too expensive a round, not a spent budget


def test_an_unlimited_budget_round_without_dp_is_still_a_ledger_line(
    cohort: Path, tmp_path: Path
) -> None:
    site_config(tmp_path, cohort / "site_00", cache=tmp_path / "cache", budget=math.inf)
    run = RunConfig.from_run_config({**ATTACK_RUN, "model-options": json.dumps(TINY), "dp": False})
    arrays = {k: v.numpy() for k, v in run.build_model().state_dict().items()}
    reply = train(run, tmp_path / "site.toml", arrays, 1)
    assert not reply.has_error(), reply.error
    entries = PrivacyLedger.at(tmp_path / "state").entries
    assert [(e.kind, e.noise_multiplier) for e in entries] == [("train", 0.0)]
    assert math.isinf(entries[0].epsilon_after)


def test_a_corrupt_ledger_during_evaluate_is_an_audited_fixed_reason_error(
    cohort: Path, tmp_path: Path
) -> None:
    site_config(tmp_path, cohort / "site_00", cache=tmp_path / "cache")
    run = RunConfig.from_run_config(ATTACK_RUN)
    (tmp_path / "state" / LEDGER_FILENAME).write_text("{corrupt")
    reply = client_app(
        instruction(run, "evaluate", arrays=crafted(run), **{SERVER_ROUND: 1}),
        site_context(run, tmp_path / "site.toml"),
    )
    assert reply.has_error()
    assert "/" not in reply.error.reason and str(tmp_path) not in reply.error.reason
    assert "corrupt" in (AuditLog.at(tmp_path / "state").entries()[-1].note or "")


# ---- found by the red team (tests/test_redteam.py on its branch), kept as regressions -------


def blow_up(run: RunConfig, scale: float) -> dict[str, np.ndarray]:
    """Every weight zero but one row of the ECG patch embedding: the first token is
    scale·Σ(visible patch), so whether the loss overflows depends on the patient's samples."""
    arrays = crafted(run)
    arrays["embed.ecg.proj.weight"][0, :] = scale
    return arrays


def test_a_round_that_fails_on_patient_data_is_charged_and_not_answered_again(
    cohort: Path, tmp_path: Path
) -> None:
    site_config(tmp_path, cohort / "site_00", cache=tmp_path / "cache")
    toml, state = tmp_path / "site.toml", tmp_path / "state"
    run = RunConfig.from_run_config({**ATTACK_RUN, "batch-subjects": 8, "noise-multiplier": 5.0})
    assert not train(run, toml, blow_up(run, 1.0), 1).has_error()
    charged = len(PrivacyLedger.at(state).entries)
    replies = [train(run, toml, blow_up(run, 1e21), 2) for _ in range(3)]  # one key, thrice
    assert replies[0].has_error()  # the loss overflowed on patient data ...
    assert "invalid" not in replies[0].error.reason  # ... which is not the server's config
    assert len(PrivacyLedger.at(state).entries) == charged + 1  # ... and it was paid for first
    for again in replies[1:]:  # the same question again: refused, never a free second bit
        assert not again.has_error(), again.error
        assert TrainReplyMetrics.from_metrics(dict(again.content[METRICS_KEY])).refused
    assert len(PrivacyLedger.at(state).entries) == charged + 1


def test_gradients_and_losses_of_one_batch_are_charged_as_one_joint_mechanism(
    cohort: Path, tmp_path: Path
) -> None:
    site = site_config(tmp_path, cohort / "site_00", cache=tmp_path / "cache", budget=1e6)
    run = RunConfig.from_run_config(
        {**ATTACK_RUN, "model-options": json.dumps(TINY), "batch-subjects": 1, "local-steps": 8}
    )
    arrays = {k: v.numpy() for k, v in run.build_model().state_dict().items()}
    assert not train(run, tmp_path / "site.toml", arrays, 1).has_error()
    (entry,) = PrivacyLedger.at(tmp_path / "state").entries
    sigma, sigma_m = run.noise_multiplier, site.privacy.train_metric_noise
    assert entry.noise_multiplier == pytest.approx((sigma**-2 + sigma_m**-2) ** -0.5)


def test_seeded_simulation_noise_differs_between_run_keys(cohort: Path, tmp_path: Path) -> None:
    from client.site_data import SimulationSites

    site_config(tmp_path, cohort / "site_00", cache=tmp_path / "cache", budget=1e6)
    toml = tmp_path / "site.toml"
    SimulationSites(sites=[SiteRef(site_config=toml, dp_seed=1000)]).write(tmp_path / "sites.json")
    run = RunConfig.from_run_config({**ATTACK_RUN, "sim-sites": str(tmp_path / "sites.json")})
    sim = Context(
        run_id=RUN_ID,
        node_id=NODE_ID,
        node_config={"partition-id": 0},
        state=RecordDict(),
        run_config=run.to_run_config(),
    )
    answers = []
    for key in ("a", "b"):  # the same weights and round under two run keys
        ask = {SERVER_ROUND: 1, RUN_KEY: key}
        reply = client_app(instruction(run, "evaluate", arrays=crafted(run), **ask), sim)
        answers.append(float(reply.content[METRICS_KEY][EVAL_LOSS]))
    assert answers[0] != answers[1]  # two charges, two independent draws: nothing cancels
