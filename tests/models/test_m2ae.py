"""M2AE: shapes, complementary masking, one fingerprint space, per-subject loss, registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fpkit import assert_per_sample_grads_are_per_subject
from opacus.validators import ModuleValidator

from biofp_core.errors import ConfigError
from biofp_core.models import MODEL_NAMES, build_model
from biofp_core.models.base import SubjectWindows
from biofp_core.models.m2ae import M2AE, M2AEConfig
from biofp_core.signals.rhythm import rhythm_features, statistics_of

L = 1250
TINY = {"width": 32, "heads": 2, "decoder_width": 16, "modality_depth": 1, "fusion_depth": 1}


def tiny(**overrides: object) -> M2AE:
    torch.manual_seed(0)
    return M2AE(M2AEConfig(**{**TINY, **overrides}))


def random_batch(B: int = 3, K: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "ecg": torch.randn(B, K, L, generator=g),
        "ppg": torch.randn(B, K, L, generator=g),
        "mask": torch.ones(B, K, 2, dtype=torch.bool),
        "index": torch.arange(K).expand(B, K).clone(),
    }


def subject(n: int, *, mask: np.ndarray | None = None, quality: np.ndarray | None = None):
    rng = np.random.default_rng(n)
    return SubjectWindows(
        subject_id=f"s{n}",
        ecg=rng.standard_normal((n, L)).astype(np.float32),
        ppg=rng.standard_normal((n, L)).astype(np.float32),
        mask=np.ones((n, 2), bool) if mask is None else mask,
        quality=np.ones((n, 2), np.float32) if quality is None else quality,
        start_s=np.arange(n) * 10.0,
        record_index=np.zeros(n, int),
    )


def test_default_size_and_opacus_compatibility() -> None:
    model = M2AE()
    assert 1_000_000 <= model.num_parameters() <= 5_000_000
    assert ModuleValidator.validate(model, strict=False) == []
    kinds = {type(m).__name__ for m in model.modules()}
    assert not any("BatchNorm" in k or "MultiheadAttention" in k for k in kinds)


@pytest.mark.parametrize("ratio", [0.5, 0.3, 0.1])
def test_complementary_masks(ratio: float) -> None:
    model = tiny(mask_ratio=ratio)
    T, n = model.config.n_patches, model.config.hidden_patches
    assert n == round(ratio * T)
    hidden, visible = model.complementary_masks(64, 5, torch.device("cpu"))
    assert hidden.shape == (64, 5, 2, T) and visible.shape == (64, 5, 2, T - n)
    assert (hidden.sum(-1) == n).all()  # the configured fraction, in each modality and window
    assert not (hidden[:, :, 0] & hidden[:, :, 1]).any()  # never hidden in both
    seen = torch.zeros_like(hidden).scatter_(-1, visible, True)
    assert torch.equal(seen, ~hidden)  # visible positions are exactly the unhidden ones
    if 2 * n == T:
        assert torch.equal(hidden[:, :, 0], ~hidden[:, :, 1])  # exact complements


def test_fingerprints_one_space_shapes() -> None:
    model = tiny().eval()
    ecg, ppg = torch.randn(5, L), torch.randn(5, 1, L)
    with torch.inference_mode():
        outs = [model.fingerprint(ecg=ecg), model.fingerprint(ppg=ppg), model.fingerprint(ecg, ppg)]
    for fp in outs:
        assert fp.shape == (5, model.config.fingerprint_dim) and torch.isfinite(fp).all()
    with pytest.raises(ValueError):
        model.fingerprint()


def test_loss_terms_per_subject() -> None:
    model = tiny()
    loss, terms = model.loss(random_batch(B=3, K=4))
    assert loss.shape == (3,) and torch.isfinite(loss).all()
    assert set(terms) == {"recon", "cross", "align", "stats"}
    assert all(v.shape == (3,) and torch.isfinite(v).all() for v in terms.values())
    assert (terms["align"] > 0).all()


def pulse_train(beat_times_s: np.ndarray) -> np.ndarray:
    """A z-scored train of narrow pulses (a PPG-like window, 10 s at 125 Hz)."""
    t = np.arange(L) / 125.0
    x = np.exp(-0.5 * ((t[:, None] - beat_times_s[None]) / 0.03) ** 2).sum(1)
    return ((x - x.mean()) / x.std()).astype(np.float32)


def test_beat_statistics_term_per_view_and_window() -> None:
    """Every view's fingerprint regresses its window's beat statistics; unusable windows don't."""
    model = tiny(modality_dropout=0.0)
    batch = random_batch(B=2, K=4)
    stats = np.full((2, 4, 2), 3.0, dtype=np.float32)
    ok = np.array([[True] * 4, [False] * 4])
    z = torch.zeros(2, 3, 4, model.config.fingerprint_dim)
    keep = avail = batch["mask"]
    with torch.no_grad():
        model.stats_head.bias.zero_()
        term = model._statistics(z, keep, avail, stats, ok)
        assert term.tolist() == pytest.approx([9.0, 0.0])  # (0 - 3)^2; no usable window
        model.stats_head.bias.fill_(3.0)
        assert model._statistics(z, keep, avail, stats, ok).tolist() == pytest.approx([0, 0])


