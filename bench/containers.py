"""The hospital containers, built and run as hospital IT and a coordinator would run them.

Used by ``bench/deployment.py --containers``. Builds both images with ``deploy/build-images.sh
--offline`` (buildah, vfs storage, chroot isolation, the Debian base of deploy/base-image.sh),
then runs them with ``buildah run --isolation chroot --network host`` (no daemon, no OCI runtime:
the host's network, so everything meets on 127.0.0.1):

- the server image runs its ENTRYPOINT + CMD (``biofp server start``, TLS + SuperNode auth), with
  its config folder read-only and its state on a volume; the flwr CLI *in that image* connects,
  registers the two sites' public keys and submits the run;
- each site's state is initialised in its container (``biofp site init``), then two site images
  run their ENTRYPOINT + CMD (``biofp client start``), each with its own
  read-only data folder, read-only config folder (site.toml, ca.crt, the node key owned by uid
  10001, mode 0600) and state volume; the run's rounds complete;
- each image's HEALTHCHECK command runs inside its running container: the server's must pass;
  the site's exit status and last line are recorded (see check_containers);
- each site's ledger and audit log, written inside its container, are read back from its volume
  with ``biofp site ledger`` / ``biofp site audit`` (rounds 1..R of the run, one charge each);
- the north container is killed (SIGKILL) and a new one started at once on the same volumes
  (the SuperLink refuses it until the old session expires; ``biofp client start`` retries): its
  ledger is unchanged, and a second run charges only that run's round (nothing of the first run
  again);
- bad input: a missing node key, a world-readable node key, a data folder without records, a
  SuperLink whose certificate names another host: each site container exits 1 with one line.

Every container is made with ``buildah from`` and removed at the end; images are kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from localfed import free_port, kill_tree, read_json, wait_until  # noqa: E402

SITE_IMAGE = "localhost/biofp-site:latest"
SERVER_IMAGE = "localhost/biofp-server:latest"
UID = 10001
BIOFP = [sys.executable, "-m", "biofp_cli"]  # the host's BioFP: keys, cohort, reading volumes


def buildah(*args: str, timeout_s: float = 600) -> subprocess.CompletedProcess[str]:
    argv = ["buildah", "--storage-driver", os.environ.get("STORAGE_DRIVER", "vfs"), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()[-2000:]}")
    return done


def image_config(image: str) -> dict[str, Any]:
    """The image's Docker-format config (Entrypoint, Cmd, User, Healthcheck, ExposedPorts...)."""
    doc = json.loads(buildah("inspect", "--type", "image", image).stdout)
    return dict(doc["Docker"]["config"])


def image_bytes(image: str) -> int:
    """Uncompressed size of an image (all its layers), as buildah reports it (e.g. "1.46 GB":
    decimal units, about four significant digits)."""
    (doc,) = [
        d for d in json.loads(buildah("images", "--json", image).stdout)
        if image in (d.get("names") or [])
    ]  # fmt: skip
    number, unit = str(doc["size"]).split()
    return round(float(number) * 1000 ** ["B", "kB", "MB", "GB", "TB"].index(unit))


# the file a "BioFP source change" edits (one comment line appended, restored after the build)
CHANGED_SOURCE = ROOT / "biofp_core" / "__init__.py"


