"""Which site this ClientApp is, and its subjects: training set and subject-disjoint holdout.

Deployment: the SuperNode is started with ``--node-config 'site-config="/etc/biofp/site.toml"'``
and the site's own ``site.toml`` says where its data, cache and state (ledger, audit log) are and
what privacy budget it accepts. Simulation: Flower sets ``partition-id`` in the node config and
the run config's ``sim-sites`` names a :class:`SimulationSites` manifest written by
``simulations/``, which maps each partition to the ``site.toml`` of one emulated hospital. Either
way the site is then loaded the same way, from its ``site.toml`` (:func:`load_site_data`); the
simulation's own reports and studies load their emulated sites with it too
(:meth:`SimulationSites.load`).

Loaded sites are cached per process: a ClientApp process serves many rounds.
"""

from __future__ import annotations

import functools
import logging
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common.constant import PARTITION_ID_KEY
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from biofp_core.errors import ConfigError, DataError
from biofp_core.protocol.keys import SITE_CONFIG_KEY
from biofp_core.signals.types import SiteModality, SubjectWindows
from biofp_core.site import SiteConfig, load_site_config
from biofp_core.store import WindowStore
from biofp_core.validate import open_site_store

log = logging.getLogger(__name__)


class SiteRef(BaseModel):
    """Where a site is: its site.toml, and (simulation only) what the emulated site may use."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    site_config: Path = Field(description="the site's own site.toml")
    modality: SiteModality = Field("both", description="ecg/ppg: the site has only that sensor")
    dp_seed: int | None = Field(None, description="seeds DP noise: reproducible simulations")


class SimulationSites(BaseModel):
    """The simulation's manifest: partition id -> emulated site."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sites: list[SiteRef] = Field(min_length=1)

    def write(self, path: Path) -> Path:
        """Write the manifest as JSON."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=1) + "\n")
        return path

    @classmethod
    def read(cls, path: Path) -> SimulationSites:
        """The manifest at `path`.

        Raises
        ------
        ConfigError
            One line naming the file: missing or not a manifest.
        """
        try:
            return cls.model_validate_json(Path(path).read_bytes())
        except (OSError, ValidationError) as exc:
            raise ConfigError(f"{path}: unreadable simulation manifest ({exc})") from None

    def load(self, *, holdout_fraction: float) -> list[SiteData]:
        """Every emulated site, in partition order, loaded as its ClientApp loads it."""
        return [load_site_data(site, holdout_fraction=holdout_fraction) for site in self.sites]


@dataclass(frozen=True)
class SiteData:
    """A site's config and its subjects, split by subject into training and holdout; what the
    site may use (`modality`) and its DP noise seed (both from its :class:`SiteRef`)."""

    config: SiteConfig
    train: list[SubjectWindows]
    holdout: list[SubjectWindows]
    dp_seed: int | None = None
    modality: SiteModality = "both"

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def state_dir(self) -> Path:
        """Where the site's ledger and audit log live."""
        return self.config.resolved_state_dir()

    @functools.cached_property
    def store(self) -> WindowStore:
        """The site's window store (reopened from its cache on first use)."""
        return open_site_store(self.config)


def _restrict_modality(subject: SubjectWindows, modality: SiteModality) -> SubjectWindows | None:
    """The subject's windows with only `modality` kept; None when none of them has it."""
    if modality == "both":
        return subject
    keep = 0 if modality == "ecg" else 1
    rows: slice | np.ndarray = np.flatnonzero(subject.mask[:, keep])
    if len(rows) == 0:
        return None
    n = len(rows)
    if n == len(subject):
        rows = slice(None)  # every window has it: keep (memory-mapped) views, copy nothing
    mask = np.zeros((n, 2), dtype=bool)
    mask[:, keep] = True
    quality = np.full((n, 2), np.nan, dtype=np.float32)
    quality[:, keep] = subject.quality[rows, keep]
    zeros = np.broadcast_to(
        np.zeros((1, subject.ecg.shape[1]), np.float32), (n, subject.ecg.shape[1])
    )
    return SubjectWindows(
        subject_id=subject.subject_id,
        ecg=subject.ecg[rows] if keep == 0 else zeros,
        ppg=subject.ppg[rows] if keep == 1 else zeros,
        mask=mask,
        quality=quality,
        start_s=subject.start_s[rows],
        record_index=subject.record_index[rows],
        valid_n=subject.valid_samples()[rows],
    )


