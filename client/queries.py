"""A site's answers to the server's query messages, in plain code (no Message is built here).

- ``query.fingerprint``: the global model's fingerprints of the site's windows, released under the
  site's OWN release policy (which must add noise for anything to leave through Flower) by
  :func:`biofp_core.fingerprints.export.release_store` (record means
  or windows, clipping, Gaussian noise charged to the ledger, pseudonyms, an audit line for the
  release). Fingerprints leave only under a policy the site wrote down: a ``site.toml`` without a
  ``[release]`` section refuses. A noisy release is charged once per (run key, round, "release");
  asked again (a resumed server, a replayed message), the site sends the very bytes it released,
  kept by :mod:`client.charged`, never a second noise draw for one charge; without that cache,
  or for other global weights, it refuses.
- ``query.probe``: one task's linear probe, cross-validated by subject on the site's own
  noise-free record fingerprints (never released) and its labels CSV; only the scalars of
  :func:`~biofp_core.evaluation.federated.private_site_probe` leave (subsample-and-aggregate plus
  Gaussian noise of the site's ``probe_epsilon``), charged as ``probe:<task>`` and counted against
  ``max_charged_queries``. The task's kind and classes are the site's settings (``[tasks]`` in
  site.toml), never read off the labels; a group that cannot probe (one class, too few subjects)
  counts as the public baseline inside the mechanism. A site refuses only for reasons of its
  configuration: no ``[release]`` section, no labels file, a task it did not declare or a
  labels file without the task's column.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from biofp_core.artifacts import ModelCard, load_model, save_model
from biofp_core.errors import DataError, SiteLimitError
from biofp_core.evaluation import declared_task_labels, read_labels
from biofp_core.evaluation.federated import private_site_probe
from biofp_core.fingerprints.compute import window_fingerprints
from biofp_core.fingerprints.export import release_store
from biofp_core.fingerprints.policy import ReleasePolicy
from biofp_core.fingerprints.pseudonyms import SiteKey
from biofp_core.fingerprints.release import prepare_release
from biofp_core.models.base import BioFPModel
from biofp_core.privacy.accounting import gaussian_noise_multiplier
from biofp_core.privacy.ledger import LedgerEntry
from biofp_core.privacy.mechanisms import noise_rng
from biofp_core.protocol import FingerprintReplyMetrics, ProbeReplyMetrics, RunConfig
from biofp_core.site import SiteConfig
from biofp_core.validate import open_site_store
from client.charged import Answer, answered_before, charging, instruction_json, keep_answer
from client.limits import check_query_cap
from client.session import SiteSession
from client.task import Arrays, model_from_arrays, round_seed

FINGERPRINT_MODALITY = {"both": "paired", "ecg": "ecg", "ppg": "ppg"}  # site sensors -> modality
RELEASE_ARRAY = "parquet"  # the released file's bytes, as kept in the charged-answer cache


class QueryRefusedError(SiteLimitError):
    """The site declines a query under its own rules: no release policy or no usable labels for
    the task."""


def global_model(run: RunConfig, arrays: Arrays) -> tuple[BioFPModel, ModelCard]:
    """The global model and its card, saved exactly as the server saves its final artifact, so
    a released file names the same weights sha256 as the server's ``model.card.json``."""
    with tempfile.TemporaryDirectory(prefix="biofp-global-") as tmp:
        return load_model(save_model(model_from_arrays(run, arrays), Path(tmp) / "global"))


def release_fingerprints(
    session: SiteSession, arrays: Arrays
) -> tuple[FingerprintReplyMetrics, np.ndarray, LedgerEntry]:
    """Release the site's fingerprints of the global model under its own policy.

    Returns
    -------
    tuple[FingerprintReplyMetrics, np.ndarray, LedgerEntry]
        The reply's metrics, the released Parquet file as a uint8 array (N,), and the ledger
        entry that paid for it.

    Raises
    ------
    QueryRefusedError
        The site has no ``[release]`` policy or one without noise.
    ReplayRefusedError
        The release is charged but its bytes are not cached, or were of other global weights.
    PrivacyBudgetError
        The release's noise would exceed the site's budget; nothing is released.
    """
    site, run_key, server_round = session.site, session.run_key, session.server_round
    _check_release_policy(site, what="fingerprints")
    if not site.release.noisy:
        raise QueryRefusedError(
            f"site {site.name}: its [release] policy adds no noise (no epsilon); fingerprints "
            "leave through Flower only with noise charged to the ledger; refused"
        )
    question = instruction_json({"server_round": server_round})
    with charging(session):  # check, release, cache
        answer = answered_before(session, "release", global_arrays=arrays, instruction=question)
        if answer is None:
            check_query_cap(session)
            model, card = global_model(session.run, arrays)
            ref = session.where
            seed = (
                None
                if ref.dp_seed is None
                else round_seed(ref.dp_seed, run_key, "release", server_round)
            )
            report, blob = release_store(
                open_site_store(site), model, card, site=site, out=None,
                modality=FINGERPRINT_MODALITY[ref.modality], run_id=run_key,
                server_round=server_round, seed=seed,
            )  # fmt: skip
            session.ledger.reload()  # release_store charged the ledger itself
            charged = next(
                e for e in session.ledger.entries if e.key == (run_key, server_round, "release")
            )
            answer = Answer(
                {"rows": report.rows}, {RELEASE_ARRAY: np.frombuffer(blob, dtype=np.uint8)}, charged
            )
            # a noisy policy always charges: asked again, the site sends these very bytes
            keep_answer(session, "release", global_arrays=arrays, instruction=question,
                        answer=answer)  # fmt: skip
    parquet = answer.arrays[RELEASE_ARRAY]
    metrics = FingerprintReplyMetrics(
        rows=int(answer.metrics["rows"]),
        payload_bytes=int(parquet.nbytes),
        epsilon=session.epsilon(),
        delta=session.delta,
    )
    return metrics, parquet, answer.charged


