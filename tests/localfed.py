"""A real federation on 127.0.0.1 for tests and benchmarks: SuperLink, SuperNodes, flwr CLI.

Everything runs as the coordinator and hospital IT would run it: ``biofp certs ...`` for keys,
``biofp server start`` / ``biofp client start`` as subprocesses (the same entry points as the
containers), Flower's own ``flwr supernode register`` and ``flwr run``. Ports are picked free;
every process tree started here is killed by :meth:`LocalFederation.close` (and by ``with``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fpkit import BIOFP

BIN = Path(sys.executable).parent
TINY_MODEL = {"width": 16, "heads": 2, "decoder_width": 16, "modality_depth": 1, "fusion_depth": 1}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    check: Callable[[], Any], *, timeout_s: float, what: str, poll_s: float = 0.2
) -> Any:
    """Poll `check` until it returns something truthy; fail the caller after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(poll_s)


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(ppid, start time, state) of a process, None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), int(fields[19]), fields[0]


def descendants(pid: int) -> list[tuple[int, int]]:
    """(pid, start time) of `pid` and every process below it (Flower detaches some children
    into new sessions, so process groups do not catch them all)."""
    tree: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            tree.setdefault(st[0], []).append((int(entry.name), st[1]))
    root = _stat(pid)
    out, todo = [], [(pid, root[1])] if root else []
    while todo:
        item = todo.pop()
        out.append(item)
        todo.extend(tree.get(item[0], []))
    return out


def _signal_if_same(pid: int, started: int, sig: int) -> bool:
    """Send `sig` only to the very process recorded (never to a reused pid); True if alive."""
    st = _stat(pid)
    if st is None or st[1] != started or st[2] == "Z":
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    return True


def kill_tree(
    proc: subprocess.Popen[bytes], *, sig: int = signal.SIGTERM, wait_s: float = 15
) -> None:
    """Signal a process and all its descendants; SIGKILL what is left after `wait_s`."""
    tree = descendants(proc.pid)
    for pid, started in tree:
        _signal_if_same(pid, started, sig)
    deadline = time.monotonic() + wait_s
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=wait_s)
    while time.monotonic() < deadline and any(_alive(pid, started) for pid, started in tree):
        time.sleep(0.1)
    for pid, started in tree:
        _signal_if_same(pid, started, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # its session: helpers orphaned before we looked
    if proc.poll() is None:
        proc.wait(timeout=5)


def _alive(pid: int, started: int) -> bool:
    st = _stat(pid)
    return st is not None and st[1] == started and st[2] != "Z"


@dataclass
class Site:
    """One hospital of the local federation."""

    name: str
    toml: Path
    state_dir: Path
    key: Path
    pub: Path


@dataclass
class LocalFederation:
    """Certificates, server.toml, sites and the processes of one local federation."""

    root: Path
    port: int
    server_toml: Path
    certs: Path
    flwr_home: Path
    sites: dict[str, Site] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    insecure: bool = False  # --insecure everywhere (no TLS, no node keys): a baseline only

    # ---- environment and commands -------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """Environment of the coordinator's flwr CLI (its own FLWR_HOME) and BioFP commands."""
        env = dict(os.environ)
        env.update(FLWR_HOME=str(self.flwr_home), FLWR_TELEMETRY_ENABLED="0",
                   FLWR_DISABLE_UPDATE_CHECK="1", COLUMNS="200", NO_COLOR="1")  # fmt: skip
        env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
        return env

    @property
    def workdir(self) -> Path:
        return self.root / "server" / "runs"

    def run(self, argv: list[str], *, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, env=self.env, capture_output=True, text=True,
                              timeout=timeout_s, cwd=self.root)  # fmt: skip

    def flwr(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        return self.run([str(BIN / "flwr"), *args], timeout_s=timeout_s)

    def start(self, argv: list[str], log_name: str) -> subprocess.Popen[bytes]:
        """A long-running process in its own session, logging to ``root/logs/<log_name>``."""
        logs = self.root / "logs"
        logs.mkdir(exist_ok=True)
        with open(logs / log_name, "ab") as log:
            proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=self.root,
                                    start_new_session=True)  # fmt: skip
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.root / "logs" / name
        return path.read_text(errors="replace") if path.exists() else ""

    # ---- coordinator --------------------------------------------------------------------------
    def start_server(self) -> subprocess.Popen[bytes]:
        """``biofp server start``; returns once its port accepts connections."""
        proc = self.start(
            [*BIOFP, "server", "start", "--config", str(self.server_toml), *self._insecure],
            "server.log",
        )
        wait_until(lambda: proc.poll() is not None or _accepts(self.port), timeout_s=60,
                   what="the SuperLink's port")  # fmt: skip
        if proc.poll() is not None:
            raise RuntimeError(f"biofp server start exited:\n{self.log('server.log')[-3000:]}")
        return proc

    def connect_cli(self) -> None:
        done = self.run(
            [*BIOFP, "server", "connect", "--config", str(self.server_toml), *self._insecure]
        )
        assert done.returncode == 0, done.stderr

    @property
    def _insecure(self) -> list[str]:
        return ["--insecure"] if self.insecure else []

    def register(self, site: Site) -> str:
        done = self.flwr("supernode", "register", str(site.pub), "biofp", "--format", "json")
        assert done.returncode == 0, done.stdout + done.stderr
        return str(json.loads(done.stdout[done.stdout.index("{") :])["node-id"])

    def nodes(self) -> list[dict[str, Any]]:
        done = self.flwr("supernode", "ls", "biofp", "--format", "json")
        if done.returncode != 0 or "{" not in done.stdout:
            return []
        return list(json.loads(done.stdout[done.stdout.index("{") :]).get("nodes", []))

    def online(self) -> int:
        return sum(n.get("status") == "online" for n in self.nodes())

    def submit(self, app_dir: Path, overrides: dict[str, Any]) -> str:
        """``flwr run APP biofp --run-config overrides.toml``; returns the run id."""
        path = self.root / f"overrides-{len(list(self.root.glob('overrides-*')))}.toml"
        path.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in overrides.items()))
        done = self.flwr("run", str(app_dir), "biofp", "--run-config", str(path), "--format",
                         "json", timeout_s=120)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        return str(json.loads(done.stdout[done.stdout.index("{") :])["run-id"])

    # ---- sites ----------------------------------------------------------------------------------
    def start_client(self, site: Site) -> subprocess.Popen[bytes]:
        return self.start([*BIOFP, "client", "start", "--config", str(site.toml), *self._insecure],
                          f"client-{site.name}.log")  # fmt: skip

    def close(self) -> None:
        """Stop every process started here (SIGTERM, then SIGKILL)."""
        for proc in reversed(self.procs):
            kill_tree(proc)
        self.procs.clear()

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return json.dumps(json.dumps(value))
    return json.dumps(value) if isinstance(value, str) else repr(value)


