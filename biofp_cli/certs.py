"""Certificates and keys of a deployment: make them, and check them before anything starts.

The coordinator runs a small private CA (`init_certificates`): it signs the SuperLink's TLS
certificate, and every site trusts it (its ``ca.crt`` is the SuperNode's root certificate). Each
site makes its own SuperNode key pair (`node_keypair`): an EC P-384 key in OpenSSH format, the
format Flower's SuperNode authentication reads (``flower-supernode
--auth-supernode-private-key``, ``flwr supernode register <key.pub>``). The private key never
leaves the site; only the ``.pub`` file goes to the coordinator.

Private keys are written with mode 0600 and refused when group or others can read them. Nothing
here imports Flower.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
import stat
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from biofp_core.errors import BioFPError
from biofp_core.fsutil import atomic_write_bytes

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")  # always in the server certificate's SANs
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_CA_KEY_USAGE = x509.KeyUsage(  # sign certificates and CRLs, nothing else
    digital_signature=True,
    key_cert_sign=True,
    crl_sign=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    encipher_only=False,
    decipher_only=False,
)


class CertificateError(BioFPError):
    """A certificate or key is missing, unreadable, expired, unsafe or does not fit."""


@dataclass(frozen=True)
class CertificateSet:
    """The files `init_certificates` writes."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKeyPair:
    """A SuperNode's key pair: the private key stays at the site, the public key is registered."""

    private_key: Path
    public_key: Path
    fingerprint: str  # SHA256:<base64>, as `ssh-keygen -lf` prints it


# ---- writing ------------------------------------------------------------------------------------


