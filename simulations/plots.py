"""The research report's figures: small PNGs drawn on matplotlib's Agg canvas (no display, no
pyplot state), one function per figure, each from the same data the report tabulates.

Each function writes `path` and returns it, or returns None when there is nothing to draw (e.g. no
ε without DP). Probe bars carry their 95 % bootstrap CI as error bars and the task's baseline
(chance AUROC, or the mean predictor's MAE) as a dashed line.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from biofp_core.evaluation import StudyRow
from server.report import RunReport
from simulations.downstream import CLEAN, DownstreamStudy, ReconstructedWindow

DPI = 100
PANEL_W, PANEL_H = 3.0, 2.8  # inches per probe panel
SERIES_SIZE = (6.0, 3.2)
MODALITY_LABELS = {"paired": "paired", "ecg": "ECG only", "ppg": "PPG only"}


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def short_node(node_id: int, name: str | None = None) -> str:
    """A site as the figures and tables name it: its registration name when the server knows
    one (deployment), else the end of its Flower node id."""
    return name or f"node {str(node_id)[-6:]}"


def site_series(report: RunReport, field: str, path: Path, *, ylabel: str) -> Path | None:
    """One line per site (Flower node) of a SiteRound field over rounds: train_loss, epsilon,
    payload_bytes."""
    series: dict[int, list[tuple[int, float]]] = {}
    names = report.site_names()
    for rnd in report.rounds:
        for site in rnd.sites:
            value = getattr(site, field)
            if value is not None and site.status == "ok":
                series.setdefault(site.node_id, []).append((rnd.server_round, float(value)))
    if not series:
        return None
    fig = Figure(figsize=SERIES_SIZE)
    ax = fig.subplots()
    for node, points in sorted(series.items()):
        rounds, values = zip(*points, strict=True)
        ax.plot(rounds, values, marker="o", label=short_node(node, names.get(node)))
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_xticks([r.server_round for r in report.rounds])
    ax.legend(fontsize="small", ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def bytes_per_round(report: RunReport, path: Path) -> Path | None:
    """Bytes the server received per round (update arrays of every reply)."""
    if not report.rounds:
        return None
    fig = Figure(figsize=SERIES_SIZE)
    ax = fig.subplots()
    rounds = [r.server_round for r in report.rounds]
    ax.bar(rounds, [r.bytes_received / 1e6 for r in report.rounds], color="tab:blue")
    ax.set_xlabel("round")
    ax.set_ylabel("MB received")
    ax.set_xticks(rounds)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def _ci(row: StudyRow) -> tuple[float, float]:
    r = row.result
    if math.isnan(r.ci_low) or math.isnan(r.ci_high):
        return 0.0, 0.0
    return max(0.0, r.value - r.ci_low), max(0.0, r.ci_high - r.value)


def _panel(
    ax: Axes, title: str, groups: Sequence[str], series: dict[str, list[StudyRow | None]]
) -> None:
    """Grouped bars: one group per `groups` entry, one bar per series (None: not run)."""
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    rows = [r for values in series.values() for r in values if r is not None]
    for i, (name, values) in enumerate(series.items()):
        heights = [r.result.value if r is not None else 0.0 for r in values]
        errors = np.array([_ci(r) if r is not None else (0.0, 0.0) for r in values]).T
        ax.bar(x + (i - (len(series) - 1) / 2) * width, heights, width, yerr=errors,
               capsize=2, label=name)  # fmt: skip
    if rows:
        ax.axhline(rows[0].result.baseline, color="gray", linestyle="--", linewidth=1)
        ax.set_ylabel(rows[0].result.metric.upper().replace("_", " "))
        if rows[0].result.metric != "mae":
            ax.set_ylim(0.0, 1.05)
    ax.set_xticks(x, groups, fontsize="small")
    ax.set_title(title, fontsize="medium")


def _panels(n: int) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(PANEL_W * max(1, n), PANEL_H))
    axes = fig.subplots(1, max(1, n), squeeze=False)[0]
    return fig, list(axes)


def downstream_comparison(studies: Sequence[DownstreamStudy], path: Path) -> Path | None:
    """Each task on paired fingerprints released without noise, one bar per model."""
    tasks = list(dict.fromkeys(t for s in studies for t in s.tasks))
    if not tasks:
        return None
    fig, axes = _panels(len(tasks))
    for ax, task in zip(axes, tasks, strict=True):
        series = {s.model: [s.ablation_row(CLEAN, task, "paired")] for s in studies}
        _panel(ax, task, ["paired"], series)
    axes[0].legend(fontsize="x-small")
    return _save(fig, path)


def modality_ablation(study: DownstreamStudy, path: Path) -> Path | None:
    """Each task on paired, ECG-only and PPG-only fingerprints, one bar per release variant."""
    if not study.ablation:
        return None
    fig, axes = _panels(len(study.tasks))
    modalities = list(MODALITY_LABELS)
    for ax, task in zip(axes, study.tasks, strict=True):
        series = {v: [study.ablation_row(v, task, m) for m in modalities] for v in study.ablation}
        _panel(ax, task, [MODALITY_LABELS[m] for m in modalities], series)
    axes[0].legend(fontsize="x-small")
    return _save(fig, path)


def attribute_inference(study: DownstreamStudy, path: Path) -> Path | None:
    """Utility beside leakage: the utility task and each attribute, per release variant."""
    tasks = list(dict.fromkeys(r.result.task for r in study.attributes))
    if not tasks:
        return None
    variants = list(dict.fromkeys(r.fingerprints for r in study.attributes))
    fig, axes = _panels(len(tasks))
    for ax, task in zip(axes, tasks, strict=True):
        rows = {r.fingerprints: r for r in study.attributes if r.result.task == task}
        role = next(iter(rows.values())).role
        series = {v: [rows.get(v)] for v in variants}
        _panel(ax, f"{task} ({'utility' if role == 'utility' else 'attack'})", [""], series)
    axes[0].legend(fontsize="x-small")
    return _save(fig, path)


def reconstruction(
    windows: Sequence[ReconstructedWindow], path: Path, *, fs_hz: float = 125.0
) -> Path | None:
    """Per held-out window: the PPG given, the real ECG and the ECG decoded from the PPG alone."""
    if not windows:
        return None
    fig = Figure(figsize=(7.0, 1.7 * len(windows)))
    axes = fig.subplots(len(windows), 1, squeeze=False)[:, 0]
    for ax, w in zip(axes, windows, strict=True):
        t = np.arange(len(w.ecg)) / fs_hz
        ax.plot(t, w.ppg + 4.0, color="tab:green", linewidth=0.7, label="PPG (input)")
        ax.plot(t, w.ecg_from_ppg, color="tab:red", linewidth=0.7, label="ECG from PPG alone")
        ax.plot(t, w.ecg, color="black", linewidth=0.7, label="ECG (real)")
        r = w.row
        title = f"{r.site}, subject {r.subject[:8]}, t = {r.start_s:g} s: r = {r.correlation:.2f}"
        ax.set_title(title, fontsize="small")
        ax.set_yticks([])
    axes[-1].set_xlabel("s")
    axes[0].legend(fontsize="x-small", ncol=3, loc="upper right")
    return _save(fig, path)


def utility_vs_epsilon(
    curves: dict[str, list[tuple[float, float, float, float]]],
    path: Path,
    *,
    ylabels: dict[str, str] | None = None,
    references: dict[str, dict[str, float]] | None = None,
) -> Path | None:
    """One panel per site: its main task's score (with the 95 % CI) against the per-site budget
    ε, points (ε, value, ci_low, ci_high) with ε = inf drawn at the right end as "∞"; dashed
    lines for reference models (e.g. the untrained encoder)."""
    curves = {site: sorted(points) for site, points in curves.items() if points}
    if not curves:
        return None
    finite = sorted({e for pts in curves.values() for e, *_ in pts if math.isfinite(e)})
    top = (finite[-1] * 2) if finite else 1.0  # where ε = inf is drawn
    fig, axes = _panels(len(curves))
    for ax, (site, points) in zip(axes, curves.items(), strict=True):
        eps = np.array([e if math.isfinite(e) else top for e, *_ in points])
        value = np.array([p[1] for p in points])
        low = np.array([p[1] - p[2] for p in points])
        high = np.array([p[3] - p[1] for p in points])
        ax.errorbar(eps, value, yerr=[np.maximum(low, 0), np.maximum(high, 0)], marker="o",
                    capsize=2, label="federated")  # fmt: skip
        for i, (name, level) in enumerate((references or {}).get(site, {}).items()):
            ax.axhline(level, linestyle="--", linewidth=1, color=f"C{i + 1}", label=name)
        ax.set_xscale("log", base=2)
        ticks = [*finite, top]
        ax.set_xticks(ticks, [f"{t:g}" for t in finite] + ["∞"])
        ax.set_xlabel("ε per site")
        ax.set_ylabel((ylabels or {}).get(site, "score"))
        ax.set_title(site, fontsize="medium")
    axes[0].legend(fontsize="x-small")
    return _save(fig, path)
