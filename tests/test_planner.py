"""The privacy planner: its plan spends what the site's ledger charges, within the budget."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from fpkit import run_biofp

from biofp_core.privacy.ledger import Charge, PrivacyLedger, initialise_site_state
from biofp_core.privacy.planner import PlanError, PrivacyPlan, effective_noise, plan_privacy
from biofp_core.site import PrivacyBudget


@pytest.fixture(scope="module")
def plans() -> dict[int, PrivacyPlan]:
    return {n: plan_privacy(n, 8.0, rounds=12) for n in (28, 3000)}


def _charged_epsilon(plan: PrivacyPlan, state_dir: Path) -> tuple[float, list[float]]:
    """ε a real ledger reaches when charged exactly the plan's schedule, round by round."""
    initialise_site_state(state_dir, name="planned")
    ledger = PrivacyLedger.at(state_dir)
    after = []
    for r in range(1, plan.rounds + 1):
        charges = [
            Charge(run_id="run-1", server_round=c.server_round, kind=c.kind, mechanism=c.mechanism)
            for c in plan.charges()
            if c.server_round == r
        ]
        entries = ledger.charge_all(
            charges, delta=plan.delta, budget=PrivacyBudget(epsilon=plan.epsilon_budget)
        )
        after.append(entries[-1].epsilon_after)
    return ledger.epsilon(delta=plan.delta), after


@pytest.mark.parametrize("subjects", [28, 3000])
def test_plan_spends_what_the_ledger_charges(
    plans: dict[int, PrivacyPlan], subjects: int, tmp_path: Path
) -> None:
    plan = plans[subjects]
    epsilon, after = _charged_epsilon(plan, tmp_path / "state")
    assert epsilon == pytest.approx(plan.epsilon_total, rel=1e-9)
    assert after == pytest.approx([r.epsilon_after for r in plan.per_round], rel=1e-9)
    assert 0.95 * 8.0 <= plan.epsilon_total <= 8.0
    assert [r.round for r in plan.per_round] == list(range(1, 13))
    assert all(a < b for a, b in itertools.pairwise(after))


def test_both_sizes_train_above_the_floor(plans: dict[int, PrivacyPlan]) -> None:
    small, large = plans[28], plans[3000]
    for plan in (small, large):
        assert plan.rounds == 12 and plan.steps_per_round >= 1
        assert plan.noise_multiplier >= 0.8
        assert plan.effective_noise_multiplier == pytest.approx(
            effective_noise(plan.noise_multiplier, 5.0)
        )
        assert plan.sample_rate == pytest.approx(plan.batch_subjects / plan.subjects)
        assert plan.evaluations == 12 and 0 < plan.epsilon_evaluations < plan.epsilon_total
    assert small.batch_subjects == 7 and small.sample_rate == 0.25
    assert small.steps_per_round == 4  # one epoch per round
    assert small.noise_multiplier > 0.8  # the budget, not the floor, sets σ
    assert large.batch_subjects == 64 and large.steps_per_round >= 47  # at least one epoch
    assert large.noise_multiplier == 0.8  # at the floor: the spare ε buys more steps


def test_floor_and_noise_of_the_site_are_respected() -> None:
    limits = PrivacyBudget(min_noise_multiplier=2.0, train_metric_noise=8.0, eval_noise=20.0)
    plan = plan_privacy(3000, 8.0, rounds=4, limits=limits)
    assert plan.noise_multiplier >= 2.0
    assert plan.train_metric_noise == 8.0 and plan.eval_noise == 20.0
    assert plan.effective_noise_multiplier == pytest.approx(
        effective_noise(plan.noise_multiplier, 8)
    )
    assert plan.epsilon_total <= 8.0


