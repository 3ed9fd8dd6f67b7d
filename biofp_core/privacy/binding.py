"""Which state folder holds the privacy budget of which records: a registry in the site's cache.

A site's budget lives in its state folder, which defaults to a folder beside the data: moving or
renaming the data folder (or editing ``state_dir``) would point the site at an empty folder, and
initialising it would start a fresh ledger for patients whose ε is already spent. So `biofp site
init` binds the records to the site: ``<cache_dir>/sites/<data digest>-<site id>.json`` holds the
site id, its state folder and the sha256 of every record file (the digests the window store
keeps, memoised in ``<cache_dir>/digests.json``). Initialising a NEW state folder for records
any binding already holds is refused (:class:`DataBoundError`) unless the operator says, loudly,
that it is a new site (``--new-site``). An already initialised state folder is only (re)bound:
it creates no budget.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from biofp_core.errors import ConfigError
from biofp_core.fsutil import atomic_write_text
from biofp_core.site import SiteConfig

REGISTRY_DIR = "sites"  # under the site's cache folder


class DataBoundError(ConfigError):
    """The records are bound to another site's state folder: a new ledger would reset their ε."""


class DataBinding(BaseModel):
    """One site's claim on a set of records (one registry file)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["biofp-data-binding"] = "biofp-data-binding"
    site_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    name: str = Field(description="the site's name when bound (for people only)")
    state_dir: str
    data_dir: str = Field(description="the data folder when bound (for people only)")
    bound: str = Field(description="when, UTC ISO 8601")
    files: list[str] = Field(description="sha256 of every record file, sorted")


def record_digests(site: SiteConfig) -> list[str]:
    """sha256 of every record file of the site's data folder, sorted (memoised in the cache).

    Raises
    ------
    DataError
        The data folder holds no WFDB record.
    """
    from biofp_core.signals.read import find_records
    from biofp_core.store import file_digests, record_files

    headers = find_records(site.data_dir)
    files = sorted({f for h in headers for f in record_files(h)})
    digests = file_digests(files, memo_path=Path(site.cache_dir) / "digests.json")
    return sorted({d for d in digests.values() if d != "missing"})


def bindings(cache_dir: Path) -> list[tuple[Path, DataBinding]]:
    """Every binding in the registry of `cache_dir`.

    Raises
    ------
    ConfigError
        A registry file that does not parse (it may hide a binding: never skipped).
    """
    out = []
    for path in sorted((Path(cache_dir) / REGISTRY_DIR).glob("*.json")):
        try:
            out.append((path, DataBinding.model_validate_json(path.read_bytes())))
        except (OSError, ValidationError):
            raise ConfigError(
                f"{path}: unreadable data binding; restore it from a backup of the cache folder"
            ) from None
    return out


def check_new_ledger(site: SiteConfig, digests: list[str], *, new_site: bool) -> None:
    """Refuse a fresh ledger for records another site's ledger already covers.

    Raises
    ------
    DataBoundError
        Naming the site, its state folder and how to proceed (unless `new_site`).
    """
    wanted = set(digests)
    for path, binding in bindings(site.cache_dir):
        shared = wanted & set(binding.files)
        if shared and not new_site:
            raise DataBoundError(
                f"{site.data_dir}: {len(shared)} of its record files are bound to site "
                f"{binding.name!r} (site id {binding.site_id[:12]}, state folder "
                f"{binding.state_dir}, {path.name}); a new ledger would forget the ε spent on "
                f'them: set state_dir = "{binding.state_dir}" in site.toml (or restore that '
                "folder), or give --new-site if this is truly another site with its own budget"
            )


def bind(site: SiteConfig, state_dir: Path, site_id: str, digests: list[str]) -> Path:
    """Record that the site `site_id` (state folder `state_dir`) holds these records' budget."""
    data = hashlib.sha256("\n".join(digests).encode()).hexdigest()[:24]
    path = Path(site.cache_dir) / REGISTRY_DIR / f"{data}-{site_id}.json"
    binding = DataBinding(
        site_id=site_id, name=site.name, state_dir=str(Path(state_dir).resolve()),
        data_dir=str(site.data_dir), bound=datetime.now(UTC).isoformat(timespec="seconds"),
        files=digests,
    )  # fmt: skip
    atomic_write_text(path, binding.model_dump_json(indent=2) + "\n")
    return path
