"""`biofp plan`: a site's DP schedule (σ, q, steps per round, rounds) within its budget."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def plan(
    subjects: int = typer.Option(..., "--subjects", help="N: the site's training subjects"),
    epsilon: float = typer.Option(..., "--epsilon", help="the site's budget ε"),
    delta: float = typer.Option(1e-5, "--delta", help="δ at which ε is given"),
    rounds: int | None = typer.Option(None, "--rounds", help="rounds R (default: 12 or fewer)"),
    batch: float | None = typer.Option(
        None, "--batch", help="expected subjects per step (default: min(64, N // 4), at least 1)"
    ),
    max_steps: int = typer.Option(
        100,
        "--max-steps",
        min=1,
        help="local steps a round may take (a privacy-plan run caps them at its local-steps)",
    ),
    as_json: bool = typer.Option(False, "--json", help="print the plan as JSON"),
) -> None:
    """Choose σ, q, steps per round and rounds so the whole run spends at most ε.

    Plans with the ledger's own accountant and the site's defaults (σ floor 0.8, noisy training
    loss sums at σ_m = 5, one noisy evaluation per round at σ = 10); prints ε after each round.
    """
    from biofp_core.privacy.planner import plan_privacy

    result = plan_privacy(
        subjects, epsilon, delta=delta, rounds=rounds, batch=batch, max_steps_per_round=max_steps
    )
    if as_json:
        typer.echo(result.model_dump_json(indent=2))
        return
    console.print(
        f"privacy plan: {result.subjects} subjects, ε ≤ {result.epsilon_budget:g}",
        highlight=False,
        soft_wrap=True,
    )
    table = Table()
    table.add_column("round", justify="right")
    table.add_column("ε after", justify="right")
    for r in result.per_round:
        table.add_row(str(r.round), f"{r.epsilon_after:.3f}")
    console.print(table)
    console.print(
        f"σ={result.noise_multiplier:g} (floor {result.min_noise_multiplier:g}), "
        f"σ_eff={result.effective_noise_multiplier:.4g} (with σ_m={result.train_metric_noise:g}), "
        f"q={result.sample_rate:.4g} ({result.batch_subjects:g} subjects per step), "
        f"{result.steps_per_round} steps per round, {result.rounds} rounds",
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        f"ε reserved for {result.evaluations} evaluation(s) at σ={result.eval_noise:g}: "
        f"{result.epsilon_evaluations:.3f}; total ε {result.epsilon_total:.3f} of "
        f"{result.epsilon_budget:g} at δ={result.delta:g}",
        highlight=False,
        soft_wrap=True,
    )
