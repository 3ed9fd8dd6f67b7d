"""The site's privacy ledger (Opacus RDP history on disk) and `biofp site ledger`."""

from __future__ import annotations

import fcntl
import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path
from subprocess import PIPE

import pytest
from fpkit import BIOFP, run_biofp
from opacus.accountants import RDPAccountant

from biofp_core.errors import PrivacyBudgetError
from biofp_core.privacy import accounting as ledger_module
from biofp_core.privacy.ledger import (
    LEDGER_FILENAME,
    LedgerSummary,
    PrivacyLedger,
    PrivacyLedgerError,
    initialise_site_state,
)
from biofp_core.site import PrivacyBudget

SIGMA, Q, STEPS, DELTA = 1.1, 0.05, 40, 1e-5


def init(state: Path) -> Path:
    """An initialised site state folder (idempotent)."""
    initialise_site_state(state, name="test")
    return state


def fresh_epsilon(history: list[tuple[float, float, int]], delta: float = DELTA) -> float:
    """ε of a new accountant stepped through the history one optimizer step at a time."""
    accountant = RDPAccountant()
    for sigma, q, steps in history:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(delta)


def charge_rounds(ledger: PrivacyLedger, run_id: str, rounds: range, **kw: float) -> list[float]:
    params = {"noise_multiplier": SIGMA, "sample_rate": Q, "steps": STEPS, "delta": DELTA, **kw}
    return [
        ledger.charge(run_id=run_id, server_round=r, **params).epsilon_after  # type: ignore[arg-type]
        for r in rounds
    ]


def test_epsilon_grows_per_round_and_matches_a_fresh_accountant(tmp_path: Path) -> None:
    ledger = PrivacyLedger.at(init(tmp_path))
    assert ledger.epsilon(delta=DELTA) == 0.0 and ledger.history == []
    eps = charge_rounds(ledger, "run-a", range(1, 4))
    assert 0 < eps[0] < eps[1] < eps[2]
    assert eps[0] == pytest.approx(fresh_epsilon([(SIGMA, Q, STEPS)]), rel=1e-9)
    assert eps[2] == pytest.approx(fresh_epsilon([(SIGMA, Q, 3 * STEPS)]), rel=1e-9)
    assert ledger.epsilon(delta=DELTA) == pytest.approx(eps[2], rel=1e-12)
    assert ledger.history == [(SIGMA, Q, STEPS)] * 3
    doc = json.loads((tmp_path / LEDGER_FILENAME).read_text())  # human-readable JSON on disk
    assert [e["server_round"] for e in doc["entries"]] == [1, 2, 3]
    assert doc["entries"][2]["epsilon_after"] == pytest.approx(eps[2])


