"""A release: fingerprints made fit to leave the site under its policy, charged, written, audited.

`prepare_release` has no side effect: it aggregates windows into record means (policy level
"record"), clips each released vector to L2 norm C, adds the Gaussian noise of the policy (see
`policy`) and swaps ids for pseudonyms. Under a noisy policy every column is covered: each
subject keeps at most the policy's ``max_vectors_per_subject`` = k vectors (the first by record
pseudonym, then window order; the rest are dropped), `fp` is noised for k, the per-row signal
quality is withheld (NaN), and so is the window count (0); `modality` is the release's modality
on every row (which sensors a window had is not said). The rows, their level and pseudonyms are
public by design (see `policy`): a subject's row count is at most k, so the rows say no more
than min(windows or records, k). At level "window" the kept window vectors are released and the
record means of the NOISED windows are added (post-processing: free of privacy cost).

`commit_release` then, in this order: charges the ledger (kind "release", under the ledger's lock,
refusing with PrivacyBudgetError if the site's budget would be exceeded), serialises the Parquet
bytes, writes the file atomically (if a path is given) and appends a line to the audit log. A
refused release writes nothing, and a failure after the charge leaves ε spent but nothing released.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict

from biofp_core.audit import AuditEntry, AuditLog
from biofp_core.errors import DataError
from biofp_core.fingerprints.parquet import COLUMNS, FingerprintMeta, to_parquet_bytes
from biofp_core.fingerprints.policy import NoiseCalibration, ReleasePolicy, calibrate_noise
from biofp_core.fingerprints.pseudonyms import SiteKey
from biofp_core.fingerprints.table import FingerprintTable, concat, record_means
from biofp_core.fsutil import atomic_write_bytes
from biofp_core.privacy.ledger import PrivacyLedger
from biofp_core.site import PrivacyBudget

if TYPE_CHECKING:
    from biofp_core.artifacts import ModelCard

log = logging.getLogger(__name__)

RELEASE_MESSAGE = "fingerprint-release"  # audit message type of a release written to a file


@dataclass(frozen=True)
class PreparedRelease:
    """A release ready to commit: pseudonymised rows and how they were made private."""

    table: FingerprintTable
    policy: ReleasePolicy
    calibration: NoiseCalibration | None
    modality: str
    site: str  # the site's pseudonym
    card: ModelCard


class ReleaseReport(BaseModel):
    """What one committed release let out, and what it cost."""

    model_config = ConfigDict(frozen=True)

    path: Path | None
    run_id: str
    server_round: int
    level: str
    modality: str
    rows: int
    subjects: int
    records: int
    bytes: int
    sha256: str
    noise_sigma: float | None
    epsilon_per_vector: float | None
    delta_per_vector: float | None
    vectors_per_subject: int
    charged: bool
    site_epsilon: float
    site_delta: float


def clip_rows(fp: np.ndarray, clip_norm: float) -> np.ndarray:
    """Each row scaled down to L2 norm <= `clip_norm` (rows already inside are unchanged); a row
    holding NaN or inf becomes zero, a public row inside the ball (noise does not hide a NaN)."""
    fp = np.where(np.isfinite(fp).all(axis=1, keepdims=True), fp, 0.0)
    norms = np.linalg.norm(fp, axis=1, keepdims=True)
    return fp * np.minimum(1.0, clip_norm / np.maximum(norms, 1e-12))


def _pseudonymise(table: FingerprintTable, key: SiteKey) -> FingerprintTable:
    subjects = {s: key.subject(s) for s in set(table.subject)}
    records = {r: key.record(r) for r in set(table.record)}
    return replace(
        table,
        subject=np.array([subjects[s] for s in table.subject], dtype=object),
        record=np.array([records[r] for r in table.record], dtype=object),
    )


def capped(rows: FingerprintTable, key: SiteKey, cap: int) -> FingerprintTable:
    """At most `cap` rows of each subject: the first by record pseudonym, then row order (a
    choice that depends on no fingerprint); the kept rows stay in their order."""
    pseudonym = {r: key.record(r) for r in set(rows.record.astype(str))}
    records = [pseudonym[r] for r in rows.record.astype(str)]
    order = sorted(range(len(rows)), key=lambda i: (str(rows.subject[i]), records[i], i))
    kept: list[int] = []
    taken: dict[str, int] = {}
    for i in order:
        subject = str(rows.subject[i])
        if taken.get(subject, 0) < cap:
            taken[subject] = taken.get(subject, 0) + 1
            kept.append(i)
    return rows.take(np.array(sorted(kept), dtype=np.int64))


def prepare_release(
    windows: FingerprintTable,
    *,
    card: ModelCard,
    policy: ReleasePolicy,
    key: SiteKey,
    modality: str,
    default_delta: float,
    seed: int | None = None,
) -> PreparedRelease:
    """Rows to release from window fingerprints with raw ids (see the module docstring).

    Parameters
    ----------
    windows
        Window-level rows from `compute.window_fingerprints`.
    card
        The model card (name, weights sha256 and code version go into the file).
    policy
        The site's release policy.
    key
        The site's pseudonymisation key.
    modality
        The modality the windows were embedded from ("paired", "ecg", "ppg").
    default_delta
        δ per vector when the policy sets none (the site's privacy δ).
    seed
        Seeds the noise, for tests and benchmarks only; None draws from OS entropy.
    """
    windows = windows.at_level("window")
    if len(windows) == 0:
        raise DataError("nothing to release: no window fingerprint")
    rows = windows if policy.level == "window" else record_means(windows)
    calibration = calibrate_noise(
        policy, vectors_per_subject=policy.max_vectors_per_subject, default_delta=default_delta
    )
    if calibration is not None:  # the charge is for k vectors per subject: never more leave
        rows = capped(rows, key, policy.max_vectors_per_subject)
    fp = rows.fp.astype(np.float64)
    if policy.clip_norm is not None:
        fp = clip_rows(fp, policy.clip_norm)
    if calibration is not None:
        fp = fp + np.random.default_rng(seed).normal(0.0, calibration.sigma, size=fp.shape)
    released = rows.with_fp(fp)
    if policy.level == "window":
        released = concat([released, record_means(released)])
    if calibration is not None:  # every column is covered: what is not noised is withheld
        released = replace(
            released,
            modality=np.full(len(released), modality, dtype=object),
            quality=np.full(len(released), np.nan, dtype=np.float32),
            n_windows=np.zeros(len(released), dtype=np.int32),
            start_s=np.full(len(released), np.nan),  # where in a record: withheld too
        )
    return PreparedRelease(
        table=_pseudonymise(released, key),
        policy=policy,
        calibration=calibration,
        modality=modality,
        site=key.site,
        card=card,
    )


def _charge(
    prepared: PreparedRelease, ledger: PrivacyLedger, budget: PrivacyBudget, run_id: str,
    server_round: int,
) -> float:  # fmt: skip
    """Charge the release's noise (if any); the site's ε at its δ afterwards."""
    if prepared.calibration is None:
        return ledger.epsilon(delta=budget.delta)
    entry = ledger.charge(
        run_id=run_id,
        server_round=server_round,
        kind="release",
        noise_multiplier=prepared.calibration.noise_multiplier,
        sample_rate=1.0,
        steps=1,
        delta=budget.delta,
        budget=budget,
    )
    return entry.epsilon_after


def _meta(prepared: PreparedRelease, site_epsilon: float, budget: PrivacyBudget) -> FingerprintMeta:
    t, cal, card = prepared.table, prepared.calibration, prepared.card
    return FingerprintMeta(
        model=card.model,
        model_weights_sha256=card.weights_sha256,
        model_code_version=card.code_version,
        fingerprint_dim=t.dim,
        modality=prepared.modality,  # type: ignore[arg-type]
        site=prepared.site,
        release=prepared.policy,
        noise_sigma=cal.sigma if cal else None,
        noise_delta=cal.delta if cal else None,
        vectors_per_subject=cal.vectors_per_subject if cal else 1,
        charged_noise_multiplier=cal.noise_multiplier if cal else None,
        site_epsilon=site_epsilon,
        site_delta=budget.delta,
        subjects=len(set(t.subject)),
        records=len(set(t.record)),
        rows=len(t),
    )


def commit_release(
    prepared: PreparedRelease,
    *,
    state_dir: Path,
    budget: PrivacyBudget,
    out: Path | None,
    run_id: str | None = None,
    server_round: int = 0,
    message_type: str = RELEASE_MESSAGE,
) -> tuple[ReleaseReport, bytes]:
    """Charge, serialise, write (to `out`, if given) and audit a prepared release.

    Parameters
    ----------
    state_dir
        The site's state folder (ledger and audit log).
    budget
        The site's privacy budget; the charge is refused if it would be exceeded.
    out
        File to write atomically; None only returns the bytes (e.g. to answer a query message).
    run_id, server_round
        Ledger key of the charge; each release needs its own (default: a fresh run id).
    message_type
        How the audit log names this release.

    Raises
    ------
    PrivacyBudgetError
        When the noise would take the site past its budget; nothing is written.
    """
    run_id = run_id or f"release-{uuid.uuid4().hex[:12]}"
    ledger = PrivacyLedger.at(state_dir)
    site_epsilon = _charge(prepared, ledger, budget, run_id, server_round)
    meta = _meta(prepared, site_epsilon, budget)
    blob = to_parquet_bytes(prepared.table, meta)
    digest = hashlib.sha256(blob).hexdigest()
    if out is not None:
        atomic_write_bytes(Path(out), blob)
    cal = prepared.calibration
    noise = f"σ={cal.sigma:.4g} ε/vector={cal.epsilon:g} δ={cal.delta:g}" if cal else "no noise"
    AuditLog.at(state_dir).append(
        AuditEntry(
            run_id=run_id,
            server_round=server_round,
            message_type=message_type,
            payload_bytes=len(blob),
            arrays_sha256=digest,
            metric_keys=list(COLUMNS),
            epsilon=site_epsilon,
            note=f"rows={meta.rows} level={prepared.policy.level} modality={meta.modality} "
            f"{noise}" + (f" file={Path(out).name}" if out is not None else ""),
        )
    )
    log.info("released %d fingerprint rows (%s), site ε=%.4g", meta.rows, noise, site_epsilon)
    report = ReleaseReport(
        path=Path(out) if out is not None else None,
        run_id=run_id,
        server_round=server_round,
        level=prepared.policy.level,
        modality=prepared.modality,
        rows=meta.rows,
        subjects=meta.subjects,
        records=meta.records,
        bytes=len(blob),
        sha256=digest,
        noise_sigma=meta.noise_sigma,
        epsilon_per_vector=cal.epsilon if cal else None,
        delta_per_vector=cal.delta if cal else None,
        vectors_per_subject=meta.vectors_per_subject,
        charged=cal is not None,
        site_epsilon=site_epsilon,
        site_delta=budget.delta,
    )
    return report, blob
