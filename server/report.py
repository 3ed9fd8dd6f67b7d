"""The run report: per-round, per-site metrics as the server saw them, written as JSON each round.

``<run_dir>/metrics.json`` holds a :class:`RunReport`: the status of the run and one
:class:`RoundMetrics` per completed round, each with one :class:`SiteRound` per sampled site,
keyed by Flower node id and named by the name the site was registered under (``flwr supernode
register ... --name``, see :mod:`server.nodes`) when there is one. ε is the total a site reported
for its whole ledger (``None`` when it trains without DP).

``run_key`` is BioFP's run key (``run.json``: what the sites' ledgers and audit logs call the
run) and ``flower_run_ids`` every Flower run id (``flwr ls``) that worked on this run directory,
one per submission: the mapping between what the coordinator and the sites see.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from biofp_core.artifacts import DataSummary
from biofp_core.errors import ArtifactError
from biofp_core.fsutil import atomic_write_text
from strategies.base import RoundReplies

REPORT_NAME = "metrics.json"

SiteStatus = Literal["ok", "refused", "failed", "missing", "not-sampled"]


class SiteData(BaseModel):
    """A site's training data in counts, as the site reported them (if it did)."""

    model_config = ConfigDict(extra="forbid")

    subjects: int = Field(0, ge=0)
    windows: int = Field(0, ge=0)
    hours: float = Field(0.0, ge=0)


class SiteRound(BaseModel):
    """One site's part in one round."""

    model_config = ConfigDict(extra="forbid")

    node_id: int
    name: str | None = Field(None, description="registration name (flwr supernode register)")
    status: SiteStatus
    num_examples: int = 0
    train_loss: float | None = None
    loss_terms: dict[str, float] = Field(default_factory=dict)
    eval_loss: float | None = None
    epsilon: float | None = Field(None, description="total ε of the site; None without DP")
    delta: float | None = Field(None, description="the site's δ; None without DP")
    budget_exhausted: bool = False
    payload_bytes: int = 0
    reason: str | None = Field(None, description="one line, for failed or missing replies")
    data: SiteData | None = Field(None, description="the site's data, as it reported it")


class RoundMetrics(BaseModel):
    """One round: counts, aggregated losses, bytes, and every sampled site."""

    model_config = ConfigDict(extra="forbid")

    server_round: int
    sampled: int
    contributed: int
    failed: int
    refused: int
    missing: int
    excluded: int = Field(0, description="sites no longer sampled (budget-aware strategies)")
    bytes_received: int
    train_loss: float | None = Field(None, description="weighted mean over contributing sites")
    eval_loss: float | None = Field(None, description="weighted mean over evaluating sites")
    max_epsilon: float | None = None
    wall_s: float
    sites: list[SiteRound]