def test_ledger_survives_a_new_process(tmp_path: Path) -> None:
    ledger = PrivacyLedger.at(init(tmp_path))
    charge_rounds(ledger, "run-a", range(1, 3))
    code = (
        "import sys; from pathlib import Path\n"
        "from biofp_core.privacy.ledger import PrivacyLedger\n"
        "book = PrivacyLedger.at(Path(sys.argv[1]))\n"
        "print(repr(book.epsilon(delta=1e-5)))\n"
        "e = book.charge(run_id='run-b', server_round=1, noise_multiplier=0.9,"
        " sample_rate=0.02, steps=25, delta=1e-5)\n"
        "print(repr(e.epsilon_after))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    before, after = (float(x) for x in res.stdout.split())
    assert before == ledger.epsilon(delta=DELTA)  # same history, same ε, to the last bit
    reopened = PrivacyLedger.at(init(tmp_path))  # the other process's charge is on disk
    assert len(reopened.entries) == 3 and reopened.epsilon(delta=DELTA) == after
    history = [(SIGMA, Q, STEPS)] * 2 + [(0.9, 0.02, 25)]
    assert after == pytest.approx(fresh_epsilon(history), rel=1e-9)


def test_runs_compose(tmp_path: Path) -> None:
    ledger = PrivacyLedger.at(init(tmp_path))
    after_a = charge_rounds(ledger, "run-a", range(1, 4))[-1]
    after_b = charge_rounds(ledger, "run-b", range(1, 3), sample_rate=0.1)[-1]
    assert after_b > after_a
    history = [(SIGMA, Q, STEPS)] * 3 + [(SIGMA, 0.1, STEPS)] * 2
    assert after_b == pytest.approx(fresh_epsilon(history), rel=1e-9)
    summary = ledger.summary(budget=PrivacyBudget(epsilon=50.0, delta=DELTA), site="north")
    assert summary.runs == ["run-a", "run-b"] and summary.entries == 5
    assert summary.epsilon == pytest.approx(after_b) and summary.site == "north"
    assert summary.budget_left == pytest.approx(50.0 - after_b) and not summary.exhausted


def test_a_site_round_evaluates_the_rdp_of_its_mechanism_once(tmp_path: Path) -> None:
    """Budget check, charge, exhausted flag and audit reuse one RDP evaluation of (σ, q); ε is
    still the WHOLE history's, equal to Opacus' accountant to the last bit."""
    one_step = ledger_module._one_step_rdp
    sigma, q = 1.37, 0.0731  # a (σ, q) no other test uses, so the process cache has not seen it
    budget = PrivacyBudget(epsilon=1e6, delta=DELTA)
    ledger = PrivacyLedger.at(init(tmp_path))
    charge_rounds(ledger, "old-run", range(1, 3))  # an earlier run with another mechanism
    misses = one_step.cache_info().misses
    mech = {"noise_multiplier": sigma, "sample_rate": q, "steps": 17}
    for rnd in (1, 2, 3):  # what client.task does each round
        planned = ledger.check_budget(budget=budget, mechanisms=[(sigma, q, 17)])
        entry = ledger.charge(
            run_id="new-run", server_round=rnd, delta=DELTA, budget=budget, **mech
        )
        ledger_module.rdp_epsilon([*ledger.history, (sigma, q, 17)], delta=DELTA)  # exhausted
        assert ledger.epsilon(delta=DELTA) == entry.epsilon_after == planned  # audit, report
    assert one_step.cache_info().misses == misses + 1  # one new (σ, q): one evaluation
    accountant = RDPAccountant()
    accountant.history = [(SIGMA, Q, 2 * STEPS), (sigma, q, 3 * 17)]
    assert entry.epsilon_after == accountant.get_epsilon(DELTA)  # bit-identical, not approx
    assert entry.epsilon_after == pytest.approx(
        fresh_epsilon([(SIGMA, Q, STEPS)] * 2 + [(sigma, q, 17)] * 3), rel=1e-9
    )


def test_replayed_round_is_not_charged_twice(tmp_path: Path) -> None:
    ledger = PrivacyLedger.at(init(tmp_path))
    first = ledger.charge(
        run_id="r", server_round=1, noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS, delta=DELTA
    )
    on_disk = (tmp_path / LEDGER_FILENAME).read_bytes()
    again = PrivacyLedger.at(
        init(tmp_path)
    ).charge(  # crash recovery: a new process replays round 1
        run_id="r", server_round=1, noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS, delta=DELTA
    )
    assert again == first and (tmp_path / LEDGER_FILENAME).read_bytes() == on_disk
    with pytest.raises(PrivacyLedgerError, match="already charged") as exc:
        ledger.charge(
            run_id="r", server_round=1, noise_multiplier=SIGMA, sample_rate=Q, steps=99, delta=DELTA
        )
    assert "\n" not in str(exc.value)
    assert PrivacyLedger.at(init(tmp_path)).history == [(SIGMA, Q, STEPS)]


def test_check_budget_refuses_the_round_that_would_exceed(tmp_path: Path) -> None:
    ledger = PrivacyLedger.at(init(tmp_path))
    spent = charge_rounds(ledger, "run-a", range(1, 3))[-1]
    nxt = {"noise_multiplier": SIGMA, "sample_rate": Q, "steps": STEPS}
    would = ledger_module.rdp_epsilon([*ledger.history, (SIGMA, Q, STEPS)], delta=DELTA)
    assert would > spent
    roomy = PrivacyBudget(epsilon=would + 0.01, delta=DELTA)
    assert ledger.check_budget(budget=roomy, mechanisms=[(SIGMA, Q, STEPS)]) == pytest.approx(
        would, rel=1e-12
    )
    tight = PrivacyBudget(epsilon=(spent + would) / 2, delta=DELTA)
    with pytest.raises(PrivacyBudgetError) as exc:
        ledger.check_budget(budget=tight, mechanisms=[(SIGMA, Q, STEPS)])
    msg = str(exc.value)
    assert "\n" not in msg and f"ε={tight.epsilon:g} would be exceeded" in msg
    assert f"reach {would:.4g}" in msg and f"spent {spent:.4g}" in msg
    with pytest.raises(PrivacyBudgetError):  # charge re-checks under the lock
        ledger.charge(run_id="run-a", server_round=3, **nxt, delta=DELTA, budget=tight)
    assert len(PrivacyLedger.at(init(tmp_path)).entries) == 2
    summary = ledger.summary(budget=PrivacyBudget(epsilon=spent, delta=DELTA))
    assert summary.exhausted and summary.budget_left == 0.0


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "",
        '{"format": "biofp-privacy-ledger", "version": 2, "accountant": "rdp", "site_id": "'
        + "0" * 32
        + '", "entries": [{"run_id": "r", "server_round": 1, "kind": "train", '
        '"noise_multiplier": -1.0, "sample_rate": 0.1, "steps": 5, "delta": 1e-5, '
        '"epsilon_after": 1.0, "time": "t"}]}',
        '{"format": "something-else", "entries": []}',
    ],
    ids=["bad-json", "empty", "sigma-negative", "wrong-format"],
)
def test_corrupt_ledger_is_an_error_and_left_untouched(tmp_path: Path, content: str) -> None:
    path = init(tmp_path) / LEDGER_FILENAME
    path.write_text(content)
    with pytest.raises(PrivacyLedgerError) as exc:
        PrivacyLedger.at(tmp_path)
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg and "corrupt" in msg
    assert path.read_text() == content


