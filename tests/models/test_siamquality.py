"""SiamQuality: shapes, modalities, bag pairing, DP per-subject gradients, and learning on BIDMC."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import wfdb
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from pydantic import ValidationError
from torch import nn

from biofp_core.models import build_model
from biofp_core.models.base import BioFPModel, SubjectWindows
from biofp_core.models.siamquality import (
    ECG_FLAG,
    PPG_FLAG,
    SiamQuality,
    SiamQualityConfig,
    degrade_window,
)

T = 1250
TINY = {
    "stem_channels": 8,
    "stage_channels": (8, 16),
    "groups": 4,
    "proj_dim": 32,
    "pred_hidden": 8,
    "fingerprint_dim": 16,
}


def tiny(**overrides: object) -> SiamQuality:
    torch.manual_seed(0)
    return SiamQuality(SiamQualityConfig(**{**TINY, **overrides}))


def bidmc_windows(bidmc_dir: Path, record: str) -> tuple[np.ndarray, np.ndarray]:
    """(n, 1250) z-scored PPG and ECG lead II windows of one BIDMC record (already 125 Hz)."""
    rec = wfdb.rdrecord(str(bidmc_dir / record))
    names = [re.sub(r"[^a-z0-9]", "", n.lower()) for n in rec.sig_name]
    out = []
    for name in ("pleth", "ii"):
        x = rec.p_signal[:, names.index(name)]
        n = len(x) // T
        w = x[: n * T].reshape(n, T)
        out.append((w - w.mean(1, keepdims=True)) / (w.std(1, keepdims=True) + 1e-6))
    return out[0].astype(np.float32), out[1].astype(np.float32)


def make_subject(
    ppg: np.ndarray,
    quality: np.ndarray,
    *,
    ecg: np.ndarray | None = None,
    record_index: np.ndarray | None = None,
    start_s: np.ndarray | None = None,
) -> SubjectWindows:
    n = len(ppg)
    has_ecg = ecg is not None
    return SubjectWindows(
        subject_id="s",
        ecg=ecg if has_ecg else np.zeros_like(ppg),
        ppg=ppg,
        mask=np.stack([np.full(n, has_ecg), np.isfinite(quality)], axis=1),
        quality=np.stack([np.full(n, 0.9 if has_ecg else np.nan), quality], 1).astype(np.float32),
        start_s=np.arange(n) * 10.0 if start_s is None else start_s,
        record_index=np.zeros(n, dtype=int) if record_index is None else record_index,
    )


def labelled_windows(n: int, offset: float = 0.0) -> np.ndarray:
    """Window i is the constant i + offset, so a bag tells which windows it took."""
    return np.repeat(np.arange(n, dtype=np.float32)[:, None] + offset, T, axis=1)


def test_config_validates() -> None:
    with pytest.raises(ValidationError):
        SiamQualityConfig(kernel_size=6)
    with pytest.raises(ValidationError):
        SiamQualityConfig(groups=5)
    with pytest.raises(ValidationError):
        SiamQualityConfig(unknown_field=1)


def test_default_size_and_no_batchnorm() -> None:
    model = build_model("siamquality")
    assert isinstance(model, SiamQuality) and isinstance(model, BioFPModel)
    assert 0.5e6 <= model.num_parameters() <= 2e6
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert ModuleValidator.validate(model, strict=False) == []


def test_fingerprint_shapes_and_modalities() -> None:
    model = tiny().eval()
    x = torch.randn(5, T)
    with torch.inference_mode():
        ppg = model.fingerprint(ppg=x)
        assert ppg.shape == (5, 16) and torch.isfinite(ppg).all()
        torch.testing.assert_close(model.fingerprint(ppg=x[:, None]), ppg)
        ecg = model.fingerprint(ecg=x)
        assert ecg.shape == (5, 16) and torch.isfinite(ecg).all()
        assert not torch.allclose(ecg, ppg)  # the modality flag matters
        torch.testing.assert_close(model.fingerprint(ecg=x, ppg=x), ppg)  # pair_fusion="ppg"
    mean_model = tiny(pair_fusion="mean").eval()
    with torch.inference_mode():
        paired = mean_model.fingerprint(ecg=x, ppg=x.flip(0))
        expected = 0.5 * (mean_model.fingerprint(ecg=x) + mean_model.fingerprint(ppg=x.flip(0)))
    torch.testing.assert_close(paired, expected)
    with pytest.raises(ValueError):
        model.fingerprint()


def test_loss_is_per_subject() -> None:
    model = tiny()
    batch = {"view_a": torch.randn(3, 2, T), "view_b": torch.randn(3, 2, T)}
    loss, terms = model.loss(batch)
    assert loss.shape == (3,) and terms["simsiam"].shape == (3,)
    assert torch.all(loss >= -1) and torch.all(loss <= 1)
    other = {k: v.clone() for k, v in batch.items()}
    other["view_a"][1:] = torch.randn(2, 2, T)  # change every subject but the first
    torch.testing.assert_close(model.loss(other)[0][0], loss[0])


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_opacus_per_sample_grads_equal_per_subject_grads() -> None:
    model = tiny()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    batch = {
        "view_a": torch.randn(3, 2, T, generator=g),
        "view_b": torch.randn(3, 2, T, generator=g),
        "modality_b": torch.tensor([[PPG_FLAG, ECG_FLAG], [PPG_FLAG, PPG_FLAG], [ECG_FLAG, 1.0]]),
    }
    GradSampleModule(model, batch_first=True, loss_reduction="sum")  # hooks on `model`
    model.loss(batch)[0].sum().backward()
    for b in range(3):
        reference.zero_grad()
        reference.loss({k: v[b : b + 1] for k, v in batch.items()})[0].sum().backward()
        for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p.grad_sample[b], q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_draw_bag_pairs_good_with_nearby_poor() -> None:
    rng = np.random.default_rng(0)
    n = 40
    quality = rng.uniform(0.0, 1.0, n).astype(np.float32)
    quality[7] = np.nan  # PPG missing there
    record = np.repeat([0, 1], n // 2)
    subject = make_subject(labelled_windows(n), quality, record_index=record)
    model = tiny(ecg_pair_frac=0.0)
    bag = model.draw_bag(subject, bag_size=16, rng=rng)
    assert bag is not None
    assert bag["view_a"].shape == bag["view_b"].shape == (16, T)
    assert bag["view_a"].dtype == bag["view_b"].dtype == np.float32
    np.testing.assert_array_equal(bag["modality_b"], np.full(16, PPG_FLAG, np.float32))
    paired = 0
    for a, b in zip(bag["view_a"], bag["view_b"], strict=True):
        ia = int(a[0])
        assert quality[ia] >= 0.7
        if np.all(b == b[0]) and float(b[0]).is_integer():  # a real window, not a degraded copy
            ib = int(b[0])
            assert quality[ib] <= quality[ia] - 0.15 and record[ib] == record[ia]
            assert abs(ib - ia) * 10.0 <= 60.0
            paired += 1
    assert paired > 0


def test_draw_bag_degrades_when_no_poor_window() -> None:
    rng = np.random.default_rng(2)
    ppg = rng.standard_normal((6, T)).astype(np.float32)
    subject = make_subject(ppg, np.full(6, 0.9, np.float32))
    bag = tiny(ecg_pair_frac=0.0).draw_bag(subject, bag_size=4, rng=rng)
    assert bag is not None
    for a, b in zip(bag["view_a"], bag["view_b"], strict=True):
        assert not np.allclose(a, b) and np.isfinite(b).all()
        assert abs(b.mean()) < 1e-4 and abs(b.std() - 1) < 1e-3
    x = degrade_window(ppg[0], np.random.default_rng(3))
    assert x.shape == (T,) and x.dtype == np.float32


def test_draw_bag_uses_top_half_when_nothing_is_good() -> None:
    quality = np.linspace(0.0, 0.5, 10).astype(np.float32)
    subject = make_subject(labelled_windows(10), quality)
    bag = tiny(ecg_pair_frac=0.0).draw_bag(subject, bag_size=8, rng=np.random.default_rng(0))
    assert bag is not None and np.all(bag["view_a"][:, 0] >= 5)


def test_draw_bag_ecg_pairs_and_no_ppg() -> None:
    n = 5
    subject = make_subject(
        labelled_windows(n), np.full(n, 0.9, np.float32), ecg=labelled_windows(n, offset=100.0)
    )
    bag = tiny(ecg_pair_frac=1.0).draw_bag(subject, bag_size=3, rng=np.random.default_rng(0))
    assert bag is not None
    np.testing.assert_array_equal(bag["modality_b"], np.full(3, ECG_FLAG, np.float32))
    np.testing.assert_array_equal(bag["view_b"], bag["view_a"] + 100.0)  # simultaneous ECG
    no_ppg = make_subject(labelled_windows(n), np.full(n, np.nan, np.float32))
    assert tiny().draw_bag(no_ppg, bag_size=3, rng=np.random.default_rng(0)) is None


def test_loss_decreases_on_bidmc_ppg(bidmc_dir: Path) -> None:
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    subjects = []
    for record in ("bidmc01", "bidmc02", "bidmc03", "bidmc04"):
        ppg, ecg = bidmc_windows(bidmc_dir, record)
        quality = rng.uniform(0.0, 1.0, len(ppg)).astype(np.float32)
        subjects.append(make_subject(ppg, quality, ecg=ecg))
    model = tiny()
    bags = [model.draw_bag(s, bag_size=2, rng=rng) for s in subjects]
    batch = {k: torch.from_numpy(np.stack([b[k] for b in bags])) for k in bags[0]}
    assert batch["view_a"].shape == (4, 2, T)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        loss = model.loss(batch)[0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.05


def test_draw_bag_skips_padded_windows() -> None:
    ppg = labelled_windows(4)
    s = make_subject(ppg, np.full(4, 0.9, np.float32))
    whole, short = np.full(4, T, np.int32), np.array([262, T, 262, T], np.int32)
    only_padded = SubjectWindows(**{**s.__dict__, "valid_n": np.full(4, 262, np.int32)})
    assert tiny().draw_bag(only_padded, bag_size=4, rng=np.random.default_rng(0)) is None
    mixed = SubjectWindows(**{**s.__dict__, "valid_n": short})
    bag = tiny().draw_bag(mixed, bag_size=8, rng=np.random.default_rng(0))
    assert bag is not None and set(np.unique(bag["view_a"][:, 0]).tolist()) == {1.0, 3.0}
    assert tiny().draw_bag(SubjectWindows(**{**s.__dict__, "valid_n": whole}), bag_size=2,
                           rng=np.random.default_rng(0)) is not None  # fmt: skip