def test_loss_targets_come_from_the_windows() -> None:
    """Pulse trains give the stats term a target; noise windows (no beats) give none."""
    model = tiny(modality_dropout=0.0)
    batch = random_batch(B=2, K=2)
    batch["ppg"][0] = torch.from_numpy(pulse_train(np.arange(0.2, 10, 0.8)))
    batch["ecg"][0] = 0.0
    batch["mask"][0, :, 0] = False  # subject 0: PPG only, 75 bpm
    batch["ecg"][1], batch["ppg"][1] = 0.0, 0.0  # subject 1: flat windows, no beats
    _, terms = model.loss(batch)
    assert terms["stats"][0] > 0 and terms["stats"][1] == 0
    with torch.no_grad():
        model.stats_head.weight.zero_()
        model.stats_head.bias.copy_(torch.tensor([0.0, 0.0]))  # irregularity 0, (75 - 75) / 25
        assert model.loss(batch)[1]["stats"][0] == pytest.approx(0.0, abs=1e-3)


def test_more_beat_statistics_widen_the_head_and_are_regressed() -> None:
    """beat_stats picks which rhythm statistics the fingerprint regresses; unknown ones refused."""
    names = ("range", "rate", "sdnn", "pnn50")
    model = tiny(modality_dropout=0.0, beat_stats=names)
    assert model.stats_head.bias.shape == (4,)
    rng = np.random.default_rng(3)
    beats = np.cumsum(rng.uniform(0.45, 1.15, 20)) + 0.1  # irregular: every statistic differs
    train = pulse_train(beats[beats < 9.9])
    stats, _ = statistics_of(rhythm_features(train[None], modality="ppg"), names)
    assert len(set(np.round(stats[0], 3))) == 4
    batch = random_batch(B=1, K=2)
    batch["ppg"][0] = torch.from_numpy(train)
    batch["ecg"][0] = 0.0
    batch["mask"][0, :, 0] = False
    with torch.no_grad():
        model.stats_head.weight.zero_()
        model.stats_head.bias.copy_(torch.from_numpy(stats[0]))  # exactly these, in this order
        assert model.loss(batch)[1]["stats"][0] == pytest.approx(0.0, abs=1e-4)
        model.stats_head.bias.copy_(torch.from_numpy(stats[0][::-1].copy()))  # another order
        assert model.loss(batch)[1]["stats"][0] > 0.01
    for bad in (("irregularity", "qrs_width"), ("rate", "rate")):
        with pytest.raises(ValueError, match="beat_stats: choose one or more of"):
            M2AEConfig(beat_stats=bad)


