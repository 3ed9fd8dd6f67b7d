"""The site's privacy ledger: Opacus' accountant history across rounds and runs, on the site's disk.

The ledger is the history an Opacus `RDPAccountant` keeps, ``(noise_multiplier, sample_rate,
steps)``, one entry per charged mechanism, plus run key, server round, kind, δ, time and the ε
reached. ε is always recomputed from the WHOLE history (every round of every run), so rounds and
runs compose under RDP; the stored ``epsilon_after`` is for people reading the file, never summed.

What is charged (``kind``)
--------------------------
- ``train``: one round of DP-SGD and its noisy loss sums, drawn from the same Poisson batch each
  step and charged together as one sampled Gaussian (σ_eff = (σ⁻² + σ_m⁻²)^(-1/2), q = Poisson
  rate of subjects, ``steps`` optimizer steps). σ = 0 records a round trained without DP (ε
  becomes infinite).
- ``evaluate``: the noisy held-out loss (one Gaussian, q = 1, steps = 1).
- ``release``: a Gaussian fingerprint release (q = 1, steps = 1; see ``fingerprints.policy``).
- ``probe:<task>``: the noisy scalars of one task's probe (q = 1, steps = 1).
Entries are keyed by ``(run_id, server_round, kind)``; charging a key again with the same
mechanism returns the existing entry and charges nothing.

Failing closed
--------------
A site's state folder is initialised once (:func:`initialise_site_state`): a marker ``site.json``
(site id, creation time, the ledger's head) and the ledger. Entries are hash-chained from the
site id; the marker keeps the hash of the last entry, updated after each charge. Every charged
action first verifies (:meth:`PrivacyLedger.verify`) that the site is initialised, that every
entry's hash and link are intact, that the marker's head is in the chain (a ledger may only grow:
a missing, emptied, truncated or replaced ledger is behind its marker), that every line of the
audit log parses (but one a crash tore) and that every audit line recording a charge names an
entry of the chain. Any failure refuses the action with a one-line
error saying how to recover; nothing is ever reset. The file is JSON, replaced atomically and
fsync'ed; a sidecar ``.lock`` (`fcntl.flock`) serialises read-modify-write between processes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import numbers
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from biofp_core.errors import BioFPError, PrivacyBudgetError, first_error
from biofp_core.fsutil import atomic_write_text, read_if_present
from biofp_core.privacy.accounting import History, compact_history, rdp_epsilon
from biofp_core.site import PrivacyBudget

__all__ = [
    "Charge",
    "History",
    "LedgerEntry",
    "LedgerSummary",
    "PrivacyLedger",
    "PrivacyLedgerError",
    "SiteMarker",
    "compact_history",
    "initialise_site_state",
    "rdp_epsilon",
]

LEDGER_FILENAME = "privacy_ledger.json"
MARKER_FILENAME = "site.json"
LEDGER_FORMAT = "biofp-privacy-ledger"
LEDGER_VERSION = 2
KIND_PATTERN = r"^(train|evaluate|release|probe:[A-Za-z0-9_.-]{1,64})$"
RECOVER = "restore the state folder from a backup; a ledger is never reset"

log = logging.getLogger(__name__)


class PrivacyLedgerError(BioFPError):
    """The privacy ledger is missing, unreadable, tampered with, or contradicts a charge."""


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _genesis(site_id: str) -> str:
    return hashlib.sha256(f"biofp-ledger:{site_id}".encode()).hexdigest()


class LedgerEntry(BaseModel):
    """One charged mechanism: an accountant history item, where it came from, and its link."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="strings")

    run_id: str = Field(min_length=1, description="the run key the charge is made under")
    server_round: int = Field(ge=0)
    kind: str = Field("train", pattern=KIND_PATTERN)
    noise_multiplier: float = Field(ge=0, description="σ: noise std / sensitivity; 0 = no DP")
    sample_rate: float = Field(gt=0, le=1, description="q: sampling rate of privacy units")
    steps: int = Field(ge=1)
    delta: float = Field(gt=0, lt=1, description="δ at which epsilon_after is given")
    epsilon_after: float = Field(ge=0, description="ε of the whole history up to this entry")
    time: str = Field(default_factory=_utc_now, description="when it was charged, UTC ISO 8601")
    prev: str = Field("", description="hash of the previous entry (or of the site id)")
    hash: str = Field("", description="sha256 of this entry's fields and `prev`")

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.run_id, self.server_round, self.kind)

    @property
    def mechanism(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps)

    def computed_hash(self) -> str:
        """sha256 of every field but `hash`, canonical JSON (what `hash` must be)."""
        fields = self.model_dump(mode="json", exclude={"hash"})
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    def linked(self, prev: str) -> LedgerEntry:
        """This entry chained after `prev`."""
        entry = self.model_copy(update={"prev": prev, "hash": ""})
        return entry.model_copy(update={"hash": entry.computed_hash()})


