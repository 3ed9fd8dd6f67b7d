"""Checks before a SuperLink or SuperNode starts: each failure is one `BioFPError` line.

`check_server` and `check_site` run every check for ``biofp server start`` and ``biofp client
start``: certificates present, parseable and within their validity period; private keys readable
by their owner only and belonging to their certificate; the server certificate signed by the CA
and naming the address sites dial; the listening port free; for a site, records in its data
directory, a writable state folder, a reachable SuperLink whose TLS certificate the federation's
CA vouches for. ``insecure=True`` (the explicit ``--insecure``) skips what concerns TLS and keys.
Nothing here imports Flower.
"""

from __future__ import annotations

import logging
import socket
import ssl
from pathlib import Path

from biofp_cli.certs import (
    certificate_names,
    check_certificate,
    check_issued_by,
    check_key_matches,
    load_node_key,
    load_private_key,
)
from biofp_core.deployment import (
    DeploymentError,
    FederationConfig,
    ServerConfig,
    derived_runtime_port,
    is_loopback,
)
from biofp_core.site import SiteConfig

log = logging.getLogger(__name__)

RUNTIME_HOST = "127.0.0.1"  # the SuperNode's runtime API never listens elsewhere


def check_reachable(host: str, port: int, *, timeout_s: float) -> None:
    """Refuse an address no TCP connection can be opened to within `timeout_s`."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except socket.gaierror as exc:
        raise DeploymentError(f"SuperLink {host}:{port}: unknown host ({exc.strerror})") from None
    except TimeoutError:
        problem = f"no answer within {timeout_s:g} s"
    except OSError as exc:
        problem = exc.strerror or type(exc).__name__
    raise DeploymentError(
        f"SuperLink {host}:{port} is unreachable ({problem}); check federation.superlink "
        "and that the coordinator's firewall lets this site in"
    )


def check_tls_handshake(host: str, port: int, *, ca_cert: Path, timeout_s: float) -> None:
    """Refuse a server whose certificate the federation's CA does not vouch for, or that is
    issued for another name than `host` (what the SuperNode checks, without retrying forever)."""
    try:
        context = ssl.create_default_context(cafile=str(ca_cert))
    except ssl.SSLError as exc:
        raise DeploymentError(f"{ca_cert}: unusable CA certificate ({exc.reason})") from None
    try:
        with (
            socket.create_connection((host, port), timeout=timeout_s) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            return
    except ssl.SSLCertVerificationError as exc:
        reason = exc.verify_message or exc.reason or "verification failed"
        raise DeploymentError(
            f"SuperLink {host}:{port}: its TLS certificate is not trusted with {ca_cert} "
            f"({reason}); get the federation's ca.crt from the coordinator"
        ) from None
    except ssl.SSLError as exc:
        raise DeploymentError(
            f"SuperLink {host}:{port}: TLS handshake failed ({exc.reason or exc}); "
            "is it running with TLS (not --insecure)?"
        ) from None
    except OSError as exc:
        raise DeploymentError(
            f"SuperLink {host}:{port}: TLS handshake failed ({exc.strerror or exc})"
        ) from None


def check_port_free(host: str, port: int, *, key: str | None = None) -> None:
    """Refuse a listening address another process holds; `key` names the setting to change."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            hint = f"change {key}" if key else "is a SuperLink already running?"
            raise DeploymentError(
                f"cannot listen on {host}:{port} ({exc.strerror}): another process (another "
                f"SuperLink or site?) holds it; {hint}"
            ) from None


def port_is_free(host: str, port: int) -> bool:
    """True when `host`:`port` can be listened on now."""
    try:
        check_port_free(host, port)
    except DeploymentError:
        return False
    return True


