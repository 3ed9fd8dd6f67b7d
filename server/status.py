"""``biofp server status``: a run as the coordinator reads it, from its ``metrics.json``.

Sites appear by their registration name (``flwr supernode register ... --name``), the run by
both its BioFP run key (what the sites' ledgers and audit logs call it) and the Flower run ids
that worked on it (what ``flwr ls`` shows).
"""

from __future__ import annotations

import time
from pathlib import Path

from biofp_core.deployment import DeploymentError, load_server_config
from server.nodes import node_label
from server.report import REPORT_NAME, RunReport


def run_directory(config: Path, run: str) -> Path:
    """``<workdir>/<run>`` of server.toml (an absolute `run` as is)."""
    cfg = load_server_config(config)
    path = Path(run).expanduser()
    return path if path.is_absolute() else cfg.superlink.workdir / path


def read_status(
    config: Path, run: str, *, wait: bool = False, timeout_s: float = 3600.0, poll_s: float = 2.0
) -> tuple[RunReport, Path]:
    """The run's report (waiting, with `wait`, until it is no longer running) and directory.

    Raises
    ------
    DeploymentError
        No report in the run directory (and none appeared within `timeout_s` with `wait`).
    """
    run_dir = run_directory(config, run)
    deadline = time.monotonic() + timeout_s
    while True:
        report = RunReport.read(run_dir)
        done = report is not None and report.status != "running"
        if done or not wait or time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    if report is None:
        raise DeploymentError(
            f"{run_dir / REPORT_NAME}: no run report (has the run been submitted with flwr run, "
            "with this out-dir?)"
        )
    return report, run_dir


def render_status(report: RunReport, run_dir: Path) -> list[str]:
    """Lines for people: the run, then one line per round and site."""
    flower = ", ".join(map(str, report.flower_run_ids)) or "?"
    lines = [
        f"run {run_dir}: {report.status}" + (f" ({report.error})" if report.error else ""),
        f"run key {report.run_key or '?'} (the sites' ledgers and audit logs) = Flower run "
        f"{flower} (flwr ls)",
    ]
    if report.resumed_from_round is not None:
        lines.append(f"resumed after round {report.resumed_from_round}")
    names = report.site_names()
    for rnd in report.rounds:
        lines.append(
            f"round {rnd.server_round}/{report.num_rounds}: {rnd.contributed} of {rnd.sampled} "
            f"sites contributed, {rnd.failed} failed, {rnd.refused} refused, {rnd.missing} "
            f"missing, {rnd.wall_s:.0f} s"
        )
        for site in rnd.sites:
            eps = f", ε {site.epsilon:.3f}" if site.epsilon is not None else ""
            why = f": {site.reason}" if site.reason else ""
            label = node_label(site.node_id, names)
            lines.append(f"  {label} (node {site.node_id}): {site.status}{eps}{why}")
    if report.model_path:
        model = Path(report.model_path)  # relative to the SuperLink's workdir, like out-dir
        lines.append(f"model: {model if model.is_absolute() else run_dir / model.name}")
    return lines
