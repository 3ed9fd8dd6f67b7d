"""Health of a running SuperLink, for the server image's HEALTHCHECK.

``biofp server start --check`` cannot serve while the SuperLink runs (its port is taken by then),
so the container's health check runs the pre-start checks that still apply — CA and server
certificate valid, the key private and theirs, the certificate naming ``public_name``, the state
folders writable — and then a TLS handshake with the running SuperLink on this machine, verified
with the federation's CA under the name the sites dial: what a site's pre-start check sees.

    python -m biofp_cli.health --config /etc/biofp/server.toml    # exit 0 healthy, 1 with one line
"""

from __future__ import annotations

import argparse
import socket
import ssl
import sys
from pathlib import Path

from biofp_cli.preflight import check_server_tls, check_writable_dir
from biofp_core.deployment import DeploymentError, ServerConfig, load_server_config
from biofp_core.errors import BioFPError


def local_host(cfg: ServerConfig) -> str:
    """The address to reach the SuperLink from its own machine."""
    host = cfg.superlink.host
    return "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host


def check_serving(cfg: ServerConfig, *, timeout_s: float = 5.0) -> str:
    """TLS handshake with the running SuperLink, as a site makes it; returns what was checked."""
    host, port = local_host(cfg), cfg.superlink.port
    if cfg.tls is None:  # --insecure deployments: the port answers, nothing more to verify
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                return f"{host}:{port} accepts connections (no TLS)"
        except OSError as exc:
            raise DeploymentError(f"SuperLink {host}:{port}: not serving ({exc})") from None
    name = cfg.superlink.public_name or host
    context = ssl.create_default_context(cafile=str(cfg.tls.ca_cert))
    try:
        with (
            socket.create_connection((host, port), timeout=timeout_s) as raw,
            context.wrap_socket(raw, server_hostname=name),
        ):
            return f"{host}:{port} serves TLS trusted for {name}"
    except ssl.SSLError as exc:
        raise DeploymentError(
            f"SuperLink {host}:{port}: TLS as {name} fails ({exc.reason or exc})"
        ) from None
    except OSError as exc:
        raise DeploymentError(f"SuperLink {host}:{port}: not serving ({exc})") from None


def check_health(config_path: Path) -> str:
    """Every check of a running SuperLink; raises the first failure (one line)."""
    cfg = load_server_config(config_path)
    if cfg.tls is not None:
        check_server_tls(cfg)
    check_writable_dir(cfg.superlink.state_dir, what="SuperLink state folder")
    check_writable_dir(cfg.superlink.workdir, what="SuperLink working folder (run directories)")
    return check_serving(cfg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="health of a running SuperLink")
    parser.add_argument("--config", type=Path, required=True, help="server.toml")
    args = parser.parse_args(argv)
    try:
        print(f"healthy: {check_health(args.config)}")
    except BioFPError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