class RunReport(BaseModel):
    """The whole run so far."""

    model_config = ConfigDict(extra="forbid")

    status: Literal["running", "completed", "failed", "stopped"] = "running"
    error: str | None = Field(None, description="why the run failed or stopped (one line)")
    run_key: str | None = Field(None, description="BioFP's run key: 'run' in the sites' ledgers")
    flower_run_ids: list[int] = Field(
        default_factory=list, description="Flower run ids (flwr ls) of every submission"
    )
    resumed_from_round: int | None = None
    initial_model_sha256: str | None = Field(
        None, description="sha256 of the initial-model weights round 1 started from"
    )
    num_rounds: int
    rounds: list[RoundMetrics] = Field(default_factory=list)
    model_path: str | None = None

    def site_privacy(self) -> dict[int, tuple[float, float]]:
        """Latest (total ε, δ) each DP site reported over the run, by node id."""
        latest: dict[int, tuple[float, float]] = {}
        for rnd in self.rounds:
            for site in rnd.sites:
                if site.epsilon is not None and site.delta:
                    latest[site.node_id] = (site.epsilon, site.delta)
        return latest

    def site_names(self) -> dict[int, str]:
        """Node id -> registration name of every named site seen in the run."""
        return {s.node_id: s.name for rnd in self.rounds for s in rnd.sites if s.name}

    def data_summary(self) -> DataSummary:
        """Sites that contributed, and the subjects, windows and hours of those that reported
        their data (each site's latest report, summed)."""
        contributors = self.contributors()
        latest: dict[int, SiteData] = {}
        for rnd in self.rounds:
            for site in rnd.sites:
                if site.data is not None and site.node_id in contributors:
                    latest[site.node_id] = site.data
        return DataSummary(
            sites=len(contributors),
            subjects=sum(d.subjects for d in latest.values()),
            windows=sum(d.windows for d in latest.values()),
            hours=round(sum(d.hours for d in latest.values()), 3),
        )

    def contributors(self) -> set[int]:
        """Node ids of every site that contributed at least one update."""
        return {s.node_id for rnd in self.rounds for s in rnd.sites if s.status == "ok"}

    def write(self, run_dir: Path) -> Path:
        """Write ``<run_dir>/metrics.json`` atomically."""
        path = Path(run_dir) / REPORT_NAME
        atomic_write_text(path, self.model_dump_json(indent=1) + "\n")
        return path

    @classmethod
    def read(cls, run_dir: Path) -> RunReport | None:
        """The report of an earlier attempt of this run, or None."""
        path = Path(run_dir) / REPORT_NAME
        if not path.exists():
            return None
        try:
            return cls.model_validate_json(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{path}: unreadable run report ({exc})") from None


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def site_rounds(report: RoundReplies) -> list[SiteRound]:
    """Per-site view of one training round: the strategy's verdict and the metrics it parsed."""
    statuses: dict[int, tuple[SiteStatus, str | None]] = {
        **{n: ("ok", None) for n in report.contributed},
        **{n: ("refused", None) for n in report.refused},
        **{n: ("failed", reason) for n, reason in report.failed.items()},
        **{n: ("missing", None) for n in report.missing},
    }
    sites = []
    for node_id, (status, reason) in sorted(statuses.items()):
        metrics = report.metrics.get(node_id)
        site = SiteRound(node_id=node_id, status=status, reason=reason)
        if metrics is not None:
            site.num_examples = metrics.num_examples
            site.train_loss = metrics.train_loss
            site.loss_terms = dict(metrics.loss_terms)
            site.epsilon = _finite(metrics.epsilon)
            site.delta = metrics.delta if site.epsilon is not None else None
            site.budget_exhausted = metrics.budget_exhausted
            site.payload_bytes = metrics.payload_bytes
            if metrics.data_subjects is not None:
                site.data = SiteData(
                    subjects=metrics.data_subjects,
                    windows=metrics.data_windows or 0,
                    hours=metrics.data_hours or 0.0,
                )
        sites.append(site)
    return sites


def name_sites(sites: list[SiteRound], names: dict[int, str]) -> None:
    """Give each site its registration name (:func:`server.nodes.registered_names`)."""
    for site in sites:
        site.name = names.get(site.node_id, site.name)


def add_eval_losses(sites: list[SiteRound], report: RoundReplies) -> float | None:
    """Put each site's held-out loss (as the strategy kept it) into `sites`; return the
    example-weighted mean."""
    by_node = {s.node_id: s for s in sites}
    total, weight = 0.0, 0
    for node_id, answer in report.evaluated.items():
        loss = float(answer.eval_loss or 0.0)  # an answer always has one
        by_node.setdefault(node_id, SiteRound(node_id=node_id, status="not-sampled"))
        by_node[node_id].eval_loss = loss
        total, weight = total + loss * answer.num_examples, weight + answer.num_examples
    sites[:] = sorted(by_node.values(), key=lambda s: s.node_id)
    return total / weight if weight else None


def weighted_train_loss(sites: list[SiteRound]) -> float | None:
    """Mean training loss over contributing sites, weighted by their examples."""
    ok = [s for s in sites if s.status == "ok" and s.train_loss is not None and s.num_examples]
    weight = sum(s.num_examples for s in ok)
    return sum(s.train_loss * s.num_examples for s in ok) / weight if weight else None
