"""One call from a configured site and a model artifact to a released fingerprint file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from biofp_core.artifacts import ModelCard, load_model
from biofp_core.fingerprints.compute import window_fingerprints
from biofp_core.fingerprints.policy import ReleasePolicy
from biofp_core.fingerprints.pseudonyms import SiteKey
from biofp_core.fingerprints.release import (
    RELEASE_MESSAGE,
    ReleaseReport,
    commit_release,
    prepare_release,
)
from biofp_core.fingerprints.table import FingerprintTable
from biofp_core.fsutil import check_output_file
from biofp_core.models.base import BioFPModel
from biofp_core.site import SiteConfig
from biofp_core.store import WindowStore
from biofp_core.validate import open_site_store


def release_store(
    store: WindowStore,
    model: BioFPModel,
    card: ModelCard,
    *,
    site: SiteConfig,
    out: Path | None,
    modality: str = "paired",
    run_id: str | None = None,
    server_round: int = 0,
    message_type: str = RELEASE_MESSAGE,
    seed: int | None = None,
    on_batch: Callable[[int], None] | None = None,
    new_key: bool = False,
) -> tuple[ReleaseReport, bytes]:
    """Embed a site's windows with `model` and release them under the site's policy.

    The site's state folder holds the pseudonym key (created on first use), the ledger charged
    for the noise and the audit log. See `release.commit_release` for `out`, `run_id`,
    `server_round` and `message_type`; `seed` seeds the noise (tests and benchmarks only);
    `new_key` lets a site that has released before make a new pseudonym key when it lost its own.

    Raises
    ------
    PrivacyBudgetError
        When the release's noise would exceed the site's budget (nothing is written).
    """
    windows = window_fingerprints(store, model, modality=modality, on_batch=on_batch)
    return release_windows(
        windows, card, site=site, out=out, modality=modality, run_id=run_id,
        server_round=server_round, message_type=message_type, seed=seed, new_key=new_key,
    )  # fmt: skip


def release_windows(
    windows: FingerprintTable,
    card: ModelCard,
    *,
    site: SiteConfig,
    out: Path | None,
    policy: ReleasePolicy | None = None,
    modality: str = "paired",
    run_id: str | None = None,
    server_round: int = 0,
    message_type: str = RELEASE_MESSAGE,
    seed: int | None = None,
    new_key: bool = False,
) -> tuple[ReleaseReport, bytes]:
    """Release a site's window fingerprints (embedded from `modality`) under `policy` (default:
    the site's own ``[release]`` policy); the rest as in :func:`release_store`."""
    state_dir = site.resolved_state_dir()
    key = SiteKey.load_or_create(state_dir, allow_new=new_key)
    prepared = prepare_release(
        windows, card=card, policy=site.release if policy is None else policy, key=key,
        modality=modality, default_delta=site.privacy.delta, seed=seed,
    )  # fmt: skip
    return commit_release(
        prepared, state_dir=state_dir, budget=site.privacy, out=out, run_id=run_id,
        server_round=server_round, message_type=message_type,
    )  # fmt: skip


def export_fingerprints(
    site: SiteConfig,
    *,
    model_path: Path,
    out: Path,
    modality: str = "paired",
    seed: int | None = None,
    on_record: Callable[[str], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
    new_key: bool = False,
) -> ReleaseReport:
    """`biofp fingerprint`: the site's window store, the artifact's model, a released file.

    The output path is checked before anything is read or charged.
    """
    check_output_file(out, what="Parquet file")
    model, card = load_model(model_path)
    store = open_site_store(site, on_record=on_record)
    report, _ = release_store(
        store, model, card, site=site, out=out, modality=modality, seed=seed, on_batch=on_batch,
        new_key=new_key,
    )  # fmt: skip
    return report
