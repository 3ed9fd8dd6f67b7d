"""``biofp client start``: check a site's site.toml, then run the stock Flower SuperNode.

The SuperNode dials the coordinator's SuperLink (``[federation] superlink``) over TLS, trusting
only the federation's CA (``--root-certificates``), and authenticates with the site's own EC key
(``--auth-supernode-private-key``, OpenSSH format, from ``biofp certs node``). It opens no
inbound port: its Runtime API listens on 127.0.0.1 only (``--host 127.0.0.1 --port
runtime_port``; by default a port derived from the path of site.toml, so that several sites
on one host never share one), for the ClientApp processes it starts. Its node config carries
the path of site.toml (``site-config``), from which the ClientApp finds the site's data, state
(privacy ledger, audit log) and budget (client/site_data.py). Flower's app cache lives in the
site's state folder; telemetry and the update check are off.

Before anything starts, every check of :func:`biofp_cli.preflight.check_site` runs, and the
site's window store is built (or found in the cache), so the first round does not pay for it.

A restart right after a hard stop (a container killed, a power cut) finds the SuperLink still
counting the previous session of this key as online: Flower 1.41 keeps a SuperNode online until
2 x 30 s after its last heartbeat (``HEARTBEAT_PATIENCE`` x ``HEARTBEAT_DEFAULT_INTERVAL``,
options of neither flower-supernode nor flower-superlink) and refuses to activate the key again
meanwhile. The SuperNode only sees "Failed to activate SuperNode" (code 2004), the same as for a
key never registered (only the SuperLink's log tells "could not be activated" from "No SuperNode
found"). So each acceptance is remembered in the state folder (``supernode-session.json``: the
SuperLink, the key's fingerprint, the node id), and a refused key accepted before is retried until
that session must have expired; a key never accepted is reported at once as not registered.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from math import ceil
from pathlib import Path

from pydantic import BaseModel, ValidationError

from biofp_cli.certs import load_node_key, ssh_fingerprint
from biofp_cli.preflight import check_site
from biofp_cli.superlink import flower_env, flower_executable, last_error
from biofp_cli.supervise import pause, run_supervised
from biofp_core.deployment import DeploymentError, FederationConfig, derived_runtime_port
from biofp_core.fsutil import atomic_write_text
from biofp_core.protocol.keys import SITE_CONFIG_KEY
from biofp_core.site import SiteConfig, load_site_config

log = logging.getLogger(__name__)

_REFUSED = "Failed to activate SuperNode"  # Flower's log line when the SuperLink refuses the key
_ACCEPTED = re.compile(r"SuperNode ID: (\d+)")  # Flower's log line once the SuperLink accepted it
SESSION_FILE = "supernode-session.json"
# flwr.common.constant HEARTBEAT_PATIENCE x HEARTBEAT_DEFAULT_INTERVAL (tests/test_deployment.py
# checks them): a SuperNode counts as online until this long after its last heartbeat
SESSION_EXPIRY_S = 2 * 30.0
_RETRY_MARGIN_S = 5.0
_BACKOFF_S = (2.0, 3.0, 5.0)  # then 5 s (each try also starts flower-supernode: seconds)


def _node_config(site_toml: Path) -> str:
    """``site-config='<path>'`` for --node-config (a TOML literal string when possible)."""
    path = str(site_toml)
    value = f"'{path}'" if "'" not in path else json.dumps(path)
    return f"{SITE_CONFIG_KEY}={value}"


def supernode_command(
    fed: FederationConfig, site_toml: Path, *, insecure: bool, runtime_port: int | None = None
) -> list[str]:
    """The flower-supernode command line for a site (`runtime_port`: default the configured
    one, else the one derived from the path of site.toml)."""
    if runtime_port is None:
        runtime_port = fed.runtime_port or derived_runtime_port(site_toml)
    argv = [
        flower_executable("flower-supernode"),
        "--superlink", fed.superlink,
        "--host", "127.0.0.1", "--port", str(runtime_port),
        "--isolation", "subprocess",
        "--node-config", _node_config(site_toml),
    ]  # fmt: skip
    if insecure:
        argv.append("--insecure")
    else:
        assert fed.ca_cert is not None and fed.node_key is not None, "checked by check_site"
        argv += ["--root-certificates", str(fed.ca_cert)]
        argv += ["--auth-supernode-private-key", str(fed.node_key)]
    if fed.max_retries is not None:
        argv += ["--max-retries", str(fed.max_retries)]
    if fed.max_wait_s is not None:
        argv += ["--max-wait-time", str(fed.max_wait_s)]
    return argv


@dataclass(frozen=True)
class SuperNodeLaunch:
    """A checked SuperNode start for one site."""

    site: SiteConfig
    site_toml: Path
    argv: list[str]
    env: dict[str, str]
    insecure: bool
    runtime_port: int
    runtime_port_source: str

    @property
    def federation(self) -> FederationConfig:
        assert self.site.federation is not None
        return self.site.federation


def prepare_supernode(
    config_path: Path, *, insecure: bool, allow_non_loopback: bool = False, serving: bool = False
) -> SuperNodeLaunch:
    """Parse and check site.toml; nothing is started (``serving``: the checks of a running site,
    whose runtime port its SuperNode holds).

    Raises
    ------
    BioFPError
        One line: no [federation], missing/expired CA certificate, unsafe or invalid node key,
        empty data directory, unreachable or untrusted SuperLink, runtime port taken,
        --insecure towards a non-loopback SuperLink...
    """
    site_toml = Path(config_path).expanduser().resolve()
    site = load_site_config(site_toml)
    port, source = check_site(
        site, insecure=insecure, config_path=site_toml, allow_non_loopback=allow_non_loopback,
        serving=serving,
    )  # fmt: skip
    fed = site.federation
    assert fed is not None
    home = fed.flower_home or site.resolved_state_dir() / "flower"
    return SuperNodeLaunch(
        site=site,
        site_toml=site_toml,
        argv=supernode_command(fed, site_toml, insecure=insecure, runtime_port=port),
        env=flower_env(home),
        insecure=insecure,
        runtime_port=port,
        runtime_port_source=source,
    )


def warm_store(launch: SuperNodeLaunch) -> int:
    """Build the site's window store now (or find it cached); returns its subject count. The
    state folder is never initialised here: `biofp site init` does it, once, explicitly."""
    from biofp_core.validate import open_site_store

    return len(open_site_store(launch.site).subjects())


class AcceptedSession(BaseModel):
    """The last time a SuperLink accepted this site's key (``supernode-session.json``)."""

    superlink: str
    key_fingerprint: str
    node_id: int
    accepted_at: str


