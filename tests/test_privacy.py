"""Per-subject DP-SGD: per-sample grads are per-subject grads, accounting, clean state dicts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fpkit import assert_per_sample_grads_are_per_subject
from opacus.accountants import RDPAccountant
from pydantic import ValidationError
from torch import nn

from biofp_core.errors import ConfigError, DataError
from biofp_core.models import build_model
from biofp_core.models.base import SubjectWindows
from biofp_core.models.layers import Dense
from biofp_core.models.m2ae import M2AE, M2AEConfig
from biofp_core.privacy import (
    DPConfig,
    PrivateTraining,
    poisson_rate,
)
from biofp_core.privacy.accounting import rdp_epsilon
from biofp_core.training import TrainConfig, collate_bags, train_local

pytestmark = pytest.mark.filterwarnings("ignore:DPConfig.seed is set")
L = 1250
TINY = {"width": 32, "heads": 2, "decoder_width": 16, "modality_depth": 1, "fusion_depth": 1}


def tiny_m2ae(seed: int = 0, **options: object) -> M2AE:
    torch.manual_seed(seed)
    return M2AE(M2AEConfig(**{**TINY, "modality_dropout": 0.5, **options}))


def subjects(n: int, windows: int = 6) -> list[SubjectWindows]:
    rng = np.random.default_rng(0)
    return [
        SubjectWindows(
            subject_id=f"s{i}",
            ecg=rng.standard_normal((windows, L)).astype(np.float32),
            ppg=rng.standard_normal((windows, L)).astype(np.float32),
            mask=np.ones((windows, 2), bool),
            quality=np.ones((windows, 2), np.float32),
            start_s=np.arange(windows) * 10.0,
            record_index=np.zeros(windows, int),
        )
        for i in range(n)
    ]


def bags(model: M2AE, n: int, K: int) -> list[dict[str, torch.Tensor]]:
    rng = np.random.default_rng(1)
    return [
        {k: torch.as_tensor(v) for k, v in model.draw_bag(s, bag_size=K, rng=rng).items()}
        for s in subjects(n)
    ]


def test_per_sample_grad_is_per_subject_grad() -> None:
    """Opacus' per-sample gradient of subject b == gradient of subject b's loss alone."""
    model = tiny_m2ae()
    data = bags(model, 3, K=3)
    private = assert_per_sample_grads_are_per_subject(model, data)
    dense = next(m for m in model.modules() if isinstance(m, Dense))
    assert dense.weight.grad is None  # the batch weight gradient was skipped
    private.close()


def test_dp_training_leaves_a_plain_model() -> None:
    model = tiny_m2ae()
    keys = list(model.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(steps=2, batch_subjects=2, bag_size=3)
    result = train_local(model, subjects(4), cfg, dp=DPConfig(seed=0))
    assert list(model.state_dict()) == keys and not any("_module." in k for k in keys)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    for module in model.modules():
        assert not module._forward_hooks and not module._backward_hooks
        assert not isinstance(module, Dense) or module.batch_weight_grad
    for p in model.parameters():
        assert not hasattr(p, "grad_sample") and not hasattr(p, "_forward_counter")
    assert result.privacy is not None and result.privacy.steps == 2


def test_epsilon_grows_and_ledger_composes() -> None:
    model = tiny_m2ae()
    cfg = TrainConfig(steps=2, batch_subjects=2, bag_size=2)
    dp = DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, seed=0)
    first = train_local(model, subjects(4), cfg, dp=dp).privacy
    second = train_local(model, subjects(4), cfg, dp=dp, ledger_history=first.history).privacy
    assert first is not None and second is not None
    assert 0 < first.epsilon < second.epsilon
    assert second.history == [(1.0, 0.5, 4)] and first.sample_rate == 0.5
    assert second.epsilon == pytest.approx(rdp_epsilon(second.history, delta=1e-5))
    assert second.epsilon == pytest.approx(rdp_epsilon([*first.history, (1.0, 0.5, 2)], delta=1e-5))


def test_ledger_epsilon_matches_opacus() -> None:
    history = [(1.1, 0.1, 15), (2.0, 0.2, 3)]
    accountant = RDPAccountant()
    for _ in range(15):
        accountant.step(noise_multiplier=1.1, sample_rate=0.1)
    for _ in range(3):
        accountant.step(noise_multiplier=2.0, sample_rate=0.2)
    spent = rdp_epsilon(history, delta=1e-5)
    assert spent == pytest.approx(accountant.get_epsilon(1e-5))
    split = [(1.1, 0.1, 10), (1.1, 0.1, 5), (2.0, 0.2, 3)]  # rounds compose under RDP
    assert rdp_epsilon(split, delta=1e-5) == pytest.approx(spent, rel=1e-12)
    assert rdp_epsilon([], delta=1e-5) == 0.0
    assert rdp_epsilon([*history, (1.0, 0.1, 10)], delta=1e-5) > spent


def test_poisson_rate_is_capped_at_one() -> None:
    assert poisson_rate(2, 8) == 0.25 and poisson_rate(16, 5) == 1.0
    with pytest.raises(DataError, match="no subject"):
        poisson_rate(2, 0)


def test_empty_poisson_batches_take_noise_steps() -> None:
    model = tiny_m2ae()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(steps=6, batch_subjects=1, bag_size=2, optimizer="sgd", lr=0.1)
    report = train_local(model, subjects(12, windows=2), cfg, dp=DPConfig(seed=3)).privacy
    assert report is not None and report.steps == 6 and report.empty_steps >= 1
    assert report.history == [(1.0, 1 / 12, 6)]
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha")
@pytest.mark.filterwarnings("ignore:DP-SGD without noise")
@pytest.mark.parametrize("options", [{}, {"rhythm_template": 8, "template_targets": 8}])
def test_ghost_clipping_equals_hooks_without_noise(options: dict) -> None:
    """Same subjects, masks and clip: ghost clipping and hooks give the same update (with the
    mean beats in the token and as targets too)."""
    cfg = TrainConfig(steps=1, batch_subjects=3, bag_size=2, optimizer="sgd", lr=1.0)
    states = []
    for mode in ("hooks", "ghost"):
        model = tiny_m2ae(**options)
        dp = DPConfig(noise_multiplier=0.0, max_grad_norm=0.05, seed=0, grad_sample_mode=mode)
        train_local(model, subjects(3), cfg, dp=dp)
        states.append(model.state_dict())
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], atol=1e-5, rtol=1e-4, msg=k)


def test_dp_works_for_siamquality() -> None:
    torch.manual_seed(0)
    model = build_model("siamquality", {"stage_channels": (16, 16), "stem_channels": 16})
    cfg = TrainConfig(steps=1, batch_subjects=2, bag_size=2)
    result = train_local(model, subjects(3), cfg, dp=DPConfig(seed=0))
    assert result.privacy is not None and result.privacy.epsilon > 0
    assert not any("_module." in k for k in model.state_dict())


def test_invalid_settings() -> None:
    with pytest.raises(ValidationError):
        DPConfig(noise_multiplier=-1.0)
    with pytest.raises(ValidationError):
        DPConfig(grad_sample_mode="ew")
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    with pytest.raises(ConfigError, match="not DP-compatible"):
        PrivateTraining(
            model, torch.optim.SGD(model.parameters(), lr=0.1), [1, 2], dp=DPConfig(),
            sample_rate=0.5, steps=1, collate_fn=collate_bags,
        )  # fmt: skip


@pytest.mark.filterwarnings("ignore:DP-SGD without noise")
def test_a_subject_with_a_non_finite_gradient_is_dropped_not_sent_as_nan() -> None:
    """Clipping leaves NaN as NaN and noise does not hide it: a crafted subject would otherwise
    turn the whole update into NaN (one exact bit). Its gradient is zeroed; the others count."""
    model = tiny_m2ae()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = bags(model, 4, K=2)
    data[3]["ecg"] = torch.full_like(data[3]["ecg"], float("inf"))  # subject 3's loss: NaN
    private = PrivateTraining(
        model, torch.optim.SGD(model.parameters(), lr=0.1), data,
        dp=DPConfig(noise_multiplier=0.0, seed=0), sample_rate=1.0, steps=1,
        collate_fn=collate_bags,
    )  # fmt: skip
    torch.manual_seed(5)
    losses, _ = model.loss(collate_bags(data))
    assert not torch.isfinite(losses[3]) and torch.isfinite(losses[:3]).all()
    private.backward(losses)
    private.step()
    private.close()
    after = model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in after)  # the others trained it
