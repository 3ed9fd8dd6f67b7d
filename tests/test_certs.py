"""Certificates and SuperNode keys: what `biofp certs` writes, and that Flower can read it."""

from __future__ import annotations

import stat
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fpkit import BIOFP

from biofp_cli.certs import (
    CertificateError,
    certificate_names,
    check_certificate,
    check_issued_by,
    check_key_matches,
    check_key_permissions,
    init_certificates,
    issue_server_certificate,
    load_certificate,
    load_node_key,
    load_private_key,
    node_keypair,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def write_expired_certificate(ca_dir: Path, out: Path) -> Path:
    """A server certificate signed by the CA in `ca_dir` that expired yesterday."""
    ca_key = load_private_key(ca_dir / "ca.key")
    ca = load_certificate(ca_dir / "ca.crt")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=30))
        .not_valid_after(now - timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    out.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = out.with_suffix(".key")
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return out


def test_init_writes_a_ca_and_a_server_certificate_for_the_name(tmp_path: Path) -> None:
    files = init_certificates(tmp_path, server_name="fl.example.org")
    assert mode(files.ca_key) == 0o600 and mode(files.server_key) == 0o600
    assert mode(files.ca_cert) == 0o644
    ca = check_certificate(files.ca_cert)
    cert = check_certificate(files.server_cert)
    assert certificate_names(cert) == ["fl.example.org", "localhost", "127.0.0.1", "::1"]
    check_issued_by(cert, ca, cert_path=files.server_cert, ca_path=files.ca_cert)
    key = load_private_key(files.server_key)
    check_key_matches(cert, key, cert_path=files.server_cert, key_path=files.server_key)
    with pytest.raises(CertificateError, match="does not belong"):
        check_key_matches(cert, load_private_key(files.ca_key), cert_path=files.server_cert,
                          key_path=files.ca_key)  # fmt: skip


def test_init_never_overwrites_without_force(tmp_path: Path) -> None:
    init_certificates(tmp_path, server_name="localhost")
    before = (tmp_path / "ca.crt").read_bytes()
    with pytest.raises(CertificateError, match="already exists"):
        init_certificates(tmp_path, server_name="localhost")
    assert (tmp_path / "ca.crt").read_bytes() == before
    init_certificates(tmp_path, server_name="localhost", force=True)
    assert (tmp_path / "ca.crt").read_bytes() != before


def test_server_certificate_rotation_keeps_the_ca(tmp_path: Path) -> None:
    files = init_certificates(tmp_path, server_name="old.example.org")
    ca_before = files.ca_cert.read_bytes()
    cert_path, key_path = issue_server_certificate(tmp_path, server_name="new.example.org")
    assert files.ca_cert.read_bytes() == ca_before
    cert = check_certificate(cert_path)
    assert certificate_names(cert)[0] == "new.example.org"
    check_issued_by(cert, load_certificate(files.ca_cert), cert_path=cert_path,
                    ca_path=files.ca_cert)  # fmt: skip
    assert mode(key_path) == 0o600


def test_bad_server_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match="not a host name"):
        init_certificates(tmp_path, server_name="no spaces/allowed")


def test_node_keys_are_what_flower_reads(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    pair = node_keypair(tmp_path, name="north")
    assert mode(pair.private_key) == 0o600
    assert pair.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert pair.public_key.read_text().rstrip().endswith("biofp-site:north")
    # as flower-supernode --auth-supernode-private-key loads it
    key = serialization.load_ssh_private_key(pair.private_key.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    # as flwr supernode register loads the public key: the same key
    assert try_load_public_key(pair.public_key) == public_key_to_bytes(key.public_key())
    assert pair.fingerprint.startswith("SHA256:") and len(pair.fingerprint) == 50
    assert load_node_key(pair.private_key).public_key().public_numbers() == (
        key.public_key().public_numbers()
    )


@pytest.mark.parametrize("name", ["", "../escape", "has space", "x" * 65])
def test_bad_site_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(CertificateError, match="not a valid site name"):
        node_keypair(tmp_path, name=name)


def test_expired_and_future_certificates_are_refused(tmp_path: Path) -> None:
    init_certificates(tmp_path, server_name="localhost")
    expired = write_expired_certificate(tmp_path, tmp_path / "old.crt")
    with pytest.raises(CertificateError, match="expired on") as exc:
        check_certificate(expired, what="server certificate")
    assert "\n" not in str(exc.value) and str(expired) in str(exc.value)
    later = datetime.now(UTC) - timedelta(days=1)
    with pytest.raises(CertificateError, match="not valid before"):
        check_certificate(tmp_path / "server.crt", now=later)
    with pytest.raises(CertificateError, match="not found"):
        check_certificate(tmp_path / "missing.crt")
    (tmp_path / "junk.crt").write_text("not a certificate")
    with pytest.raises(CertificateError, match="not a PEM certificate"):
        check_certificate(tmp_path / "junk.crt")


@pytest.mark.parametrize("bad_mode", [0o644, 0o640, 0o604, 0o660])
def test_key_readable_by_others_is_refused(tmp_path: Path, bad_mode: int) -> None:
    pair = node_keypair(tmp_path, name="north")
    pair.private_key.chmod(bad_mode)
    with pytest.raises(CertificateError, match="chmod 600") as exc:
        load_node_key(pair.private_key)
    assert f"{bad_mode:04o}" in str(exc.value)
    pair.private_key.chmod(0o400)
    check_key_permissions(pair.private_key)


def test_a_pem_key_is_not_a_supernode_key(tmp_path: Path) -> None:
    init_certificates(tmp_path, server_name="localhost")
    with pytest.raises(CertificateError, match="not an OpenSSH private key"):
        load_node_key(tmp_path / "server.key")


def test_certs_commands(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    done = subprocess.run([*BIOFP, "certs", "init", "--out", str(out), "--server-name", "fl.test"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    again = subprocess.run([*BIOFP, "certs", "init", "--out", str(out), "--server-name", "fl.test"],
                           capture_output=True, text=True)  # fmt: skip
    assert again.returncode == 1
    assert again.stderr.count("\n") == 1 and "already exists" in again.stderr
    node = subprocess.run([*BIOFP, "certs", "node", "--out", str(tmp_path / "keys"), "--name",
                           "south"], capture_output=True, text=True)  # fmt: skip
    assert node.returncode == 0 and "SHA256:" in node.stdout
    shown = subprocess.run([*BIOFP, "certs", "show", str(tmp_path / "keys" / "south.pub")],
                           capture_output=True, text=True)  # fmt: skip
    fingerprint = shown.stdout.split()[0]
    assert fingerprint in node.stdout
    cert = subprocess.run([*BIOFP, "certs", "show", str(out / "server.crt")],
                          capture_output=True, text=True)  # fmt: skip
    assert "fl.test, localhost, 127.0.0.1, ::1" in cert.stdout
