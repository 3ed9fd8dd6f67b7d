"""WFDB -> windows throughput on all of BIDMC: cold (no cache) and cached, in hours of signal/s.

.venv/bin/python bench/signals.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from common import median_time, report, shared_data

from biofp_core.store import build_store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    bidmc = shared_data() / "bidmc"
    tmp = Path(tempfile.mkdtemp(prefix="biofp-bench-"))
    try:
        fresh = iter(range(10**6))

        def cold() -> None:
            build_store(bidmc, cache_dir=tmp / f"cold-{next(fresh)}")

        def cached_open() -> None:
            build_store(bidmc, cache_dir=tmp / "warm")

        def cached_load() -> None:
            build_store(bidmc, cache_dir=tmp / "warm").subjects()

        cold_s, cold_all = median_time(cold, repeats=args.repeats)
        store = build_store(bidmc, cache_dir=tmp / "warm")
        hours = store.manifest.hours
        open_s, _ = median_time(cached_open, repeats=max(5, args.repeats))
        load_s, _ = median_time(cached_load, repeats=max(5, args.repeats))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    payload = {
        "records": len(store.manifest.records),
        "windows": len(store),
        "hours": hours,
        "cold_s": cold_s,
        "cold_samples_s": cold_all,
        "cold_hours_per_s": hours / cold_s,
        "cached_open_s": open_s,
        "cached_hours_per_s": hours / open_s,
        "cached_load_s": load_s,
        "cached_load_hours_per_s": hours / load_s,
    }
    report(
        "signals",
        [
            ("BIDMC signal (h)", f"{hours:.2f}", f"{len(store.manifest.records)} records"),
            ("cold: read+preprocess+store (h/s)", f"{hours / cold_s:.1f}", ">= 10"),
            ("cached: open store (h/s)", f"{hours / open_s:.0f}", ">= 200"),
            ("cached: open + load all subjects (h/s)", f"{hours / load_s:.0f}", "(info)"),
        ],
        payload,
    )


if __name__ == "__main__":
    main()
