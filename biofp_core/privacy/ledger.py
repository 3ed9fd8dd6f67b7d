"""The site's privacy ledger: Opacus' accountant history across rounds and runs, on the site's disk.

The ledger is the history an Opacus `RDPAccountant` keeps, ``(noise_multiplier, sample_rate,
steps)``, one item per charged round, plus run id, server round, kind, δ, time and the ε reached.
ε is always recomputed from the WHOLE history (every round of every run), so rounds and runs
compose under RDP; the stored ``epsilon_after`` is for people reading the file, never summed.

What is charged, and how
------------------------
- ``kind="train"``: one round of DP-SGD, σ = noise std / clipping norm, q = Poisson sampling rate of
  privacy units (subjects), ``steps`` optimizer steps.
- ``kind="release"``: a Gaussian release (e.g. fingerprints clipped to norm C plus N(0, (σC)²) noise
  per released vector), with ``sample_rate=1.0`` and ``steps=1``. At q = 1 the sampled Gaussian
  mechanism is the plain Gaussian mechanism (RDP α/(2σ²)), so composition with training is exact.
  σ must be relative to the L2 sensitivity of the whole release to one subject: a subject with k
  released vectors clipped to C has sensitivity C·√k.
- σ = 0 (no DP) is never charged: `charge` raises ValueError, since it would mean infinite ε.

Entries are keyed by ``(run_id, server_round, kind)``; charging the same key again (crash recovery,
a replayed message) returns the existing entry and charges nothing. Each release needs its own key
(e.g. its own round number). The file is JSON, indented, replaced atomically and fsync'ed; a
sidecar ``.lock`` (`fcntl.flock`) serialises read-modify-write between processes. A corrupt file is
an error naming it, never reset.

ε uses Opacus' default RDP orders. When the optimum lies at the smallest or largest order, Opacus
warns that a wider range could tighten the bound; the bound is still valid (conservative), so
that warning is silenced here.

Cost: Opacus' RDP of a mechanism is its one-step RDP times ``steps`` (``compute_rdp`` returns
``rdp * steps``), and the one-step RDP depends on (σ, q) only. :func:`rdp_epsilon` therefore
computes the one-step RDP of each distinct (σ, q) once per process (about 0.15-0.3 s on 2 cores)
and keeps it; ε of a whole history is then the same sum and the same RDP-to-ε conversion as
Opacus' ``RDPAccountant.get_epsilon``, bit for bit, in well under a millisecond. A site-round
(budget check, report, ledger charge, exhausted flag, audit) thus pays for one RDP evaluation in
its first round and none after.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import math
import numbers
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from biofp_core.errors import BioFPError, PrivacyBudgetError
from biofp_core.fsutil import atomic_write_text
from biofp_core.site import PrivacyBudget

LEDGER_FILENAME = "privacy_ledger.json"
LEDGER_FORMAT = "biofp-privacy-ledger"
LEDGER_VERSION = 1

Kind = Literal["train", "release"]
History = list[tuple[float, float, int]]  # Opacus' accountant history: (σ, q, steps)

log = logging.getLogger(__name__)


class PrivacyLedgerError(BioFPError):
    """The privacy ledger file is unreadable, corrupt, or contradicts a replayed charge."""


class LedgerEntry(BaseModel):
    """One charged round or release: an accountant history item and where it came from."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    run_id: str = Field(min_length=1)
    server_round: int = Field(ge=0)
    kind: Kind = "train"
    noise_multiplier: float = Field(gt=0, description="σ: noise std / clipping norm")
    sample_rate: float = Field(gt=0, le=1, description="q: sampling rate of privacy units")
    steps: int = Field(ge=1)
    delta: float = Field(gt=0, lt=1, description="δ at which epsilon_after is given")
    epsilon_after: float = Field(ge=0, description="ε of the whole history up to this entry")
    time: str = Field(description="when it was charged, UTC ISO 8601")

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.run_id, self.server_round, self.kind)

    @property
    def mechanism(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps)


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