def build_images(*, cold: bool, skip: bool = False) -> dict[str, float]:
    """Seconds for deploy/build-images.sh --offline, both images:

    - ``cold`` (with ``cold``): no BioFP image and no cached step; the base image and the
      wheelhouse's third-party wheels kept;
    - ``biofp-change``: after a BioFP source change (a comment line appended to one source file:
      BioFP's wheel changes, so both images rebuild their ``biofp`` stage and last layer);
    - ``biofp-revert``: the file restored, a BioFP change again (back to the sources as they are);
    - ``cached``: nothing changed since the build before.
    """
    out: dict[str, float] = {}
    if skip:
        return out
    script = [str(ROOT / "deploy" / "build-images.sh"), "--offline"]

    def timed(label: str) -> None:
        t0 = time.perf_counter()
        subprocess.run(script, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        out[f"build_{label}_s"] = time.perf_counter() - t0

    if cold:
        for image in (SITE_IMAGE, SERVER_IMAGE):
            with contextlib.suppress(RuntimeError):
                buildah("rmi", "--force", image)
        buildah("rmi", "--prune", "--force")  # intermediate (cache) images
        timed("cold")
    original = CHANGED_SOURCE.read_bytes()
    try:
        note = f"# bench/containers.py: a source change at {time.time():.0f}\n"
        CHANGED_SOURCE.write_bytes(original + note.encode())
        timed("biofp-change")
    finally:
        CHANGED_SOURCE.write_bytes(original)
    timed("biofp-revert")
    timed("cached")
    return out


@dataclass
class Container:
    """A working container of an image, run with ``buildah run`` like ``docker run`` would."""

    name: str
    image: str
    logs: Path
    proc: subprocess.Popen[bytes] | None = None
    mounts: list[str] = field(default_factory=list)
    created_s: float = 0.0

    def create(self) -> Container:
        with contextlib.suppress(RuntimeError):
            buildah("rm", self.name)
        t0 = time.perf_counter()
        buildah("from", "--pull=never", "--name", self.name, self.image)
        self.created_s = time.perf_counter() - t0
        return self

    def _run_argv(self, argv: list[str], mounts: list[str], env: dict[str, str]) -> list[str]:
        out = ["buildah", "--storage-driver", os.environ.get("STORAGE_DRIVER", "vfs"), "run",
               "--isolation", "chroot", "--network", "host"]  # fmt: skip
        for mount in mounts:
            out += ["--volume", mount]
        for key, value in env.items():
            out += ["--env", f"{key}={value}"]
        return [*out, self.name, "--", *argv]

    def entrypoint(self, args: list[str] | None = None) -> list[str]:
        """The image's ENTRYPOINT with `args`, or with its CMD (what ``docker run`` executes)."""
        cfg = image_config(self.image)
        return [*(cfg.get("Entrypoint") or []), *(args if args is not None else cfg["Cmd"])]

    def start(self, mounts: list[str], args: list[str] | None = None,
              log_name: str | None = None) -> subprocess.Popen[bytes]:  # fmt: skip
        """Start the image's entry point in the background; output goes to its log file."""
        self.mounts = mounts
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / (log_name or f"{self.name}.log"), "ab") as log:
            self.proc = subprocess.Popen(
                self._run_argv(self.entrypoint(args), mounts, {}), stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        return self.proc

    def run(self, argv: list[str], *, mounts: list[str] | None = None,
            env: dict[str, str] | None = None, timeout_s: float = 300,
            ) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """Run a command in the container (its mounts unless told), like ``docker exec``."""
        argv = self._run_argv(argv, self.mounts if mounts is None else mounts, env or {})
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)

    def log(self, name: str | None = None) -> str:
        path = self.logs / (name or f"{self.name}.log")
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None:
            kill_tree(self.proc)
            self.proc = None

    def kill(self) -> None:
        """SIGKILL every process of the container at once (``docker kill``, a power cut):
        nothing shuts down cleanly, and the SuperLink is not told the node left."""
        if self.proc is not None:
            kill_tree(self.proc, sig=signal.SIGKILL, wait_s=5)
            self.proc = None

    def remove(self) -> None:
        self.stop()
        with contextlib.suppress(RuntimeError):
            buildah("rm", self.name)


def healthcheck(ctr: Container) -> subprocess.CompletedProcess[str]:
    """The image's HEALTHCHECK command, run inside the running container (``docker`` runs it
    with exec; buildah has no exec: another ``buildah run`` on the same container and mounts)."""
    test = image_config(ctr.image)["Healthcheck"]["Test"]
    argv = ["/bin/sh", "-c", test[1]] if test[0] == "CMD-SHELL" else test[1:]
    return ctr.run(argv, timeout_s=120)


# ---- the hospital's and the coordinator's files ------------------------------------------------
def _own(path: Path, mode: int | None = None) -> None:
    os.chown(path, UID, UID)
    if mode is not None:
        path.chmod(mode)


