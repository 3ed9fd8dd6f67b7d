"""Encoder costs on 2 CPU threads: DP-SGD step vs plain step, and fingerprint throughput.

.venv/bin/python bench/encoders.py [--repeats 11] [--compare batch-wgrad,ghost] [--smoke]

Random windows of the right shape (no data needed). The DP and the plain step run on two copies of
the same model with the same batch, alternately, so both see the same machine load; the ratio is
the ratio of their medians ("best" = ratio of the fastest of each, least disturbed by other load).
Fingerprints: batches of 256 windows under inference_mode.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from common import median_time, report

from biofp_core.models.layers import Dense
from biofp_core.models.m2ae import M2AE, M2AEConfig
from biofp_core.privacy import DPConfig, PrivateTraining
from biofp_core.training import TrainConfig, collate_bags

SMOKE = {"width": 32, "heads": 2, "decoder_width": 16, "modality_depth": 1, "fusion_depth": 1}


def random_bags(B: int, K: int, L: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "ecg": torch.randn(K, L, generator=g),
            "ppg": torch.randn(K, L, generator=g),
            "mask": torch.ones(K, 2, dtype=torch.bool),
            "index": torch.arange(K),
        }
        for _ in range(B)
    ]


def plain_step(model: M2AE, batch: dict, cfg: TrainConfig) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model.loss(batch)[0].mean().backward()
        optimizer.step()

    return step


def dp_step(model: M2AE, bags: list, cfg: TrainConfig, mode: str, skip: bool) -> Callable[[], None]:
    """One DP-SGD step on the whole batch; skip=False re-enables the batch weight gradient."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private = PrivateTraining(
            model, optimizer, bags, dp=DPConfig(seed=0, grad_sample_mode=mode),
            sample_rate=1.0, steps=1, collate_fn=collate_bags,
        )  # fmt: skip
    if not skip:
        for layer in model.modules():
            if isinstance(layer, Dense):
                layer.batch_weight_grad = True
    batch = collate_bags(bags)

    def step() -> None:
        private.zero_grad()
        private.backward(model.loss(batch)[0])
        private.step()

    return step


def overhead(cfg: M2AEConfig, train: TrainConfig, mode: str, skip: bool, repeats: int) -> dict:
    """Plain and DP step times, alternated, on two copies of one model and one batch.

    ratio = median DP / median plain (the figure), pairwise = median of per-pair ratios, best =
    fastest DP / fastest plain (least disturbed by other load on the machine).
    """
    torch.manual_seed(0)
    model = M2AE(cfg)
    bags = random_bags(train.batch_subjects, train.bag_size, cfg.window_samples)
    plain = plain_step(copy.deepcopy(model), collate_bags(bags), train)
    private = dp_step(model, bags, train, mode, skip)
    plain(), private(), plain(), private()  # warm up
    plain_s, dp_s = [], []
    for _ in range(repeats):
        plain_s.append(median_time(plain, repeats=1)[0])
        dp_s.append(median_time(private, repeats=1)[0])
    p, d = statistics.median(plain_s), statistics.median(dp_s)
    return {
        "plain_step_s": p,
        "dp_step_s": d,
        "ratio": d / p,
        "pairwise": statistics.median(x / y for x, y in zip(dp_s, plain_s, strict=True)),
        "best": min(dp_s) / min(plain_s),
    }


def throughput(model: M2AE, batch: int, repeats: int) -> dict[str, float]:
    """Median (and best) fingerprinted windows per second: paired, PPG-only and ECG-only input.

    The three inputs alternate within each repeat, so a burst of load hits all of them alike.
    """
    L = model.config.window_samples
    ecg, ppg = torch.randn(batch, L), torch.randn(batch, L)
    inputs = {"paired": (ecg, ppg), "ppg": (None, ppg), "ecg": (ecg, None)}
    samples: dict[str, list[float]] = {name: [] for name in inputs}
    model.eval()
    with torch.inference_mode():
        for e, p in inputs.values():
            model.fingerprint(e, p)  # warm up
        for _ in range(repeats):
            for name, (e, p) in inputs.items():
                fn = lambda e=e, p=p: model.fingerprint(e, p)  # noqa: E731
                samples[name].append(median_time(fn, repeats=1)[0])
    out = {name: batch / statistics.median(s) for name, s in samples.items()}
    return out | {f"{name}_best": batch / min(s) for name, s in samples.items()}


