"""The public federation: each real public cohort is one hospital, read in its own format.

``biofp simulate --cohort public`` reads ``simulations/configs/public.toml`` (``--quick``:
``public-quick.toml``): one :class:`PublicSite` per cohort folder under the data root
(``--data-root``, default ``$BIOFP_SHARED_DATA`` or ``../shared/data``). Each site is laid out
as a real one would be: its own ``site.toml`` whose ``data_dir`` is the cohort folder exactly as
shipped (or, with ``max_subjects``, a folder of links to that many of its subjects' files), its
privacy budget and state folder, and a ``labels.csv`` written from what its reader found
(subject, record or window labels: its own tasks). The split between sites is the natural one:
a site holds one cohort, so device, modality, rate, population and labels all differ.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from biofp_core.errors import ConfigError, DataError
from biofp_core.privacy.ledger import initialise_site_state
from biofp_core.signals.formats import Item, ReaderConfig, Source, open_source
from biofp_core.site import load_site_config
from biofp_core.store import label_rows, write_labels_csv
from biofp_core.validate import open_site_store
from simulations.site_toml import SITE_TOML, SiteSettings, site_toml

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
COHORT_CONFIGS = {"public": "public.toml"}
QUICK_SUFFIX = "-quick"
LABELS_NAME = "labels.csv"


class PublicSite(BaseModel):
    """One hospital of the public federation: a cohort folder and what the site may use."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    folder: str = Field(description="the cohort's folder, relative to the data root")
    modality: Literal["both", "ecg", "ppg"] = "both"
    max_subjects: int | None = Field(
        None, ge=2, description="use this many subjects (seeded choice); None: all of them"
    )
    reader: ReaderConfig = Field(default_factory=ReaderConfig)


def cohort_config(cohort: str, *, quick: bool = False) -> Path:
    """The sim.toml shipped for `cohort` (``--quick``: its CI-sized variant)."""
    if cohort not in COHORT_CONFIGS:
        raise ConfigError(f"unknown cohort {cohort!r}; valid: {', '.join(COHORT_CONFIGS)}")
    name = COHORT_CONFIGS[cohort]
    if quick:
        name = name.replace(".toml", f"{QUICK_SUFFIX}.toml")
    return CONFIG_DIR / name


def default_data_root() -> Path:
    """``$BIOFP_SHARED_DATA``, else ``../shared/data`` from the current folder."""
    env = os.environ.get("BIOFP_SHARED_DATA")
    return Path(env) if env else Path("..") / "shared" / "data"


def item_subject(source: Source, item: Item) -> str:
    """The subject a unit of reading belongs to, known before reading it."""
    if source.format == "matseg":
        return item.path.stem
    if source.format == "textseg":
        match = re.fullmatch(source.config.textseg.name_pattern, item.path.stem)
        return match.group("subject") if match else item.item_id
    return item.item_id


def _link_subset(source: Source, folder: Path, max_subjects: int, seed: int) -> None:
    """Links in `folder` to the files of `max_subjects` subjects (seeded) and the label files."""
    subjects = sorted({item_subject(source, i) for i in source.items})
    rng = np.random.default_rng(seed)
    chosen = {subjects[i] for i in rng.permutation(len(subjects))[:max_subjects]}
    wanted = {f for i in source.items if item_subject(source, i) in chosen for f in i.files}
    wanted |= set(source.label_files)
    links = set()
    for f in sorted(wanted):
        link = folder / f.relative_to(source.data_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() and Path(os.readlink(link)) == f.resolve():
            links.add(link)
            continue
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(f.resolve())
        links.add(link)
    for stale in folder.rglob("*"):
        if stale.is_symlink() and stale not in links:
            stale.unlink()


MAX_CLASSES = 20  # text label columns with more distinct values are not declared as tasks


def site_tasks(rows: list[dict[str, str]], columns: list[str]) -> dict[str, dict]:
    """``[tasks]`` of a public site from the labels its reader found (the simulation owns the
    cohort): 0/1 columns binary, other numeric ones regression, text columns with 2 to
    MAX_CLASSES values binary or multiclass with their sorted values as classes."""
    tasks: dict[str, dict] = {}
    for column in columns:
        cells = {r.get(column, "").strip() for r in rows} - {""}
        try:
            numbers = {float(c) for c in cells}
        except ValueError:
            numbers = None
        if numbers is not None and numbers:
            tasks[column] = {"kind": "binary" if numbers <= {0.0, 1.0} else "regression"}
        elif numbers is None and 2 <= len(cells) <= MAX_CLASSES:
            kind = "binary" if len(cells) == 2 else "multiclass"
            tasks[column] = {"kind": kind, "classes": sorted(cells)}
    return tasks


def _site_toml(
    site: PublicSite, data_dir: Path, settings: SiteSettings, *, labels: bool,
    tasks: dict[str, dict] | None = None,
) -> str:  # fmt: skip
    reader = site.reader.model_dump(mode="json", exclude_defaults=True)
    return site_toml(
        site.name, str(data_dir), settings, labels_csv=LABELS_NAME if labels else None,
        tables={"reader": reader or None, "tasks": tasks or None},
    )  # fmt: skip


def write_public_sites(
    sites: list[PublicSite], settings: SiteSettings, *, data_root: Path, root: Path, seed: int
) -> list[Path]:
    """One folder per public site under `root`, its window store built and its labels written.

    Returns the site.toml paths. A site's ``state/`` (ledger, audit log) is never touched;
    `settings` are what every site's ``site.toml`` shares (budget, limits, release policy).

    Raises
    ------
    DataError
        A cohort folder is missing (one line naming it and the data root).
    """
    data_root = Path(data_root).expanduser().resolve()
    tomls = []
    for index, site in enumerate(sites):
        folder = data_root / site.folder
        if not folder.is_dir():
            raise DataError(
                f"{folder}: cohort folder of site {site.name} not found "
                "(give --data-root or set BIOFP_SHARED_DATA)"
            )
        site_dir = Path(root) / site.name
        site_dir.mkdir(parents=True, exist_ok=True)
        data_dir = folder
        if site.max_subjects is not None:
            data_dir = site_dir / "data"
            source = open_source(folder, site.reader)
            _link_subset(source, data_dir, site.max_subjects, seed * 1000 + index)
        initialise_site_state(site_dir / "state", name=site.name)  # once; kept across runs
        toml = site_dir / SITE_TOML
        toml.write_text(_site_toml(site, data_dir, settings, labels=False))
        store = open_site_store(load_site_config(toml))
        rows = write_labels_csv(store, site_dir / LABELS_NAME)
        if rows:
            _, table = label_rows(store)
            tasks = site_tasks(table, sorted(store.manifest.label_levels))
            toml.write_text(_site_toml(site, data_dir, settings, labels=True, tasks=tasks))
        log.info(
            "public site %s: %s, %d records, %d windows, %d label rows",
            site.name, store.manifest.format, len(store.manifest.records), len(store), rows,
        )  # fmt: skip
        tomls.append(toml)
    return tomls
