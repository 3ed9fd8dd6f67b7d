"""The docs' pilot on one machine, run exactly as written: docs/coordinator.md, "Pilot on one
machine".

Every ```bash block of that section is concatenated, in order, and run by bash with ``set -euo
pipefail`` in a fresh folder, with this environment's BioFP first on PATH, the flwr CLI's home in
that folder and another free port than 9092 (the only substitution). Nothing else is done
between the blocks: if the docs miss a step, this fails. Then the results are checked: a
completed 2-round run with both sites by name in metrics.json, the model card's data summary,
both ledgers charged twice and both audit logs passing the five checks.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from localfed import (
    BIN,
    LocalFederation,
    _alive,
    _signal_if_same,
    descendants,
    free_port,
    read_json,
    wait_until,
    write_app,
)

from biofp_core.artifacts import load_model
from biofp_core.audit import AuditLog
from biofp_core.audit_check import check_audit
from biofp_core.privacy.ledger import PrivacyLedger

DOC = Path(__file__).resolve().parents[1] / "docs" / "coordinator.md"
SECTION = "## Pilot on one machine"


def pilot_script(port: int) -> str:
    """The section's bash blocks, in order; the SuperLink port 9092 replaced by `port`."""
    text = DOC.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start : end if end > 0 else None]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    assert len(blocks) >= 5, "the pilot section lost its command blocks"
    return "\n".join(blocks).replace("9092", str(port))


def _stop(pid_files: list[Path]) -> None:
    """SIGTERM every process (tree) the script left running, by the pid files it wrote."""
    trees = []
    for pid_file in pid_files:
        if pid_file.exists() and pid_file.read_text().strip().isdigit():
            trees.append(descendants(int(pid_file.read_text())))
    for tree in trees:
        for pid, started in tree:
            _signal_if_same(pid, started, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_alive(p, s) for tree in trees for p, s in tree):
        time.sleep(0.2)
    for tree in trees:
        for pid, started in tree:
            _signal_if_same(pid, started, signal.SIGKILL)


def test_the_docs_pilot_runs_as_written(tmp_path: Path) -> None:
    port = free_port()
    script = "set -euo pipefail\n" + pilot_script(port)
    env = dict(os.environ)
    env.update(
        PATH=os.pathsep.join([str(BIN), env.get("PATH", "")]),
        FLWR_HOME=str(tmp_path / "flwr-home"),  # the coordinator's flwr CLI config
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        NO_COLOR="1",
    )
    pilot = tmp_path / "pilot"
    pid_files = [pilot / "coordinator" / "superlink.pid"]
    pid_files += [pilot / site / "supernode.pid" for site in ("north", "south")]
    started = time.monotonic()
    try:
        done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, text=True,
                              capture_output=True, timeout=540)  # fmt: skip
    finally:
        _stop(pid_files)
    wall_s = time.monotonic() - started
    logs = "".join(
        f"\n--- {p.relative_to(tmp_path)}\n{p.read_text(errors='replace')[-3000:]}"
        for p in sorted(pilot.glob("*/*.out"))
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:] + logs
    print(f"pilot wall time: {wall_s:.1f} s")

    # two sites with the default config got two different runtime ports, both printed
    printed = re.compile(r"runtime API \(ClientApps\) on 127\.0\.0\.1:(\d+)")
    checked = printed.findall(done.stderr)  # --check of north, then of south
    outs = [pilot / site / "supernode.out" for site in ("north", "south")]
    started = [printed.findall(out.read_text()) for out in outs]
    assert len(checked) == 2 and checked[0] != checked[1], done.stderr[-3000:]
    assert started == [[checked[0]], [checked[1]]]
    # the log folder of server.toml's log_file was created, and the SuperLink logs there
    assert (pilot / "coordinator" / "logs" / "superlink.log").stat().st_size > 0

    run_dir = pilot / "coordinator" / "runs" / "pilot"
    report = json.loads((run_dir / "metrics.json").read_text())
    assert report["status"] == "completed"
    assert [r["server_round"] for r in report["rounds"]] == [1, 2]
    for rnd in report["rounds"]:
        assert rnd["contributed"] == 2
        assert sorted(s["name"] for s in rnd["sites"]) == ["north", "south"]
    run_key = report["run_key"]
    assert run_key == json.loads((run_dir / "run.json").read_text())["run_key"]
    assert len(report["flower_run_ids"]) == 1
    flower_run = report["flower_run_ids"][0]
    assert f"run key {run_key}" in done.stdout and f"Flower run {flower_run}" in done.stdout

    _, card = load_model(run_dir / "model")
    assert card.training.rounds == 2 and card.data.sites == 2
    # the cohort: 2 sites x 4 subjects x 1 min; 1 subject per site held out; 10 s windows
    assert card.data.subjects == 6
    assert 6 * 3 <= card.data.windows <= 6 * 6
    assert abs(card.data.hours - card.data.windows * 10 / 3600) < 1e-3
    assert card.privacy is not None and sorted(card.privacy.sites) == ["north", "south"]

    assert done.stdout.count("all five checks passed") == 2, done.stdout[-3000:]
    for site in ("north", "south"):
        state = pilot / site / "state"
        charged = [e for e in PrivacyLedger.at(state).entries if e.run_id == run_key]
        assert [e.server_round for e in charged] == [1, 2]
        audit = AuditLog.at(state).entries()
        assert {e.flower_run_id for e in audit if e.run_key == run_key} == {flower_run}
        ledger = PrivacyLedger.at(state)
        assert check_audit(audit, ledger.entries, ledger_epsilon=ledger.epsilon(delta=1e-5)) == []


def test_flwr_stop_marks_the_run_stopped(tmp_path: Path) -> None:
    """A run waiting for sites that never come, stopped by the coordinator: metrics.json says
    "stopped" (it stayed "running" before)."""
    fed = LocalFederation(root=tmp_path, port=free_port(), server_toml=tmp_path / "server.toml",
                          certs=tmp_path / "certs", flwr_home=tmp_path / "flwr-home",
                          insecure=True)  # fmt: skip
    fed.server_toml.write_text(
        f'[superlink]\nhost = "127.0.0.1"\nport = {fed.port}\nstate_dir = "state"\n'
        'workdir = "runs"\n'
    )
    with fed:
        fed.start_server()
        fed.connect_cli()
        app = write_app(fed, tmp_path / "app")
        run_id = fed.submit(app, {"min-sites": 3, "wait-timeout-s": 600.0, "out-dir": "stopme"})
        metrics = tmp_path / "runs" / "stopme" / "metrics.json"  # server.toml workdir
        wait_until(lambda: (read_json(metrics) or {}).get("status") == "running", timeout_s=120,
                   what="the ServerApp waiting for sites")  # fmt: skip
        done = fed.flwr("stop", run_id, "biofp")
        assert done.returncode == 0, done.stdout + done.stderr
        report = wait_until(
            lambda: (r := read_json(metrics)) and r["status"] != "running" and r,
            timeout_s=60, what="metrics.json to leave running",
        )  # fmt: skip
    assert report["status"] == "stopped" and "flwr stop" in report["error"]
    assert report["flower_run_ids"] == [int(run_id)]