def cpu_pressure() -> float | None:
    """Linux PSI: % of the last 10 s some task waited for a CPU (other load on a shared machine)."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except OSError:
        return None
    return float(line.split()[1].split("=")[1])


COMPARE = {  # --compare name -> (grad_sample_mode, skip the batch weight gradient)
    "batch-wgrad": ("hooks", False),  # stock Opacus hooks: autograd also computes batch grads
    "ghost": ("ghost", False),
    "functorch": ("functorch", False),
}


def measure(args: argparse.Namespace) -> tuple[dict, list[tuple[str, str, str]]]:
    """Run every measurement; return the JSON payload and the printed rows."""
    cfg = M2AEConfig(**SMOKE) if args.smoke else M2AEConfig()
    train = TrainConfig(batch_subjects=2, bag_size=2) if args.smoke else TrainConfig()
    repeats, fp_batch = (2, 16) if args.smoke else (args.repeats, 256)
    t0, load, pressure = time.perf_counter(), os.getloadavg()[0], cpu_pressure()
    run = overhead(cfg, train, "hooks", True, repeats)
    compared = {
        name: overhead(cfg, train, *COMPARE[name], repeats)["ratio"]
        for name in filter(None, args.compare.split(","))
    }
    model = M2AE(cfg)
    fps = throughput(model, fp_batch, max(repeats, 3))
    payload = {
        "params": model.num_parameters(),
        "plain_step_s": run["plain_step_s"],
        "dp_step_s": run["dp_step_s"],
        "dp_overhead_ratio": run["ratio"],
        "dp_overhead_ratio_pairwise": run["pairwise"],
        "dp_overhead_ratio_best": run["best"],
        **{f"dp_overhead_ratio_{name}": ratio for name, ratio in compared.items()},
        **{f"fingerprint_windows_per_s_{name}": v for name, v in fps.items()},
        "bytes_per_fingerprint": cfg.fingerprint_dim * 4,  # float32
        "settings": {
            "threads": args.threads, "repeats": repeats, "batch_subjects": train.batch_subjects,
            "bag_size": train.bag_size, "fingerprint_batch": fp_batch, "grad_sample_mode": "hooks",
            "optimizer": "adamw", "model": cfg.model_dump(), "wall_s": time.perf_counter() - t0,
            "loadavg_1min_before_after": [load, os.getloadavg()[0]],
            "cpu_pressure_avg10_before_after": [pressure, cpu_pressure()],
        },
    }  # fmt: skip
    shape = f"{train.batch_subjects} subjects x {train.bag_size} windows"
    rows = [
        ("parameters", f"{payload['params']:,}", "1-5 M"),
        ("plain step (s)", f"{run['plain_step_s']:.3f}", shape),
        ("DP step (s)", f"{run['dp_step_s']:.3f}", "hooks, per-subject clip"),
        ("DP / plain (best)", f"{run['ratio']:.2f} ({run['best']:.2f})", "<= 1.5"),
        *[(f"{name}: DP / plain", f"{v:.2f}", "comparison") for name, v in compared.items()],
        *[
            (f"fingerprints/s {name} (best)", f"{fps[name]:.0f} ({fps[name + '_best']:.0f})", goal)
            for name, goal in (("paired", ">= 2000"), ("ppg", ">= 2000"), ("ecg", ""))
        ],
        ("bytes per fingerprint", str(payload["bytes_per_fingerprint"]), "float32"),
    ]  # fmt: skip
    return payload, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--compare", default="", help=f"also time: {', '.join(COMPARE)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny model and batch (CI)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    payload, rows = measure(args)
    report("encoders-smoke" if args.smoke else "encoders", rows, payload)


if __name__ == "__main__":
    main()