def _session_path(launch: SuperNodeLaunch) -> Path:
    return launch.site.resolved_state_dir() / SESSION_FILE


def _fingerprint(launch: SuperNodeLaunch) -> str:
    fed = launch.federation
    assert fed.node_key is not None, "checked by check_site"
    return ssh_fingerprint(load_node_key(fed.node_key).public_key())


def accepted_before(launch: SuperNodeLaunch) -> AcceptedSession | None:
    """This SuperLink's last acceptance of this key, None if never (or not remembered)."""
    path = _session_path(launch)
    try:
        session = AcceptedSession.model_validate_json(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValidationError) as exc:
        log.warning("%s: unreadable, ignored (%s)", path, str(exc).splitlines()[0])
        return None
    same = (session.superlink, session.key_fingerprint) == (
        launch.federation.superlink,
        _fingerprint(launch),
    )
    return session if same else None


def _remember(launch: SuperNodeLaunch, node_id: int) -> None:
    session = AcceptedSession(
        superlink=launch.federation.superlink,
        key_fingerprint=_fingerprint(launch),
        node_id=node_id,
        accepted_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    atomic_write_text(_session_path(launch), session.model_dump_json(indent=1) + "\n")


def _not_registered(launch: SuperNodeLaunch) -> DeploymentError:
    fed = launch.federation
    assert fed.node_key is not None
    key = _fingerprint(launch)
    return DeploymentError(
        f"the SuperLink at {fed.superlink} refused this SuperNode: its key ({key}) "
        f"is not registered (never accepted from this site); send "
        f"{fed.node_key.with_suffix('.pub')} to the coordinator (flwr supernode register)"
    )


def _session_held(
    launch: SuperNodeLaunch, session: AcceptedSession, waited_s: float
) -> DeploymentError:
    return DeploymentError(
        f"the SuperLink at {launch.federation.superlink} still holds a session for this key "
        f"({session.key_fingerprint}, node {session.node_id}, accepted before) after "
        f"{waited_s:.0f} s of retries: another SuperNode with this key is still connected (an "
        "old container?), or the coordinator unregistered the key; `flwr supernode ls` on the "
        "coordinator shows which"
    )


def _failure(returncode: int, tail: list[str]) -> DeploymentError:
    return DeploymentError(f"flower-supernode exited with status {returncode}: {last_error(tail)}")


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _delays() -> Iterator[float]:
    yield from _BACKOFF_S
    while True:
        yield _BACKOFF_S[-1]


def run_supernode(
    launch: SuperNodeLaunch,
    *,
    retry_s: float = SESSION_EXPIRY_S + _RETRY_MARGIN_S,
    say: Callable[[str], None] = _say,
) -> None:
    """Run the SuperNode until it is stopped (SIGTERM/SIGINT) or fails.

    A refusal of a key this SuperLink accepted before (see the module's docstring) is retried,
    one line each, for up to `retry_s` from the first start (once at least).

    Raises
    ------
    DeploymentError
        It exited on its own with a failure: its key is not registered; the SuperLink still
        holds a session for it after `retry_s`; any other failure (the end of Flower's log).
    """
    log.info("starting: %s", " ".join(launch.argv))
    started = time.monotonic()
    delays = _delays()
    session = None if launch.insecure else accepted_before(launch)
    retried = False

    def on_line(line: str) -> None:
        if launch.insecure or not (match := _ACCEPTED.search(line)):
            return
        try:  # runs in the thread echoing Flower's log: it must not die here
            _remember(launch, int(match.group(1)))
        except OSError as exc:
            log.warning("%s: not written (%s): a restart would not know it", SESSION_FILE, exc)
        if retried:
            say(f"reconnected to the SuperLink {time.monotonic() - started:.0f} s after the start")

    while True:
        ended = run_supervised(
            launch.argv, env=launch.env, cwd=launch.site_toml.parent, on_line=on_line
        )
        if ended.returncode == 0 or ended.stopped:
            return
        if launch.insecure or not any(_REFUSED in line for line in ended.tail):
            raise _failure(ended.returncode, ended.tail)
        if session is None:
            raise _not_registered(launch)
        left = started + retry_s - time.monotonic()
        if left <= 0 and retried:  # one retry at least, however long the first try took
            raise _session_held(launch, session, time.monotonic() - started)
        delay = max(min(next(delays), left), 1.0)
        say(f"the SuperLink still sees this site's previous session; retrying in {ceil(delay)} s")
        retried = True
        if pause(delay):
            return
