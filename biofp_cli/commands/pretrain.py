"""`biofp pretrain`: a run's starting weights, trained on simulated signals (no patient data)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

console = Console()


def pretrain(
    out: Path = typer.Option(..., "--out", help="folder for model.safetensors + model.card.json"),
    model: str = typer.Option("m2ae", "--model", help="m2ae or siamquality"),
    model_options: str = typer.Option("{}", "--model-options", help="JSON architecture overrides"),
    steps: int = typer.Option(2560, "--steps", min=1, help="optimizer steps"),
    sites: int = typer.Option(8, "--sites", min=1, help="simulated hospitals"),
    subjects_per_site: int = typer.Option(64, "--subjects-per-site", min=1),
    minutes: float = typer.Option(5.0, "--minutes", min=0.1, help="minutes per simulated record"),
    seed: int = typer.Option(0, "--seed", help="seeds the simulated cohort and the model"),
) -> None:
    """Train the run's architecture on the simulated cohort (biofp_core.synth), centralized and
    without DP: nothing patient-derived, nothing charged. Start a federation from it with the
    run config `initial-model = "OUT/model.safetensors"` (the same model and model-options)."""
    from biofp_core.protocol import RunConfig
    from simulations.config import SimulationConfig, SyntheticPretraining
    from simulations.pretrain import pretraining_config
    from simulations.run import simulate

    run = RunConfig.from_run_config({"model": model, "model-options": model_options, "seed": seed})
    pre = SyntheticPretraining(
        sites=sites, subjects_per_site=subjects_per_site, minutes=minutes, steps=steps
    )
    cfg = pretraining_config(SimulationConfig(pretrain=pre, run=run))
    with console.status(f"pretraining {model} on simulated signals ({steps} steps)"):
        summary = simulate(cfg.model_copy(update={"out": out}))
    console.print(
        f"{summary.model_path}: held-out loss {summary.eval_loss:.4f} after {steps} steps "
        f'({summary.wall_s:.0f} s); run config: initial-model = "{summary.model_path}"',
        highlight=False,
        soft_wrap=True,
    )
