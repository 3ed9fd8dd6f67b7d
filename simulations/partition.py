"""Split a dataset's subjects into emulated hospitals ("sites").

Partitions are by SUBJECT, never by window: all windows of a subject live at one site, as they
would in a real federation. Every partitioner is seeded and independent of the
order of its input (subject ids are sorted first), puts every subject at exactly one site and
leaves no site empty.

- :func:`partition_iid`: a uniform shuffle, sites as equal as possible.
- :func:`partition_dirichlet`: label skew; each label's subjects are spread over the sites with
  proportions drawn from Dirichlet(alpha). Small alpha: each site sees few labels.
- :func:`partition_quantity_skew`: site sizes drawn from Dirichlet(alpha); labels stay mixed.
- :func:`with_modality_skew` / :func:`partition_modality_skew`: a share of the sites only has ECG
  or only PPG (half each), as hospitals without one of the two sensors.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from biofp_core.errors import ConfigError
from biofp_core.signals.types import SiteModality

PARTITIONERS: tuple[str, ...] = ("iid", "dirichlet", "quantity-skew", "modality-skew")


class Partition(BaseModel):
    """Subjects per site and the modalities each site may use.

    Attributes
    ----------
    sites : tuple[tuple[str, ...], ...]
        Site index -> its subject ids (sorted).
    modalities : tuple[SiteModality, ...]
        Site index -> "both", or "ecg"/"ppg" for a single-modality site.
    scheme : str
        How the partition was made, e.g. "dirichlet(alpha=0.3)".
    seed : int
        The seed it was made with.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    sites: tuple[tuple[str, ...], ...] = Field(..., min_length=1)
    modalities: tuple[SiteModality, ...]
    scheme: str
    seed: int

    @model_validator(mode="after")
    def _check_disjoint_and_non_empty(self) -> Partition:
        if len(self.modalities) != len(self.sites):
            raise ValueError("one modality restriction per site is required")
        if any(not subjects for subjects in self.sites):
            raise ValueError("every site needs at least one subject")
        all_ids = [subject for subjects in self.sites for subject in subjects]
        if len(set(all_ids)) != len(all_ids):
            raise ValueError("a subject is assigned to more than one site")
        return self

    @property
    def num_sites(self) -> int:
        """Number of sites."""
        return len(self.sites)


def _sorted_unique(subject_ids: Sequence[str], num_sites: int) -> list[str]:
    """Sorted subject ids, after checking there are enough distinct ones for the sites."""
    ids = sorted(subject_ids)
    if len(set(ids)) != len(ids):
        raise ConfigError("subject ids must be unique")
    if num_sites < 1:
        raise ConfigError(f"num_sites must be at least 1, got {num_sites}")
    if len(ids) < num_sites:
        raise ConfigError(
            f"cannot split {len(ids)} subjects into {num_sites} sites without an empty site"
        )
    return ids


def _check_alpha(alpha: float) -> None:
    if not alpha > 0:
        raise ConfigError(f"Dirichlet alpha must be > 0, got {alpha}")


def _build(sites: Sequence[Sequence[str]], scheme: str, seed: int) -> Partition:
    """A Partition of sorted sites, all with both modalities."""
    return Partition(
        sites=tuple(tuple(sorted(site)) for site in sites),
        modalities=("both",) * len(sites),
        scheme=scheme,
        seed=seed,
    )


def _fill_empty_sites(sites: list[list[str]], rng: np.random.Generator) -> None:
    """Move one subject from the largest site into each empty site (in place)."""
    for empty in [i for i, site in enumerate(sites) if not site]:
        largest = max(range(len(sites)), key=lambda i: len(sites[i]))
        donor = sites[largest]
        sites[empty].append(donor.pop(int(rng.integers(len(donor)))))


def partition_iid(subject_ids: Sequence[str], *, num_sites: int, seed: int = 0) -> Partition:
    """Shuffle subjects uniformly into `num_sites` sites whose sizes differ by at most one."""
    ids = _sorted_unique(subject_ids, num_sites)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ids))
    sites = [[ids[i] for i in chunk] for chunk in np.array_split(order, num_sites)]
    return _build(sites, "iid", seed)


