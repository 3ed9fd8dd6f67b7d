"""``biofp server start``: check a coordinator's server.toml, then run the stock Flower SuperLink.

The SuperLink (Flower 1.41) serves one HTTPS port for the Fleet API (SuperNodes), the Control API
(``flwr run``, ``flwr supernode register``) and its local Runtime API. With TLS it gets
``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``; with ``[auth] supernode_auth`` it gets
``--enable-supernode-auth``, so only SuperNodes whose public key was registered with ``flwr
supernode register`` may connect. Its state (registered keys, runs) lives in a SQLite
``--database`` that survives restarts; ServerApps run in its working directory, so a relative
``out-dir`` lands in ``[superlink] workdir``. Runtime dependency installation is disabled (the
apps run with the installed BioFP) and Flower's telemetry and update check are off.

A ServerApp killed with its SuperLink resumes from its last checkpoint when the same run (same
``out-dir``) is submitted again with ``flwr run`` after ``biofp server start`` (server/rundir.py).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from biofp_cli.preflight import check_server
from biofp_cli.supervise import run_supervised
from biofp_core.deployment import DeploymentError, ServerConfig, load_server_config

log = logging.getLogger(__name__)

SUPERLINK_DATABASE_ENV = "BIOFP_SUPERLINK_DATABASE"  # = server.nodes.DATABASE_ENV
CONNECTION_NAME = "biofp"  # the flwr CLI's name for this federation's SuperLink
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def flower_executable(name: str) -> str:
    """A Flower console script, preferably the one installed beside this Python."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise DeploymentError(f"{name} not found: is flwr installed in this environment?")
    return found


def flower_env(flower_home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a Flower process: its home folder, no telemetry, no update check,
    and this Python's scripts first on PATH (Flower starts flower-superexec by name)."""
    env = dict(os.environ if base is None else base)
    env["FLWR_HOME"] = str(flower_home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def superlink_command(cfg: ServerConfig, *, insecure: bool) -> list[str]:
    """The flower-superlink command line for `cfg`."""
    link = cfg.superlink
    argv = [
        flower_executable("flower-superlink"),
        "--host", link.host, "--port", str(link.port),
        "--database", str(link.database_path),
        "--isolation", link.isolation,
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip
    if insecure:
        argv.append("--insecure")
    else:
        assert cfg.tls is not None, "check_server refuses a config without [tls]"
        argv += [
            "--ssl-ca-certfile", str(cfg.tls.ca_cert),
            "--ssl-certfile", str(cfg.tls.cert),
            "--ssl-keyfile", str(cfg.tls.key),
        ]  # fmt: skip
        if cfg.auth.supernode_auth:
            argv.append("--enable-supernode-auth")
    if link.log_file is not None:
        argv += ["--log-file", str(link.log_file)]
    return argv


@dataclass(frozen=True)
class SuperLinkLaunch:
    """A checked SuperLink start: the command, its environment and working directory."""

    config: ServerConfig
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    insecure: bool


def prepare_superlink(
    config_path: Path, *, insecure: bool, allow_non_loopback: bool = False
) -> SuperLinkLaunch:
    """Parse and check server.toml; nothing is started.

    Raises
    ------
    BioFPError
        One line: invalid config, missing/expired certificate, unsafe key, busy port...
    """
    cfg = load_server_config(config_path)
    check_server(cfg, insecure=insecure, allow_non_loopback=allow_non_loopback)
    env = flower_env(cfg.superlink.flower_home)
    env[SUPERLINK_DATABASE_ENV] = str(cfg.superlink.database_path)  # site names (server/nodes.py)
    return SuperLinkLaunch(
        config=cfg,
        argv=superlink_command(cfg, insecure=insecure),
        env=env,
        cwd=cfg.superlink.workdir,
        insecure=insecure,
    )


def last_error(tail: list[str]) -> str:
    """The most telling line of a Flower log tail (its last ERROR, else its last line)."""
    lines = [" ".join(_ANSI.sub("", line).split()) for line in tail]
    lines = [line for line in lines if line]
    errors = [i for i, line in enumerate(lines) if "ERROR" in line or "Error" in line]
    if errors:
        i = errors[-1]
        return " ".join(lines[i : i + 3])[:300]
    return lines[-1][:300] if lines else "no output"


def run_superlink(launch: SuperLinkLaunch) -> None:
    """Run the SuperLink until it is stopped (SIGTERM/SIGINT) or fails.

    Raises
    ------
    DeploymentError
        It exited on its own with a failure.
    """
    log.info("starting: %s", " ".join(launch.argv))
    ended = run_supervised(launch.argv, env=launch.env, cwd=launch.cwd)
    if ended.returncode != 0 and not ended.stopped:
        raise DeploymentError(
            f"flower-superlink exited with status {ended.returncode}: {last_error(ended.tail)}"
        )


def write_flwr_connection(
    cfg: ServerConfig, *, name: str = CONNECTION_NAME, insecure: bool = False, default: bool = False
) -> Path:
    """Add (or replace) ``[superlink.<name>]`` in the flwr CLI's config ($FLWR_HOME/config.toml),
    so that ``flwr run . <name>`` and ``flwr supernode register <key.pub> <name>`` reach it."""
    from flwr.cli.flower_config import (
        set_default_superlink_connection,
        write_superlink_connection,
    )
    from flwr.cli.typing import SuperLinkConnection
    from flwr.supercore.utils import get_flwr_home

    if not insecure and cfg.tls is None:
        raise DeploymentError("server config has no tls section; use --insecure for a test")
    connection = SuperLinkConnection(
        name=name,
        address=cfg.address,
        root_certificates=None if insecure else str(cfg.tls.ca_cert),  # type: ignore[union-attr]
        insecure=True if insecure else None,
    )
    write_superlink_connection(connection)
    if default:
        set_default_superlink_connection(name)
    return get_flwr_home() / "config.toml"