class _LedgerFile(BaseModel):
    """The on-disk document."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["biofp-privacy-ledger"] = LEDGER_FORMAT
    version: Literal[1] = LEDGER_VERSION
    accountant: Literal["rdp"] = "rdp"
    entries: list[LedgerEntry] = []

    @model_validator(mode="after")
    def _unique_keys(self) -> _LedgerFile:
        keys = [e.key for e in self.entries]
        if len(set(keys)) != len(keys):
            raise ValueError("the same (run_id, server_round, kind) is charged twice")
        return self


def compact_history(history: History) -> History:
    """Merge items with the same (σ, q), summing steps: RDP is additive, so ε is unchanged.

    A ledger of many rounds and runs is compacted before ε is computed, so the sum of RDP
    vectors grows with the distinct (σ, q), not with rounds.
    """
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, n in history:
        steps[(sigma, q)] = steps.get((sigma, q), 0) + n
    return [(sigma, q, n) for (sigma, q), n in steps.items()]


@functools.lru_cache(maxsize=256)
def _one_step_rdp(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    """Opacus' RDP of ONE step of the sampled Gaussian mechanism at its default orders."""
    from opacus.accountants import RDPAccountant  # imports torch: only when ε is computed
    from opacus.accountants.analysis import rdp as analysis

    rdp = analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
        orders=RDPAccountant.DEFAULT_ALPHAS,
    )  # fmt: skip
    return tuple(float(x) for x in rdp)


def rdp_epsilon(history: History, *, delta: float) -> float:
    """ε of a whole accountant history at `delta`, as Opacus' `RDPAccountant` computes it.

    The same sum over the (compacted) history and the same conversion as
    ``RDPAccountant.get_epsilon``, with each (σ, q)'s one-step RDP cached (see the module
    docstring). 0.0 for an empty history.
    """
    if not history:
        return 0.0
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    rdp = sum([np.array(_one_step_rdp(sigma, q)) * n for sigma, q, n in compact_history(history)])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
        eps, _ = analysis.get_privacy_spent(
            orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta
        )
    return float(eps)


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def _as_mechanism(
    *, noise_multiplier: float, sample_rate: float, steps: int
) -> tuple[float, float, int]:
    """``(σ, q, steps)`` as plain Python numbers; rejects what cannot be charged (caller bugs)."""
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(
            f"noise_multiplier must be finite and > 0 to be charged, got {noise_multiplier} "
            "(σ=0 is training without DP: infinite ε)"
        )
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return (float(noise_multiplier), float(sample_rate), int(steps))


