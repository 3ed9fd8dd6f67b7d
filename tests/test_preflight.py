"""Pre-start checks of `biofp server start` / `biofp client start`, and the Flower command lines.

Each bad input is one line, before anything starts: missing or expired certificates, a key file
group or others can read, an unreachable or untrusted SuperLink, an empty data directory.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import copy_records
from fpkit import BIOFP
from test_certs import write_expired_certificate

from biofp_cli.certs import CertificateError, init_certificates, node_keypair
from biofp_cli.preflight import (
    check_port_free,
    check_reachable,
    check_server,
    check_site,
    check_tls_handshake,
)
from biofp_cli.superlink import last_error, superlink_command
from biofp_cli.supernode import SITE_CONFIG_KEY, supernode_command
from biofp_core.deployment import DeploymentError, ServerConfig, load_server_config
from biofp_core.errors import BioFPError, ConfigError, DataError
from biofp_core.privacy.ledger import PrivacyLedgerError, initialise_site_state
from biofp_core.site import load_site_config


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    out = tmp_path / "certs"
    init_certificates(out, server_name="localhost")
    return out


def write_server_toml(folder: Path, certs: Path, *, port: int, extra: str = "") -> Path:
    path = folder / "server.toml"
    path.write_text(
        f'[superlink]\nhost = "127.0.0.1"\nport = {port}\npublic_name = "localhost"\n{extra}\n'
        f'[tls]\nca_cert = "{certs}/ca.crt"\ncert = "{certs}/server.crt"\n'
        f'key = "{certs}/server.key"\n'
    )
    return path


@pytest.fixture
def site_toml(tmp_path: Path, bidmc_dir: Path, certs: Path) -> Path:
    """A site with two BIDMC records and a [federation] section (keys beside the TOML)."""
    folder = tmp_path / "north"
    copy_records(bidmc_dir, folder / "data", ["bidmc01", "bidmc02"])
    node_keypair(folder / "federation", name="north")
    shutil.copy(certs / "ca.crt", folder / "federation" / "ca.crt")
    toml = folder / "site.toml"
    toml.write_text(
        'name = "north"\ndata_dir = "data"\nstate_dir = "state"\n\n'
        f'[federation]\nsuperlink = "localhost:{closed_port()}"\nca_cert = "federation/ca.crt"\n'
        'node_key = "federation/north.key"\nconnect_timeout_s = 2.0\n'
    )
    initialise_site_state(folder / "state", name="north")  # `biofp site init`, done once
    return toml


def with_superlink(toml: Path, address: str) -> None:
    text = toml.read_text()
    start = text.index("superlink = ")
    end = text.index("\n", start)
    toml.write_text(text[:start] + f'superlink = "{address}"' + text[end:])


@pytest.fixture
def tls_server(certs: Path) -> Iterator[int]:
    """A TLS server on 127.0.0.1 with the federation's server certificate (handshakes only)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs / "server.crt", certs / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


# ---- server ------------------------------------------------------------------------------------