def split_holdout(
    subjects: list[SubjectWindows], *, fraction: float, key: str
) -> tuple[list[SubjectWindows], list[SubjectWindows]]:
    """Split subjects (never windows) into (train, holdout), seeded by `key`.

    With two or more subjects and ``fraction > 0`` at least one subject is held out and at least
    one is kept for training.
    """
    n = len(subjects)
    n_holdout = 0 if fraction <= 0 or n < 2 else min(n - 1, max(1, int(fraction * n)))
    order = np.random.default_rng(zlib.crc32(key.encode())).permutation(n)
    held = set(order[:n_holdout].tolist())
    train = [s for i, s in enumerate(subjects) if i not in held]
    holdout = [s for i, s in enumerate(subjects) if i in held]
    return train, holdout


@functools.lru_cache(maxsize=8)
def _load(
    site_toml: Path, mtime_ns: int, modality: SiteModality, holdout_fraction: float
) -> tuple[SiteConfig, list[SubjectWindows], list[SubjectWindows]]:
    """Open a site's store and split its subjects (cached on the TOML path and mtime)."""
    config = load_site_config(site_toml)
    store = open_site_store(config)
    restricted = (_restrict_modality(s, modality) for s in store.subjects())
    subjects = [s for s in restricted if s is not None]
    if not subjects:
        raise DataError(f"site {config.name}: no subject has {modality} windows")
    train, holdout = split_holdout(subjects, fraction=holdout_fraction, key=config.name)
    log.info(
        "site %s: %d training and %d held-out subjects (%s)",
        config.name,
        len(train),
        len(holdout),
        modality,
    )
    return config, train, holdout


def _simulated_site(node_config: Mapping[str, Any], sim_sites: str) -> SiteRef:
    """The emulated site of this simulation node (by Flower's partition id)."""
    if not sim_sites:
        raise ConfigError("simulation node without a sim-sites manifest in the run config")
    path = Path(sim_sites)
    manifest = SimulationSites.read(path)
    partition = int(node_config[PARTITION_ID_KEY])
    if not 0 <= partition < len(manifest.sites):
        raise ConfigError(f"{path}: no site for partition {partition}")
    return manifest.sites[partition]


def locate_site(node_config: Mapping[str, Any], *, sim_sites: str = "") -> SiteRef:
    """Which site this node serves: its site.toml (deployment) or its partition (simulation).

    Raises
    ------
    ConfigError
        The node config names no site, or the simulation manifest is unusable.
    """
    if SITE_CONFIG_KEY in node_config:
        return SiteRef(site_config=Path(str(node_config[SITE_CONFIG_KEY])))
    if PARTITION_ID_KEY in node_config:
        return _simulated_site(node_config, sim_sites)
    raise ConfigError(
        f"node config has no {SITE_CONFIG_KEY!r}: start the SuperNode with "
        f"--node-config '{SITE_CONFIG_KEY}=\"/path/to/site.toml\"'"
    )


def _toml_path(site: SiteRef) -> Path:
    toml = site.site_config.expanduser().resolve()
    if not toml.is_file():
        raise ConfigError(f"{toml}: site config not found")
    return toml


def site_config(site: SiteRef) -> SiteConfig:
    """The site's own config (before any of its data is read)."""
    return load_site_config(_toml_path(site))


def load_site_data(site: SiteRef, *, holdout_fraction: float) -> SiteData:
    """The site's config and subjects (cached per process on the site.toml and its mtime).

    Raises
    ------
    ConfigError
        The site config is missing or invalid.
    DataError
        The site has no usable record or no subject with usable windows.
    """
    toml = _toml_path(site)
    config, train, holdout = _load(toml, toml.stat().st_mtime_ns, site.modality, holdout_fraction)
    return SiteData(
        config=config, train=train, holdout=holdout, dp_seed=site.dp_seed, modality=site.modality
    )