class LedgerSummary(BaseModel):
    """ε spent against the site's budget, for people and for the CLI's JSON (an unlimited
    budget or a non-DP history is written as "Infinity" and read back as inf, not as null)."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="strings")

    site: str | None
    entries: int
    runs: list[str]
    epsilon: float
    delta: float
    budget_epsilon: float
    budget_left: float
    exhausted: bool


class SiteMarker(BaseModel):
    """``site.json``: the site's state was initialised, and the ledger's head since."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["biofp-site-state"] = "biofp-site-state"
    site_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    created: str
    name: str = Field(description="the site's name at initialisation (for people only)")
    ledger_head: str = Field(description="hash of the ledger's last entry when last charged")
    entries: int = Field(ge=0, description="entries in the ledger when last charged")


class _LedgerFile(BaseModel):
    """The on-disk document."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings")

    format: Literal["biofp-privacy-ledger"] = LEDGER_FORMAT
    version: Literal[2] = LEDGER_VERSION
    accountant: Literal["rdp"] = "rdp"
    site_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    entries: list[LedgerEntry] = []

    @model_validator(mode="after")
    def _unique_keys(self) -> _LedgerFile:
        keys = [e.key for e in self.entries]
        if len(set(keys)) != len(keys):
            raise ValueError("the same (run_id, server_round, kind) is charged twice")
        return self


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


Mechanism = tuple[float, float, int]  # (σ, q, steps)


@dataclass(frozen=True)
class Charge:
    """One mechanism to charge under its key."""

    run_id: str
    server_round: int
    kind: str
    mechanism: Mechanism

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.run_id, self.server_round, self.kind)


def _as_mechanism(noise_multiplier: float, sample_rate: float, steps: int) -> Mechanism:
    """``(σ, q, steps)`` as plain Python numbers; rejects what cannot be charged (caller bugs).
    σ = 0 is allowed: it records a round without DP (infinite ε)."""
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return (float(noise_multiplier), float(sample_rate), int(steps))


def _read_model(path: Path, model: type[BaseModel], what: str) -> BaseModel | None:
    """`path` parsed as `model`; None when there is no file."""
    raw = read_if_present(path, what, PrivacyLedgerError)
    if raw is None:
        return None
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise PrivacyLedgerError(
            f"{path}: corrupt {what} ({first_error(exc, 'file')}); {RECOVER}"
        ) from None


def _audit_charges(state_dir: Path) -> set[str]:
    """Hashes of the ledger entries the audit log says paid for a message."""
    from biofp_core.audit import AuditLog, AuditLogError  # the audit log does not import the ledger

    try:
        entries = AuditLog.at(state_dir).checked_entries()
    except AuditLogError as exc:
        raise PrivacyLedgerError(f"{exc}; {RECOVER}") from None
    return {e.ledger_entry for e in entries if e.ledger_entry}


class PrivacyLedger:
    """The privacy ledger of one site's state folder.

    Reading methods use the entries loaded at construction (or by the last `reload`,
    `check_budget` or `charge`); `check_budget` and `charge` verify the ledger and re-read it
    first, so another process's charges always count and a tampered ledger is refused.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / LEDGER_FILENAME
        self.marker_path = self.state_dir / MARKER_FILENAME
        self.reload()

    @classmethod
    def at(cls, state_dir: Path) -> PrivacyLedger:
        """The ledger in a site's state folder (`SiteConfig.resolved_state_dir()`)."""
        return cls(Path(state_dir))

    def reload(self) -> None:
        """Re-read the files (another process may have charged since); tolerant of a missing
        ledger (reads as empty): :meth:`verify` is what refuses it."""
        self._file = _read_ledger_file(self.path)
        self._marker = _read_model(self.marker_path, SiteMarker, "site marker")
        self._entries = list(self._file.entries) if self._file else []

    @property
    def initialised(self) -> bool:
        return self._marker is not None

    @property
    def entries(self) -> list[LedgerEntry]:
        return list(self._entries)

    @property
    def history(self) -> History:
        """The Opacus accountant history, one item per entry, in charge order."""
        return [e.mechanism for e in self._entries]

    def verify(self) -> None:
        """Refuse a ledger that is not initialised, missing, edited or behind its marker, or
        that the audit log contradicts (see the module docstring).

        Raises
        ------
        PrivacyLedgerError
            One line naming the file, the problem and how to recover.
        """
        marker = self._marker
        if marker is None:
            what = "has a ledger but no site.json marker" if self._file else "is not initialised"
            raise PrivacyLedgerError(
                f"{self.state_dir}: the site's state {what}; run `biofp site init --config "
                "site.toml` for a new site, else " + RECOVER
            )
        if self._file is None:
            raise PrivacyLedgerError(f"{self.path}: privacy ledger missing; {RECOVER}")
        if self._file.site_id != marker.site_id:
            raise PrivacyLedgerError(f"{self.path}: ledger of another site; {RECOVER}")
        heads = _verified_chain(self.path, self._entries, marker.site_id)
        if marker.ledger_head not in heads or heads.index(marker.ledger_head) != marker.entries:
            raise PrivacyLedgerError(
                f"{self.path}: the ledger holds {len(self._entries)} entries but "
                f"{marker.entries} were charged (emptied, truncated or replaced); {RECOVER}"
            )
        unknown = _audit_charges(self.state_dir) - set(heads)
        if unknown:
            raise PrivacyLedgerError(
                f"{self.path}: the audit log records {len(unknown)} charged message(s) the "
                f"ledger does not hold (e.g. entry {sorted(unknown)[0][:12]}); {RECOVER}"
            )

    def epsilon(self, *, delta: float) -> float:
        """ε spent by the whole history at `delta` (0.0 for an empty ledger)."""
        _check_delta(delta)
        return rdp_epsilon(self.history, delta=delta)

    def check_budget(self, *, budget: PrivacyBudget, mechanisms: list[Mechanism]) -> float:
        """ε after charging `mechanisms` (σ, q, steps), at the budget's δ; refuse if over budget.

        Raises
        ------
        PrivacyLedgerError
            The ledger does not verify.
        PrivacyBudgetError
            That ε would exceed ``budget.epsilon``.
        """
        self.reload()
        self.verify()
        return self._within_budget(budget, [_as_mechanism(*m) for m in mechanisms])

    def _within_budget(self, budget: PrivacyBudget, mechanisms: list[Mechanism]) -> float:
        after = rdp_epsilon([*self.history, *mechanisms], delta=budget.delta)
        if after > budget.epsilon:
            spent = self.epsilon(delta=budget.delta)
            alone = rdp_epsilon(list(mechanisms), delta=budget.delta)
            raise PrivacyBudgetError(
                f"site budget ε={budget.epsilon:g} would be exceeded: ε would reach {after:.4g} "
                f"(spent {spent:.4g}) at δ={budget.delta:g}; refused ({self.path})",
                exhausted=alone <= budget.epsilon,
            )
        return after

    def charge(
        self, *, run_id: str, server_round: int, noise_multiplier: float, sample_rate: float,
        steps: int, delta: float, kind: str = "train", budget: PrivacyBudget | None = None,
    ) -> LedgerEntry:  # fmt: skip
        """Append one mechanism to the ledger and return its entry (see :meth:`charge_all`)."""
        charge = Charge(
            run_id=run_id, server_round=server_round, kind=kind,
            mechanism=(noise_multiplier, sample_rate, steps),
        )  # fmt: skip
        return self.charge_all([charge], delta=delta, budget=budget)[0]

    def charge_all(
        self, charges: list[Charge], *, delta: float, budget: PrivacyBudget | None = None
    ) -> list[LedgerEntry]:
        """Append mechanisms to the ledger at once (one lock, one budget check, one write).

        A replay of an already charged ``(run_id, server_round, kind)`` with the same mechanism
        returns the existing entry and charges nothing. With `budget`, the budget is checked
        again under the lock, so two processes cannot both spend the last of it.

        Raises
        ------
        PrivacyBudgetError
            With `budget`, when the charges would exceed it (nothing is written).
        PrivacyLedgerError
            The ledger does not verify, or a key was charged with another mechanism.
        ValueError
            For σ < 0, q outside (0, 1], steps < 1 or δ outside (0, 1).
        """
        _check_delta(delta)
        checked = [(c, _as_mechanism(*c.mechanism)) for c in charges]
        with self._locked():
            self.reload()
            self.verify()
            out: list[LedgerEntry | None] = []
            new: list[tuple[Charge, Mechanism]] = []
            for charge, mechanism in checked:
                existing = next((e for e in self._entries if e.key == charge.key), None)
                out.append(None if existing is None else _replayed(existing, mechanism))
                if existing is None:
                    new.append((charge, mechanism))
            if budget is not None and new:
                self._within_budget(budget, [m for _, m in new])
            entries, history = list(self._entries), list(self.history)
            for charge, mechanism in new:
                history.append(mechanism)
                prev = entries[-1].hash if entries else _genesis(self._site_id)
                entries.append(LedgerEntry(
                    run_id=charge.run_id, server_round=charge.server_round, kind=charge.kind,
                    noise_multiplier=mechanism[0], sample_rate=mechanism[1], steps=mechanism[2],
                    delta=delta, epsilon_after=rdp_epsilon(history, delta=delta),
                ).linked(prev))  # fmt: skip
            if new:
                self._write(entries)
            added = iter(entries[len(entries) - len(new) :])
            result = [e if e is not None else next(added) for e in out]
        for entry in result:
            log.info("charged %s: ε=%.4g at δ=%g", entry.key, entry.epsilon_after, delta)
        return result

    @property
    def _site_id(self) -> str:
        assert self._marker is not None
        return self._marker.site_id

    def _write(self, entries: list[LedgerEntry]) -> None:
        """Replace the ledger durably, then move the marker's head (a crash between the two
        leaves the ledger ahead of its marker, which verifies: a ledger may grow)."""
        assert self._marker is not None
        document = _LedgerFile(site_id=self._site_id, entries=entries)
        atomic_write_text(self.path, document.model_dump_json(indent=2) + "\n")
        head = entries[-1].hash if entries else _genesis(self._site_id)
        marker = self._marker.model_copy(update={"ledger_head": head, "entries": len(entries)})
        atomic_write_text(self.marker_path, marker.model_dump_json(indent=2) + "\n")
        self._entries, self._marker = entries, marker

    def summary(self, *, budget: PrivacyBudget, site: str | None = None) -> LedgerSummary:
        """ε spent at the budget's δ, the budget and what is left."""
        spent = self.epsilon(delta=budget.delta)
        return LedgerSummary(
            site=site, entries=len(self._entries),
            runs=list(dict.fromkeys(e.run_id for e in self._entries)), epsilon=spent,
            delta=budget.delta, budget_epsilon=budget.epsilon,
            budget_left=max(0.0, budget.epsilon - spent), exhausted=spent >= budget.epsilon,
        )  # fmt: skip

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold an exclusive lock on the sidecar ``<ledger>.lock`` (blocks until it is free)."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _read_ledger_file(path: Path) -> _LedgerFile | None:
    """The ledger document; a version-1 file (before hash chains) must be migrated first."""
    try:
        head = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        head = None
    if isinstance(head, dict) and head.get("version") == 1:
        raise PrivacyLedgerError(
            f"{path}: ledger of an older BioFP (no hash chain); run `biofp site init --config "
            "site.toml` once to migrate it"
        )
    return _read_model(path, _LedgerFile, "privacy ledger")  # type: ignore[return-value]