def test_rhythm_template_widens_the_token_and_changes_fingerprints() -> None:
    """rhythm_template feeds the window's mean beat into the rhythm token: same windows, same
    rhythm statistics, another token input (so another fingerprint)."""
    torch.manual_seed(0)
    model = tiny(rhythm_template=8)
    assert model.rhythm["ppg"].weight.shape[1] == 8 + 8  # RHYTHM_FEATURES + template
    a = torch.from_numpy(pulse_train(np.arange(0.2, 10, 0.8)))[None]
    b = torch.from_numpy(pulse_train(np.arange(0.2, 10, 0.8)) ** 2)[None]  # same beats, new shape
    features = model._rhythm_features(1, torch.cat([a, b])[:, None])  # (2, 1, 16)
    assert np.allclose(features[0, 0, :2], features[1, 0, :2])  # valid, beat count
    assert not np.allclose(features[0, 0, 8:], features[1, 0, 8:])
    plain = tiny()
    plain.load_state_dict(
        {k: v for k, v in model.state_dict().items() if not k.startswith("rhythm.")}, strict=False
    )  # the same weights but the rhythm token's
    model.eval(), plain.eval()
    with torch.no_grad():
        with_template = model.fingerprint(ppg=torch.cat([a, b]))
        model.rhythm["ppg"].weight[:, 8:] = 0.0  # the template's weights off: the plain token
        plain.rhythm["ppg"].weight.copy_(model.rhythm["ppg"].weight[:, :8])
        plain.rhythm["ppg"].bias.copy_(model.rhythm["ppg"].bias)
        without = model.fingerprint(ppg=torch.cat([a, b]))
        assert torch.allclose(without, plain.fingerprint(ppg=torch.cat([a, b])), atol=1e-5)
        assert not torch.allclose(with_template[1], without[1], atol=1e-4)  # the shape counts
    with pytest.raises(ValueError, match="set rhythm_token = true"):
        M2AEConfig(rhythm_template=8, rhythm_token=False)


@pytest.mark.parametrize("token", [0, 8, 4])
def test_template_targets_regress_each_signals_mean_beat(token: int) -> None:
    """template_targets: every view's fingerprint regresses its signals' mean beats (a one-signal
    view only its own), whatever the token holds; windows without beats and absent signals are
    no target."""
    model = tiny(modality_dropout=0.0, template_targets=8, rhythm_template=token)
    assert model.template_head.bias.shape == (16,)  # ECG block, PPG block
    train = pulse_train(np.arange(0.2, 10, 0.8))
    beat = rhythm_features(train[None], modality="ppg", template_points=8)[0, 8:]
    assert np.ptp(beat) > 0.5  # a pulse, not a flat line
    batch = random_batch(B=2, K=2)
    batch["ppg"][0] = torch.from_numpy(train)
    batch["ecg"][0] = 0.0
    batch["mask"][0, :, 0] = False  # subject 0: PPG only
    batch["ecg"][1], batch["ppg"][1] = 0.0, 0.0  # subject 1: flat windows, no beats
    with torch.no_grad():
        model.template_head.weight.zero_()
        model.template_head.bias.zero_()
        model.template_head.bias[8:] = torch.from_numpy(beat)  # the PPG block: exactly it
        terms = model.loss(batch)[1]
        assert terms["template"].tolist() == pytest.approx([0.0, 0.0], abs=1e-5)
        model.template_head.bias[:8] = 9.0  # the absent ECG block is never a target
        assert model.loss(batch)[1]["template"][0] == pytest.approx(0.0, abs=1e-5)
        model.template_head.bias[8:] = torch.from_numpy(beat[::-1].copy())  # another shape
        assert model.loss(batch)[1]["template"][0] > 0.1
    plain = tiny()
    assert "template" not in plain.loss(batch)[1]  # off by default: older saved models load
    assert not any(k.startswith("template_head") for k in plain.state_dict())


