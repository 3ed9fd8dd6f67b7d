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
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from biofp_cli.certs import load_node_key, ssh_fingerprint
from biofp_cli.preflight import check_site
from biofp_cli.superlink import flower_env, flower_executable, last_error
from biofp_cli.supervise import run_supervised
from biofp_core.deployment import DeploymentError, FederationConfig, derived_runtime_port
from biofp_core.protocol.keys import SITE_CONFIG_KEY
from biofp_core.site import SiteConfig, load_site_config

log = logging.getLogger(__name__)

_REFUSED = "Failed to activate SuperNode"  # Flower's log line when the SuperLink refuses the key


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
    config_path: Path, *, insecure: bool, allow_non_loopback: bool = False
) -> SuperNodeLaunch:
    """Parse and check site.toml; nothing is started.

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
        site, insecure=insecure, config_path=site_toml, allow_non_loopback=allow_non_loopback
    )
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


def _failure(launch: SuperNodeLaunch, returncode: int, tail: list[str]) -> DeploymentError:
    fed = launch.federation
    if any(_REFUSED in line for line in tail) and not launch.insecure:
        assert fed.node_key is not None
        fingerprint = ssh_fingerprint(load_node_key(fed.node_key).public_key())
        return DeploymentError(
            f"the SuperLink at {fed.superlink} refused this SuperNode: its key ({fingerprint}) "
            f"is not registered; send {fed.node_key.with_suffix('.pub')} to the coordinator "
            "(flwr supernode register)"
        )
    return DeploymentError(f"flower-supernode exited with status {returncode}: {last_error(tail)}")


def run_supernode(launch: SuperNodeLaunch) -> None:
    """Run the SuperNode until it is stopped (SIGTERM/SIGINT) or fails.

    Raises
    ------
    DeploymentError
        It exited on its own with a failure (e.g. its key is not registered).
    """
    log.info("starting: %s", " ".join(launch.argv))
    ended = run_supervised(launch.argv, env=launch.env, cwd=launch.site_toml.parent)
    if ended.returncode != 0 and not ended.stopped:
        raise _failure(launch, ended.returncode, ended.tail)
