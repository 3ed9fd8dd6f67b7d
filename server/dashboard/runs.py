"""What the dashboard reads: run directories, as the server (or ``biofp simulate``) wrote them.

Only the files the server itself holds are read, and only these, by fixed name (:data:`RUN_FILES`,
plus the report's figures): never a site's folder, ledger, key or audit log, even where a
simulation keeps its emulated sites under the run directory. ``metrics.json`` is read tolerantly
(unknown fields kept, missing ones blank) so that the schema may grow; a file that is missing,
half-written or corrupt makes its run show as "updating" instead of failing the page.

A root given to the dashboard is either a run directory itself or a folder of run directories
(one level down). Runs are identified by their directory name (made unique with ``~2``,
``~3``... across roots); a request names a run by that id, and its path comes from the discovery,
never from the request.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger(__name__)

METRICS = "metrics.json"
CONFIG = "config.json"
RUN_KEY = "run.json"
SUMMARY = "summary.json"
SIMULATION = "simulation.json"
REPORT_MD = "report.md"
REPORT_DIR = "report"
CHECKPOINTS = "checkpoints"
# the run-directory files the dashboard may read or serve: nothing else (besides the report's
# figures, and the header of the latest checkpoint for the size of a dense update)
RUN_FILES = (METRICS, CONFIG, RUN_KEY, SUMMARY, SIMULATION, REPORT_MD)
_MARKERS = (METRICS, CONFIG, RUN_KEY, SIMULATION)
_MAX_HEADER = 16 * 2**20
_FIGURE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,120}\.png$")
_SITE_NAME_KEYS = ("site", "site_name", "name")
_SITE_BUDGET_KEYS = ("epsilon_budget", "budget_epsilon", "budget")
GRID_STATUS = {
    "ok": "ok", "refused": "refused", "failed": "failed", "missing": "timed out",
    "timeout": "timed out", "timed-out": "timed out", "timed_out": "timed out",
}  # fmt: skip


class SiteRoundView(BaseModel):
    """One site in one round, as in ``metrics.json`` (extra fields kept, missing ones blank)."""

    model_config = ConfigDict(extra="allow")

    node_id: int | str | None = None
    status: str = "unknown"
    num_examples: int = 0
    train_loss: float | None = None
    eval_loss: float | None = None
    epsilon: float | None = None
    delta: float | None = None
    budget_exhausted: bool = False
    payload_bytes: int = 0
    reason: str | None = None

    def extra(self, keys: tuple[str, ...]) -> Any:
        """The first of `keys` present among the fields this view does not declare."""
        extras = self.model_extra or {}
        return next((extras[k] for k in keys if extras.get(k) is not None), None)

    @property
    def label(self) -> str:
        """The site's name when the server recorded one, else ``node-<id>``."""
        name = self.extra(_SITE_NAME_KEYS)
        return str(name) if name else f"node-{self.node_id}"


class RoundView(BaseModel):
    """One round of ``metrics.json``."""

    model_config = ConfigDict(extra="allow")

    server_round: int
    sampled: int = 0
    contributed: int = 0
    failed: int = 0
    refused: int = 0
    missing: int = 0
    bytes_received: int = 0
    train_loss: float | None = None
    eval_loss: float | None = None
    max_epsilon: float | None = None
    wall_s: float | None = None
    sites: list[SiteRoundView] = Field(default_factory=list)


class ReportView(BaseModel):
    """``metrics.json`` as a whole."""

    model_config = ConfigDict(extra="allow")

    status: str = "running"
    error: str | None = None
    resumed_from_round: int | None = None
    num_rounds: int | None = None
    rounds: list[RoundView] = Field(default_factory=list)
    model_path: str | None = None


@dataclass(frozen=True)
class RunDir:
    """A discovered run: its id (unique among the dashboard's runs) and its directory."""

    id: str
    path: Path


def _is_run(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in _MARKERS)