def _check_release_policy(site: SiteConfig, *, what: str) -> None:
    if "release" not in site.model_fields_set:
        raise QueryRefusedError(
            f"site {site.name}: no [release] policy in its site.toml; {what} leave only under a "
            "policy the site wrote down; refused"
        )


def probe_task(
    session: SiteSession, arrays: Arrays, task: str
) -> tuple[ProbeReplyMetrics, LedgerEntry]:
    """`task`'s probe on the site's own record fingerprints, released as noisy scalars.

    The fingerprints are the global model's, noise-free and keyed by the site's pseudonyms like
    its labels; they never leave the site. The probe's value leaves through
    :func:`~biofp_core.evaluation.federated.private_site_probe`, charged as ``probe:<task>``
    (a charged probe asked again is answered from the site's cache).

    Raises
    ------
    QueryRefusedError
        No ``[release]`` section, no labels CSV, `task` not declared in ``[tasks]``, or no
        column `task` in the labels CSV (configuration only: never the label values).
    PrivacyBudgetError
        Over budget or over the query cap.
    """
    site, run_key, server_round = session.site, session.run_key, session.server_round
    _check_release_policy(site, what="probe results")
    if site.labels_csv is None:
        raise QueryRefusedError(
            f"site {site.name}: no labels_csv in its site.toml, no labels for task {task!r}; "
            "refused"
        )
    spec = site.tasks.get(task)
    if spec is None:
        raise QueryRefusedError(
            f"site {site.name}: task {task!r} is not declared in its site.toml [tasks]; refused"
        )
    kind = f"probe:{task}"[:70]
    key = SiteKey.load_or_create(session.state_dir)
    try:
        rows = read_labels(site.labels_csv, key=key)
        labels = declared_task_labels(rows, task, kind=spec.kind, classes=spec.classes)
    except DataError as exc:
        raise QueryRefusedError(f"site {site.name}: no labels for task {task!r}: {exc}") from None
    question = instruction_json({"task": task, "server_round": server_round})
    with charging(session):
        cached = answered_before(session, kind, global_arrays=arrays, instruction=question)
        if cached is not None:
            return ProbeReplyMetrics.from_metrics(cached.metrics), cached.charged
        check_query_cap(session)
        model, card = global_model(session.run, arrays)
        modality = FINGERPRINT_MODALITY[session.where.modality]
        windows = window_fingerprints(open_site_store(site), model, modality=modality)
        # record means keyed by pseudonyms, without noise: prepared, never committed nor sent
        level = "window" if labels.key == "window" else "record"  # window labels: window rows
        local = prepare_release(
            windows, card=card, policy=ReleasePolicy(level=level), key=key, modality=modality,
            default_delta=site.privacy.delta,
        ).table  # fmt: skip
        limits, dp_seed = site.privacy, session.where.dp_seed
        sigma = gaussian_noise_multiplier(epsilon=limits.probe_epsilon, delta=limits.delta)
        seed = None if dp_seed is None else round_seed(dp_seed, run_key, kind, server_round)
        probe = private_site_probe(
            local, labels, groups=limits.probe_groups, noise_multiplier=sigma,
            rng=noise_rng(seed), seed=session.run.seed,
        )  # fmt: skip
        entry = session.ledger.charge(
            run_id=run_key, server_round=server_round, kind=kind, noise_multiplier=sigma,
            sample_rate=1.0, steps=1, delta=limits.delta, budget=limits,
        )  # fmt: skip
        metrics = ProbeReplyMetrics(
            kind=probe.kind, value=probe.value, baseline=probe.baseline, rows=probe.rows,
            subjects=probe.subjects,
        )  # fmt: skip
        keep_answer(session, kind, global_arrays=arrays, instruction=question,
                    answer=Answer(metrics.to_metrics(), {}, entry))  # fmt: skip
    return metrics, entry
