"""The local training loop on real BIDMC windows: loss goes down, seeding, FedProx, configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import wfdb
from pydantic import ValidationError

from biofp_core.errors import DataError
from biofp_core.models.base import SubjectWindows
from biofp_core.models.m2ae import M2AE, M2AEConfig
from biofp_core.training import (
    SubjectBagDataset,
    TrainConfig,
    evaluate_loss,
    train_local,
)

L = 1250
SMALL = {"width": 64, "heads": 4, "decoder_width": 32, "modality_depth": 1, "fusion_depth": 1}


def bidmc_subject(path: Path, n_windows: int) -> SubjectWindows:
    """Lead II and PLETH of one BIDMC record (125 Hz) cut into z-scored 10 s windows."""
    record = wfdb.rdrecord(str(path))
    names = [n.strip(" ,").upper() for n in record.sig_name]
    signals = []
    for channel in ("II", "PLETH"):
        x = record.p_signal[: n_windows * L, names.index(channel)].reshape(n_windows, L)
        x = np.nan_to_num(x - x.mean(1, keepdims=True))
        signals.append((x / (x.std(1, keepdims=True) + 1e-6)).astype(np.float32))
    return SubjectWindows(
        subject_id=path.name,
        ecg=signals[0],
        ppg=signals[1],
        mask=np.ones((n_windows, 2), bool),
        quality=np.ones((n_windows, 2), np.float32),
        start_s=np.arange(n_windows) * 10.0,
        record_index=np.zeros(n_windows, int),
    )


@pytest.fixture(scope="module")
def bidmc(bidmc_dir: Path) -> list[SubjectWindows]:
    return [bidmc_subject(bidmc_dir / f"bidmc{i:02d}", 12) for i in (1, 2, 3, 4, 5, 6)]


def small_model(seed: int = 0) -> M2AE:
    torch.manual_seed(seed)
    return M2AE(M2AEConfig(**SMALL))


def test_loss_goes_down_on_bidmc(bidmc: list[SubjectWindows]) -> None:
    model = small_model()
    before = evaluate_loss(model, bidmc, bag_size=4, seed=7)
    cfg = TrainConfig(steps=20, batch_subjects=3, bag_size=4, lr=3e-3, seed=0)
    result = train_local(model, bidmc, cfg)
    after = evaluate_loss(model, bidmc, bag_size=4, seed=7)
    assert after["loss"] < 0.85 * before["loss"]
    assert after["recon"] < before["recon"]
    assert result.steps == 20 and result.examples == 60 and result.privacy is None
    assert set(result.terms) == {"recon", "cross", "align", "stats"}
    assert np.isfinite(result.final_loss) and result.wall_s > 0
    assert before["subjects"] == 6.0


def test_runs_are_seeded(bidmc: list[SubjectWindows]) -> None:
    cfg = TrainConfig(steps=3, batch_subjects=2, bag_size=2, seed=4)
    a, b = small_model(), small_model()
    ra, rb = train_local(a, bidmc, cfg), train_local(b, bidmc, cfg)
    assert ra.mean_loss == rb.mean_loss
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    assert evaluate_loss(a, bidmc, bag_size=2, seed=1) == evaluate_loss(
        a, bidmc, bag_size=2, seed=1
    )


def test_fedprox_pulls_toward_reference(bidmc: list[SubjectWindows]) -> None:
    reference = {k: v.clone() for k, v in small_model().state_dict().items()}

    def distance(mu: float | None) -> float:
        model = small_model()
        cfg = TrainConfig(steps=5, batch_subjects=3, bag_size=2, lr=1e-2, proximal_mu=mu)
        result = train_local(model, bidmc, cfg, reference=reference)
        assert mu is None or result.terms["prox"] > 0
        state = model.state_dict()
        return sum(float((state[k] - reference[k]).pow(2).sum()) for k in reference)

    assert distance(50.0) < 0.5 * distance(None)


def test_one_epoch_by_default_with_sgd(bidmc: list[SubjectWindows]) -> None:
    cfg = TrainConfig(batch_subjects=4, bag_size=2, optimizer="sgd")
    result = train_local(small_model(), bidmc[:5], cfg, progress=True)
    assert result.steps == 2 and result.examples == 5  # ceil(5 / 4) = 2 steps per epoch


def test_subjects_without_bags_are_skipped(bidmc: list[SubjectWindows]) -> None:
    s = bidmc[0]
    empty = SubjectWindows("none", s.ecg, s.ppg, np.zeros_like(s.mask), s.quality, s.start_s,
                           s.record_index)  # fmt: skip
    model = small_model()
    dataset = SubjectBagDataset(model, [empty, *bidmc[:2]], bag_size=3, seed=0)
    assert len(dataset) == 2 and dataset[0]["ecg"].shape == (3, L)
    with pytest.raises(DataError, match="no subject"):
        train_local(model, [empty], TrainConfig(steps=1))


def test_config_checks() -> None:
    with pytest.raises(ValidationError, match="extra"):
        TrainConfig(epochs=1)  # no longer a setting
    with pytest.raises(ValidationError):
        TrainConfig(optimizer="lamb")
    assert TrainConfig().total_steps(33) == 3  # one epoch of 16-subject batches


@pytest.mark.filterwarnings("ignore:DPConfig.seed is set")
@pytest.mark.parametrize("dp", [False, True])
def test_biases_only_training_moves_only_the_biases(bidmc: list[SubjectWindows], dp: bool) -> None:
    from biofp_core.privacy.dp import DPConfig

    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(steps=2, batch_subjects=3, bag_size=2, lr=1e-2, trainable="biases")
    private = DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, seed=1) if dp else None
    result = train_local(model, bidmc, cfg, dp=private)
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    biases = {n for n, p in model.named_parameters() if n.endswith(".bias")}
    assert moved and moved <= biases  # no weight matrix changed
    assert all(p.requires_grad for p in model.parameters())  # unfrozen again
    assert (result.privacy is not None) == dp
