"""The limits a site pins in its own ``[privacy]`` section, checked before any data is read.

The server only asks: a run config that asks for a model, an architecture, a holdout, a bag size
or a noise level the site does not accept is refused (:class:`SiteLimitError`, a refusal reply),
and so is a charged query (a fingerprint release or a probe) past the site's cap per run.
Evaluations are not queries: one per round, each charged (and answered again from the cache).
"""

from __future__ import annotations

from biofp_core.errors import SiteLimitError
from biofp_core.protocol import RunConfig
from biofp_core.site import SiteConfig
from client.session import SiteSession

CHARGED_QUERY_KINDS = ("release", "probe:")  # ledger kinds a query is charged as


def check_run_limits(site: SiteConfig, run: RunConfig) -> None:
    """Refuse a run config beyond the site's limits.

    Raises
    ------
    SiteLimitError
        One line naming the run-config key, the value asked and the site's limit.
    """
    limits, where = site.privacy, f"site {site.name}"
    if run.model not in limits.models:
        raise SiteLimitError(f"{where}: model {run.model!r} not in its [privacy] models")
    pinned = limits.model_options
    if pinned is not None and run.model_architecture() != pinned:
        raise SiteLimitError(
            f"{where}: model-options {run.model_options} differ from its pinned architecture"
        )
    if run.holdout_fraction > limits.max_holdout_fraction:
        raise SiteLimitError(
            f"{where}: holdout-fraction {run.holdout_fraction:g} above its max_holdout_fraction "
            f"{limits.max_holdout_fraction:g}"
        )
    if run.bag_size > limits.max_bag_size:
        raise SiteLimitError(
            f"{where}: bag-size {run.bag_size} above its max_bag_size {limits.max_bag_size}"
        )
    if run.dp and run.noise_multiplier < limits.min_noise_multiplier:
        raise SiteLimitError(
            f"{where}: noise-multiplier {run.noise_multiplier:g} below its min_noise_multiplier "
            f"{limits.min_noise_multiplier:g}"
        )


def check_query_cap(session: SiteSession) -> None:
    """Refuse a charged query once the run has had the site's cap of them.

    Raises
    ------
    SiteLimitError
        The run key already holds ``max_charged_queries`` charged queries.
    """
    run_key = session.run_key
    used = sum(
        1
        for e in session.ledger.entries
        if e.run_id == run_key and e.kind.startswith(CHARGED_QUERY_KINDS)
    )
    cap = session.site.privacy.max_charged_queries
    if used >= cap:
        raise SiteLimitError(
            f"site {session.site.name}: run {run_key} has had its {cap} charged queries "
            "(max_charged_queries); refused"
        )
