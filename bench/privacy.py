"""What the metrics' noise costs in the default run: ε beside training, and the spread it adds.

Usage: ``.venv/bin/python bench/privacy.py [--out DIR]``. Runs the default ``biofp simulate``
(synthetic cohort, 4 sites x 16 subjects, 3 rounds x 8 local steps, σ = 1.5, no report) and reads
each site's ledger: ε of DP-SGD alone (σ recovered from each round's σ_eff), of the rounds as
charged (gradients and noisy losses together), and with the held-out evaluations, at the site's
δ. The spread the noise adds is the standard deviation
of the sent value around the exact one: held-out loss σ_e·C / n_holdout; training loss
σ_m·C·√steps / (q·n·steps). Prints a table and writes ``bench/results/privacy.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from biofp_core.privacy.accounting import rdp_epsilon
from biofp_core.privacy.ledger import PrivacyLedger
from biofp_core.site import load_site_config
from client.site_data import load_site_data
from simulations.run import SITES_MANIFEST, SimulationConfig, simulate

RESULTS = Path(__file__).resolve().parent / "results" / "privacy.json"


def site_figures(site_toml: Path, holdout_fraction: float) -> dict:
    """ε by kind of charge, and the analytic spread of the noisy losses, for one site."""
    from client.site_data import SiteRef

    config = load_site_config(site_toml)
    limits, delta = config.privacy, config.privacy.delta
    entries = PrivacyLedger.at(config.resolved_state_dir()).entries
    trained = [e for e in entries if e.kind == "train"]
    sigma_m = limits.train_metric_noise
    gradients_only = [  # what DP-SGD alone would have cost: σ from σ_eff and σ_m
        ((e.noise_multiplier**-2 - sigma_m**-2) ** -0.5, e.sample_rate, e.steps) for e in trained
    ]
    eps = {
        "train": rdp_epsilon(gradients_only, delta=delta),
        "train+metrics": rdp_epsilon([e.mechanism for e in trained], delta=delta),
        "all": rdp_epsilon([e.mechanism for e in entries], delta=delta),
    }
    data = load_site_data(SiteRef(site_config=site_toml), holdout_fraction=holdout_fraction)
    q, steps = (trained[0].sample_rate, trained[0].steps) if trained else (math.nan, 0)
    n = len(data.train)
    return {
        "site": config.name,
        "subjects_train": n,
        "subjects_holdout": len(data.holdout),
        "epsilon_train": eps["train"],
        "epsilon_metrics": eps["train+metrics"] - eps["train"],
        "epsilon_evaluation": eps["all"] - eps["train+metrics"],
        "epsilon_total": eps["all"],
        "eval_loss_noise_sd": limits.eval_noise * limits.metric_clip / max(len(data.holdout), 1),
        "train_loss_noise_sd": limits.train_metric_noise * limits.metric_clip
        * math.sqrt(steps) / (q * n * steps) if steps else math.nan,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: temporary)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="biofp-bench-privacy-") as tmp:
        out = args.out or Path(tmp) / "run"
        cfg = SimulationConfig(out=out)
        started = time.perf_counter()
        summary = simulate(cfg)
        wall_s = time.perf_counter() - started
        manifest = json.loads((out / SITES_MANIFEST).read_text())
        sites = [
            site_figures(Path(s["site_config"]), cfg.run.holdout_fraction)
            for s in manifest["sites"]
        ]
        metrics = json.loads((out / "metrics.json").read_text())
    rounds = [
        {"round": r.get("server_round"), "train_loss": r.get("train_loss"),
         "eval_loss": r.get("eval_loss")}
        for r in metrics.get("rounds", [])
    ]  # fmt: skip
    table = Table(title=f"default run ({summary.status}, {wall_s:.0f} s): ε per site at δ=1e-5")
    for col in ("site", "train", "+ metrics", "+ evaluation", "total", "eval-loss sd",
                "train-loss sd"):  # fmt: skip
        table.add_column(col)
    for s in sites:
        table.add_row(
            s["site"], f"{s['epsilon_train']:.3f}", f"{s['epsilon_metrics']:.3f}",
            f"{s['epsilon_evaluation']:.3f}", f"{s['epsilon_total']:.3f}",
            f"{s['eval_loss_noise_sd']:.2f}", f"{s['train_loss_noise_sd']:.2f}",
        )  # fmt: skip
    Console().print(table)
    for r in rounds:
        Console().print(f"round {r['round']}: sent train loss {r['train_loss']}, "
                        f"held-out loss {r['eval_loss']}", highlight=False)  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    doc = {"status": summary.status, "wall_s": round(wall_s, 1), "sites": sites, "rounds": rounds}
    RESULTS.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
