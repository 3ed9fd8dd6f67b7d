"""A site's answers to the server's query messages, in plain code (no Message is built here).

- ``query.fingerprint``: the global model's fingerprints of the site's windows, released under the
  site's OWN release policy by :func:`biofp_core.fingerprints.export.release_store` (record means
  or windows, clipping, Gaussian noise charged to the ledger, pseudonyms, an audit line for the
  release). Fingerprints leave only under a policy the site wrote down: a ``site.toml`` without a
  ``[release]`` section refuses. A noisy release is charged once per (run key, round, "release");
  asked again (a resumed server, a replayed message), the site sends the very bytes it released,
  cached in ``<state_dir>/releases/``, never a second noise draw for one charge; without that
  cache, or for other global weights, it refuses.
- ``query.probe``: one task's linear probe, cross-validated by subject on the site's own
  noise-free record fingerprints (never released) and its labels CSV; only the
  :class:`~biofp_core.evaluation.SiteProbe` scalars leave. A site without usable labels for the
  task refuses.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from biofp_core.artifacts import ModelCard, load_model, save_model
from biofp_core.errors import BioFPError, DataError
from biofp_core.evaluation import read_labels, site_probe, task_labels
from biofp_core.fingerprints.compute import window_fingerprints
from biofp_core.fingerprints.export import release_store
from biofp_core.fingerprints.parquet import read_fingerprints
from biofp_core.fingerprints.policy import ReleasePolicy
from biofp_core.fingerprints.pseudonyms import SiteKey
from biofp_core.fingerprints.release import prepare_release
from biofp_core.fsutil import atomic_write_bytes, exclusive_lock
from biofp_core.models.base import BioFPModel
from biofp_core.privacy.ledger import PrivacyLedger
from biofp_core.protocol import PROBE_TASK, FingerprintReplyMetrics, ProbeReplyMetrics
from biofp_core.site import SiteConfig
from biofp_core.validate import open_site_store
from client.site_data import SiteRef
from client.task import Arrays, model_from_arrays, round_seed
from server.config import RunConfig

RELEASES_DIR = "releases"  # under the site's state folder: the bytes of charged releases
FINGERPRINT_MODALITY = {"both": "paired", "ecg": "ecg", "ppg": "ppg"}  # site sensors -> modality


class QueryRefusedError(BioFPError):
    """The site declines a query under its own rules: no release policy, no usable labels for the
    task, or a charged release it cannot send again."""


class ProbeInstruction(BaseModel):
    """The server's probe query (the message's ConfigRecord)."""

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    task: str = Field(alias=PROBE_TASK, min_length=1, description="the label column to probe")


def global_model(run: RunConfig, arrays: Arrays) -> tuple[BioFPModel, ModelCard]:
    """The global model and its card, saved exactly as the server saves its final artifact, so
    a released file names the same weights sha256 as the server's ``model.card.json``."""
    with tempfile.TemporaryDirectory(prefix="biofp-global-") as tmp:
        return load_model(save_model(model_from_arrays(run, arrays), Path(tmp) / "global"))


def release_cache_path(state_dir: Path, run_key: str, server_round: int) -> Path:
    """Where a site keeps the bytes of the release charged under (run key, round)."""
    return Path(state_dir) / RELEASES_DIR / f"{run_key}-round-{server_round:04d}.parquet"


def _released_before(
    site: SiteConfig, card: ModelCard, *, run_key: str, server_round: int
) -> tuple[int, bytes] | None:
    """(rows, bytes) of the release already charged under (run key, round); None if none.

    Raises
    ------
    QueryRefusedError
        The release is charged but its bytes are not cached, or were of other global weights.
    """
    state_dir = site.resolved_state_dir()
    key = (run_key, server_round, "release")
    if not any(e.key == key for e in PrivacyLedger.at(state_dir).entries):
        return None
    path = release_cache_path(state_dir, run_key, server_round)
    where = f"site {site.name}: the release of round {server_round} of run {run_key} is charged"
    try:
        _, meta = read_fingerprints(path)
    except DataError:
        raise QueryRefusedError(
            f"{where} but its bytes are not cached ({path}); releasing again would draw new "
            "noise for one charge; refused"
        ) from None
    if meta.model_weights_sha256 != card.weights_sha256:
        raise QueryRefusedError(
            f"{where} for other global weights ({meta.model_weights_sha256[:12]}, now "
            f"{card.weights_sha256[:12]}); releasing again would draw new noise for one charge; "
            "refused"
        )
    return meta.rows, path.read_bytes()