def _verified_chain(path: Path, entries: list[LedgerEntry], site_id: str) -> list[str]:
    """[genesis, hash of entry 1, ...] after checking every link and hash."""
    heads = [_genesis(site_id)]
    for number, entry in enumerate(entries, start=1):
        if entry.prev != heads[-1] or entry.hash != entry.computed_hash():
            raise PrivacyLedgerError(
                f"{path}: entry {number} ({entry.kind}, round {entry.server_round} of run "
                f"{entry.run_id}) was edited or moved: its hash does not check; {RECOVER}"
            )
        heads.append(entry.hash)
    return heads


def _replayed(existing: LedgerEntry, mechanism: tuple[float, float, int]) -> LedgerEntry:
    """The existing entry of a replayed key, if the replay charges the same mechanism."""
    if existing.mechanism != mechanism:
        sigma, q, steps = existing.mechanism
        raise PrivacyLedgerError(
            f"run {existing.run_id!r} round {existing.server_round} ({existing.kind}) is already "
            f"charged with σ={sigma:g}, q={q:g}, steps={steps}; a replay must use the same"
        )
    log.info("replay of %s ignored: already charged", existing.key)
    return existing


def _migrated(path: Path, site_id: str) -> list[LedgerEntry]:
    """The entries of a version-1 ledger at `path`, chained from `site_id` ([] if none)."""
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise PrivacyLedgerError(f"{path}: unreadable privacy ledger ({exc}); {RECOVER}") from None
    entries, prev = [], _genesis(site_id)
    try:
        for item in raw.get("entries", []):
            entry = LedgerEntry.model_validate(item).linked(prev)
            entries.append(entry)
            prev = entry.hash
    except (ValidationError, AttributeError) as exc:
        raise PrivacyLedgerError(f"{path}: corrupt privacy ledger ({exc}); {RECOVER}") from None
    return entries