def _host(argv: list[str]) -> str:
    done = subprocess.run([*BIOFP, *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


SERVER_TOML = """[superlink]
host = "127.0.0.1"
port = {port}
public_name = "{name}"
state_dir = "/var/lib/biofp-server/state"
workdir = "/var/lib/biofp-server/runs"

[tls]
ca_cert = "{certs}/ca.crt"
cert = "{certs}/server.crt"
key = "{certs}/server.key"

[auth]
supernode_auth = true
"""

SITE_TOML = """name = "{name}"
data_dir = "/data"
labels_csv = "/data/labels.csv"
state_dir = "/var/lib/biofp"
cache_dir = "/var/lib/biofp/cache"

[privacy]
epsilon = 50.0
delta = 1e-5

[federation]
superlink = "localhost:{port}"
ca_cert = "federation/ca.crt"
node_key = "federation/{name}.key"
runtime_port = {runtime_port}
"""


@dataclass
class Hospital:
    """One site's host folders: config (mounted read-only at /etc/biofp), data, state volume.

    The state volumes are mounted at /var/lib/biofp (/var/lib/biofp-server for the server), not
    on the paths the images declare as VOLUME: buildah 1.28's ``run`` mounts a private folder of
    its own there, which can end up over a ``-v`` for the same path.
    """

    name: str
    etc: Path
    data: Path
    state: Path

    @property
    def mounts(self) -> list[str]:
        return [
            f"{self.data}:/data:ro",
            f"{self.etc}:/etc/biofp:ro",
            f"{self.state}:/var/lib/biofp",
        ]


def server_files(root: Path, port: int) -> tuple[Path, Path]:
    """server/etc (server.toml, certs/ with the key owned by uid 10001) and server/state."""
    etc, state = root / "server" / "etc", root / "server" / "state"
    _host(["certs", "init", "--out", str(etc / "certs"), "--server-name", "localhost"])
    (etc / "server.toml").write_text(
        SERVER_TOML.format(port=port, name="localhost", certs="/etc/biofp/certs")
    )
    _own(etc / "certs" / "server.key", 0o600)
    (etc / "certs" / "ca.key").unlink()  # the CA key never goes into a container
    state.mkdir(parents=True)
    _own(state)
    return etc, state


def hospitals(root: Path, ca_cert: Path, port: int, names: list[str], *, subjects: int,
              minutes: float) -> list[Hospital]:  # fmt: skip
    """A synthetic cohort (one folder per site) and each site's key, site.toml and state."""
    cohort = root / "cohort"
    _host(["data", "synth", "--out", str(cohort), "--sites", str(len(names)),
           "--subjects-per-site", str(subjects), "--minutes", str(minutes),
           "--seed", "0"])  # fmt: skip
    out = []
    for i, name in enumerate(names):
        etc, state = root / name / "etc", root / name / "state"
        fed = etc / "federation"
        _host(["certs", "node", "--out", str(fed), "--name", name])
        shutil.copy(ca_cert, fed / "ca.crt")
        _own(fed / f"{name}.key", 0o600)
        (etc / "site.toml").write_text(
            SITE_TOML.format(name=name, port=port, runtime_port=free_port())
        )
        state.mkdir(parents=True)
        _own(state)
        out.append(Hospital(name=name, etc=etc, data=cohort / f"site_{i:02d}", state=state))
    return out


def run_toml(path: Path, overrides: dict[str, Any]) -> Path:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, dict):
            return json.dumps(json.dumps(v))
        return json.dumps(v) if isinstance(v, str) else repr(v)

    path.write_text("".join(f"{k} = {value(v)}\n" for k, v in overrides.items()))
    return path


# ---- the check ----------------------------------------------------------------------------------
def _json_tail(text: str) -> Any:
    return json.loads(text[text.index("{") :])


def _train_audit(state: Path, run_key: str) -> list[int]:
    from biofp_core.audit import AuditLog, AuditLogError

    try:
        entries = AuditLog.at(state).entries()
    except AuditLogError:  # a line being appended: look again
        return []
    return [e.server_round for e in entries
            if e.run_id == run_key and e.message_type.startswith("train")]  # fmt: skip


def _ledger(site: Hospital) -> list[dict[str, Any]]:
    """The site's ledger read back from its volume with ``biofp site ledger --json``."""
    doc = json.loads(_host(["site", "ledger", "--site-dir", str(site.state), "--json"]))
    return list(doc["entries"])


# what `buildah run` itself prints when the command fails (not the container's output)
_BUILDAH_EXIT = re.compile(r"^(subprocess exited with status \d+|Error: exit status \d+)$")


def _error_lines(log: str) -> list[str]:
    """The container's own log lines (buildah's exit-status lines, on the same stream, dropped)."""
    return [line for line in log.splitlines() if line.strip() and not _BUILDAH_EXIT.match(line)]


class Federation:
    """Server and site containers of one check; removes every container it made."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.containers: list[Container] = []

    def container(self, name: str, image: str) -> Container:
        ctr = Container(name=f"biofp-bench-{name}", image=image, logs=self.root / "logs")
        self.containers.append(ctr.create())
        return ctr

    def close(self) -> None:
        for ctr in reversed(self.containers):
            ctr.remove()


@contextlib.contextmanager
def federation(root: Path) -> Iterator[Federation]:
    fed = Federation(root)
    try:
        yield fed
    except BaseException:
        kept = Path(os.environ.get("TMPDIR", "/tmp")) / "biofp-containers-failed-logs"
        shutil.rmtree(kept, ignore_errors=True)
        shutil.copytree(root / "logs", kept, dirs_exist_ok=True)
        print(f"containers' logs kept in {kept}", file=sys.stderr)
        raise
    finally:
        fed.close()


def _wait_port(ctr: Container, port: int, what: str) -> None:
    import socket

    def up() -> bool:
        assert ctr.proc is not None
        if ctr.proc.poll() is not None:
            raise RuntimeError(f"{what} exited:\n{ctr.log()[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return True
        return False

    wait_until(up, timeout_s=180, what=what)


def _finished(run_dir: Path) -> dict | None:
    doc = read_json(run_dir / "metrics.json")
    if doc and doc.get("status") == "failed":
        raise RuntimeError(f"run failed: {doc.get('error')}")
    return doc if doc and doc.get("status") == "completed" else None


def check_containers(root: Path, run: dict[str, Any], *, subjects: int, minutes: float) -> dict:
    """Run the whole check; returns its figures and findings (raises on any failure)."""
    from server.rundir import read_run_key

    port = free_port()
    server_etc, server_state = server_files(root, port)
    names = ["north", "south"]
    sites = hospitals(root, server_etc / "certs" / "ca.crt", port, names, subjects=subjects,
                      minutes=minutes)  # fmt: skip
    inbox = root / "server" / "inbox"  # what the sites sent the coordinator, and the run config
    inbox.mkdir()
    for site in sites:
        shutil.copy(site.etc / "federation" / f"{site.name}.pub", inbox)
    run_toml(inbox / "run-1.toml", {**run, "out-dir": "containers-1"})
    run_toml(inbox / "run-2.toml", {**run, "num-rounds": 1, "out-dir": "containers-2"})
    found: dict[str, Any] = {"images": {}, "refusals": {}}
    for image in (SITE_IMAGE, SERVER_IMAGE):
        cfg = image_config(image)
        found["images"][image] = {
            "bytes": image_bytes(image), "user": cfg.get("User"),
            "exposed_ports": sorted(cfg.get("ExposedPorts") or {}),
            "healthcheck": cfg.get("Healthcheck", {}).get("Test"),
            "entrypoint": cfg.get("Entrypoint"), "cmd": cfg.get("Cmd"),
        }  # fmt: skip
    assert found["images"][SITE_IMAGE]["exposed_ports"] == [], "the site image exposes a port"
    assert all(i["user"] == str(UID) for i in found["images"].values())
    with federation(root) as fed:
        server = fed.container("server", SERVER_IMAGE)
        server_mounts = [f"{server_etc}:/etc/biofp:ro", f"{server_state}:/var/lib/biofp-server",
                         f"{inbox}:/inbox:ro"]  # fmt: skip
        t0 = time.perf_counter()
        server.start(server_mounts)
        _wait_port(server, port, "the server container")
        found["server_start_s"] = time.perf_counter() - t0
        found["server_create_s"] = server.created_s
        health = healthcheck(server)
        assert health.returncode == 0, health.stdout + health.stderr
        found["server_health"] = health.stdout.strip()

        def coordinator(*argv: str) -> str:  # the flwr CLI and biofp in the server image
            done = server.run(list(argv), timeout_s=180)
            assert done.returncode == 0, f"{argv}: {done.stdout}{done.stderr}"[-2000:]
            return done.stdout

        coordinator("biofp", "server", "connect", "--config", "/etc/biofp/server.toml")
        coordinator("biofp", "server", "app", "--out", "/var/lib/biofp-server/app")
        for site in sites:
            coordinator("flwr", "supernode", "register", f"/inbox/{site.name}.pub", "biofp")
        submitted = _json_tail(coordinator(
            "flwr", "run", "/var/lib/biofp-server/app", "biofp",
            "--run-config", "/inbox/run-1.toml", "--format", "json"))  # fmt: skip
        found["run_id"] = submitted.get("run-id")
        run_dir = server_state / "runs" / "containers-1"

        ctrs = {site.name: fed.container(site.name, SITE_IMAGE) for site in sites}
        found["site_create_s"] = {n: c.created_s for n, c in ctrs.items()}
        for site in sites:  # once per site, in its container: the ledger starts in the volume
            done = ctrs[site.name].run(
                ["biofp", "site", "init", "--config", "/etc/biofp/site.toml"], mounts=site.mounts
            )
            assert done.returncode == 0, (site.name, done.stdout + done.stderr)
        t0 = time.perf_counter()
        for site in sites:
            ctrs[site.name].start(site.mounts)
        first: dict[str, float] = {}

        def first_rounds() -> bool:
            key = read_run_key(run_dir)  # written once the ServerApp has its sites
            for site in sites:
                if key and site.name not in first and _train_audit(site.state, key):
                    first[site.name] = time.perf_counter() - t0
                proc = ctrs[site.name].proc
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"{site.name} exited:\n{ctrs[site.name].log()[-3000:]}")
            return len(first) == len(sites)

        wait_until(first_rounds, timeout_s=900, what="both sites' first round", poll_s=0.2)
        found["first_round_s"] = first
        run_key = read_run_key(run_dir)
        assert run_key is not None
        # recorded, not asserted: with [federation] runtime_port set (as here: two sites on the
        # host's network), the pre-start check finds that port held by the site's own running
        # SuperNode and fails (biofp_cli/preflight.choose_runtime_port)
        health = healthcheck(ctrs["north"])
        found["site_health"] = {
            "returncode": health.returncode,
            "lines": _error_lines(health.stdout + health.stderr)[-2:],
        }
        metrics = wait_until(lambda: _finished(run_dir), timeout_s=1800, what="the run",
                             poll_s=0.5)  # fmt: skip
        found["round_s"] = [float(r["wall_s"]) for r in metrics["rounds"]]
        assert all(r["contributed"] == 2 for r in metrics["rounds"]), metrics["rounds"]

        # the ledgers, written inside the containers, read back from their volumes
        before: dict[str, list[dict[str, Any]]] = {}
        for site in sites:
            entries = _ledger(site)
            charged = [e["server_round"] for e in entries if e["run_key"] == run_key]
            assert charged == list(range(1, run["num-rounds"] + 1)), (site.name, charged)
            assert _train_audit(site.state, run_key) == charged
            before[site.name] = entries
            owners = {p.stat().st_uid for p in site.state.rglob("*")}
            assert owners == {UID}, (site.name, owners)  # written by the container's user
        found["ledger_entries"] = {n: len(e) for n, e in before.items()}
        found["epsilon_after_run_1"] = {n: e[-1]["epsilon_after"] for n, e in before.items()}

        # north's container killed (SIGKILL) and a new one started at once on the same volumes:
        # the SuperLink still counts the old node online (Flower's heartbeat expiry) and refuses
        # the new SuperNode until then; `biofp client start` retries that refusal
        ctrs["north"].kill()
        ctrs["north"].remove()
        north = fed.container("north-2", SITE_IMAGE)
        t0 = time.perf_counter()
        north.start(sites[0].mounts)
        # accepted by the SuperLink (after its retries): a run submitted before that would send
        # north's message to the node the SuperLink still counts online, and north would miss it
        wait_until(lambda: "SuperNode ID:" in north.log(), timeout_s=300,
                   what="the new north container accepted by the SuperLink")  # fmt: skip
        found["north_replaced_accepted_s"] = time.perf_counter() - t0
        assert _ledger(sites[0]) == before["north"], "the ledger changed across the restart"
        coordinator("flwr", "run", "/var/lib/biofp-server/app", "biofp", "--run-config",
                    "/inbox/run-2.toml", "--format", "json")  # fmt: skip
        run2_dir = server_state / "runs" / "containers-2"
        run2 = wait_until(lambda: read_run_key(run2_dir), timeout_s=600, what="run 2's key")
        wait_until(lambda: _train_audit(sites[0].state, run2), timeout_s=900,
                   what="the new north container's first round", poll_s=0.2)  # fmt: skip
        found["north_replaced_first_round_s"] = time.perf_counter() - t0
        wait_until(lambda: _finished(run2_dir), timeout_s=1800, what="the second run", poll_s=0.5)
        found["north_restart_log"] = [  # retries while the SuperLink held the old session
            line for line in north.log().splitlines()
            if "previous session; retrying" in line or "reconnected to the SuperLink" in line
        ]  # fmt: skip
        again = [re.search(r"reconnected to the SuperLink (\d+) s", x)
                 for x in found["north_restart_log"]]  # fmt: skip
        found["north_reconnect_s"] = next((float(m.group(1)) for m in again if m), None)
        run2_key = read_run_key(run2_dir)
        after = _ledger(sites[0])
        assert after[: len(before["north"])] == before["north"]
        assert [(e["run_key"], e["server_round"]) for e in after[len(before["north"]) :]] == [
            (run2_key, 1)
        ], after
        assert after[-1]["epsilon_after"] > before["north"][-1]["epsilon_after"]
        found["epsilon_after_run_2"] = after[-1]["epsilon_after"]

        # bad input, each in a site container (south's, its runs stopped) against this server
        ctrs["south"].stop()
        south, site = ctrs["south"], sites[1]
        found["refusals"] = refusals(root, south, site)
        north.stop()
        server.stop()
        found["refusals"]["server certificate for another name"] = wrong_name(
            root, fed, south, site
        )
    return found


def _refused(ctr: Container, mounts: list[str], log_name: str, needle: str) -> list[str]:
    """Run the site image's entry point with `mounts`; it must exit 1 with one log line."""
    proc = ctr.start(mounts, log_name=log_name)
    code = proc.wait(timeout=300)
    ctr.proc = None
    lines = _error_lines(ctr.log(log_name))
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), (code, lines)
    assert needle in lines[0], (needle, lines)
    return lines