def test_default_rounds_shrink_when_twelve_cannot_train() -> None:
    assert plan_privacy(3000, 8.0).rounds == 12
    tight = plan_privacy(28, 0.6)
    assert 1 <= tight.rounds < 12 and tight.steps_per_round >= 1
    assert tight.epsilon_total <= 0.6


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 8.0), "subjects must be >= 1"),
        ((28, 0.0), "epsilon must be a finite number > 0"),
        ((3, 8.0), "below the site's min_train_subjects 4"),
        ((28, 0.05), "even one step per round"),
    ],
)
def test_impossible_or_bad_requests_are_refused(args: tuple, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        plan_privacy(*args, rounds=12)


def test_cli_prints_the_plan_and_json(plans: dict[int, PrivacyPlan]) -> None:
    args = ("plan", "--subjects", "28", "--epsilon", "8", "--rounds", "12")
    code, out, err = run_biofp(*args, "--json")
    assert code == 0, err
    assert PrivacyPlan.model_validate(json.loads(out)) == plans[28]
    code, out, err = run_biofp(*args)
    assert code == 0, err
    assert "ε after" in out and "4 steps per round" in out and "σ=1.49" in out
    assert f"{plans[28].per_round[-1].epsilon_after:.3f}" in out
    assert "reserved for 12 evaluation(s)" in out
    code, out, err = run_biofp("plan", "--subjects", "2250", "--epsilon", "8", "--json",
                               "--max-steps", "8")  # fmt: skip
    capped = PrivacyPlan.model_validate(json.loads(out))  # what a privacy-plan site trains
    assert code == 0 and capped.steps_per_round == 8 and capped.batch_subjects == 64


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--subjects", "0", "--epsilon", "8"], "subjects must be >= 1"),
        (["--subjects", "28", "--epsilon", "-1"], "epsilon must be a finite number > 0"),
        (["--subjects", "28", "--epsilon", "0.05", "--rounds", "12"], "even one step per round"),
    ],
)
def test_cli_errors_are_one_line(args: list[str], message: str) -> None:
    code, out, err = run_biofp("plan", *args)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: plan: ") and message in lines[0]
    assert out == ""


def test_a_site_trains_and_is_charged_on_its_own_plan(tmp_path: Path) -> None:
    """Run config ``privacy-plan``: the site's round uses the plan for ITS training subjects and
    budget (σ, q, steps), not the server's settings, and the ledger charges exactly that."""
    from flowerkit import instruction, site_context
    from fpkit import TINY, site_config, tiny_cohort

    from biofp_core.protocol import METRICS_KEY, NUM_EXAMPLES, RUN_KEY, SERVER_ROUND, RunConfig
    from client.app import app

    cohort = tiny_cohort(tmp_path / "cohort", sites=1, subjects=8)
    data = next(p for p in cohort.iterdir() if p.is_dir())
    site = site_config(tmp_path / "site", data, cache=tmp_path / "cache", budget=6.0)
    run = RunConfig.from_run_config({
        "model-options": json.dumps(TINY), "privacy-plan": True, "num-rounds": 3,
        "local-steps": 3, "batch-subjects": 1, "noise-multiplier": 5.0, "bag-size": 2,
    })  # fmt: skip
    reply = app(instruction(run, "train", **{SERVER_ROUND: 1, RUN_KEY: "planned"}),
                site_context(run, tmp_path / "site" / "site.toml"))  # fmt: skip
    assert not reply.has_error(), reply.error
    trained = int(reply.content[METRICS_KEY][NUM_EXAMPLES])
    # 8 subjects - 25 %; the run's local-steps caps the steps (uncapped, the plan takes 6)
    plan = plan_privacy(6, 6.0, rounds=3, evaluations=3, limits=site.privacy,
                        max_steps_per_round=3)  # fmt: skip
    entry = PrivacyLedger.at(tmp_path / "site" / "state").entries[-1]
    assert (entry.kind, entry.steps) == ("train", plan.steps_per_round) and plan.steps_per_round > 1
    assert entry.sample_rate == pytest.approx(plan.sample_rate)
    assert entry.noise_multiplier == pytest.approx(plan.effective_noise_multiplier)
    assert plan.noise_multiplier < 5.0 and trained >= 1  # the site's σ, not the server's