def release_fingerprints(
    site: SiteConfig, ref: SiteRef, run: RunConfig, arrays: Arrays, *, run_key: str,
    server_round: int,
) -> tuple[FingerprintReplyMetrics, np.ndarray]:  # fmt: skip
    """Release the site's fingerprints of the global model under its own policy.

    Returns
    -------
    tuple[FingerprintReplyMetrics, np.ndarray]
        The reply's metrics and the released Parquet file as a uint8 array (N,).

    Raises
    ------
    QueryRefusedError
        The site has no ``[release]`` policy, or cannot send a charged release again.
    PrivacyBudgetError
        The release's noise would exceed the site's budget; nothing is released.
    """
    if "release" not in site.model_fields_set:
        raise QueryRefusedError(
            f"site {site.name}: no [release] policy in its site.toml; fingerprints leave only "
            "under a policy the site wrote down; refused"
        )
    model, card = global_model(run, arrays)
    state_dir = site.resolved_state_dir()
    with exclusive_lock(Path(state_dir) / RELEASES_DIR / ".lock"):  # check, release, cache
        released = _released_before(site, card, run_key=run_key, server_round=server_round)
        if released is None:
            seed = None if ref.dp_seed is None else round_seed(ref.dp_seed, "release", server_round)
            report, blob = release_store(
                open_site_store(site), model, card, site=site, out=None,
                modality=FINGERPRINT_MODALITY[ref.modality], run_id=run_key,
                server_round=server_round, seed=seed,
            )  # fmt: skip
            if report.charged:  # asked again, the site sends these very bytes
                atomic_write_bytes(release_cache_path(state_dir, run_key, server_round), blob)
            released = report.rows, blob
    rows, blob = released
    metrics = FingerprintReplyMetrics(
        rows=rows,
        payload_bytes=len(blob),
        epsilon=PrivacyLedger.at(state_dir).epsilon(delta=site.privacy.delta),
        delta=site.privacy.delta,
    )
    return metrics, np.frombuffer(blob, dtype=np.uint8)


def fingerprint_refusal(site: SiteConfig) -> FingerprintReplyMetrics:
    """The metrics of a refused fingerprint query: nothing released, the site's ε."""
    delta = site.privacy.delta
    epsilon = PrivacyLedger.at(site.resolved_state_dir()).epsilon(delta=delta)
    return FingerprintReplyMetrics.refusal(epsilon=epsilon, delta=delta)


def probe_task(
    site: SiteConfig, ref: SiteRef, run: RunConfig, arrays: Arrays, task: str
) -> ProbeReplyMetrics:
    """Cross-validate `task`'s linear probe on the site's own record fingerprints.

    The fingerprints are the global model's, noise-free and keyed by the site's pseudonyms like
    its labels; they never leave the site, only the probe's scalars do.

    Raises
    ------
    QueryRefusedError
        The site has no labels CSV, no column `task`, or too few labelled subjects or classes.
    """
    if site.labels_csv is None:
        raise QueryRefusedError(
            f"site {site.name}: no labels_csv in its site.toml, no labels for task {task!r}; "
            "refused"
        )
    key = SiteKey.load_or_create(site.resolved_state_dir())
    try:
        labels = task_labels(read_labels(site.labels_csv, key=key), task)
    except DataError as exc:
        raise QueryRefusedError(f"site {site.name}: no labels for task {task!r}: {exc}") from None
    model, card = global_model(run, arrays)
    modality = FINGERPRINT_MODALITY[ref.modality]
    windows = window_fingerprints(open_site_store(site), model, modality=modality)
    # record means keyed by pseudonyms, without noise: prepared, never committed nor sent
    level = "window" if labels.key == "window" else "record"  # window labels: window rows
    local = prepare_release(
        windows, card=card, policy=ReleasePolicy(level=level), key=key, modality=modality,
        default_delta=site.privacy.delta,
    ).table  # fmt: skip
    try:
        probe = site_probe(local, labels, seed=run.seed)
    except DataError as exc:
        raise QueryRefusedError(f"site {site.name}: cannot probe task {task!r}: {exc}") from None
    return ProbeReplyMetrics(
        kind=probe.kind, value=probe.value, baseline=probe.baseline, rows=probe.rows,
        subjects=probe.subjects,
    )  # fmt: skip