def refusals(root: Path, ctr: Container, site: Hospital) -> dict:
    """A missing key, a world-readable key, a data folder without records."""
    out = {}
    bad = root / "bad"
    no_key = bad / "no-key"
    shutil.copytree(site.etc, no_key)
    (no_key / "federation" / f"{site.name}.key").unlink()
    mounts = [f"{site.data}:/data:ro", f"{no_key}:/etc/biofp:ro", f"{site.state}:/var/lib/biofp"]
    out["node key missing"] = _refused(ctr, mounts, "refuse-no-key.log", "not found")

    readable = bad / "readable-key"
    shutil.copytree(site.etc, readable)
    key = readable / "federation" / f"{site.name}.key"
    _own(key, 0o644)
    mounts = [f"{site.data}:/data:ro", f"{readable}:/etc/biofp:ro", f"{site.state}:/var/lib/biofp"]
    out["node key world-readable"] = _refused(ctr, mounts, "refuse-readable-key.log", "chmod 600")

    empty = bad / "no-records"
    empty.mkdir()
    (empty / "labels.csv").write_text("subject,label\n")
    (empty / "notes.txt").write_text("exported the wrong folder\n")
    mounts = [f"{empty}:/data:ro", f"{site.etc}:/etc/biofp:ro", f"{site.state}:/var/lib/biofp"]
    out["data folder without records"] = _refused(
        ctr, mounts, "refuse-no-records.log", "no records found"
    )
    return out


