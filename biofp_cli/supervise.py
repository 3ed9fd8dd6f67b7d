"""Run a long-lived command in the foreground: pass its log through, forward signals, keep a tail.

``biofp server start`` and ``biofp client start`` run the stock Flower SuperLink / SuperNode this
way rather than replacing themselves with it: they stay the parent (PID 1 in a container), pass
SIGTERM, SIGINT and SIGHUP on to it, echo its log, and when it fails they can turn the end of that
log into one clear line. The child runs in its own process group, so a terminal's Ctrl-C reaches
it once, through here; when it has exited, whatever it left in its group is ended too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TextIO

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@dataclass(frozen=True)
class Exited:
    """How the command ended: its exit status, the last lines of its log, and whether it was
    asked to stop (a forwarded signal) rather than failing on its own."""

    returncode: int
    tail: list[str]
    stopped: bool


def run_supervised(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path | None = None,
    on_start: Callable[[int], None] | None = None,
    on_line: Callable[[str], None] | None = None,
    out: TextIO | None = None,
    tail_lines: int = 40,
) -> Exited:
    """Run `argv` until it exits; returns its status and the tail of its combined output.

    Parameters
    ----------
    on_start
        Called with the child's pid once it runs.
    on_line
        Called with each line of the child's output (without its newline), as it comes.
    out
        Where the child's output is echoed (default: stderr).
    """
    out = out or sys.stderr
    child = subprocess.Popen(
        list(argv), env=dict(env), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, text=True, errors="replace", bufsize=1, process_group=0,
    )  # fmt: skip
    stopped = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopped
        stopped = True
        if child.poll() is None:
            child.send_signal(signum)

    tail: deque[str] = deque(maxlen=tail_lines)
    reader = threading.Thread(target=_echo, args=(child, out, tail, on_line), daemon=True)
    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        reader.start()
        if on_start is not None:
            on_start(child.pid)
        returncode = child.wait()
    finally:
        if child.poll() is None:  # we are leaving on an exception: do not orphan it
            child.terminate()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _end_group(child.pid)
        reader.join(timeout=2)  # a leftover holding the pipe must not keep us here
    return Exited(returncode=returncode, tail=list(tail), stopped=stopped)


def _echo(
    child: subprocess.Popen[str],
    out: TextIO,
    tail: deque[str],
    on_line: Callable[[str], None] | None,
) -> None:
    """Copy the child's output to `out`, keeping the last lines."""
    assert child.stdout is not None
    for line in child.stdout:
        out.write(line)
        out.flush()
        tail.append(line.rstrip("\n"))
        if on_line is not None:
            on_line(tail[-1])


def pause(seconds: float) -> bool:
    """Wait `seconds` between two runs; True if SIGTERM, SIGINT or SIGHUP came meanwhile (then
    return at once: as PID 1 in a container, a signal without a handler would be ignored)."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda _s, _f: stop.set()) for sig in FORWARDED}
    try:
        return stop.wait(seconds)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _end_group(pgid: int) -> None:
    """SIGTERM what is left of the child's process group (helpers it started and did not stop)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