def test_server_toml_resolves_paths_and_passes_checks(tmp_path: Path, certs: Path) -> None:
    path = write_server_toml(tmp_path, certs, port=closed_port(), extra='state_dir = "st"\n')
    cfg = load_server_config(path)
    assert cfg.superlink.state_dir == (tmp_path / "st").resolve()
    assert cfg.superlink.database_path == (tmp_path / "st" / "superlink.db").resolve()
    assert cfg.address == f"localhost:{cfg.superlink.port}"
    check_server(cfg, insecure=False)
    argv = superlink_command(cfg, insecure=False)
    assert argv[0].endswith("flower-superlink")
    for flag, value in [("--ssl-certfile", str(certs / "server.crt")),
                        ("--ssl-keyfile", str(certs / "server.key")),
                        ("--ssl-ca-certfile", str(certs / "ca.crt")),
                        ("--database", str(cfg.superlink.database_path)),
                        ("--port", str(cfg.superlink.port))]:  # fmt: skip
        assert argv[argv.index(flag) + 1] == value
    assert "--enable-supernode-auth" in argv and "--insecure" not in argv
    assert "--disable-runtime-dependency-installation" in argv
    insecure = superlink_command(cfg, insecure=True)
    assert "--insecure" in insecure and "--ssl-certfile" not in insecure
    assert "--enable-supernode-auth" not in insecure


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[superlink]\nport = "x"\n', "superlink.port"),
        ("[superlink]\nbogus = 1\n", "superlink.bogus"),
        ("[superlink\n", "invalid TOML"),
    ],
)
def test_bad_server_toml_is_one_line(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "server.toml"
    path.write_text(text)
    with pytest.raises(DeploymentError) as exc:
        load_server_config(path)
    assert needle in str(exc.value) and str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_server_checks_refuse_bad_certificates_and_keys(tmp_path: Path, certs: Path) -> None:
    cfg = load_server_config(write_server_toml(tmp_path, certs, port=closed_port()))
    (certs / "server.key").chmod(0o644)
    with pytest.raises(CertificateError, match="accessible by group or others"):
        check_server(cfg, insecure=False)
    (certs / "server.key").chmod(0o600)
    write_expired_certificate(certs, certs / "server.crt")
    with pytest.raises(CertificateError, match="server certificate expired on"):
        check_server(cfg, insecure=False)
    (certs / "ca.crt").unlink()
    with pytest.raises(CertificateError, match="CA certificate not found"):
        check_server(cfg, insecure=False)
    check_server(cfg, insecure=True)  # --insecure: no TLS files are read


def test_server_checks_refuse_another_name_a_foreign_key_and_a_busy_port(
    tmp_path: Path, certs: Path
) -> None:
    other = init_certificates(tmp_path / "other", server_name="localhost")
    cfg = load_server_config(write_server_toml(tmp_path, certs, port=closed_port()))
    assert cfg.tls is not None

    def changed(section: str, **update: object) -> ServerConfig:
        return cfg.model_copy(update={section: getattr(cfg, section).model_copy(update=update)})

    with pytest.raises(DeploymentError, match=r"not for public_name 'fl\.example\.org'"):
        check_server(changed("superlink", public_name="fl.example.org"), insecure=False)
    with pytest.raises(CertificateError, match="does not belong"):
        check_server(changed("tls", key=other.server_key), insecure=False)
    with pytest.raises(CertificateError, match="not signed by the CA"):
        check_server(changed("tls", ca_cert=other.ca_cert), insecure=False)
    with socket.create_server(("127.0.0.1", 0)) as busy:
        taken = busy.getsockname()[1]
        with pytest.raises(DeploymentError, match=f"cannot listen on 127.0.0.1:{taken}"):
            check_port_free("127.0.0.1", taken)
    no_tls = cfg.model_copy(update={"tls": None})
    with pytest.raises(DeploymentError, match="no tls section"):
        check_server(no_tls, insecure=False)


def test_server_start_with_expired_certificate_is_one_line(tmp_path: Path, certs: Path) -> None:
    write_expired_certificate(certs, certs / "server.crt")
    path = write_server_toml(tmp_path, certs, port=closed_port())
    done = subprocess.run([*BIOFP, "server", "start", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "expired on" in done.stderr
    assert "Traceback" not in done.stderr


# ---- site --------------------------------------------------------------------------------------


def test_federation_section_resolves_against_the_site_toml(site_toml: Path) -> None:
    site = load_site_config(site_toml)
    fed = site.federation
    assert fed is not None
    assert fed.ca_cert == site_toml.parent / "federation" / "ca.crt"
    assert fed.node_key == site_toml.parent / "federation" / "north.key"
    argv = supernode_command(fed, site_toml, insecure=False)
    assert argv[argv.index("--superlink") + 1] == fed.superlink
    assert argv[argv.index("--root-certificates") + 1] == str(fed.ca_cert)
    assert argv[argv.index("--auth-supernode-private-key") + 1] == str(fed.node_key)
    assert argv[argv.index("--host") + 1] == "127.0.0.1"  # no inbound port for the site
    insecure = supernode_command(fed, site_toml, insecure=True)
    assert "--insecure" in insecure and "--root-certificates" not in insecure
    assert "--auth-supernode-private-key" not in insecure


def test_node_config_carries_the_site_toml_path_as_flower_parses_it(tmp_path: Path) -> None:
    from flwr.common.config import parse_config_args

    from client.site_data import SITE_CONFIG_KEY as CLIENT_KEY

    assert SITE_CONFIG_KEY == CLIENT_KEY
    from biofp_core.deployment import FederationConfig

    fed = FederationConfig(superlink="localhost:9092")
    for path in (tmp_path / "a b" / "site.toml", tmp_path / "it's" / "site.toml"):
        argv = supernode_command(fed, path, insecure=True)
        node_config = argv[argv.index("--node-config") + 1]
        assert parse_config_args([node_config]) == {SITE_CONFIG_KEY: str(path)}


def test_site_without_federation_section_is_refused(site_toml: Path) -> None:
    site_toml.write_text(site_toml.read_text().split("\n[federation]")[0])
    with pytest.raises(DeploymentError, match="no federation section"):
        check_site(load_site_config(site_toml), insecure=False, config_path=site_toml)


def test_site_node_key_with_wrong_permissions_is_refused(site_toml: Path) -> None:
    key = site_toml.parent / "federation" / "north.key"
    key.chmod(0o640)
    with pytest.raises(CertificateError, match="chmod 600") as exc:
        check_site(load_site_config(site_toml), insecure=False)
    assert str(key) in str(exc.value)


def test_site_with_expired_or_missing_ca_is_refused(site_toml: Path, certs: Path) -> None:
    ca = site_toml.parent / "federation" / "ca.crt"
    write_expired_certificate(certs, ca)
    with pytest.raises(CertificateError, match="federation CA certificate expired on"):
        check_site(load_site_config(site_toml), insecure=False)
    ca.unlink()
    with pytest.raises(CertificateError, match="federation CA certificate not found"):
        check_site(load_site_config(site_toml), insecure=False)


def test_site_with_empty_data_directory_is_refused(site_toml: Path) -> None:
    for f in (site_toml.parent / "data").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="no records found"):
        check_site(load_site_config(site_toml), insecure=False)


def test_a_site_whose_state_folder_was_never_initialised_is_refused(site_toml: Path) -> None:
    """`biofp client start` never initialises a ledger (a moved data folder would get a fresh
    budget): the operator runs `biofp site init` once."""
    shutil.rmtree(site_toml.parent / "state")
    with pytest.raises(PrivacyLedgerError, match="is not initialised; run `biofp site init") as exc:
        check_site(load_site_config(site_toml), insecure=False)
    assert "\n" not in str(exc.value)


def test_unreachable_superlink_is_refused_quickly(site_toml: Path) -> None:
    with pytest.raises(DeploymentError, match="is unreachable") as exc:
        check_site(load_site_config(site_toml), insecure=False)
    assert "\n" not in str(exc.value)
    with pytest.raises(DeploymentError, match="unknown host"):
        check_reachable("no-such-host.invalid", 9092, timeout_s=2)


def test_tls_handshake_needs_the_federation_ca(
    tls_server: int, certs: Path, tmp_path: Path
) -> None:
    check_tls_handshake("localhost", tls_server, ca_cert=certs / "ca.crt", timeout_s=5)
    other = init_certificates(tmp_path / "other", server_name="localhost")
    with pytest.raises(DeploymentError, match="not trusted"):
        check_tls_handshake("localhost", tls_server, ca_cert=other.ca_cert, timeout_s=5)


def test_reachable_trusted_site_passes(site_toml: Path, tls_server: int) -> None:
    with_superlink(site_toml, f"localhost:{tls_server}")
    check_site(load_site_config(site_toml), insecure=False)


def test_a_serving_sites_health_check_wants_its_runtime_port_held(
    site_toml: Path, tls_server: int
) -> None:
    with_superlink(site_toml, f"localhost:{tls_server}")
    with socket.create_server(("127.0.0.1", 0)) as supernode:  # the SuperNode's runtime API
        port = supernode.getsockname()[1]
        site_toml.write_text(site_toml.read_text() + f"runtime_port = {port}\n")
        site = load_site_config(site_toml)
        with pytest.raises(DeploymentError, match=f"cannot listen on 127.0.0.1:{port}"):
            check_site(site, insecure=False)  # before a start: the port must be free
        assert check_site(site, insecure=False, serving=True) == (
            port, "held by the serving SuperNode"
        )  # fmt: skip
    with pytest.raises(DeploymentError) as exc:  # nothing serves any more
        check_site(site, insecure=False, serving=True)
    assert str(exc.value) == (
        f"nothing listens on 127.0.0.1:{port}, this site's SuperNode runtime API: "
        "`biofp client start` is not serving"
    )


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        ("empty-data", "no records found"),
        ("key-perms", "chmod 600"),
        ("unreachable", "is unreachable"),
    ],
)
def test_client_start_check_failures_are_one_line(
    site_toml: Path, damage: str, needle: str
) -> None:
    if damage == "empty-data":
        shutil.rmtree(site_toml.parent / "data")
        (site_toml.parent / "data").mkdir()
    elif damage == "key-perms":
        (site_toml.parent / "federation" / "north.key").chmod(0o644)
    done = subprocess.run([*BIOFP, "client", "start", "--check", "--config", str(site_toml)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and needle in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_last_error_finds_flowers_reason() -> None:
    tail = ["INFO : starting", "\x1b[91mERROR \x1b[0m: Exit Code: 305",
            "Failed to initialize the connection to the SuperLink.",
            "[code: 2004] Failed to activate SuperNode.", "INFO: Shutting down"]  # fmt: skip
    assert last_error(tail).startswith("ERROR : Exit Code: 305 Failed to initialize")
    assert last_error([]) == "no output"
    assert isinstance(DeploymentError("x"), BioFPError)


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('superlink = "no-port"', "federation.superlink"),
        ('superlink = "localhost:9092"\nbogus = 1', "federation.bogus"),
        ('superlink = "localhost:9092"\nruntime_port = 0', "federation.runtime_port"),
    ],
)
def test_bad_federation_section_is_one_line(site_toml: Path, line: str, needle: str) -> None:
    text = site_toml.read_text()
    start = text.index("superlink = ")
    site_toml.write_text(text[:start] + line + text[text.index("\n", start) :])
    with pytest.raises(ConfigError) as exc:
        load_site_config(site_toml)
    assert needle in str(exc.value) and "\n" not in str(exc.value)
