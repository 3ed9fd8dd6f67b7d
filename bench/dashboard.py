"""Dashboard figures: page weight and time to first render of a 50-site x 20-round run, and how
long a new round takes to show on an open run page.

.venv/bin/python bench/dashboard.py [--sites 50] [--rounds 20] [--repeats 5]

The run directory is synthesised with the server's own models (``server.report.RunReport`` and its
rounds and sites, ``biofp_core.protocol.RunConfig``, ``simulations.run.SimulationConfig``), so its
``metrics.json`` has exactly the schema a real run writes: every site with a loss and a growing ε,
a few refusals (budget), failures (with a reason) and time-outs. ``biofp dashboard`` serves it from
its own process; Debian's headless Chromium (Playwright) loads each page ``--repeats`` times in a
fresh browser context (empty cache). Time to first render is the page's ``biofp-first-render``
performance mark (navigation start to the first data drawn: HTML, scripts, the first API response
and the render); page weight is the bytes of every response the page loaded (``encodedBodySize``:
gzip where the server compressed). Update latency: with the run page open on round ``rounds - 1``,
round ``rounds`` is written (atomically, as the server does) and the time until the page shows it
is measured; repeated ``--repeats`` times.
Targets: first render <= 1 s, update <= 2 s.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import report

from biofp_core.protocol import RunConfig
from server.report import RoundMetrics, RunReport, SiteRound
from simulations.run import SimulationConfig

CHROMIUM = "/usr/bin/chromium"
PAGES = {"runs": "/", "run": "/runs/{run}", "sites": "/sites"}


def synth_report(sites: int, rounds: int, *, seed: int = 0) -> RunReport:
    """A finished run of `sites` x `rounds` in the server's own schema."""
    rng = random.Random(seed)
    node_ids = [rng.getrandbits(63) for _ in range(sites)]
    report = RunReport(num_rounds=rounds, status="completed")
    for rnd in range(1, rounds + 1):
        site_rounds = []
        for i, node in enumerate(node_ids):
            eps = 0.35 * rnd**0.7 * (1 + 0.02 * i)
            draw = rng.random()
            if eps > 7.5 or draw < 0.02:
                site = SiteRound(node_id=node, status="refused", epsilon=eps, delta=1e-5,
                                 budget_exhausted=True)  # fmt: skip
            elif draw < 0.04:
                reason = "ClientApp error: CUDA out of memory (site restarted)"
                site = SiteRound(node_id=node, status="failed", reason=reason)
            elif draw < 0.05:
                site = SiteRound(node_id=node, status="missing")
            else:
                loss = 3.5 * rnd**-0.2 + rng.gauss(0, 0.05)
                site = SiteRound(
                    node_id=node, status="ok", num_examples=rng.randint(20, 60),
                    train_loss=loss, loss_terms={"align": loss / 2, "recon": loss / 2},
                    eval_loss=loss + 0.1, epsilon=eps, delta=1e-5, payload_bytes=845_000,
                )  # fmt: skip
            site_rounds.append(site)
        ok = [s for s in site_rounds if s.status == "ok"]
        report.rounds.append(
            RoundMetrics(
                server_round=rnd,
                sampled=sites,
                contributed=len(ok),
                failed=sum(s.status == "failed" for s in site_rounds),
                refused=sum(s.status == "refused" for s in site_rounds),
                missing=sum(s.status == "missing" for s in site_rounds),
                bytes_received=sum(s.payload_bytes for s in ok) + 4096 * len(ok),
                train_loss=statistics.fmean(s.train_loss for s in ok),  # type: ignore[misc]
                eval_loss=statistics.fmean(s.eval_loss for s in ok),  # type: ignore[misc]
                max_epsilon=max(s.epsilon or 0 for s in site_rounds),
                wall_s=40 + rng.random() * 5,
                sites=site_rounds,
            )
        )  # fmt: skip
    return report