def test_release_composes_with_training(tmp_path: Path) -> None:
    ledger = PrivacyLedger.at(init(tmp_path))
    trained = charge_rounds(ledger, "run-a", range(1, 3))[-1]
    release = ledger.charge(
        run_id="run-a",
        server_round=2,  # same round as a training entry: a different key
        kind="release",
        noise_multiplier=4.0,
        sample_rate=1.0,
        steps=1,
        delta=DELTA,
    )
    assert release.epsilon_after > trained and len(ledger.entries) == 3
    history = [(SIGMA, Q, STEPS)] * 2 + [(4.0, 1.0, 1)]
    assert release.epsilon_after == pytest.approx(fresh_epsilon(history), rel=1e-9)


@pytest.mark.parametrize(
    "bad",
    [{"noise_multiplier": -1.0}, {"sample_rate": 0.0}, {"sample_rate": 1.5}, {"steps": 0}],
)
def test_what_cannot_be_charged_is_a_bug(tmp_path: Path, bad: dict[str, float]) -> None:
    params = {"noise_multiplier": SIGMA, "sample_rate": Q, "steps": STEPS, **bad}
    with pytest.raises(ValueError):
        PrivacyLedger.at(init(tmp_path)).charge(run_id="r", server_round=1, delta=DELTA, **params)  # type: ignore[arg-type]
    assert PrivacyLedger.at(tmp_path).entries == []