def pick_free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free on `host` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def choose_runtime_port(site: SiteConfig, config_path: Path | None = None) -> tuple[int, str]:
    """(port, how it was chosen) of the SuperNode's runtime API on 127.0.0.1.

    A configured ``[federation] runtime_port`` must be free (else one line naming the key); the
    default is derived from the path of site.toml (`config_path`; else the state folder), so
    sites on one host differ, and when that
    port is taken another free port is chosen.
    """
    fed = site.federation
    assert fed is not None
    if fed.runtime_port is not None:
        where = (
            f"federation.runtime_port in {config_path}"
            if config_path
            else ("federation.runtime_port in site.toml")
        )
        check_port_free(RUNTIME_HOST, fed.runtime_port, key=where)
        return fed.runtime_port, "federation.runtime_port"
    derived = derived_runtime_port(config_path or site.resolved_state_dir())
    if port_is_free(RUNTIME_HOST, derived):
        return derived, "the default for this site.toml"
    chosen = pick_free_port(RUNTIME_HOST)
    log.warning("runtime port %d (derived) is taken; using %d", derived, chosen)
    return chosen, f"chosen free: {derived} was taken"


def serving_runtime_port(site: SiteConfig, config_path: Path | None = None) -> tuple[int, str]:
    """(port, how it was found) of a serving site's runtime API: the configured or derived port
    must be held, by its running SuperNode (the health check of a running site, where
    :func:`choose_runtime_port` would find it taken)."""
    fed = site.federation
    assert fed is not None
    port = fed.runtime_port
    if port is None:
        port = derived_runtime_port(config_path or site.resolved_state_dir())
    if port_is_free(RUNTIME_HOST, port):
        raise DeploymentError(
            f"nothing listens on {RUNTIME_HOST}:{port}, this site's SuperNode runtime API: "
            "`biofp client start` is not serving"
        )
    return port, "held by the serving SuperNode"


def check_insecure_address(host: str, *, what: str, allow_non_loopback: bool) -> None:
    """Refuse --insecure for a non-loopback `host` unless explicitly allowed."""
    if is_loopback(host) or allow_non_loopback:
        if not is_loopback(host):
            log.warning("--insecure-non-loopback: %s %s is reached WITHOUT TLS", what, host)
        return
    raise DeploymentError(
        f"--insecure is for a test on one machine: {what} {host} is not a loopback address "
        "(127.0.0.1, ::1, localhost); use TLS, or add --insecure-non-loopback if you really mean "
        "unencrypted traffic over a network"
    )


