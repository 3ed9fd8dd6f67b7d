"""A real deployment on 127.0.0.1: SuperLink with TLS and SuperNode authentication, two sites.

Everything is started through ``biofp server start`` / ``biofp client start`` (subprocesses, the
containers' entry points); keys are registered with Flower's ``flwr supernode register`` and runs
submitted with ``flwr run``. No mocks. The module shares one federation (one SuperLink, two
SuperNodes); a site is killed hard and restarted at once (it must reconnect, charging nothing
twice); the last test kills the SuperLink in the middle of a round and restarts it.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from localfed import (
    BIOFP,
    TINY_MODEL,
    LocalFederation,
    Site,
    add_site,
    free_port,
    kill_tree,
    make_federation,
    read_json,
    wait_until,
    write_app,
)

from biofp_cli.certs import init_certificates
from biofp_cli.superlink import flower_env
from biofp_cli.supernode import (
    SESSION_EXPIRY_S,
    SESSION_FILE,
    AcceptedSession,
    SuperNodeLaunch,
    run_supernode,
    supernode_command,
)
from biofp_core.artifacts import load_model
from biofp_core.audit import AuditLog, AuditLogError
from biofp_core.deployment import DeploymentError
from biofp_core.privacy.ledger import PrivacyLedger
from biofp_core.site import load_site_config
from server.rundir import read_run_key

RUN = {  # a tiny model and 2 short rounds, no federated evaluation: seconds of training
    # 4 steps: a site of 3 training subjects sampled at q = 2/3 samples nobody in every step of a
    # round (a DataError reply) with p = (1/27)^steps, 1/729 at 2 steps, 2e-6 at 4
    "num-rounds": 2, "local-steps": 4, "batch-subjects": 2, "bag-size": 4,
    "model-options": TINY_MODEL, "fraction-evaluate": 0.0, "wait-timeout-s": 60.0,
    "round-timeout-s": 120.0,
}  # fmt: skip


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    """SuperLink (TLS + node auth) with two registered, connected sites."""
    root = tmp_path_factory.mktemp("deploy")
    with make_federation(root, ["north", "south"], cache_dir=root / "cache") as fed:
        fed.start_server()
        for site in fed.sites.values():
            fed.register(site)
            fed.start_client(site)
        wait_until(lambda: fed.online() == 2, timeout_s=90, what="two SuperNodes online")
        yield fed


@pytest.fixture(scope="module")
def app_dir(federation: LocalFederation) -> Path:
    return write_app(federation, federation.root / "app")


def _wait_for_run(fed: LocalFederation, run_dir: Path, *, timeout_s: float) -> dict:
    def finished() -> dict | None:
        report = read_json(run_dir / "metrics.json")
        return report if report and report.get("status") in ("completed", "failed") else None

    report = wait_until(finished, timeout_s=timeout_s, what=f"run in {run_dir}", poll_s=0.5)
    assert report["status"] == "completed", (report, fed.log("server.log")[-3000:])
    return report


def _train_entries(state_dir: Path) -> list:
    return [e for e in PrivacyLedger.at(state_dir).entries if e.kind == "train"]


def _sent_train(state_dir: Path, run_key: str, server_round: int) -> list:
    """Audit entries of the training replies (updates, refusals, errors) a site sent for one
    round of a run."""
    try:
        entries = AuditLog.at(state_dir).entries()
    except AuditLogError:  # a line being appended right now: look again
        return []
    return [
        e for e in entries
        if (e.run_id, e.server_round) == (run_key, server_round)
        and e.message_type.startswith("train")
    ]  # fmt: skip


def test_two_rounds_with_tls_and_node_auth(federation: LocalFederation, app_dir: Path) -> None:
    fed = federation
    fed.submit(app_dir, {**RUN, "out-dir": "run-2rounds"})
    run_dir = fed.workdir / "run-2rounds"  # relative out-dir: the SuperLink's workdir
    report = _wait_for_run(fed, run_dir, timeout_s=240)
    run_key = read_run_key(run_dir)  # what the sites charge and audit under
    assert run_key is not None
    assert [r["server_round"] for r in report["rounds"]] == [1, 2]
    assert all(r["contributed"] == 2 and r["failed"] == 0 for r in report["rounds"])
    model, card = load_model(run_dir / "model")
    assert card.training.rounds == 2 and card.data.sites == 2
    assert card.privacy is not None and len(card.privacy.sites) == 2
    assert sum(p.numel() for p in model.parameters()) > 0
    for site in fed.sites.values():
        charged = [e for e in _train_entries(site.state_dir) if e.run_id == run_key]
        assert [e.server_round for e in charged] == [1, 2]
        sent = [e for e in AuditLog.at(site.state_dir).entries() if e.run_id == run_key]
        assert [e.server_round for e in sent if e.message_type.startswith("train")] == [1, 2]


def _other_site(fed: LocalFederation, name: str, *, ca_cert: Path | None = None) -> Site:
    """A site.toml for a new site reading north's data, with its own state and key."""
    north = fed.sites["north"].toml
    folder = fed.root / name
    folder.mkdir(exist_ok=True)
    toml = folder / "site.toml"
    text = north.read_text().split("\n[federation]")[0]
    text = text.replace('data_dir = "data"', f'data_dir = "{north.parent / "data"}"')
    text = text.replace(
        'labels_csv = "labels.csv"', f'labels_csv = "{north.parent / "labels.csv"}"'
    )
    toml.write_text(text.replace('name = "site_00"', f'name = "{name}"'))
    # north's records, bound to north's ledger: another site on purpose, said loudly
    done = fed.run([*BIOFP, "site", "init", "--config", str(toml), "--new-site"], timeout_s=60)
    assert done.returncode == 0, done.stderr
    return add_site(fed, name, toml, ca_cert=ca_cert)