def test_writers_are_serialised_by_the_lock(tmp_path: Path) -> None:
    first, second = (
        PrivacyLedger.at(init(tmp_path)),
        PrivacyLedger.at(init(tmp_path)),
    )  # two "processes"
    charge_rounds(first, "run-a", range(1, 2))
    done = threading.Event()

    def charge_round_2() -> None:
        charge_rounds(second, "run-a", range(2, 3))  # `second` has not seen round 1 yet
        done.set()

    lock = tmp_path / f"{LEDGER_FILENAME}.lock"
    fd = os.open(lock, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    worker = threading.Thread(target=charge_round_2)
    try:
        worker.start()
        assert not done.wait(0.3)  # blocked while another writer holds the lock
    finally:
        os.close(fd)
    worker.join(timeout=30)
    assert done.is_set()
    assert [e.server_round for e in PrivacyLedger.at(init(tmp_path)).entries] == [1, 2]
    assert second.epsilon(delta=DELTA) == pytest.approx(fresh_epsilon([(SIGMA, Q, 2 * STEPS)]))


def run_cli(*argvs: list[str], cwd: Path) -> list[subprocess.CompletedProcess[str]]:
    """Run `biofp` once per argv, all at the same time (each start imports torch)."""
    env = {**os.environ, "COLUMNS": "160"}
    procs = [
        subprocess.Popen([*BIOFP, *argv], cwd=cwd, env=env, text=True, stdout=PIPE, stderr=PIPE)
        for argv in argvs
    ]
    done = []
    for argv, proc in zip(argvs, procs, strict=True):
        out, err = proc.communicate(timeout=120)
        done.append(subprocess.CompletedProcess([*BIOFP, *argv], proc.returncode, out, err))
    return done


def test_cli_ledger_prints_table_and_json(tmp_path: Path) -> None:
    state = tmp_path / "state"
    ledger = PrivacyLedger.at(init(state))
    charge_rounds(ledger, "run-a", range(1, 3))
    charge_rounds(ledger, "run-b", range(1, 2))
    spent = ledger.epsilon(delta=1e-6)
    cfg = tmp_path / "site.toml"
    cfg.write_text('name = "north"\ndata_dir = "data"\n[privacy]\nepsilon = 20.0\ndelta = 1e-6\n')
    cmd = ["site", "ledger", "--site-dir", str(state)]
    text, as_json = run_cli([*cmd, "--config", str(cfg)], [*cmd, "--json"], cwd=tmp_path)

    assert text.returncode == 0, text.stderr
    assert f"ε spent: {spent:.3f} at δ=1e-06" in text.stdout and "run-b" in text.stdout
    assert f"budget left: {20.0 - spent:.3f}" in text.stdout and "default" not in text.stdout

    assert as_json.returncode == 0, as_json.stderr
    doc = json.loads(as_json.stdout)
    assert doc["budget_from"] == "default" and doc["summary"]["budget_epsilon"] == 8.0
    assert doc["summary"]["epsilon"] == ledger.epsilon(delta=1e-5)
    assert doc["summary"]["runs"] == ["run-a", "run-b"] and len(doc["entries"]) == 3
    assert doc["entries"][2]["epsilon_after"] == ledger.entries[2].epsilon_after


def test_cli_ledger_without_ledger_and_with_a_corrupt_one(tmp_path: Path) -> None:
    code, _, err = run_biofp("site", "ledger", "--site-dir", str(tmp_path))
    assert code == 1 and "no privacy ledger here" in err and len(err.strip().splitlines()) == 1
    (tmp_path / LEDGER_FILENAME).write_text("{oops")
    code, _, err = run_biofp("site", "ledger", "--site-dir", str(tmp_path))
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1 and len(lines) == 1 and "corrupt privacy ledger" in lines[0]
    assert (tmp_path / LEDGER_FILENAME).read_text() == "{oops"


def test_an_unlimited_budget_round_trips_through_json() -> None:
    """inf is written as "Infinity" (pydantic's default null could not be read back)."""
    summary = LedgerSummary(
        site="north", entries=0, runs=[], epsilon=0.0, delta=1e-5, budget_epsilon=math.inf,
        budget_left=math.inf, exhausted=False,
    )  # fmt: skip
    text = summary.model_dump_json()
    assert '"budget_epsilon":"Infinity"' in text
    assert LedgerSummary.model_validate_json(text) == summary