def _read(path: Path) -> list[LedgerEntry]:
    """The entries of the ledger at `path`; [] when there is no file yet."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise PrivacyLedgerError(
            f"{path}: cannot read the privacy ledger: {exc.strerror}"
        ) from None
    try:
        return _LedgerFile.model_validate_json(raw).entries
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "file"
        raise PrivacyLedgerError(
            f"{path}: corrupt privacy ledger ({where}: {err['msg']}); "
            "restore it from a backup: it is never reset"
        ) from None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, entries: list[LedgerEntry]) -> None:
    """Replace the ledger atomically, then fsync the file and its folder."""
    text = _LedgerFile(entries=entries).model_dump_json(indent=2) + "\n"
    atomic_write_text(path, text)
    _fsync(path)
    _fsync(path.parent)


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class PrivacyLedger:
    """The privacy ledger of one site, stored at `path` (a JSON file).

    Reading methods use the entries loaded at construction (or by the last `reload`, `check_budget`
    or `charge`); `check_budget` and `charge` re-read the file first, so another process's charges
    always count.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._entries = _read(self.path)

    @classmethod
    def at(cls, state_dir: Path) -> PrivacyLedger:
        """The ledger in a site's state folder (`SiteConfig.resolved_state_dir()`)."""
        return cls(Path(state_dir) / LEDGER_FILENAME)

    @property
    def entries(self) -> list[LedgerEntry]:
        return list(self._entries)

    @property
    def history(self) -> History:
        """The Opacus accountant history, one item per entry, in charge order."""
        return [e.mechanism for e in self._entries]

    def reload(self) -> None:
        """Re-read the file (another process may have charged since)."""
        self._entries = _read(self.path)

    def epsilon(self, *, delta: float) -> float:
        """ε spent by the whole history at `delta` (0.0 for an empty ledger)."""
        _check_delta(delta)
        return rdp_epsilon(self.history, delta=delta)

    def epsilon_if(
        self, *, noise_multiplier: float, sample_rate: float, steps: int, delta: float
    ) -> float:
        """ε the whole history would reach at `delta` after one more charge like this one."""
        mechanism = _as_mechanism(
            noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps
        )
        _check_delta(delta)
        return rdp_epsilon([*self.history, mechanism], delta=delta)

    def check_budget(
        self, *, budget: PrivacyBudget, noise_multiplier: float, sample_rate: float, steps: int
    ) -> float:
        """ε after a charge with these parameters, at the budget's δ; refuse it if over budget.

        Raises
        ------
        PrivacyBudgetError
            When that ε would exceed ``budget.epsilon``.
        """
        self.reload()
        return self._within_budget(
            budget, noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps
        )

    def _within_budget(
        self, budget: PrivacyBudget, *, noise_multiplier: float, sample_rate: float, steps: int
    ) -> float:
        after = self.epsilon_if(
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            steps=steps,
            delta=budget.delta,
        )
        if after > budget.epsilon:
            spent = self.epsilon(delta=budget.delta)
            raise PrivacyBudgetError(
                f"site budget ε={budget.epsilon:g} would be exceeded: ε would reach {after:.4g} "
                f"(spent {spent:.4g}) at δ={budget.delta:g}; refused ({self.path})"
            )
        return after

    def charge(
        self,
        *,
        run_id: str,
        server_round: int,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        delta: float,
        kind: Kind = "train",
        budget: PrivacyBudget | None = None,
    ) -> LedgerEntry:
        """Append one round (or release) to the ledger and return its entry.

        A replay of an already charged ``(run_id, server_round, kind)`` with the same parameters
        returns the existing entry and charges nothing. With `budget`, the budget is checked again
        under the lock, so two processes cannot both spend the last of it.

        Raises
        ------
        PrivacyBudgetError
            With `budget`, when this charge would exceed it (nothing is written).
        PrivacyLedgerError
            When the file is corrupt, or the key was charged with other parameters.
        ValueError
            For σ <= 0, q outside (0, 1], steps < 1 or δ outside (0, 1).
        """
        sigma, q, n = _as_mechanism(
            noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps
        )
        _check_delta(delta)
        with self._locked():
            self.reload()
            key = (run_id, server_round, kind)
            existing = next((e for e in self._entries if e.key == key), None)
            if existing is not None:
                return _replayed(existing, (sigma, q, n))
            if budget is not None:
                self._within_budget(budget, noise_multiplier=sigma, sample_rate=q, steps=n)
            entry = LedgerEntry(
                run_id=run_id,
                server_round=server_round,
                kind=kind,
                noise_multiplier=sigma,
                sample_rate=q,
                steps=n,
                delta=delta,
                epsilon_after=self.epsilon_if(
                    noise_multiplier=sigma, sample_rate=q, steps=n, delta=delta
                ),
                time=_utc_now(),
            )
            _write(self.path, [*self._entries, entry])
            self._entries.append(entry)
        log.info("charged %s: ε=%.4g at δ=%g", key, entry.epsilon_after, delta)
        return entry

    def summary(self, *, budget: PrivacyBudget, site: str | None = None) -> LedgerSummary:
        """ε spent at the budget's δ, the budget and what is left."""
        spent = self.epsilon(delta=budget.delta)
        return LedgerSummary(
            site=site,
            entries=len(self._entries),
            runs=list(dict.fromkeys(e.run_id for e in self._entries)),
            epsilon=spent,
            delta=budget.delta,
            budget_epsilon=budget.epsilon,
            budget_left=max(0.0, budget.epsilon - spent),
            exhausted=spent >= budget.epsilon,
        )

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
