"""Deployment configs (``server.toml``, the ``[federation]`` of ``site.toml``) and pre-start checks.

A coordinator describes the SuperLink in ``server.toml``; a hospital adds a ``[federation]``
section to its ``site.toml``. Both are parsed once, here, into pydantic models with relative paths
resolved against the TOML file (:mod:`biofp_cli.preflight` checks them before anything starts).
Nothing here imports Flower; :mod:`biofp_cli.superlink` and :mod:`biofp_cli.supernode` turn
these models into Flower command lines.

``server.toml``::

    [superlink]
    host = "0.0.0.0"                  # interface the SuperLink listens on
    port = 9092                       # one port: Fleet API (sites) and Control API (flwr CLI)
    public_name = "fl.example.org"    # the name sites dial; must be in the server certificate
    state_dir = "state"               # Flower's state database and app cache
    workdir = "runs"                  # where run directories (relative out-dir) are written

    [tls]
    ca_cert = "certs/ca.crt"
    cert = "certs/server.crt"
    key = "certs/server.key"          # mode 0600

    [auth]
    supernode_auth = true             # only registered SuperNode keys may connect

``site.toml``, in addition to the site's own settings::

    [federation]
    superlink = "fl.example.org:9092"
    ca_cert = "federation/ca.crt"     # the coordinator's CA certificate
    node_key = "federation/north.key" # this site's SuperNode key (biofp certs node), mode 0600
"""

from __future__ import annotations

import ipaddress
import zlib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from biofp_core.config import read_toml
from biofp_core.errors import BioFPError, first_error

DEFAULT_PORT = 9092
RUNTIME_PORT_BASE = 20000  # derived runtime ports: RUNTIME_PORT_BASE + hash(state folder) % SPAN
RUNTIME_PORT_SPAN = 10000
FEDERATION_PATH_KEYS = ("ca_cert", "node_key", "flower_home")
_SERVER_PATHS = {
    "superlink": ("state_dir", "workdir", "database", "log_file"),
    "tls": ("ca_cert", "cert", "key"),
}


class DeploymentError(BioFPError):
    """A deployment config, certificate, key or address is unusable; nothing was started."""


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) as (host, port)."""
    host, sep, port_text = address.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{address!r} is not host:port")
    return host, int(port_text)


def derived_runtime_port(site_toml: Path) -> int:
    """The default runtime port of a site: a stable function of its site.toml's path, so
    several sites on one host get distinct ports without configuring any (a collision is caught
    by the pre-start check, which then picks a free port)."""
    digest = zlib.crc32(str(Path(site_toml).expanduser().resolve()).encode())
    return RUNTIME_PORT_BASE + digest % RUNTIME_PORT_SPAN


LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


def is_loopback(host: str) -> bool:
    """True when `host` is a loopback address (127.0.0.0/8, ::1) or a loopback name.

    A name is not resolved: only ``localhost`` and its usual aliases count, so a name that
    DNS could later point elsewhere is never taken for loopback.
    """
    host = host.strip().strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class FederationConfig(BaseModel):
    """The ``[federation]`` section of a site.toml: how this site's SuperNode joins."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    superlink: str = Field(description="host:port of the coordinator's SuperLink")
    ca_cert: Path | None = Field(None, description="the federation's CA certificate (TLS)")
    node_key: Path | None = Field(None, description="this site's SuperNode private key")
    runtime_port: int | None = Field(
        None,
        gt=0,
        lt=65536,
        description="local port (127.0.0.1 only) of the SuperNode's runtime API; default: "
        "derived from the site.toml path (distinct per site), another free one if taken",
    )
    flower_home: Path | None = Field(None, description="Flower's app cache (default: state dir)")
    max_retries: int | None = Field(None, ge=0, description="reconnect attempts (None: forever)")
    max_wait_s: float | None = Field(None, gt=0, description="give up reconnecting after this")
    connect_timeout_s: float = Field(5.0, gt=0, description="pre-start reachability check")

    @field_validator("superlink")
    @classmethod
    def _host_port(cls, value: str) -> str:
        split_address(value)
        return value.strip()

    @property
    def host(self) -> str:
        return split_address(self.superlink)[0]

    @property
    def port(self) -> int:
        return split_address(self.superlink)[1]


class SuperLinkSection(BaseModel):
    """``[superlink]`` of server.toml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field("0.0.0.0", description="interface to listen on")
    port: int = Field(DEFAULT_PORT, gt=0, lt=65536, description="Fleet + Control API port")
    public_name: str | None = Field(None, description="name sites dial (in the certificate)")
    state_dir: Path = Field(Path("state"), description="state database and Flower app cache")
    database: Path | None = Field(None, description="default: <state_dir>/superlink.db")
    workdir: Path = Field(Path("runs"), description="working directory of the ServerApp")
    log_file: Path | None = Field(None, description="also write Flower's log here (rotated)")
    isolation: Literal["subprocess", "process"] = "subprocess"

    @property
    def database_path(self) -> Path:
        return self.database or self.state_dir / "superlink.db"

    @property
    def flower_home(self) -> Path:
        return self.state_dir / "flower"


class TLSSection(BaseModel):
    """``[tls]`` of server.toml: what ``biofp certs init`` wrote."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ca_cert: Path
    cert: Path
    key: Path


class AuthSection(BaseModel):
    """``[auth]`` of server.toml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    supernode_auth: bool = Field(True, description="only registered SuperNode keys connect")


class ServerConfig(BaseModel):
    """A coordinator's ``server.toml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    superlink: SuperLinkSection = SuperLinkSection()
    tls: TLSSection | None = None
    auth: AuthSection = AuthSection()

    @property
    def address(self) -> str:
        """The address sites and the flwr CLI dial (public name, else the listening host)."""
        host = self.superlink.public_name or self.superlink.host
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        return f"[{host}]:{self.superlink.port}" if ":" in host else f"{host}:{self.superlink.port}"


def _resolve(section: dict[str, Any], keys: tuple[str, ...], base: Path) -> None:
    for key in keys:
        if isinstance(section.get(key), str):
            section[key] = str((base / Path(section[key]).expanduser()).resolve())


def resolve_federation_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """A raw ``[federation]`` table with its paths made absolute against `base`."""
    out = dict(raw)
    _resolve(out, FEDERATION_PATH_KEYS, base)
    return out


def load_server_config(path: Path) -> ServerConfig:
    """Read ``server.toml``; relative paths are resolved against its folder."""
    path = Path(path)
    raw = read_toml(path, "server config", DeploymentError)
    for section, keys in _SERVER_PATHS.items():
        if isinstance(raw.get(section), dict):
            _resolve(raw[section], keys, path.parent.resolve())
    try:
        return ServerConfig.model_validate(raw)
    except ValidationError as exc:
        raise DeploymentError(f"{path}: {first_error(exc)}") from None
