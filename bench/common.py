"""Helpers shared by the benchmark scripts: medians, a printed table and a JSON file."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def shared_data() -> Path:
    root = Path(__file__).resolve().parents[1]
    return Path(os.environ.get("BIOFP_SHARED_DATA", root.parent / "shared" / "data")).resolve()


def median_time(fn: Callable[[], object], *, repeats: int) -> tuple[float, list[float]]:
    """Median wall time of `fn` over `repeats` calls, and every sample."""
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples), samples


def report(name: str, rows: list[tuple[str, str, str]], payload: dict) -> Path:
    """Print a (figure, value, target) table and write `bench/results/<name>.json`."""
    width = max(len(r[0]) for r in rows)
    print(f"\n{name}  ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    print(f"{'figure'.ljust(width)}  {'value':>14}  target")
    for fig, value, target in rows:
        print(f"{fig.ljust(width)}  {value:>14}  {target}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(payload, indent=1, sort_keys=True))
    print(f"wrote {out}")
    return out
