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
    steps: int | None = typer.Option(None, "--steps", min=1, help="optimizer steps [2560]"),
    sites: int | None = typer.Option(None, "--sites", min=1, help="simulated hospitals [8]"),
    subjects_per_site: int | None = typer.Option(
        None, "--subjects-per-site", min=1, help="simulated subjects each [64]"
    ),
    minutes: float | None = typer.Option(
        None, "--minutes", min=0.1, help="minutes per simulated record [5]"
    ),
    ectopic_per_min: float | None = typer.Option(
        None,
        "--ectopic-per-min",
        min=0,
        max=30,
        help="premature beats per minute of sinus subjects [0]",
    ),
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
    given = {"sites": sites, "subjects_per_site": subjects_per_site, "minutes": minutes,
             "steps": steps, "ectopic_per_min": ectopic_per_min}  # fmt: skip
    pre = SyntheticPretraining(
        **{k: v for k, v in given.items() if v is not None}
    )  # the defaults: its own
    cfg = pretraining_config(SimulationConfig(pretrain=pre, run=run))
    steps = pre.steps
    with console.status(f"pretraining {model} on simulated signals ({steps} steps)"):
        summary = simulate(cfg.model_copy(update={"out": out}))
    console.print(
        f"{summary.model_path}: held-out loss {summary.eval_loss:.4f} after {steps} steps "
        f'({summary.wall_s:.0f} s); run config: initial-model = "{summary.model_path}"',
        highlight=False,
        soft_wrap=True,
    )
