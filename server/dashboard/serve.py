"""Starting the dashboard: safe bind checks, then uvicorn in the foreground or in a thread.

Loopback binds need nothing. Any other bind needs a token: given (``--token`` or
``BIOFP_DASHBOARD_TOKEN``) or made here (``--new-token``, printed once by the CLI); without one
the dashboard refuses to start.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from biofp_core.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8050
TOKEN_ENV = "BIOFP_DASHBOARD_TOKEN"


class DashboardError(ConfigError):
    """The dashboard cannot start as asked (unsafe bind, busy port, no run folder)."""


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or ``localhost``) only accepts local connections."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def new_token() -> str:
    """A fresh random token (32 bytes, URL-safe)."""
    return secrets.token_urlsafe(32)


@dataclass
class DashboardSettings:
    """A checked dashboard start."""

    roots: list[Path]
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    token: str | None = field(default=None, repr=False)

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    @property
    def url_with_token(self) -> str:
        return f"{self.url}?token={self.token}" if self.token else self.url


def check_settings(
    roots: list[Path], *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, token: str | None
) -> DashboardSettings:
    """Validate a start before anything binds.

    Raises
    ------
    DashboardError
        A non-loopback `host` without a token, a run folder that is not a folder, a busy port.
    """
    if not is_loopback(host) and not token:
        raise DashboardError(
            f"dashboard: binding {host} (not loopback) needs a token: pass --new-token to make "
            f"one, or --token / ${TOKEN_ENV}; or bind 127.0.0.1 and use an SSH tunnel"
        )
    for root in roots:
        if not root.is_dir():
            problem = "not a folder" if root.exists() else "no such folder"
            raise DashboardError(f"{root}: {problem} (--runs: a run directory or a folder of them)")
    settings = DashboardSettings(roots=list(roots), host=host, port=port, token=token or None)
    _check_port(settings)
    return settings


def _check_port(settings: DashboardSettings) -> None:
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((settings.host.strip("[]"), settings.port))
        except OSError as exc:
            raise DashboardError(
                f"dashboard: cannot listen on {settings.host}:{settings.port}: {exc.strerror}; "
                "choose another --port"
            ) from None


def _server(settings: DashboardSettings):  # -> uvicorn.Server
    import uvicorn

    from server.dashboard.app import create_app

    app = create_app(settings.roots, token=settings.token, loopback=settings.loopback)
    config = uvicorn.Config(
        app, host=settings.host.strip("[]"), port=settings.port, log_level="warning",
        access_log=False, server_header=False, lifespan="off",
    )  # fmt: skip
    return uvicorn.Server(config)


def serve(settings: DashboardSettings) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM)."""
    _server(settings).run()


class BackgroundDashboard:
    """The dashboard in a daemon thread, beside a run (``--dashboard`` of simulate/server)."""

    def __init__(self, settings: DashboardSettings) -> None:
        self.settings = settings
        self._server = _server(settings)
        self._thread = threading.Thread(target=self._server.run, name="dashboard", daemon=True)

    def start(self, timeout_s: float = 10.0) -> BackgroundDashboard:
        """Start serving; return once the socket listens."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started and self._thread.is_alive():
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if not self._server.started:
            raise DashboardError(
                f"dashboard: did not start on {self.settings.host}:{self.settings.port}"
            )
        log.info("dashboard at %s", self.settings.url)
        return self

    def wait(self, until: threading.Event | None = None) -> None:
        """Block until the server stops or `until` is set (Ctrl-C raises KeyboardInterrupt here)."""
        while self._thread.is_alive() and not (until is not None and until.is_set()):
            self._thread.join(0.5)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(5.0)


def start_background(roots: list[Path], *, port: int = DEFAULT_PORT) -> BackgroundDashboard:
    """The dashboard of `roots` on loopback, serving from a thread of this process."""
    for root in roots:
        root.mkdir(parents=True, exist_ok=True)
    return BackgroundDashboard(check_settings(roots, port=port, token=None)).start()