def write_app(fed: LocalFederation, app_dir: Path) -> Path:
    """``biofp server app``: a code-free Flower app folder naming BioFP's installed apps."""
    done = fed.run([*BIOFP, "server", "app", "--out", str(app_dir)])
    assert done.returncode == 0, done.stderr
    return app_dir


def site_cohort(
    root: Path, names: list[str], *, cache_dir: Path, subjects: int = 4, minutes: float = 1.0
) -> Any:
    """The SimulationConfig of small synthetic hospitals (`subjects` x `minutes` each)."""
    from simulations.run import SimulationConfig

    return SimulationConfig(synth_sites=len(names), synth_subjects_per_site=subjects,
                            synth_minutes=minutes, sites=len(names), cache_dir=cache_dir,
                            out=root / "sim", epsilon=50.0, reproducible_noise=False,
                            site_privacy={"min_train_subjects": 1})  # fmt: skip


def make_sites(root: Path, names: list[str], *, cache_dir: Path, **cohort: Any) -> list[Path]:
    """site.toml of small synthetic hospitals, window stores built."""
    from simulations.run import prepare_sites

    manifest = prepare_sites(site_cohort(root, names, cache_dir=cache_dir, **cohort))
    return [s.site_config for s in manifest.sites]


def make_federation(
    root: Path, sites: list[str], *, cache_dir: Path, insecure: bool = False, **cohort: Any
) -> LocalFederation:
    """CA + server certificate, server.toml, one key pair and site.toml per site (registered
    with nobody yet), the flwr CLI's connection. Nothing is started."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    certs = root / "server" / "certs"
    fed = LocalFederation(root=root, port=port, server_toml=root / "server" / "server.toml",
                          certs=certs, flwr_home=root / "coordinator-flwr",
                          insecure=insecure)  # fmt: skip
    done = fed.run([*BIOFP, "certs", "init", "--out", str(certs), "--server-name", "localhost"])
    assert done.returncode == 0, done.stderr
    fed.server_toml.write_text(
        f'[superlink]\nhost = "127.0.0.1"\nport = {port}\npublic_name = "localhost"\n'
        'state_dir = "state"\nworkdir = "runs"\n\n'
        '[tls]\nca_cert = "certs/ca.crt"\ncert = "certs/server.crt"\nkey = "certs/server.key"\n\n'
        "[auth]\nsupernode_auth = true\n"
    )
    for name, toml in zip(
        sites, make_sites(root, sites, cache_dir=cache_dir, **cohort), strict=True
    ):
        fed.sites[name] = add_site(fed, name, toml)
    fed.connect_cli()
    return fed


def add_site(fed: LocalFederation, name: str, toml: Path, *, ca_cert: Path | None = None) -> Site:
    """A key pair for `name` and a [federation] section in its site.toml."""
    keys = toml.parent / "federation"
    done = fed.run([*BIOFP, "certs", "node", "--out", str(keys), "--name", name, "--force"])
    assert done.returncode == 0, done.stderr
    ca = ca_cert or fed.certs / "ca.crt"
    text = toml.read_text().split("\n[federation]")[0]
    toml.write_text(
        text.rstrip() + f'\n\n[federation]\nsuperlink = "localhost:{fed.port}"\n'
        f'ca_cert = "{ca}"\nnode_key = "federation/{name}.key"\nruntime_port = {free_port()}\n'
    )
    return Site(name=name, toml=toml, state_dir=toml.parent / "state",
                key=keys / f"{name}.key", pub=keys / f"{name}.pub")  # fmt: skip


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