def test_template_views_read_only_their_own_signals() -> None:
    """The joint view regresses both kept signals' mean beats, a one-signal view only its own
    signal's; a signal dropped from the joint view is no target of it."""
    N = 4
    model = tiny(template_targets=N)
    features = []
    for value in (1.0, 2.0):  # ECG's mean beat all 1, PPG's all 2
        f = np.zeros((1, 1, 8 + N), np.float32)
        f[..., 0], f[..., 8:] = 1.0, value
        features.append(f)
    z = torch.zeros(1, 3, 1, model.config.fingerprint_dim)
    z[0, 0, 0, 2] = z[0, 1, 0, 0] = z[0, 2, 0, 1] = 1.0  # joint, ECG-only, PPG-only: own axis
    both = torch.ones(1, 1, 2, dtype=torch.bool)
    with torch.no_grad():
        head = model.template_head
        head.weight.zero_()
        head.bias.copy_(torch.tensor([1.0] * N + [2.0] * N))  # every view right about both
        head.weight[N:, 0] = 10.0  # the ECG-only view wrong about PPG: not its target
        head.weight[:N, 1] = 10.0  # the PPG-only view wrong about ECG: not its target
        head.weight[:N, 2] = 10.0  # the joint view wrong about ECG
        ecg_dropped = torch.tensor([[[False, True]]])
        assert model._templates(z, ecg_dropped, both, features).item() == pytest.approx(0.0)
        assert model._templates(z, both, both, features).item() > 10.0
        only_one = tiny(template_targets=N, joint_templates=False)  # one-signal views only
        only_one.load_state_dict(model.state_dict())
        assert only_one._templates(z, both, both, features).item() == pytest.approx(0.0)


def test_template_targets_read_only_the_signal_before_padding() -> None:
    """A padded window's mean beat (recomputed when the token holds none) ends at valid_n."""
    model = tiny(modality_dropout=0.0, template_targets=8)
    t = np.arange(L) / 125.0
    beats = np.arange(0.2, 10, 0.8)
    x = np.exp(-0.5 * ((t[:, None] - beats[None]) / 0.03) ** 2).sum(1)
    late = beats[beats > 5.0] + 0.3  # another pulse shape past the padding point: a second wave
    x += 0.5 * np.exp(-0.5 * ((t[:, None] - late[None]) / 0.06) ** 2).sum(1)
    x = ((x - x.mean()) / x.std()).astype(np.float32)
    valid = np.array([625])
    inside = rhythm_features(x[None], modality="ppg", template_points=8, valid_n=valid)[0, 8:]
    whole = rhythm_features(x[None], modality="ppg", template_points=8)[0, 8:]
    assert np.abs(inside - whole).max() > 0.05
    batch = random_batch(B=1, K=2)
    batch["ppg"][0] = torch.from_numpy(x)
    batch["ecg"][0] = torch.from_numpy(x)  # beats, but the signal is absent: no target
    batch["mask"][0, :, 0] = False
    batch["valid_n"] = torch.full((1, 2), 625)
    with torch.no_grad():
        model.template_head.weight.zero_()
        model.template_head.bias.zero_()
        model.template_head.bias[8:] = torch.from_numpy(inside)
        assert model.loss(batch)[1]["template"][0] == pytest.approx(0.0, abs=1e-5)
        model.template_head.bias[8:] = torch.from_numpy(whole)
        assert model.loss(batch)[1]["template"][0] > 1e-4


def test_modality_dropout_drives_cross_term() -> None:
    batch = random_batch(B=2, K=4)
    assert (tiny(modality_dropout=0.0).loss(batch)[1]["cross"] == 0).all()
    assert (tiny(modality_dropout=1.0).loss(batch)[1]["cross"] > 0).all()


def test_missing_modality_windows() -> None:
    batch = random_batch(B=2, K=4)
    batch["mask"][0, :, 1] = False  # subject 0 has no PPG
    batch["ppg"][0] = 0.0
    batch["mask"][1, 0, 0] = False  # one window of subject 1 lacks ECG
    loss, terms = tiny().loss(batch)
    assert torch.isfinite(loss).all()
    assert terms["cross"][0] == 0  # nothing dropped: only one modality to begin with