def test_unregistered_node_key_is_refused(federation: LocalFederation) -> None:
    fed = federation
    rogue = _other_site(fed, "rogue")
    done = fed.run([*BIOFP, "client", "start", "--config", str(rogue.toml)], timeout_s=120)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert "refused this SuperNode" in last and "not registered" in last, done.stderr[-2000:]
    assert "never accepted" in last and "retrying" not in done.stderr  # at once: no wait
    assert not (rogue.state_dir / SESSION_FILE).exists()
    assert fed.online() == 2


def test_the_session_expiry_is_flowers() -> None:
    """The retry window after a refusal covers Flower's: online until 2 x 30 s after the last
    heartbeat (constants of Flower, options of neither flower-supernode nor flower-superlink)."""
    from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE

    assert SESSION_EXPIRY_S == HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL


def _session(site: Site) -> AcceptedSession:
    return AcceptedSession.model_validate_json((site.state_dir / SESSION_FILE).read_text())


def _node(fed: LocalFederation, node_id: int) -> dict:
    return {n["node-id"]: n for n in fed.nodes()}[str(node_id)]


def test_a_second_supernode_with_a_connected_key_is_told_the_session_is_held(
    federation: LocalFederation,
) -> None:
    """A SuperNode started with north's key while north is connected (an old container never
    stopped): refused, retried, then one line: the SuperLink still holds a session for this key.
    Run in-process with a 3 s retry window instead of 65 s."""
    fed = federation
    north = fed.sites["north"]
    session = _session(north)  # written when the SuperLink accepted north
    assert _node(fed, session.node_id)["status"] == "online"
    site = load_site_config(north.toml)
    assert site.federation is not None
    port = free_port()  # north's own runtime port is taken by north
    launch = SuperNodeLaunch(
        site=site, site_toml=north.toml, env=flower_env(fed.root / "duplicate-flower"),
        argv=supernode_command(site.federation, north.toml, insecure=False, runtime_port=port),
        insecure=False, runtime_port=port, runtime_port_source="test",
    )  # fmt: skip
    said: list[str] = []
    with pytest.raises(DeploymentError) as exc:
        run_supernode(launch, retry_s=3.0, say=said.append)
    message = str(exc.value)
    assert "still holds a session for this key" in message and "\n" not in message
    assert f"node {session.node_id}" in message and "not registered" not in message
    assert said and all("previous session; retrying in" in line for line in said), said
    assert _session(north) == session and fed.online() == 2


def test_a_site_killed_hard_and_restarted_at_once_reconnects(federation: LocalFederation) -> None:
    """A container stop without grace (SIGKILL to the whole `biofp client start` tree), then
    the same site.toml, key and state folder at once: the SuperLink still counts the old session
    as online for up to a minute; the new SuperNode retries until it is accepted again under the
    same node id, and its ledger lost and gained nothing. (The module's last test then runs two
    rounds in which this restarted SuperNode must take part.)"""
    fed = federation
    north = fed.sites["north"]
    proc = next(p for p in fed.procs if str(north.toml) in p.args)  # type: ignore[operator]
    session = _session(north)
    online_at = _node(fed, session.node_id)["online-at"]
    before = PrivacyLedger.at(north.state_dir).entries
    kill_tree(proc, sig=signal.SIGKILL)
    fed.procs.remove(proc)
    killed = time.monotonic()
    log_name = "client-north-restarted.log"
    restarted = fed.start([*BIOFP, "client", "start", "--config", str(north.toml)], log_name)
    wait_until(lambda: restarted.poll() is not None or "reconnected" in fed.log(log_name),
               timeout_s=150, what="north to reconnect", poll_s=0.5)  # fmt: skip
    reconnect_s = time.monotonic() - killed
    log = fed.log(log_name)
    assert restarted.poll() is None, log[-3000:]
    assert "the SuperLink still sees this site's previous session; retrying in" in log, log
    node = _node(fed, session.node_id)  # the same node id, a new session
    assert node["status"] == "online" and node["online-at"] != online_at, node
    assert _session(north).node_id == session.node_id
    assert PrivacyLedger.at(north.state_dir).entries == before
    assert fed.online() == 2
    print(f"reconnected {reconnect_s:.1f} s after the kill")


