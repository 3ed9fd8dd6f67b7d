"""From clone to model: the docs' two-hospital pilot, timed, as a new coordinator would run it.

.venv/bin/python bench/pilot.py [--keep DIR]

1. ``git clone`` of this checkout's committed HEAD into a fresh folder;
2. the install of docs/hospital-it.md "Install without Docker": a virtual environment, torch's
   CPU wheel first (``pip install torch==2.13.0``, resolved by this machine's pip configuration
   instead of the PyTorch CPU index the docs name), then ``pip install <clone>``;
3. every bash block of docs/coordinator.md "Pilot on one machine", in order, with that
   environment's ``bin/`` for ``/opt/biofp/bin`` and a free port for 9092 (as tests/test_pilot.py).

Prints the install, pilot and total wall times and the pilot's round times (from its
metrics.json), and writes bench/results/pilot.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_pilot import _stop, pilot_script  # noqa: E402  (the docs' blocks, as the test runs them)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(argv: list[str], **kw: object) -> None:
    subprocess.run(argv, check=True, **kw)  # type: ignore[call-overload]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep it")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="biofp-pilot-"))
    work.mkdir(parents=True, exist_ok=True)
    clone, venv, run = work / "biofp", work / "venv", work / "run"
    run.mkdir()

    t0 = time.monotonic()
    _run(["git", "clone", "-q", str(ROOT), str(clone)])
    _run([sys.executable, "-m", "venv", str(venv)])
    pip = [str(venv / "bin" / "pip"), "install", "-q"]
    _run([*pip, "torch==2.13.0"])
    _run([*pip, str(clone)])
    t1 = time.monotonic()

    script = pilot_script(_free_port()).replace("/opt/biofp/bin", str(venv / "bin"))
    env = {**os.environ, "FLWR_HOME": str(run / "flwr-home")}
    pids = [run / "pilot" / "coordinator" / "superlink.pid"]
    pids += [run / "pilot" / site / "supernode.pid" for site in ("north", "south")]
    try:
        with open(run / "pilot.out", "w") as out:
            done = subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], cwd=run,
                                  env=env, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    finally:
        _stop(pids)  # what a failed step left running
    t2 = time.monotonic()
    if done.returncode != 0:
        sys.exit(f"the pilot failed (exit {done.returncode}); see {run / 'pilot.out'}")

    metrics = json.loads(
        (run / "pilot" / "coordinator" / "runs" / "pilot" / "metrics.json").read_text()
    )
    rounds = [r["wall_s"] for r in metrics["rounds"]]
    install_s, pilot_s = t1 - t0, t2 - t1
    rows = [
        ("clone + install (venv, torch CPU wheel, pip install .)", f"{install_s:.0f} s", "-"),
        ("pilot (docs blocks: certs, server, 2 sites, 2 rounds, checks)", f"{pilot_s:.0f} s", "-"),
        ("clone to model", f"{install_s + pilot_s:.0f} s", "≤ 15 min"),
        ("round wall time, rounds 1 / 2", " / ".join(f"{s:.0f} s" for s in rounds), "-"),
    ]
    report("pilot", rows, {"install_s": install_s, "pilot_s": pilot_s,
                           "clone_to_model_s": install_s + pilot_s, "round_wall_s": rounds,
                           "status": metrics["status"]})  # fmt: skip
    print(f"work folder: {work}")


if __name__ == "__main__":
    main()