def _write_new(path: Path, data: bytes, *, mode: int, force: bool) -> None:
    """Write `data` to a new file with `mode` (a private key is never world-readable, not even
    briefly); an existing file is an error unless `force`."""
    if path.exists() and not force:
        raise CertificateError(f"{path}: already exists (use --force to replace it)")
    atomic_write_bytes(path, data, mode=mode)  # created 0600, then given `mode` before the rename


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _subject(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "BioFP federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    """DNS names and IP addresses (IPv4/IPv6 literals become IP entries)."""
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _check_server_name(name: str) -> str:
    name = name.strip().strip("[]")
    try:
        ipaddress.ip_address(name)
        return name
    except ValueError:
        pass
    labels = name.rstrip(".").split(".")
    if not name or not all(re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", p)
                           for p in labels):  # fmt: skip
        raise CertificateError(f"{name!r} is not a host name or IP address")
    return name


def _make_ca(*, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.now(UTC)
    name = _subject("BioFP federation CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    *,
    server_name: str,
    days: int,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.now(UTC)
    not_after = min(now + timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_subject(server_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(_san([server_name, *LOCAL_NAMES]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def init_certificates(
    out_dir: Path,
    *,
    server_name: str,
    ca_days: int = 3650,
    server_days: int = 397,
    force: bool = False,
) -> CertificateSet:
    """A new CA and a SuperLink certificate for `server_name` (+ localhost, 127.0.0.1, ::1).

    Raises
    ------
    CertificateError
        A file exists already (without `force`), or `server_name` is not a host name.
    """
    server_name = _check_server_name(server_name)
    out = Path(out_dir)
    files = CertificateSet(out / CA_CERT, out / CA_KEY, out / SERVER_CERT, out / SERVER_KEY)
    if not force:
        for path in (files.ca_cert, files.ca_key, files.server_cert, files.server_key):
            if path.exists():
                raise CertificateError(f"{path}: already exists (use --force to replace it)")
    ca_key, ca_cert = _make_ca(days=ca_days)
    _write_new(files.ca_key, _pem_private(ca_key), mode=0o600, force=True)
    _write_new(files.ca_cert, _pem_cert(ca_cert), mode=0o644, force=True)
    issue_server_certificate(out, server_name=server_name, days=server_days)
    return files


def issue_server_certificate(
    out_dir: Path, *, server_name: str, days: int = 397
) -> tuple[Path, Path]:
    """A new SuperLink key and certificate signed by the CA in `out_dir`, replacing the old ones
    (rotation: sites keep trusting the same CA, nothing changes for them).

    Returns
    -------
    tuple[Path, Path]
        (server.crt, server.key).
    """
    server_name = _check_server_name(server_name)
    out = Path(out_dir)
    ca_cert = check_certificate(out / CA_CERT, what="CA certificate")
    ca_key = load_private_key(out / CA_KEY, what="CA key")
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{out / CA_KEY}: not an EC key")
    check_key_matches(ca_cert, ca_key, cert_path=out / CA_CERT, key_path=out / CA_KEY)
    key, cert = _make_server_cert(ca_key, ca_cert, server_name=server_name, days=days)
    _write_new(out / SERVER_KEY, _pem_private(key), mode=0o600, force=True)
    _write_new(out / SERVER_CERT, _pem_cert(cert), mode=0o644, force=True)
    return out / SERVER_CERT, out / SERVER_KEY


def ssh_fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """``SHA256:...`` of an OpenSSH public key, as ``ssh-keygen -lf`` prints it."""
    blob = public_key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).split()[1]
    digest = hashlib.sha256(base64.b64decode(blob)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def check_site_name(name: str) -> str:
    """A site name usable in file names: letters, digits, '.', '_' and '-'."""
    if not _NAME.match(name):
        raise CertificateError(
            f"{name!r} is not a valid site name (letters, digits, '.', '_', '-'; up to 64)"
        )
    return name


def node_keypair(out_dir: Path, *, name: str, force: bool = False) -> NodeKeyPair:
    """A SuperNode key pair: ``<name>.key`` (OpenSSH EC P-384, 0600) and ``<name>.pub``.

    The public key carries `name` as its comment, so a coordinator sees whose key it registers.
    """
    name = check_site_name(name)
    out = Path(out_dir)
    private, public = out / f"{name}.key", out / f"{name}.pub"
    if not force:
        for path in (private, public):
            if path.exists():
                raise CertificateError(f"{path}: already exists (use --force to replace it)")
    key = ec.generate_private_key(ec.SECP384R1())
    private_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public_line = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write_new(private, private_bytes, mode=0o600, force=True)
    _write_new(public, public_line + f" biofp-site:{name}\n".encode(), mode=0o644, force=True)
    return NodeKeyPair(private, public, ssh_fingerprint(key.public_key()))


# ---- checking -----------------------------------------------------------------------------------


def _read(path: Path, what: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise CertificateError(f"{path}: {what} not found")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CertificateError(f"{path}: cannot read the {what} ({exc.strerror})") from None


def load_certificate(path: Path, *, what: str = "certificate") -> x509.Certificate:
    """The first PEM certificate in `path`."""
    try:
        return x509.load_pem_x509_certificate(_read(path, what))
    except ValueError:
        raise CertificateError(f"{path}: not a PEM certificate ({what})") from None


def check_certificate(
    path: Path, *, what: str = "certificate", now: datetime | None = None
) -> x509.Certificate:
    """The certificate at `path`, refused when missing, unreadable, expired or not yet valid."""
    cert = load_certificate(path, what=what)
    now = now or datetime.now(UTC)
    if now > cert.not_valid_after_utc:
        raise CertificateError(
            f"{path}: {what} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; "
            "issue a new one (biofp certs server / biofp certs init)"
        )
    if now < cert.not_valid_before_utc:
        raise CertificateError(
            f"{path}: {what} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} "
            "UTC (check this machine's clock)"
        )
    return cert


def check_key_permissions(path: Path, *, what: str = "private key") -> Path:
    """Refuse a key file that is missing, not a regular file, or readable by group or others."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CertificateError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise CertificateError(f"{path}: cannot stat the {what} ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise CertificateError(f"{path}: {what} is not a regular file")
    if st.st_mode & 0o077:
        mode = stat.S_IMODE(st.st_mode)
        raise CertificateError(
            f"{path}: {what} is accessible by group or others (mode {mode:04o}); "
            f"run: chmod 600 {path}"
        )
    return path


def load_private_key(path: Path, *, what: str = "private key") -> object:
    """A PEM (PKCS#8/SEC1) or OpenSSH private key, after the permission check."""
    data = _read(check_key_permissions(path, what=what), what)
    loaders = (
        (serialization.load_ssh_private_key if b"OPENSSH PRIVATE KEY" in data else None),
        serialization.load_pem_private_key,
    )
    for loader in loaders:
        if loader is None:
            continue
        try:
            return loader(data, None)
        except TypeError:
            raise CertificateError(
                f"{path}: {what} is encrypted; BioFP needs it unencrypted, protected by mode 0600"
            ) from None
        except (ValueError, UnsupportedAlgorithm):
            continue
    raise CertificateError(f"{path}: not a readable {what}")


def check_key_matches(
    cert: x509.Certificate, key: object, *, cert_path: Path, key_path: Path
) -> None:
    """Refuse a key that does not belong to the certificate."""
    public = getattr(key, "public_key", None)
    if public is None or public().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise CertificateError(f"{key_path}: this key does not belong to {cert_path}")


def check_issued_by(
    cert: x509.Certificate, ca: x509.Certificate, *, cert_path: Path, ca_path: Path
) -> None:
    """Refuse a certificate that the CA at `ca_path` did not sign."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise CertificateError(f"{cert_path}: not signed by the CA in {ca_path}") from None


def certificate_names(cert: x509.Certificate) -> list[str]:
    """DNS names and IP addresses in the certificate's subject alternative names."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]  # fmt: skip


def load_node_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """A SuperNode private key as Flower reads it: OpenSSH format, NIST EC curve, mode 0600."""
    data = _read(check_key_permissions(path, what="SuperNode key"), "SuperNode key")
    try:
        key = serialization.load_ssh_private_key(data, None)
    except TypeError:
        raise CertificateError(
            f"{path}: SuperNode key is encrypted; Flower needs it unencrypted"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise CertificateError(
            f"{path}: not an OpenSSH private key (make one with: biofp certs node)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{path}: SuperNode key must be an EC (NIST P-256/384/521) key")
    return key


def load_node_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """A SuperNode public key file (OpenSSH ``ecdsa-sha2-nistp384 ...`` line)."""
    data = _read(path, "SuperNode public key")
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm):
        raise CertificateError(f"{path}: not an OpenSSH public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CertificateError(f"{path}: SuperNode public key must be an EC key")
    return key
