"""What a pilot gets wrong, caught before anything starts or said plainly afterwards.

Pre-start checks (runtime ports of several sites on one host, a log folder that does not exist,
``--insecure`` beyond loopback), the five audit-log checks of ``biofp site audit --check``, the
run report's new fields (old files still read) and ``biofp server status``. Fast: no Flower
process here (``tests/test_pilot.py`` runs the whole pilot).
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest
from fpkit import BIOFP

from biofp_cli.certs import init_certificates
from biofp_cli.preflight import check_insecure_address, check_server, choose_runtime_port
from biofp_core.audit import AuditEntry, AuditLog
from biofp_core.audit_check import CHECKS, check_audit
from biofp_core.deployment import (
    DeploymentError,
    derived_runtime_port,
    is_loopback,
    load_server_config,
)
from biofp_core.privacy.ledger import LedgerEntry
from biofp_core.site import load_site_config
from server.report import RoundMetrics, RunReport, SiteData, SiteRound
from server.status import render_status

TINY_MODEL = json.dumps({"stem_channels": 8, "stage_channels": [8, 8], "groups": 4,
                         "proj_dim": 16, "pred_hidden": 8, "fingerprint_dim": 8})  # fmt: skip


def _site(folder: Path, *, runtime_port: int | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "data").mkdir()
    extra = f"runtime_port = {runtime_port}\n" if runtime_port else ""
    toml = folder / "site.toml"
    toml.write_text(
        f'name = "{folder.name}"\ndata_dir = "data"\nstate_dir = "state"\n\n'
        f'[federation]\nsuperlink = "localhost:9092"\n{extra}'
    )
    return toml


# ---- runtime ports -------------------------------------------------------------------------------


def test_sites_on_one_host_get_distinct_default_ports(tmp_path: Path) -> None:
    north, south = _site(tmp_path / "north"), _site(tmp_path / "south")
    ports = {}
    for toml in (north, south):
        port, how = choose_runtime_port(load_site_config(toml), toml)
        assert port == derived_runtime_port(toml) and "default" in how
        ports[toml] = port
    assert ports[north] != ports[south]
    assert derived_runtime_port(north) == derived_runtime_port(north)  # stable


def test_a_taken_default_port_is_replaced_and_a_taken_configured_one_refused(
    tmp_path: Path,
) -> None:
    north = _site(tmp_path / "north")
    derived = derived_runtime_port(north)
    with socket.create_server(("127.0.0.1", derived)):  # another program (or site) holds it
        port, how = choose_runtime_port(load_site_config(north), north)
        assert port != derived and str(derived) in how
    with socket.create_server(("127.0.0.1", 0)) as busy:
        taken = busy.getsockname()[1]
        south = _site(tmp_path / "south", runtime_port=taken)
        with pytest.raises(DeploymentError) as exc:
            choose_runtime_port(load_site_config(south), south)
    message = str(exc.value)
    assert f"127.0.0.1:{taken}" in message and "federation.runtime_port" in message
    assert str(south) in message and "\n" not in message


def test_client_check_refuses_a_second_site_on_the_same_port(tmp_path: Path) -> None:
    """Through the CLI: one line naming the key, exit 1."""
    with socket.create_server(("127.0.0.1", 0)) as busy:
        taken = busy.getsockname()[1]
        toml = _site(tmp_path / "south", runtime_port=taken)
        synth = subprocess.run([*BIOFP, "data", "synth", "--out", str(tmp_path / "cohort"),
                                "--sites", "1", "--subjects-per-site", "2", "--minutes", "0.5"],
                               capture_output=True, text=True)  # fmt: skip
        assert synth.returncode == 0, synth.stderr
        cohort = tmp_path / "cohort" / "site_00"
        toml.write_text(toml.read_text().replace('data_dir = "data"', f'data_dir = "{cohort}"'))
        init = subprocess.run([*BIOFP, "site", "init", "--config", str(toml)],
                              capture_output=True, text=True)  # fmt: skip
        assert init.returncode == 0, init.stderr
        with socket.create_server(("127.0.0.1", 0)) as link:  # a "SuperLink" that accepts TCP
            link_port = link.getsockname()[1]
            toml.write_text(toml.read_text().replace("localhost:9092", f"127.0.0.1:{link_port}"))
            done = subprocess.run([*BIOFP, "client", "start", "--config", str(toml), "--insecure",
                                   "--check"], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "federation.runtime_port" in last, done.stderr


# ---- --insecure only on loopback -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.8.9.1", True), ("::1", True), ("[::1]", True),
     ("localhost", True), ("0.0.0.0", False), ("10.0.0.5", False), ("fl.example.org", False),
     ("::", False)],
)  # fmt: skip
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
    if loopback:
        check_insecure_address(host, what="x", allow_non_loopback=False)
    else:
        with pytest.raises(DeploymentError, match="--insecure-non-loopback"):
            check_insecure_address(host, what="x", allow_non_loopback=False)
        check_insecure_address(host, what="x", allow_non_loopback=True)


def test_insecure_server_on_all_interfaces_is_refused(tmp_path: Path) -> None:
    toml = tmp_path / "server.toml"
    toml.write_text('[superlink]\nhost = "0.0.0.0"\nport = 1\n')
    with pytest.raises(DeploymentError, match=r"superlink\.host 0\.0\.0\.0 is not a loopback"):
        check_server(load_server_config(toml), insecure=True)
    done = subprocess.run([*BIOFP, "server", "start", "--config", str(toml), "--insecure",
                           "--check"], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 1 and "--insecure-non-loopback" in done.stderr.splitlines()[-1]


def test_insecure_client_towards_a_remote_superlink_is_refused(tmp_path: Path) -> None:
    toml = _site(tmp_path / "north")
    toml.write_text(toml.read_text().replace("localhost:9092", "fl.example.org:9092"))
    done = subprocess.run([*BIOFP, "client", "start", "--config", str(toml), "--insecure",
                           "--check"], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert "federation.superlink fl.example.org is not a loopback address" in last


# ---- log_file ------------------------------------------------------------------------------------


def test_log_file_folder_is_created_at_check_and_a_folder_is_refused(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    init_certificates(certs, server_name="localhost")
    toml = tmp_path / "server.toml"
    body = (
        '[superlink]\nhost = "127.0.0.1"\nport = {port}\npublic_name = "localhost"\n'
        'log_file = "{log}"\n\n[tls]\nca_cert = "certs/ca.crt"\ncert = "certs/server.crt"\n'
        'key = "certs/server.key"\n'
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    toml.write_text(body.format(port=port, log="logs/deep/superlink.log"))
    done = subprocess.run([*BIOFP, "server", "start", "--config", str(toml), "--check"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "logs" / "deep").is_dir()
    toml.write_text(body.format(port=port, log="logs"))
    done = subprocess.run([*BIOFP, "server", "start", "--config", str(toml), "--check"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 1
    assert "superlink.log_file is a folder" in done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr


# ---- the five audit checks -----------------------------------------------------------------------

SHA = "ab" * 32


def _audit(server_round: int, **kw: object) -> AuditEntry:
    fields: dict[str, object] = {
        "run_key": "k1", "flower_run_id": 7, "server_round": server_round,
        "message_type": "train", "payload_bytes": 100, "arrays_sha256": SHA,
        "metric_keys": ["num-examples", "train-loss", "epsilon", "delta"],
        "epsilon": 0.5 * server_round,
    }  # fmt: skip
    return AuditEntry.model_validate({**fields, **kw})


def _charge(server_round: int) -> LedgerEntry:
    return LedgerEntry(run_id="k1", server_round=server_round, noise_multiplier=1.0,
                       sample_rate=0.5, steps=4, delta=1e-5, epsilon_after=0.5 * server_round,
                       time="2026-12-01T00:00:00+00:00")  # fmt: skip


def test_consistent_logs_pass_all_five_checks() -> None:
    evaluation = {"message_type": "evaluate", "metric_keys": ["num-examples", "eval-loss"]}
    refusal = {"metric_keys": ["refused", "epsilon", "delta"], "note": "refused: budget"}
    no_arrays = {"arrays_sha256": None, "payload_bytes": 0}
    audit = [_audit(1), _audit(1, **evaluation, **no_arrays), _audit(2),
             _audit(3, **refusal, **no_arrays, epsilon=1.0)]  # fmt: skip
    assert check_audit(audit, [_charge(1), _charge(2)], ledger_epsilon=1.0) == []


def test_each_check_finds_its_violation() -> None:
    audit = [
        _audit(1),
        _audit(2, metric_keys=["num-examples", "raw-ecg"]),  # metric-keys
        _audit(3, payload_bytes=999),  # payload
        _audit(4, epsilon=0.1),  # epsilon decreases
        _audit(5, arrays_sha256=None, payload_bytes=0, metric_keys=[]),  # error, no note
    ]
    ledger = [_charge(1), _charge(2), _charge(3), _charge(4), _charge(9)]  # 9: no audit line
    found = check_audit(audit, ledger, ledger_epsilon=4.5)
    by_check = {c: [str(v) for v in found if v.check == c] for c in CHECKS}
    assert by_check["ledger"] == ["ledger: ledger: charge of run k1 round 9 has no audit line "
                                  "with an update"]  # fmt: skip
    assert by_check["metric-keys"] == ["metric-keys: audit line 2: train reply named key(s) "
                                       "not allowed: raw-ecg"]  # fmt: skip
    assert by_check["payload"] == ["payload: audit line 3: run k1: 999 bytes, earlier updates 100"]
    assert any("audit line 4" in v and "below" in v for v in by_check["epsilon"])
    assert any("differs from the ledger's 4.5" in v for v in by_check["epsilon"])
    assert by_check["notes"] == ["notes: audit line 5: train reply without arrays or metrics "
                                 "has no note (reason)"]  # fmt: skip
    assert check_audit([_audit(1)], [], ledger_epsilon=0.5)[0].check == "ledger"


def test_audit_check_cli_exits_1_and_tables_are_not_cut(tmp_path: Path) -> None:
    state = tmp_path / "state"
    log = AuditLog.at(state)
    long_key = "k" * 60
    log.append(_audit(1, run_key=long_key))
    log.append(_audit(2, run_key=long_key, metric_keys=["secret-value"]))
    done = subprocess.run([*BIOFP, "site", "audit", "--site-dir", str(state), "--check"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 1
    assert "metric-keys: FAILED (1)" in done.stdout and "secret-value" in done.stdout
    assert "ledger: FAILED (2)" in done.stdout  # no ledger at all
    env = {"COLUMNS": "80", "PATH": ""}
    table = subprocess.run([*BIOFP, "site", "audit", "--site-dir", str(state)],
                           capture_output=True, text=True, env=env)  # fmt: skip
    assert table.returncode == 0, table.stderr
    assert long_key in table.stdout and "…" not in table.stdout  # written to a pipe: never cut
    doc = json.loads(subprocess.run([*BIOFP, "site", "audit", "--site-dir", str(state), "--json"],
                                    capture_output=True, text=True).stdout)  # fmt: skip
    assert doc[0]["run_key"] == long_key and doc[0]["flower_run_id"] == 7


def test_old_audit_lines_with_run_id_still_read(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    old = _audit(1).model_dump()
    old["run_id"] = old.pop("run_key")
    del old["flower_run_id"]
    (state / "audit.jsonl").write_text(json.dumps(old) + "\n")
    (entry,) = AuditLog.at(state).entries()
    assert entry.run_key == "k1" and entry.run_id == "k1" and entry.flower_run_id is None


# ---- run report and server status ----------------------------------------------------------------


def _round(server_round: int, *, data: bool = True) -> RoundMetrics:
    sites = [
        SiteRound(node_id=11, name="north", status="ok", num_examples=3, epsilon=1.0,
                  data=SiteData(subjects=3, windows=18, hours=0.05) if data else None),
        SiteRound(node_id=22, status="missing", reason="no reply within round-timeout-s"),
    ]  # fmt: skip
    return RoundMetrics(server_round=server_round, sampled=2, contributed=1, failed=0, refused=0,
                        missing=1, bytes_received=10, wall_s=3.0, sites=sites)  # fmt: skip


def test_report_reads_old_files_and_summarises_site_data(tmp_path: Path) -> None:
    old = {"status": "running", "num_rounds": 2, "rounds": []}  # before run_key and names
    (tmp_path / "metrics.json").write_text(json.dumps(old))
    report = RunReport.read(tmp_path)
    assert report is not None and report.run_key is None and report.flower_run_ids == []
    report.rounds = [_round(1), _round(2)]
    summary = report.data_summary()
    assert (summary.sites, summary.subjects, summary.windows) == (1, 3, 18)  # latest, not summed
    assert summary.hours == pytest.approx(0.05)
    assert report.site_names() == {11: "north"}
    report.rounds = [_round(1, data=False)]
    assert report.data_summary().subjects == 0


def test_status_names_sites_and_maps_run_key_to_flower_run(tmp_path: Path) -> None:
    report = RunReport(num_rounds=2, run_key="abc", flower_run_ids=[5, 9], status="stopped",
                       error="stopped during the run (RunNotRunningException)",
                       rounds=[_round(1)])  # fmt: skip
    lines = render_status(report, tmp_path)
    assert lines[0].endswith("stopped (stopped during the run (RunNotRunningException))")
    assert lines[1].startswith("run key abc (the sites' ledgers and audit logs) = Flower run 5, 9")
    assert "  north (node 11): ok, ε 1.000" in lines
    assert any(line.startswith("  node-22 (node 22): missing: no reply") for line in lines)
    server = tmp_path / "server.toml"
    server.write_text('[superlink]\nworkdir = "runs"\n')
    (tmp_path / "runs" / "r").mkdir(parents=True)
    report.write(tmp_path / "runs" / "r")
    done = subprocess.run([*BIOFP, "server", "status", "--config", str(server), "--run", "r"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 1 and "Flower run 5, 9" in done.stdout
    done = subprocess.run([*BIOFP, "server", "status", "--config", str(server), "--run", "nope"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 1 and "no run report" in done.stderr.splitlines()[-1]


# ---- a site that never answers ------------------------------------------------------------------


def test_sites_that_never_answer_are_reported_with_a_reason(tmp_path: Path) -> None:
    """Flower's simulation engine, a round timeout shorter than any ClientApp needs: every site
    is recorded as missing, with the reason, and the run fails saying so (no silent hang)."""
    from server.rounds import FederationError
    from simulations.run import load_simulation_config, simulate

    run = {"model": "siamquality", "model-options": TINY_MODEL, "local-steps": 1,
           "batch-subjects": 2, "bag-size": 2, "num-rounds": 1, "round-timeout-s": 0.5}  # fmt: skip
    cfg = load_simulation_config(None, sites=2, synth_sites=2, synth_subjects_per_site=2,
                                 synth_minutes=0.5, cache_dir=tmp_path / "cache",
                                 out=tmp_path / "run", sites_dir=tmp_path / "sites",
                                 run=run)  # fmt: skip
    with pytest.raises(FederationError, match=r"2 missing\); node \d+: no reply within "
                       r"round-timeout-s = 0\.5 s: the site never trained this round"):  # fmt: skip
        simulate(cfg)
    report = RunReport.read(tmp_path / "run")
    assert report is not None and report.status == "failed"
    (rnd,) = report.rounds
    assert [s.status for s in rnd.sites] == ["missing", "missing"]
    assert all(s.reason and "round-timeout-s = 0.5 s" in s.reason for s in rnd.sites)