def discover(roots: list[Path]) -> list[RunDir]:
    """Every run under `roots`: a root that is a run, else its run subdirectories."""
    runs: list[RunDir] = []
    seen: dict[str, int] = {}
    for root in roots:
        root = root.expanduser().resolve()
        if _is_run(root):
            found = [root]
        elif root.is_dir():
            found = sorted(p for p in root.iterdir() if not p.name.startswith(".") and _is_run(p))
        else:
            found = []
        for path in found:
            base = re.sub(r"[^A-Za-z0-9._-]", "_", path.name) or "run"
            seen[base] = seen.get(base, 0) + 1
            runs.append(RunDir(base if seen[base] == 1 else f"{base}~{seen[base]}", path))
    return runs


def finite(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (JSON has no inf or NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


class _Cache:
    """Parsed files keyed by (path, mtime, size): a poll re-reads only what changed."""

    def __init__(self) -> None:
        self._items: dict[Path, tuple[tuple[int, int], Any]] = {}

    def get(self, path: Path, parse: Any) -> Any:
        try:
            st = path.stat()
        except OSError:
            self._items.pop(path, None)
            return None
        key = (st.st_mtime_ns, st.st_size)
        hit = self._items.get(path)
        if hit is not None and hit[0] == key:
            return hit[1]
        value = parse(path)
        self._items[path] = (key, value)
        return value


_UNREADABLE = object()


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return _UNREADABLE


def _dense_bytes(path: Path) -> Any:
    """Bytes of the global model's arrays in a checkpoint, from its safetensors header only."""
    try:
        with path.open("rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if not 0 < size <= _MAX_HEADER:
                return None
            header = json.loads(fh.read(size))
        return sum(
            int(v["data_offsets"][1]) - int(v["data_offsets"][0])
            for k, v in header.items()
            if k.startswith("global/")
        )
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None


def _report(path: Path) -> Any:
    try:
        return ReportView.model_validate_json(path.read_bytes())
    except (OSError, ValueError, ValidationError):
        return _UNREADABLE


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class RunReader:
    """Reads runs for the dashboard; one per app, with a cache of parsed files."""

    def __init__(self, roots: list[Path]) -> None:
        self.roots = [Path(r) for r in roots]
        self._cache = _Cache()

    def runs(self) -> list[RunDir]:
        return discover(self.roots)

    def find(self, run_id: str) -> RunDir | None:
        """The run of id `run_id`, None for any other string (path parameters never join)."""
        return next((r for r in self.runs() if r.id == run_id), None)

    def _read_json(self, run: RunDir, name: str) -> dict[str, Any] | None:
        value = self._cache.get(run.path / name, _json)
        return value if isinstance(value, dict) else None

    def report(self, run: RunDir) -> tuple[ReportView | None, bool]:
        """(``metrics.json``, updating): None and True when it exists but cannot be parsed."""
        value = self._cache.get(run.path / METRICS, _report)
        if value is _UNREADABLE:
            return None, True
        return value, False

    def etag(self, run: RunDir | None = None) -> str:
        """Changes whenever a file a page shows changes (mtime and size of each)."""
        parts = []
        for r in [run] if run is not None else self.runs():
            for name in RUN_FILES:
                try:
                    st = (r.path / name).stat()
                    parts.append(f"{r.id}/{name}:{st.st_mtime_ns}:{st.st_size}")
                except OSError:
                    continue
        return f'W/"{abs(hash("|".join(parts))):x}-{int(time.time() // 30)}"'

    # ---- one run: the row of the runs page ---------------------------------------------------
    def summary(self, run: RunDir) -> dict[str, Any]:
        """Status, progress, strategy, model, sites, start and last update of one run."""
        report, updating = self.report(run)
        config = self._read_json(run, CONFIG) or {}
        key = self._read_json(run, RUN_KEY) or {}
        sim = self._read_json(run, SIMULATION) or {}
        done = max((r.server_round for r in report.rounds), default=0) if report else 0
        total = (
            (report.num_rounds if report else None)
            or config.get("num_rounds")
            or (sim.get("run") or {}).get("num_rounds")
        )
        sites = {s.label for r in report.rounds for s in r.sites} if report else set()
        updated = max(
            (t for t in (_mtime(run.path / n) for n in RUN_FILES) if t is not None), default=None
        )
        return {
            "id": run.id,
            "name": run.path.name,
            "status": "updating" if updating else self._status(run, report, config, updated),
            "updating": updating,
            "error": report.error if report else None,
            "rounds_done": done,
            "num_rounds": total,
            "strategy": config.get("strategy"),
            "model": config.get("model"),
            "compression": config.get("compression"),
            "dp": config.get("dp"),
            "sites": len(sites) or sim.get("sites"),
            "started": key.get("created_at") or _iso(_mtime(run.path / CONFIG)),
            "updated": _iso(updated),
        }

    def _status(
        self,
        run: RunDir,
        report: ReportView | None,
        config: dict[str, Any],
        updated: float | None,
    ) -> str:
        """completed / failed / stopped / resumable / running (see the docs for the rules)."""
        summary = self._read_json(run, SUMMARY) or {}
        status = report.status if report else "running"
        if status == "running" and summary.get("status") in ("completed", "failed"):
            status = str(summary["status"])  # the simulation ended before the server said so
        checkpoints = run.path / CHECKPOINTS
        resumable = checkpoints.is_dir() and any(checkpoints.glob("round-*.safetensors"))
        if status == "failed":
            return "resumable" if resumable else "failed"
        if status == "running" and updated is not None:
            quiet = float(config.get("round_timeout_s") or 3600) + float(
                config.get("wait_timeout_s") or 120
            )
            if time.time() - updated > 2 * quiet:  # nobody has written for far too long
                return "resumable" if resumable else "failed"
        if status == "stopped":
            return "resumable" if resumable else "stopped"
        return status if status in ("completed", "running") else "running"

    # ---- one run: the run page ---------------------------------------------------------------
    def budgets(self, run: RunDir, report: ReportView | None) -> dict[str, float | None]:
        """Each site's ε budget where known: as the site reported it, else the simulation's."""
        budgets: dict[str, float | None] = {}
        sim = self._read_json(run, SIMULATION)
        default = None
        if sim is not None:
            default = sim.get("epsilon")
            if default is None:  # SimulationConfig.site_epsilon: 8 with DP, unlimited without
                default = 8.0 if (sim.get("run") or {}).get("dp", True) else None
        for rnd in report.rounds if report else []:
            for site in rnd.sites:
                value = site.extra(_SITE_BUDGET_KEYS)
                if isinstance(value, int | float):
                    budgets[site.label] = float(value)
                else:
                    budgets.setdefault(site.label, default)
        return budgets

    def model_bytes(self, run: RunDir) -> int | None:
        """Size of one dense update (the global arrays of the latest checkpoint), if any."""
        folder = run.path / CHECKPOINTS
        latest = max(folder.glob("round-*.safetensors"), default=None) if folder.is_dir() else None
        return self._cache.get(latest, _dense_bytes) if latest is not None else None

    def figures(self, run: RunDir) -> list[str]:
        """The report's figures (``report/*.png``), by file name."""
        folder = run.path / REPORT_DIR
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if _FIGURE.match(p.name) and p.is_file())

    def detail(self, run: RunDir) -> dict[str, Any]:
        """Everything the run page shows, JSON-ready."""
        info = self.summary(run)
        report, _ = self.report(run)
        config = self._read_json(run, CONFIG)
        rounds = []
        for rnd in report.rounds if report else []:
            rounds.append(
                {
                    "round": rnd.server_round,
                    "sampled": rnd.sampled,
                    "contributed": rnd.contributed,
                    "failed": rnd.failed,
                    "refused": rnd.refused,
                    "timed_out": rnd.missing,
                    "bytes": rnd.bytes_received,
                    "train_loss": rnd.train_loss,
                    "eval_loss": rnd.eval_loss,
                    "wall_s": rnd.wall_s,
                    "sites": {
                        s.label: {
                            "status": GRID_STATUS.get(s.status, s.status),
                            "reason": _reason(s, config),
                            "epsilon": s.epsilon,
                            "train_loss": s.train_loss,
                            "eval_loss": s.eval_loss,
                            "bytes": s.payload_bytes,
                        }
                        for s in rnd.sites
                        if s.status != "not-sampled"
                    },
                }
            )
        sites = sorted({name for r in rounds for name in r["sites"]}, key=_natural)
        completed = info["status"] == "completed"
        return finite(
            {
                **info,
                "config": config,
                "rounds": rounds,
                "site_names": sites,
                "budgets": self.budgets(run, report),
                "model_bytes": self.model_bytes(run),
                "has_report": completed and (run.path / REPORT_MD).is_file(),
                "figures": self.figures(run) if completed else [],
            }
        )

    # ---- all runs: the sites page ------------------------------------------------------------
    def sites(self) -> list[dict[str, Any]]:
        """Per site across runs: latest ε it reported, refusals, failures, runs, last seen."""
        table: dict[str, dict[str, Any]] = {}
        for run in self.runs():
            report, _ = self.report(run)
            if report is None:
                continue
            seen_at = _iso(_mtime(run.path / METRICS))
            for rnd in report.rounds:
                for site in rnd.sites:
                    if site.status == "not-sampled":
                        continue
                    row = table.setdefault(
                        site.label,
                        {"site": site.label, "epsilon": None, "refusals": 0, "failures": 0,
                         "timeouts": 0, "rounds_ok": 0, "runs": [], "last_seen": None,
                         "last_run": None},
                    )  # fmt: skip
                    if run.id not in row["runs"]:
                        row["runs"].append(run.id)
                    row["refusals"] += site.status == "refused"
                    row["failures"] += site.status == "failed"
                    row["timeouts"] += GRID_STATUS.get(site.status) == "timed out"
                    row["rounds_ok"] += site.status == "ok"
                    answered = site.status in ("ok", "refused", "failed")
                    if answered and (row["last_seen"] or "") <= (seen_at or ""):
                        row["last_seen"], row["last_run"] = seen_at, run.id
                        if site.epsilon is not None:
                            row["epsilon"] = site.epsilon
        return finite(sorted(table.values(), key=lambda r: _natural(r["site"])))

    def report_markdown(self, run: RunDir) -> str | None:
        """``report.md`` of a finished run, None when there is none."""
        try:
            return (run.path / REPORT_MD).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None

    def figure_path(self, run: RunDir, name: str) -> Path | None:
        """The path of figure `name` of `run`, only if it is one (no other file, no escape)."""
        if not _FIGURE.match(name):
            return None
        path = (run.path / REPORT_DIR / name).resolve()
        folder = (run.path / REPORT_DIR).resolve()
        if path.parent != folder or not path.is_file():
            return None
        return path


def _reason(site: SiteRoundView, config: dict[str, Any] | None) -> str | None:
    """One line saying why a site did not contribute (None when it did)."""
    if site.status == "ok":
        return None
    if site.reason:
        return site.reason
    if site.status == "refused":
        eps = f" (ε {site.epsilon:.3g} spent)" if site.epsilon is not None else ""
        if site.budget_exhausted:
            return f"privacy budget exhausted{eps}"
        return f"refused the round{eps}"
    if GRID_STATUS.get(site.status) == "timed out":
        timeout = (config or {}).get("round_timeout_s")
        return f"no reply within round-timeout-s ({timeout:g} s)" if timeout else "no reply"
    return None


def _natural(text: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]
