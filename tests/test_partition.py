"""Subject partitioners: coverage, disjointness, determinism, skew."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest

from biofp_core.errors import ConfigError
from simulations.partition import (
    PARTITIONERS,
    Partition,
    make_partition,
    partition_dirichlet,
    partition_iid,
    partition_quantity_skew,
    with_modality_skew,
)

SUBJECTS = [f"subject{i:03d}" for i in range(200)]
LABELS = {s: i % 4 for i, s in enumerate(SUBJECTS)}  # 4 balanced classes


def _make(name: str, seed: int = 0, subjects: list[str] = SUBJECTS) -> Partition:
    return make_partition(name, subjects, num_sites=7, seed=seed, labels=LABELS, alpha=0.5)


@pytest.mark.parametrize("name", PARTITIONERS)
def test_every_subject_at_exactly_one_site_and_no_site_empty(name: str) -> None:
    partition = _make(name)
    assigned = [s for site in partition.sites for s in site]
    assert sorted(assigned) == sorted(SUBJECTS)
    assert len(assigned) == len(set(assigned))
    assert partition.num_sites == 7 and all(partition.sites)
    assert len(partition.modalities) == 7


@pytest.mark.parametrize("name", PARTITIONERS)
def test_seeded_and_independent_of_input_order(name: str) -> None:
    assert _make(name, seed=3) == _make(name, seed=3)
    assert _make(name, seed=3) == _make(name, seed=3, subjects=SUBJECTS[::-1])
    assert _make(name, seed=3) != _make(name, seed=4)


def test_iid_sizes_differ_by_at_most_one() -> None:
    sizes = [len(site) for site in partition_iid(SUBJECTS, num_sites=7).sites]
    assert max(sizes) - min(sizes) <= 1


def _label_skew(partition: Partition) -> float:
    """Mean total-variation distance between each site's label mix and the global mix."""
    distances = []
    for site in partition.sites:
        counts = Counter(LABELS[s] for s in site)
        site_mix = np.array([counts[c] for c in range(4)]) / len(site)
        distances.append(0.5 * np.abs(site_mix - 0.25).sum())
    return float(np.mean(distances))


def test_dirichlet_small_alpha_is_more_skewed_than_large_alpha() -> None:
    def skew(alpha: float) -> float:
        runs = [
            partition_dirichlet(SUBJECTS, LABELS, num_sites=5, alpha=alpha, seed=s)
            for s in range(5)
        ]
        return float(np.mean([_label_skew(p) for p in runs]))

    assert skew(0.1) > 0.4  # sites see mostly one or two labels
    assert skew(100.0) < 0.15  # close to the global mix
    assert skew(0.1) > 3 * skew(100.0)


def test_dirichlet_fills_sites_left_empty_by_the_draw() -> None:
    few = SUBJECTS[:12]
    for seed in range(20):  # alpha = 0.01 leaves most sites empty before repair
        partition = partition_dirichlet(few, LABELS, num_sites=10, alpha=0.01, seed=seed)
        assert all(partition.sites) and sum(map(len, partition.sites)) == 12


def test_quantity_skew_makes_unequal_sites() -> None:
    def spread(alpha: float) -> float:
        sizes = [
            len(site) for site in partition_quantity_skew(SUBJECTS, num_sites=7, alpha=alpha).sites
        ]
        return max(sizes) / min(sizes)

    assert spread(0.3) > 5
    assert spread(1000.0) < 2


def test_modality_skew_restricts_the_requested_share_of_sites() -> None:
    base = partition_iid(SUBJECTS, num_sites=10, seed=0)
    skewed = with_modality_skew(base, share=0.4, seed=0)
    counts = Counter(skewed.modalities)
    assert counts == {"both": 6, "ecg": 2, "ppg": 2}
    assert skewed.sites == base.sites
    assert "modality-skew" in skewed.scheme
    assert with_modality_skew(base, share=0.0).modalities == ("both",) * 10
    assert set(with_modality_skew(base, share=1.0).modalities) == {"ecg", "ppg"}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: partition_iid(SUBJECTS[:3], num_sites=5), "without an empty site"),
        (lambda: partition_iid(["a", "a", "b"], num_sites=2), "unique"),
        (lambda: partition_iid(SUBJECTS, num_sites=0), "at least 1"),
        (lambda: partition_dirichlet(SUBJECTS, {}, num_sites=2, alpha=1), "no label"),
        (lambda: partition_quantity_skew(SUBJECTS, num_sites=2, alpha=0), "alpha"),
        (lambda: with_modality_skew(partition_iid(SUBJECTS, num_sites=2), share=2), "share"),
        (lambda: make_partition("dirichlet", SUBJECTS, num_sites=2), "label"),
        (lambda: make_partition("random", SUBJECTS, num_sites=2), "valid: iid, dirichlet"),
    ],
)
def test_impossible_or_invalid_requests_raise_config_error(
    call: Callable[[], object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        call()