def wrong_name(root: Path, fed: Federation, ctr: Container, site: Hospital) -> list[str]:
    """A SuperLink whose certificate (for fl.other.example, from a CA the site trusts) does not
    name the address the site dials (127.0.0.2, a loopback address outside the certificate;
    buildah run writes its own /etc/hosts, so no host name can be mapped): the site refuses it
    before starting its SuperNode."""
    alt = root / "bad" / "other-name"
    certs = alt / "certs"
    _host(["certs", "init", "--out", str(certs), "--server-name", "fl.other.example"])
    (certs / "ca.key").unlink()
    port = free_port()
    text = SERVER_TOML.format(port=port, name="fl.other.example", certs="/etc/biofp/certs")
    (alt / "server.toml").write_text(text.replace('host = "127.0.0.1"', 'host = "0.0.0.0"'))
    _own(certs / "server.key", 0o600)
    state = alt / "state"
    state.mkdir()
    _own(state)
    server = fed.containers[0]
    server.start(
        [f"{alt}:/etc/biofp:ro", f"{state}:/var/lib/biofp-server"], log_name="server-other.log"
    )
    _wait_port(server, port, "the other-name server")
    etc = alt / "site-etc"
    shutil.copytree(site.etc, etc)
    shutil.copy(certs / "ca.crt", etc / "federation" / "ca.crt")  # the CA the site trusts
    _own(etc / "federation" / f"{site.name}.key", 0o600)  # copies belong to root
    toml = etc / "site.toml"
    text = re.sub(r'superlink = "[^"]*"', f'superlink = "127.0.0.2:{port}"', toml.read_text())
    toml.write_text(text)
    mounts = [f"{site.data}:/data:ro", f"{etc}:/etc/biofp:ro", f"{site.state}:/var/lib/biofp"]
    try:
        return _refused(ctr, mounts, "refuse-other-name.log", "not trusted")
    finally:
        server.stop()
