"""Records -> windows throughput per format: cold (no cache) and cached, in hours of signal/s.

Formats: WFDB with .dat signals (all of BIDMC), WFDB with .mat signals (CinC 2017, 3,000
records), MATLAB segment arrays (Liu 2022, 28 files, 10,620 segments), text segments + .xlsx
(PPG-BP, 657 files of 2.1 s) and EDF (BIDMC's ECG II + PLETH written as EDF here with edfio).
Cohorts absent from $BIOFP_SHARED_DATA are left out of the table.

.venv/bin/python bench/signals.py [--repeats 1] [--only bidmc,cinc2017,liu2022,ppg-bp,edf]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from common import median_time, report, shared_data

from biofp_core.store import build_store

COHORTS = {
    "bidmc": "bidmc",
    "cinc2017": "public/cinc2017",
    "liu2022": "public/liu2022-ppg-arrhythmia",
    "ppg-bp": "public/ppg-bp",
}
EDF_RECORDS = 20  # BIDMC records written as EDF


def write_bidmc_edf(out: Path) -> Path:
    """The first EDF_RECORDS BIDMC records' ECG II and PLETH as EDF files in `out`."""
    import edfio

    from biofp_core.signals.read import find_records, read_record

    out.mkdir(parents=True, exist_ok=True)
    headers = [h for h in find_records(shared_data() / "bidmc") if not h.stem.endswith("n")]
    for header in headers[:EDF_RECORDS]:
        raw = read_record(header)
        whole = int(raw.duration_s)  # EDF data records of 1 s: whole seconds only
        signals = [
            edfio.EdfSignal(
                np.nan_to_num(ch.samples[: int(whole * ch.fs_hz)]),
                sampling_frequency=ch.fs_hz,
                label=label,
            )
            for ch, label in ((raw.ecg, "ECG II"), (raw.ppg, "Pleth"))
            if ch is not None
        ]
        edfio.Edf(signals).write(out / f"{header.stem}.edf")
    return out


def measure(name: str, folder: Path, tmp: Path, repeats: int) -> dict:
    """Cold and cached store builds of one folder."""
    fresh = iter(range(10**6))

    def cold() -> None:
        build_store(folder, cache_dir=tmp / f"{name}-cold-{next(fresh)}")

    def cached(load: bool) -> Callable[[], None]:
        def run() -> None:
            store = build_store(folder, cache_dir=tmp / f"{name}-warm")
            if load:
                store.subjects()

        return run

    cold_s, cold_all = median_time(cold, repeats=repeats)
    store = build_store(folder, cache_dir=tmp / f"{name}-warm")
    open_s, _ = median_time(cached(False), repeats=5)
    load_s, _ = median_time(cached(True), repeats=3)
    hours = store.manifest.hours
    return {
        "format": store.manifest.format,
        "records": len(store.manifest.records),
        "windows": len(store),
        "padded": store.manifest.n_padded,
        "hours": hours,
        "cold_s": cold_s,
        "cold_samples_s": cold_all,
        "cold_hours_per_s": hours / cold_s,
        "cached_open_s": open_s,
        "cached_hours_per_s": hours / open_s,
        "cached_load_s": load_s,
        "cached_load_hours_per_s": hours / load_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=1, help="cold builds per format")
    parser.add_argument("--only", default=",".join([*COHORTS, "edf"]))
    args = parser.parse_args()
    wanted = args.only.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="biofp-bench-"))
    results: dict[str, dict] = {}
    try:
        folders = {n: shared_data() / p for n, p in COHORTS.items() if n in wanted}
        if "edf" in wanted:
            folders["edf"] = write_bidmc_edf(tmp / "edf-data")
        for name, folder in folders.items():
            if folder.is_dir():
                results[name] = measure(name, folder, tmp, args.repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for name, r in results.items():
        what = f"{name} ({r['format']}): {r['records']} records, {r['windows']} windows"
        cold_target, open_target = (">= 10", ">= 200") if name == "bidmc" else ("", "")
        rows += [
            (f"{what}, {r['padded']} padded (h)", f"{r['hours']:.2f}", ""),
            (f"{name}: cold read+preprocess+store (h/s)", f"{r['cold_hours_per_s']:.1f}",
             cold_target),
            (f"{name}: cached open (h/s)", f"{r['cached_hours_per_s']:.0f}", open_target),
            (f"{name}: cached open + subjects (h/s)", f"{r['cached_load_hours_per_s']:.0f}", ""),
        ]  # fmt: skip
    report("signals", rows, results)


if __name__ == "__main__":
    main()
