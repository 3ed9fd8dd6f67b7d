"""The foreground runner of `biofp server start` / `biofp client start`: log, signals, leftovers."""

from __future__ import annotations

import io
import os
import signal
import sys
import time

from biofp_cli.supervise import pause, run_supervised

# prints two lines, leaves a grandchild holding the output pipe, exits 3
LEAVES_A_HELPER = """
import subprocess, sys
print("starting"); print("ERROR : it failed", flush=True)
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
sys.exit(3)
"""


def test_exit_status_tail_and_no_wait_for_leftovers() -> None:
    out = io.StringIO()
    started = time.monotonic()
    ended = run_supervised([sys.executable, "-c", LEAVES_A_HELPER], env=os.environ, out=out)
    assert time.monotonic() - started < 20  # the sleeping helper does not keep us waiting
    assert ended.returncode == 3 and not ended.stopped
    assert ended.tail == ["starting", "ERROR : it failed"]
    assert "ERROR : it failed" in out.getvalue()


def test_sigterm_is_forwarded_and_reported_as_a_stop() -> None:
    child = "import time\nprint('up', flush=True)\ntime.sleep(60)"
    before = signal.getsignal(signal.SIGTERM)
    started = time.monotonic()
    ended = run_supervised(
        [sys.executable, "-c", child],
        env=os.environ,
        out=io.StringIO(),
        on_start=lambda _pid: os.kill(os.getpid(), signal.SIGTERM),  # handlers are installed
    )
    assert time.monotonic() - started < 20
    assert ended.stopped and ended.returncode == -signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before  # our handler is gone again


def test_a_pause_between_runs_ends_at_a_stop_signal() -> None:
    """`biofp client start` waits between two tries of the SuperNode; as PID 1 of a container a
    SIGTERM without a handler would be ignored, so the pause returns on it."""
    import threading

    before = signal.getsignal(signal.SIGTERM)
    assert pause(0.05) is False  # no signal: the whole pause
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM))
    started = time.monotonic()
    timer.start()
    try:
        assert pause(60) is True
    finally:
        timer.cancel()
    assert time.monotonic() - started < 30  # not the whole minute
    assert signal.getsignal(signal.SIGTERM) is before