def test_supernode_with_wrong_ca_cannot_connect(federation: LocalFederation) -> None:
    fed = federation
    other_ca = init_certificates(fed.root / "other-ca", server_name="localhost").ca_cert
    site = _other_site(fed, "wrongca", ca_cert=other_ca)
    fed.register(site)  # its key is registered: only the CA it trusts is wrong
    # biofp refuses before starting anything ...
    done = fed.run([*BIOFP, "client", "start", "--config", str(site.toml)], timeout_s=60)
    assert done.returncode == 1
    assert "not trusted" in done.stderr.strip().splitlines()[-1], done.stderr[-2000:]
    # ... and the stock SuperNode, started with the same flags, cannot connect either
    federation_cfg = load_site_config(site.toml).federation
    assert federation_cfg is not None
    argv = [*supernode_command(federation_cfg, site.toml, insecure=False), "--max-retries", "1"]
    node = fed.start(argv, "wrongca-supernode.log")
    try:
        assert node.wait(timeout=90) != 0
    finally:
        kill_tree(node)
    assert "CERTIFICATE_VERIFY_FAILED" in fed.log("wrongca-supernode.log")
    assert fed.online() == 2


def test_a_server_killed_mid_round_resumes_and_no_site_is_charged_twice(
    federation: LocalFederation, app_dir: Path
) -> None:
    """Kill the SuperLink (and its ServerApp) after both sites sent their round-1 update but
    before the server checkpointed round 1, restart it, resubmit: round 1 is sent again with the
    same global arrays under the same run key, and each site answers with its cached reply."""
    fed = federation
    run_dir = fed.workdir / "run-crash"
    # Federated evaluation in the first submission only: the round-1 checkpoint is written after
    # both sites' evaluation replies (each a new ClientApp process), so once both training replies
    # are in the sites' audit logs there are seconds left to kill the server before it exists.
    fed.submit(app_dir, {**RUN, "out-dir": "run-crash", "fraction-evaluate": 1.0})
    run_key = wait_until(lambda: read_run_key(run_dir), timeout_s=120, what="run.json")

    def both_replied() -> list | None:
        sent = [_sent_train(site.state_dir, run_key, 1) for site in fed.sites.values()]
        return sent if all(sent) else None

    sent = wait_until(both_replied, timeout_s=180, what="both sites' round-1 replies", poll_s=0.1)
    server = fed.procs[0]
    kill_tree(server, sig=signal.SIGKILL)  # the coordinator's machine dies: no clean shutdown
    fed.procs.remove(server)
    assert not (run_dir / "checkpoints" / "round-0001.safetensors").exists()  # round 1 in flight
    replies = [entry for entries in sent for entry in entries]
    assert len(replies) == 2 and all(e.arrays_sha256 for e in replies), [e.note for e in replies]
    fed.procs.insert(0, fed.start_server())  # same server.toml: same database, same keys
    wait_until(lambda: fed.online() == 2, timeout_s=90, what="SuperNodes reconnected")
    fed.submit(app_dir, {**RUN, "out-dir": "run-crash"})  # a new Flower run id
    report = _wait_for_run(fed, run_dir, timeout_s=240)
    assert read_run_key(run_dir) == run_key
    assert report["resumed_from_round"] is None  # no checkpoint: round 1 again, from the start
    assert [r["server_round"] for r in report["rounds"]] == [1, 2]
    assert all(r["contributed"] == 2 and r["refused"] == 0 for r in report["rounds"])
    _, card = load_model(run_dir / "model")
    assert card.training.rounds == 2
    for site in fed.sites.values():
        entries = [e for e in _train_entries(site.state_dir) if e.run_id == run_key]
        assert [e.server_round for e in entries] == [1, 2]  # one charge per (run key, round)
        first, again = _sent_train(site.state_dir, run_key, 1)  # before and after the crash
        assert again.arrays_sha256 == first.arrays_sha256
        assert again.note is not None and again.note.startswith("replay:"), again.note