def test_loss_never_mixes_subjects() -> None:
    model = tiny(modality_dropout=0.5)
    batch = random_batch(B=4, K=3)
    torch.manual_seed(1)
    before, _ = model.loss(batch)
    batch["ecg"][2] = torch.randn(3, L) * 5
    batch["ppg"][2] = 0.0
    torch.manual_seed(1)
    after, _ = model.loss(batch)
    others = [0, 1, 3]
    torch.testing.assert_close(before[others], after[others])
    assert not torch.isclose(before[2], after[2])


def test_alignment_negatives_stay_in_bag() -> None:
    """Duplicate windows of a bag (drawn with replacement) are not negatives of each other."""
    model = tiny()
    batch = random_batch(B=1, K=2)
    batch["ecg"][0, 1], batch["ppg"][0, 1] = batch["ecg"][0, 0], batch["ppg"][0, 0]
    batch["index"][0] = torch.tensor([7, 7])
    torch.manual_seed(0)
    assert model.loss(batch)[1]["align"][0] == 0  # no valid negative left


def test_draw_bag_prefers_good_quality() -> None:
    model = tiny()
    quality = np.full((20, 2), 0.1, np.float32)
    quality[[3, 5, 8, 13], :] = 0.9
    bag = model.draw_bag(subject(20, quality=quality), bag_size=4, rng=np.random.default_rng(0))
    assert bag is not None and sorted(bag["index"]) == [3, 5, 8, 13]
    assert bag["ecg"].shape == (4, L) and bag["ppg"].dtype == np.float32
    assert bag["mask"].shape == (4, 2) and bag["mask"].dtype == bool


def test_draw_bag_with_replacement_and_none() -> None:
    model = tiny()
    bag = model.draw_bag(subject(3), bag_size=8, rng=np.random.default_rng(0))
    assert bag is not None and len(bag["index"]) == 8 and set(bag["index"]) == {0, 1, 2}
    empty = subject(4, mask=np.zeros((4, 2), bool))
    assert model.draw_bag(empty, bag_size=2, rng=np.random.default_rng(0)) is None


def test_registry() -> None:
    assert set(MODEL_NAMES) == {"m2ae", "siamquality"}
    model = build_model("m2ae", TINY)
    assert isinstance(model, M2AE) and model.config.width == 32
    assert isinstance(build_model("m2ae", M2AEConfig(**TINY)), M2AE)
    assert build_model("siamquality").name == "siamquality"
    with pytest.raises(ConfigError, match="m2ae, siamquality"):
        build_model("resnet")
    with pytest.raises(ConfigError, match="width"):
        build_model("m2ae", {"width": 30, "heads": 4})
    with pytest.raises(ConfigError, match="unknown_field"):
        build_model("m2ae", {"unknown_field": 1})


def test_bad_patching_rejected() -> None:
    with pytest.raises(ValueError, match="patch_samples"):
        M2AEConfig(patch_samples=100)


def test_rhythm_token_carries_beat_intervals() -> None:
    """The rhythm token is built from the beat intervals; rhythm_token=False has none."""
    regular = pulse_train(np.arange(0.2, 10, 0.8))
    irregular = pulse_train(np.array([0.2, 0.7, 1.8, 2.3, 3.5, 4.0, 4.9, 6.1, 6.6, 7.8, 8.3, 9.5]))
    ppg = torch.from_numpy(np.stack([regular, irregular]))
    with_token, without = tiny().eval(), tiny(rhythm_token=False).eval()
    assert sum(p.numel() for p in with_token.rhythm.parameters()) > 0
    features = with_token._rhythm_features(1, ppg[:, None])  # (2, 1, F)
    rhythm = with_token._rhythm_input(features, ppg)
    assert not hasattr(without, "rhythm") and without._rhythm_input(features, ppg) is None
    assert rhythm.shape == (2, 1, 8) and rhythm[1, 0, 3] > rhythm[0, 0, 3] + 0.5  # sdnn
    with torch.no_grad():
        tokens = with_token._encode(
            1, ppg[:, None].unflatten(-1, (10, 125)), with_token.modality(2), rhythm=rhythm
        )
    assert tokens.shape == (2, 1, 11, 32)  # 10 patches + the rhythm token


# ---- short records: padded windows ----------------------------------------------------------


