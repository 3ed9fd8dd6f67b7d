"""The round loop: train, evaluate and record each round, from any round on.

It follows the loop of Flower's ``Strategy.start`` (configure_train, send_and_receive,
aggregate_train, then the same for evaluation) with what a long federated run needs and
``start`` does not offer: it can begin at any round (resume after a restart), hands every
round's result to a callback before the next round (checkpoint, metrics), waits for the minimum
number of sites with a timeout instead of forever, and fails the run when no site contributed
to a round instead of carrying on with unchanged weights.

Every instruction carries the run key (``protocol.RUN_KEY``, from ``<out-dir>/run.json``), which
stays the same when a crashed run is resubmitted: sites key their ledger charges by it, so the
round in flight during a crash is not charged twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from biofp_core.errors import BioFPError
from biofp_core.protocol import Instruction, RunConfig, TrainSettings
from server.nodes import node_label, registered_names
from server.report import (
    RoundMetrics,
    add_eval_losses,
    name_sites,
    site_rounds,
    weighted_train_loss,
)
from server.rundir import read_run_key
from strategies.base import CountedFedAvg

log = logging.getLogger(__name__)

OnRound = Callable[[ArrayRecord | None, RoundMetrics], None]


class FederationError(BioFPError):
    """The federation cannot go on: too few sites connected, or no site contributed a round."""


def wait_for_sites(grid: Grid, *, needed: int, timeout_s: float, poll_s: float = 1.0) -> int:
    """Block until `needed` sites are connected; return how many are.

    Raises
    ------
    FederationError
        When fewer than `needed` sites are connected after `timeout_s` seconds.
    """
    deadline = time.monotonic() + timeout_s
    while (connected := len(list(grid.get_node_ids()))) < needed:
        if time.monotonic() >= deadline:
            raise FederationError(
                f"timed out after {timeout_s:g} s waiting for sites: {connected} of the "
                f"{needed} required (min-sites) connected; start more SuperNodes or lower "
                "min-sites"
            )
        log.info("waiting for sites: %d of %d connected", connected, needed)
        time.sleep(poll_s)
    return connected


def _no_contribution(metrics: RoundMetrics) -> FederationError:
    """The error of a round in which no site contributed, with the first failure's reason."""
    first = next((s for s in metrics.sites if s.reason), None)
    example = f"; {first.name or f'node {first.node_id}'}: {first.reason}" if first else ""
    if metrics.refused and not metrics.failed:
        example += (
            "; every site that answered refused the round (its privacy budget or policy, e.g. "
            "too few training subjects; its audit log says which)"
        )
    return FederationError(
        f"round {metrics.server_round}: no site contributed an update ({metrics.sampled} "
        f"sampled, {metrics.failed} failed, {metrics.refused} refused, "
        f"{metrics.missing} missing){example}"
    )


def run_round(
    strategy: CountedFedAvg,
    grid: Grid,
    server_round: int,
    arrays: ArrayRecord,
    *,
    run: RunConfig,
    run_key: str | None = None,
) -> tuple[ArrayRecord | None, RoundMetrics]:
    """Train and evaluate one round; `run_key` goes to the sites with every instruction.

    Returns
    -------
    tuple[ArrayRecord | None, RoundMetrics]
        The new global arrays (None when no site contributed) and the round's metrics.
    """
    started = time.monotonic()
    settings = TrainSettings(run_key=run_key, local_steps=run.local_steps, lr=run.lr)
    train_config = ConfigRecord(settings.to_config())
    messages = list(strategy.configure_train(server_round, arrays, train_config, grid))
    replies = list(grid.send_and_receive(messages, timeout=run.round_timeout_s))
    new_arrays, _ = strategy.aggregate_train(server_round, replies)  # verdicts: round_replies
    report = strategy.round_replies[server_round]
    sites = site_rounds(report)
    names = registered_names()
    for site in sites:
        if site.status == "missing":
            site.reason = (
                f"no reply within round-timeout-s = {run.round_timeout_s:g} s: the site never "
                "trained this round (is its SuperNode running ClientApps? see its log)"
            )
            label = node_label(site.node_id, names)
            log.warning("round %d: site %s: %s", server_round, label, site.reason)
        elif site.status == "failed":
            label = node_label(site.node_id, names)
            log.warning("round %d: site %s failed: %s", server_round, label, site.reason)
    eval_loss = None
    if new_arrays is not None and run.fraction_evaluate > 0:
        eval_messages = strategy.configure_evaluate(
            server_round, new_arrays, ConfigRecord(Instruction(run_key=run_key).to_config()), grid
        )
        eval_replies = list(grid.send_and_receive(eval_messages, timeout=run.round_timeout_s))
        strategy.aggregate_evaluate(server_round, eval_replies)  # answers: round_replies
        eval_loss = add_eval_losses(sites, report)
    name_sites(sites, names)
    log.info("round %d sites: %s", server_round,
             ", ".join(f"{node_label(s.node_id, names)} {s.status}" for s in sites))  # fmt: skip
    epsilons = [s.epsilon for s in sites if s.epsilon is not None]
    metrics = RoundMetrics(
        server_round=server_round,
        sampled=len(report.sampled),
        contributed=len(report.contributed),
        failed=len(report.failed),
        refused=len(report.refused),
        missing=len(report.missing),
        excluded=len(report.excluded),
        bytes_received=report.bytes_received,
        train_loss=weighted_train_loss(sites),
        eval_loss=eval_loss,
        max_epsilon=max(epsilons, default=None),
        wall_s=time.monotonic() - started,
        sites=sites,
    )
    log.info(
        "round %d: %d/%d sites contributed, train loss %s, eval loss %s, max ε %s",
        server_round,
        metrics.contributed,
        metrics.sampled,
        metrics.train_loss,
        metrics.eval_loss,
        metrics.max_epsilon,
    )
    return new_arrays, metrics


def run_rounds(
    strategy: CountedFedAvg,
    grid: Grid,
    run: RunConfig,
    *,
    arrays: ArrayRecord,
    first_round: int,
    on_round: OnRound,
    run_key: str | None = None,
) -> ArrayRecord:
    """Run rounds `first_round` .. ``run.num_rounds``; return the final global arrays.

    `on_round` is called after every round, also after one that no site contributed to (with
    None instead of arrays), before the run fails. `run_key` defaults to the one in the run
    directory (written by :meth:`server.rundir.RunDirectory.start`); without one, sites key
    their charges by Flower's run id.

    Raises
    ------
    FederationError
        Too few sites connect in time, or a round gets no contribution.
    """
    if run_key is None:
        run_key = read_run_key(run.run_dir)
    for server_round in range(first_round, run.num_rounds + 1):
        log.info("[ROUND %d/%d]", server_round, run.num_rounds)
        wait_for_sites(grid, needed=run.min_sites, timeout_s=run.wait_timeout_s)
        new_arrays, metrics = run_round(
            strategy, grid, server_round, arrays, run=run, run_key=run_key
        )
        on_round(new_arrays, metrics)
        if new_arrays is None:
            raise _no_contribution(metrics)
        arrays = new_arrays
    return arrays
