"""A site restarted right after its stop: seconds until its SuperNode is accepted again.

.venv/bin/python bench/restart.py [--samples 3]

One SuperLink (TLS + SuperNode auth) and one site on 127.0.0.1, started with the same harness as
tests/test_deployment.py. Each sample stops the whole ``biofp client start`` tree and starts it
again at once, with the same site.toml, key and state folder:

- SIGTERM to ``biofp client start`` only (``docker stop`` signals PID 1), which passes it on
  once: Flower signs the SuperNode off; the new one is accepted at once. (SIGTERM to every
  process of the tree at once, as tests/localfed.py's kill_tree sends it, was measured once to
  leave the session held like a SIGKILL: 3 refused tries. Likely cause, from Flower's code: its
  handler resets SIGTERM to the default on the first signal, and the second one, passed on by
  biofp, ends the SuperNode before it signs off.)
- SIGKILL (``docker kill``, a crash), at a random moment 0-20 s after the site was accepted (the
  SuperNode's heartbeats come every 17.5-22.5 s): the SuperLink still counts the old session as
  online until 60 s after its last heartbeat, and ``biofp client start`` retries until then.

Figures: seconds from the stop to the new SuperNode's "SuperNode ID" line (accepted), and the
number of refused tries before it.
"""

from __future__ import annotations

import argparse
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from localfed import BIOFP, LocalFederation, kill_tree, make_federation, wait_until  # noqa: E402

RETRY = "previous session; retrying in"


def restart(
    fed: LocalFederation, proc: subprocess.Popen[bytes], sig: int, n: int
) -> tuple[float, int, subprocess.Popen[bytes]]:
    """Stop `proc` with `sig`, start the site again; (seconds to acceptance, refused tries, the
    new process)."""
    site = fed.sites["north"]
    log_name = f"client-{n}.log"
    if sig == signal.SIGTERM:  # as `docker stop` does: to the entry point (PID 1) only
        proc.send_signal(sig)
        proc.wait(timeout=60)
    kill_tree(proc, sig=sig)
    fed.procs.remove(proc)
    stopped = time.monotonic()
    new = fed.start([*BIOFP, "client", "start", "--config", str(site.toml)], log_name)
    wait_until(lambda: new.poll() is not None or "SuperNode ID" in fed.log(log_name),
               timeout_s=180, what="the site accepted again", poll_s=0.2)  # fmt: skip
    if new.poll() is not None:
        raise RuntimeError(f"biofp client start exited:\n{fed.log(log_name)[-3000:]}")
    return time.monotonic() - stopped, fed.log(log_name).count(RETRY), new


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=3, help="hard kills (default 3)")
    args = parser.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="biofp-restart-") as tmp:
        root = Path(tmp)
        with make_federation(root, ["north"], cache_dir=root / "cache", subjects=2,
                             minutes=0.5) as fed:  # fmt: skip
            fed.start_server()
            fed.register(fed.sites["north"])
            proc = fed.start_client(fed.sites["north"])
            wait_until(lambda: fed.online() == 1, timeout_s=120, what="the site online")
            term_s, term_tries, proc = restart(fed, proc, signal.SIGTERM, 0)
            hard: list[dict[str, float]] = []
            for n in range(1, args.samples + 1):
                after = rng.uniform(0, 20)
                time.sleep(after)
                seconds, tries, proc = restart(fed, proc, signal.SIGKILL, n)
                hard.append({"killed_after_s": after, "accepted_s": seconds, "refused": tries})
                print(f"SIGKILL {after:.1f} s after acceptance: accepted again after "
                      f"{seconds:.1f} s, {tries} refused tries", flush=True)  # fmt: skip
    accepted = [h["accepted_s"] for h in hard]
    rows = [
        ("SIGTERM -> accepted again (s)", f"{term_s:.1f}", f"at once ({term_tries} refused)"),
        ("SIGKILL -> accepted again, median (s)", f"{statistics.median(accepted):.1f}",
         "<= 60 s expiry + one retry"),
        ("SIGKILL -> accepted again, max (s)", f"{max(accepted):.1f}", ""),
        ("refused tries per SIGKILL restart", "/".join(str(h["refused"]) for h in hard), ""),
    ]  # fmt: skip
    report("restart", rows, {"sigterm_s": term_s, "sigterm_refused": term_tries, "sigkill": hard})


if __name__ == "__main__":
    main()