def test_padding_is_out_of_attention_and_pooling() -> None:
    model = tiny().eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, L, generator=g)
    valid = torch.tensor([262, 1125])  # PPG-BP's 2.1 s and CinC's 9 s at 125 Hz
    x[0, 262:] = 0
    x[1, 1125:] = 0
    noisy = x.clone()
    noisy[0, 375:] = 5 * torch.randn(L - 375, generator=g)  # patches 3.. are all padding
    noisy[1, 1125:] = 5 * torch.randn(L - 1125, generator=g)  # the last patch is padding
    with torch.no_grad():
        a = tiny(rhythm_token=False).eval().fingerprint(ppg=x, valid_n=valid)
        b = tiny(rhythm_token=False).eval().fingerprint(ppg=noisy, valid_n=valid)
        c = tiny(rhythm_token=False).eval().fingerprint(ppg=noisy)
        full = model.fingerprint(ppg=x, valid_n=torch.tensor([L, L]))
        plain = model.fingerprint(ppg=x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a, c, atol=1e-3)  # without the mask the padding would count
    torch.testing.assert_close(full, plain)


def test_padded_windows_train_without_padding_in_the_loss() -> None:
    model = tiny()
    batch = random_batch(B=2, K=4)
    batch["valid_n"] = torch.tensor([[262, 262, 1250, 1125], [1250, 1250, 1250, 1250]])
    for m in ("ecg", "ppg"):
        for k, n in enumerate(batch["valid_n"][0].tolist()):
            batch[m][0, k, n:] = 0
    batch["ecg"].requires_grad_(True)
    batch["ppg"].requires_grad_(True)
    loss, terms = model.loss(batch)
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    assert all(torch.isfinite(t).all() for t in terms.values())
    loss.sum().backward()
    # padding patches (from sample 375 of a 262-sample window) get no gradient at all
    assert batch["ppg"].grad[0, 0, 375:].abs().max() == 0
    assert batch["ecg"].grad[0, 1, 375:].abs().max() == 0
    assert batch["ppg"].grad[0, 0, :250].abs().max() > 0
    # subject 1's loss does not depend on subject 0's windows (DP: one subject per row)
    batch2 = {k: v.detach().clone() for k, v in batch.items()}
    batch2["ppg"][0] = torch.randn(4, L)
    torch.manual_seed(1)
    l1, _ = model.loss({k: v.detach() for k, v in batch.items()})
    torch.manual_seed(1)
    l2, _ = model.loss(batch2)
    torch.testing.assert_close(l1[1], l2[1])


def test_draw_bag_carries_valid_samples() -> None:
    s = subject(3)
    s = SubjectWindows(**{**s.__dict__, "valid_n": np.array([262, 1250, 1125], np.int32)})
    bag = tiny().draw_bag(s, bag_size=6, rng=np.random.default_rng(0))
    assert bag is not None and bag["valid_n"].shape == (6,)
    assert set(bag["valid_n"].tolist()) <= {262, 1250, 1125}
    assert np.all(bag["valid_n"] == s.valid_n[bag["index"]])


@pytest.mark.filterwarnings("ignore:DPConfig.seed is set")
@pytest.mark.parametrize("options", [{}, {"rhythm_template": 8, "template_targets": 8}])
def test_padded_bags_keep_opacus_per_subject_gradients(options: dict) -> None:
    """Under DP-SGD, subject b's per-sample gradient with padded windows is its own loss's
    (with the mean beats in the token and as targets too)."""
    model = tiny(modality_dropout=0.5, **options)
    rng = np.random.default_rng(1)
    data = []
    for n, valid in ((3, [262, 262, 1250]), (3, [1125, 1250, 1250]), (2, [262, 375])):
        s = subject(n)
        s = SubjectWindows(**{**s.__dict__, "valid_n": np.array(valid, np.int32)})
        bag = model.draw_bag(s, bag_size=3, rng=rng)
        data.append({k: torch.as_tensor(v) for k, v in bag.items()})
    assert_per_sample_grads_are_per_subject(model, data)
