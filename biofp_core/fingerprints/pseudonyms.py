"""Pseudonymous ids: HMAC-SHA256 under a secret that never leaves the site's disk.

The key is 32 random bytes, hex-encoded in ``<state_dir>/pseudonym.key``, created with mode 0600
on first use. The same id gets the same pseudonym at one site, across runs; another site (another
key) gives it an unrelated pseudonym, and without the key a pseudonym cannot be linked back to a
name, even by trying every plausible name. Subject, record and site pseudonyms hash different
messages (``b"subject\\x00" + id`` ...), so a record named like a subject gets another pseudonym.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import warnings
from pathlib import Path
from typing import Literal

from biofp_core.errors import ConfigError
from biofp_core.fsutil import write_all_synced, write_temp

KEY_FILENAME = "pseudonym.key"
KEY_BYTES = 32
PSEUDONYM_HEX = 32  # 128 bits: no collision among any realistic number of subjects

IdKind = Literal["subject", "record", "site"]


class SiteKey:
    """A site's pseudonymisation key. Build it with `load_or_create` (export) or `load`."""

    def __init__(self, secret: bytes, *, path: Path | None = None) -> None:
        if len(secret) != KEY_BYTES:
            raise ValueError(f"a site key has {KEY_BYTES} bytes, got {len(secret)}")
        self._secret = secret
        self.path = path

    def __repr__(self) -> str:  # never show the secret
        return f"SiteKey(path={self.path})"

    @classmethod
    def load(cls, state_dir: Path) -> SiteKey:
        """The key of the site whose state folder is `state_dir`; ConfigError if it has none."""
        path = Path(state_dir) / KEY_FILENAME
        try:
            text = path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            raise ConfigError(
                f"{path}: no pseudonym key (this site has not exported fingerprints yet)"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: unreadable pseudonym key: {exc}") from None
        try:
            secret = bytes.fromhex(text)
        except ValueError:
            secret = b""
        if len(secret) != KEY_BYTES:
            raise ConfigError(
                f"{path}: corrupt pseudonym key (expected {2 * KEY_BYTES} hex digits)"
            )
        if path.stat().st_mode & 0o077:
            warnings.warn(f"{path} is readable by other users; chmod 600 it", stacklevel=2)
        return cls(secret, path=path)

    @classmethod
    def load_or_create(cls, state_dir: Path, *, allow_new: bool = False) -> SiteKey:
        """The site's key, created (mode 0600, atomically) if the site has none yet.

        A site whose audit log records released fingerprints gets no new key silently: the
        same patients would get new ids. It must restore the key, or ask for a new one
        (`allow_new`, ``--new-pseudonym-key``).

        Raises
        ------
        ConfigError
            The key is missing although pseudonyms have left the site.
        """
        state_dir = Path(state_dir)
        path = state_dir / KEY_FILENAME
        if not path.exists():
            if not allow_new and _released_before(state_dir):
                raise ConfigError(
                    f"{path}: pseudonym key missing, but this site has released pseudonymised "
                    "fingerprints; restore the key from a backup, or pass --new-pseudonym-key "
                    "(released ids will no longer match)"
                )
            _create_key_file(path)
        return cls.load(state_dir)

    def pseudonym(self, kind: IdKind, value: str) -> str:
        """HMAC-SHA256(key, kind || 0x00 || value), first 32 hex digits."""
        message = kind.encode() + b"\x00" + value.encode("utf-8")
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()[:PSEUDONYM_HEX]

    def subject(self, subject_id: str) -> str:
        return self.pseudonym("subject", subject_id)

    def record(self, record_id: str) -> str:
        return self.pseudonym("record", record_id)

    @property
    def site(self) -> str:
        """The site's own pseudonym: names it in exports without naming it."""
        return self.pseudonym("site", "")


def _released_before(state_dir: Path) -> bool:
    """True when the site's audit log records a release of fingerprints."""
    from biofp_core.audit import AuditLog

    return any(
        e.payload_bytes and ("release" in e.message_type or "fingerprint" in e.message_type)
        for e in AuditLog.at(state_dir).readable_entries()
    )


def _create_key_file(path: Path) -> None:
    """Write a fresh key with mode 0600; if another process won the race, keep its key."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp: Path | None = None
    try:
        tmp = write_temp(path, (secrets.token_hex(KEY_BYTES) + "\n").encode("ascii"))  # 0600
        try:
            os.link(tmp, path)  # atomic and never overwrites: a key, once used, is kept
        except FileExistsError:
            pass  # another process created it first: keep its key
        except OSError:  # a filesystem without hard links: exclusive create, mode 0600
            with contextlib.suppress(FileExistsError):
                _write_exclusive(path, Path(tmp).read_bytes())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot create the pseudonym key: {exc.strerror}") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _write_exclusive(path: Path, data: bytes) -> None:
    """Create `path` (mode 0600) with `data`; FileExistsError if it exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        write_all_synced(fd, data)
    finally:
        os.close(fd)