def initialise_site_state(state_dir: Path, *, name: str) -> SiteMarker:
    """Initialise a site's state folder once: marker + (empty, or migrated) ledger.

    Idempotent for an initialised folder that verifies. A version-1 ledger is migrated into the
    hash chain. A folder whose audit log records sent messages but that has no ledger is refused.

    Raises
    ------
    PrivacyLedgerError
        The folder holds a ledger without its marker, or an audit log without a ledger, or an
        initialised ledger that does not verify.
    """
    state_dir = Path(state_dir)
    ledger = PrivacyLedger.__new__(PrivacyLedger)
    ledger.state_dir, ledger.path = state_dir, state_dir / LEDGER_FILENAME
    ledger.marker_path = state_dir / MARKER_FILENAME
    with ledger._locked():
        marker = _read_model(ledger.marker_path, SiteMarker, "site marker")
        if marker is not None:
            PrivacyLedger.at(state_dir).verify()
            return marker  # type: ignore[return-value]
        version = _file_version(ledger.path)
        if version not in (None, 1):
            raise PrivacyLedgerError(
                f"{ledger.path}: a ledger without its site.json marker; {RECOVER}"
            )
        if version is None and _sent(state_dir):
            raise PrivacyLedgerError(
                f"{state_dir}: the audit log records sent messages but there is no privacy "
                f"ledger; {RECOVER}"
            )
        site_id = uuid.uuid4().hex
        entries = _migrated(ledger.path, site_id) if version == 1 else []
        ledger._marker = SiteMarker(
            site_id=site_id, created=_utc_now(), name=name, ledger_head=_genesis(site_id),
            entries=0,
        )  # fmt: skip
        ledger._file = None
        state_dir.mkdir(parents=True, exist_ok=True)
        ledger._write(entries)
    log.info("initialised site state %s (site id %s, %d entries)", state_dir, site_id, len(entries))
    return ledger._marker


def _file_version(path: Path) -> int | None:
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return -1
    version = raw.get("version") if isinstance(raw, dict) else None
    return version if isinstance(version, int) else -1


def _sent(state_dir: Path) -> bool:
    """True when the audit log holds anything at all (an unparseable line counts: it may hide a
    sent message)."""
    from biofp_core.audit import AUDIT_FILENAME

    try:
        return bool((Path(state_dir) / AUDIT_FILENAME).read_bytes().strip())
    except FileNotFoundError:
        return False