def check_writable_dir(path: Path, *, what: str) -> Path:
    """Create `path` if needed; refuse it when this user cannot write there."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".biofp-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise DeploymentError(f"{path}: {what} is not writable ({exc.strerror})") from None
    return path


def check_server_tls(cfg: ServerConfig) -> None:
    """CA and server certificate valid, the key private and theirs, the dialled name covered."""
    tls = cfg.tls
    if tls is None:
        raise DeploymentError(
            "server config has no tls section (ca_cert, cert, key; make them with "
            "biofp certs init); use --insecure only for a local test"
        )
    ca = check_certificate(tls.ca_cert, what="CA certificate")
    cert = check_certificate(tls.cert, what="server certificate")
    key = load_private_key(tls.key, what="server key")
    check_key_matches(cert, key, cert_path=tls.cert, key_path=tls.key)
    check_issued_by(cert, ca, cert_path=tls.cert, ca_path=tls.ca_cert)
    name = cfg.superlink.public_name
    names = certificate_names(cert)
    if name is not None and name not in names and f"*.{name.partition('.')[2]}" not in names:
        raise DeploymentError(
            f"{tls.cert}: issued for {', '.join(names) or 'no name'}, not for public_name "
            f"{name!r}; sites would refuse it (biofp certs server --server-name {name})"
        )


def check_log_file(path: Path, *, key: str) -> None:
    """Create the folder of a log file; refuse a log path that is a folder or not writable."""
    if path.is_dir():
        raise DeploymentError(f"{path}: {key} is a folder; give a file name, e.g. {path}/x.log")
    check_writable_dir(path.parent, what=f"folder of {key}")


def check_server(cfg: ServerConfig, *, insecure: bool, allow_non_loopback: bool = False) -> None:
    """Every check before ``biofp server start``; raises the first failure."""
    if insecure:
        check_insecure_address(
            cfg.superlink.host, what="superlink.host", allow_non_loopback=allow_non_loopback
        )
    else:
        check_server_tls(cfg)
        if not cfg.auth.supernode_auth:
            log.warning("SuperNode authentication is off: any SuperNode trusting the CA may join")
    check_writable_dir(cfg.superlink.state_dir, what="SuperLink state folder")
    check_writable_dir(cfg.superlink.database_path.parent, what="SuperLink database folder")
    check_writable_dir(cfg.superlink.workdir, what="SuperLink working folder (run directories)")
    if cfg.superlink.log_file is not None:
        check_log_file(cfg.superlink.log_file, key="superlink.log_file")
    check_port_free(cfg.superlink.host, cfg.superlink.port, key="superlink.port in server.toml")


def check_site_data(site: SiteConfig) -> int:
    """Number of records (files of the folder's format) in the site's data directory; refuses an
    empty or missing one."""
    from biofp_core.signals.formats import open_source  # raises DataError (one line)

    return len(open_source(site.data_dir, site.reader).items)


def check_federation_keys(fed: FederationConfig) -> None:
    """The CA certificate valid and the node key private, in Flower's format."""
    if fed.ca_cert is None:
        raise DeploymentError(
            "federation.ca_cert is not set: the federation's CA certificate (from the "
            "coordinator) is needed for TLS; use --insecure only for a local test"
        )
    if fed.node_key is None:
        raise DeploymentError(
            "federation.node_key is not set: make this site's key with "
            "biofp certs node --out DIR --name SITE and send the .pub file to the coordinator"
        )
    check_certificate(fed.ca_cert, what="federation CA certificate")
    load_node_key(fed.node_key)


def check_site_state(state_dir: Path) -> None:
    """A site's state folder is initialised (`biofp site init`, never implicitly) and its
    ledger verifies.

    Raises
    ------
    PrivacyLedgerError
        Not initialised, or the ledger is missing, edited or behind its marker, or the audit log
        contradicts it.
    """
    from biofp_core.privacy.ledger import PrivacyLedger

    PrivacyLedger.at(state_dir).verify()


def check_site(
    site: SiteConfig,
    *,
    insecure: bool,
    config_path: Path | None = None,
    allow_non_loopback: bool = False,
    serving: bool = False,
) -> tuple[int, str]:
    """Every check before ``biofp client start``; raises the first failure. ``serving``: the
    checks of a site that runs (its health check): its runtime API port must be held, not free.

    Returns
    -------
    tuple[int, str]
        The port of the SuperNode's runtime API on 127.0.0.1 and how it was chosen
        (:func:`choose_runtime_port`).
    """
    fed = site.federation
    if fed is None:
        where = config_path or "site config"
        raise DeploymentError(
            f"{where}: no federation section (superlink, ca_cert, node_key): this site does "
            "not know which federation to join"
        )
    if insecure:
        check_insecure_address(
            fed.host, what="federation.superlink", allow_non_loopback=allow_non_loopback
        )
    else:
        check_federation_keys(fed)
    check_site_data(site)
    check_writable_dir(site.resolved_state_dir(), what="site state folder (ledger, audit log)")
    check_site_state(site.resolved_state_dir())
    check_reachable(fed.host, fed.port, timeout_s=fed.connect_timeout_s)
    if not insecure and fed.ca_cert is not None:
        check_tls_handshake(
            fed.host, fed.port, ca_cert=fed.ca_cert, timeout_s=fed.connect_timeout_s
        )
    if serving:
        return serving_runtime_port(site, config_path)
    return choose_runtime_port(site, config_path)