def partition_dirichlet(
    subject_ids: Sequence[str],
    labels: Mapping[str, Hashable],
    *,
    num_sites: int,
    alpha: float,
    seed: int = 0,
) -> Partition:
    """Label-skewed sites: each label's subjects split by proportions ~ Dirichlet(alpha).

    Parameters
    ----------
    subject_ids : Sequence[str]
        The subjects to place.
    labels : Mapping[str, Hashable]
        Subject id -> label (e.g. sex, age band, diagnosis); every subject needs one.
    num_sites : int
        Number of sites.
    alpha : float
        Concentration: 0.1 is strongly skewed, 100 is close to iid.
    seed : int
        Random seed.

    Returns
    -------
    Partition
        Sites that happen to draw nobody get one subject from the largest site.
    """
    ids = _sorted_unique(subject_ids, num_sites)
    _check_alpha(alpha)
    unlabelled = [subject for subject in ids if subject not in labels]
    if unlabelled:
        raise ConfigError(f"{len(unlabelled)} subject(s) have no label, e.g. {unlabelled[0]!r}")
    rng = np.random.default_rng(seed)
    sites: list[list[str]] = [[] for _ in range(num_sites)]
    for label in sorted({labels[s] for s in ids}, key=repr):
        members = [ids[i] for i in rng.permutation(len(ids)) if labels[ids[i]] == label]
        shares = rng.dirichlet(np.full(num_sites, alpha))
        cuts = np.round(np.cumsum(shares)[:-1] * len(members)).astype(int)
        for site, chunk in enumerate(np.split(np.array(members, dtype=object), cuts)):
            sites[site].extend(chunk.tolist())
    _fill_empty_sites(sites, rng)
    return _build(sites, f"dirichlet(alpha={alpha:g})", seed)


def partition_quantity_skew(
    subject_ids: Sequence[str], *, num_sites: int, alpha: float, seed: int = 0
) -> Partition:
    """Sites of unequal size: 1 subject each, the rest split by shares ~ Dirichlet(alpha)."""
    ids = _sorted_unique(subject_ids, num_sites)
    _check_alpha(alpha)
    rng = np.random.default_rng(seed)
    shares = rng.dirichlet(np.full(num_sites, alpha))
    sizes = 1 + rng.multinomial(len(ids) - num_sites, shares)
    order = [ids[i] for i in rng.permutation(len(ids))]
    sites = np.split(np.array(order, dtype=object), np.cumsum(sizes)[:-1])
    return _build([site.tolist() for site in sites], f"quantity-skew(alpha={alpha:g})", seed)


def with_modality_skew(partition: Partition, *, share: float, seed: int = 0) -> Partition:
    """Make ``round(share * num_sites)`` random sites single-modality, half ECG-only, half PPG.

    With an odd count the extra site is ECG-only. The subjects per site are unchanged.
    """
    if not 0 <= share <= 1:
        raise ConfigError(f"modality share must be in [0, 1], got {share}")
    rng = np.random.default_rng(seed)
    num_single = round(share * partition.num_sites)
    chosen = rng.permutation(partition.num_sites)[:num_single]
    modalities: list[SiteModality] = list(partition.modalities)
    for rank, site in enumerate(chosen):
        modalities[int(site)] = "ecg" if rank % 2 == 0 else "ppg"
    return partition.model_copy(
        update={
            "modalities": tuple(modalities),
            "scheme": f"{partition.scheme}+modality-skew(share={share:g})",
        }
    )


def partition_modality_skew(
    subject_ids: Sequence[str], *, num_sites: int, share: float, seed: int = 0
) -> Partition:
    """IID subjects per site, then :func:`with_modality_skew` on a `share` of the sites."""
    return with_modality_skew(
        partition_iid(subject_ids, num_sites=num_sites, seed=seed), share=share, seed=seed
    )


def make_partition(
    name: str,
    subject_ids: Sequence[str],
    *,
    num_sites: int,
    seed: int = 0,
    labels: Mapping[str, Hashable] | None = None,
    alpha: float = 0.5,
    modality_share: float = 0.5,
) -> Partition:
    """Dispatch to a partitioner by name (one of :data:`PARTITIONERS`).

    `labels` is required by "dirichlet"; `alpha` is used by "dirichlet" and "quantity-skew";
    `modality_share` by "modality-skew".
    """
    if name == "iid":
        return partition_iid(subject_ids, num_sites=num_sites, seed=seed)
    if name == "dirichlet":
        if labels is None:
            raise ConfigError("the dirichlet partitioner needs a label per subject")
        return partition_dirichlet(subject_ids, labels, num_sites=num_sites, alpha=alpha, seed=seed)
    if name == "quantity-skew":
        return partition_quantity_skew(subject_ids, num_sites=num_sites, alpha=alpha, seed=seed)
    if name == "modality-skew":
        return partition_modality_skew(
            subject_ids, num_sites=num_sites, share=modality_share, seed=seed
        )
    raise ConfigError(f"unknown partitioner {name!r}; valid: {', '.join(PARTITIONERS)}")