def write_run(run_dir: Path, sites: int, report: RunReport) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    run = RunConfig(num_rounds=report.num_rounds, min_sites=sites, out_dir=str(run_dir))
    (run_dir / "config.json").write_text(run.model_dump_json(indent=1) + "\n")
    sim = SimulationConfig(sites=sites, out=run_dir, run=run)
    (run_dir / "simulation.json").write_text(sim.model_dump_json(indent=1) + "\n")
    report.write(run_dir)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="bench-dashboard-"))
    run_dir = tmp / "runs" / "big"
    full = synth_report(args.sites, args.rounds)
    write_run(run_dir, args.sites, full)
    one_less = full.model_copy(update={"rounds": full.rounds[:-1], "status": "running"})
    metrics_bytes = (run_dir / "metrics.json").stat().st_size
    port = free_port()
    biofp = [sys.executable, "-m", "biofp_cli"]
    server = subprocess.Popen([*biofp, "dashboard", "--runs", str(tmp / "runs"),
                               "--port", str(port)], stderr=subprocess.DEVNULL)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(base + "/api/runs", timeout=2).read()
                break
            except OSError:
                time.sleep(0.2)
        results: dict[str, dict[str, object]] = {}
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            for name, path in PAGES.items():
                renders, weights = [], []
                for _ in range(args.repeats):
                    context = browser.new_context(viewport={"width": 1280, "height": 900})
                    page = context.new_page()
                    page.goto(base + path.format(run="big"))
                    page.wait_for_function(
                        "() => performance.getEntriesByName('biofp-first-render').length > 0"
                    )
                    renders.append(page.evaluate(
                        "performance.getEntriesByName('biofp-first-render')[0].startTime"
                    ) / 1000)  # fmt: skip
                    weights.append(page.evaluate(
                        "[...performance.getEntriesByType('navigation'), "
                        "...performance.getEntriesByType('resource')]"
                        ".reduce((a, e) => a + e.encodedBodySize, 0)"
                    ))  # fmt: skip
                    context.close()
                results[name] = {"first_render_s": renders, "weight_bytes": weights}
            # update latency on an open run page
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            page = context.new_page()
            updates = []
            for _ in range(args.repeats):
                one_less.write(run_dir)
                page.goto(base + "/runs/big")
                page.wait_for_function(
                    "() => document.querySelector('#round-progress').textContent"
                    f" === 'Round {args.rounds - 1} of {args.rounds}'"
                )
                page.wait_for_timeout(700)  # let a poll or two pass with nothing new
                started = time.perf_counter()
                full.write(run_dir)  # atomic, as the server writes it
                page.wait_for_function(
                    "() => document.querySelector('#round-progress').textContent"
                    f" === 'Round {args.rounds} of {args.rounds}'", polling=20,
                )  # fmt: skip
                updates.append(time.perf_counter() - started)
            context.close()
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for name in PAGES:
        r = results[name]
        rows.append(
            (
                f"{name} page: first render (median s)",
                f"{statistics.median(r['first_render_s']):.3f}",
                "<= 1 s",
            )
        )  # type: ignore[arg-type]
        rows.append(
            (f"{name} page: weight (kB)", f"{statistics.median(r['weight_bytes']) / 1000:.1f}", "")
        )  # type: ignore[arg-type]
    rows.append(("run page: new round shown after (median s)", f"{statistics.median(updates):.3f}",
                 "<= 2 s"))  # fmt: skip
    rows.append(("run page: new round, worst (s)", f"{max(updates):.3f}", "<= 2 s"))
    rows.append(("metrics.json (kB)", f"{metrics_bytes / 1000:.1f}", ""))
    report("dashboard", rows, {
        "sites": args.sites, "rounds": args.rounds, "repeats": args.repeats,
        "metrics_json_bytes": metrics_bytes, "pages": results, "update_s": updates,
        "cpu_count": os.cpu_count(), "load_avg": os.getloadavg(),
    })  # fmt: skip


if __name__ == "__main__":
    main()
