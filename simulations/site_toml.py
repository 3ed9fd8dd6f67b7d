"""The ``site.toml`` of an emulated hospital: the one TOML writer of ``simulations/``.

Every emulated site (a synthetic or WFDB partition, :mod:`simulations.cohort`; a public cohort,
:mod:`simulations.public`) gets the file a real site would write for itself, read back by the
same loader as a deployed site's (:func:`biofp_core.site.load_site_config`, through
:mod:`client.site_data`). What all sites of one simulation share is a :class:`SiteSettings`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from biofp_core.fingerprints.policy import ReleasePolicy
from server.app_folder import toml_value

SITE_TOML = "site.toml"
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


class SiteSettings(BaseModel):
    """What every emulated site of a simulation writes into its ``site.toml`` alike."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cache_dir: Path = Field(description="where the window stores are cached")
    epsilon: float = Field(gt=0, description="each site's privacy budget ε (inf: unlimited)")
    delta: float = Field(gt=0, lt=1, description="each site's δ")
    limits: dict[str, Any] = Field(
        default_factory=dict, description="more [privacy] keys (e.g. min_train_subjects)"
    )
    release: ReleasePolicy | None = Field(
        None, description="each site's [release] policy; None: no [release], queries refused"
    )


def toml_literal(value: object) -> str:
    """`value` as a TOML literal: scalars as in the app folder (infinities included), lists as
    arrays and dicts as inline tables."""
    if isinstance(value, dict):
        items = ", ".join(f"{toml_key(k)} = {toml_literal(v)}" for k, v in value.items())
        return "{ " + items + " }"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    if isinstance(value, Path):
        value = str(value)
    return toml_value(value)  # type: ignore[arg-type]


def toml_key(key: str) -> str:
    """A bare key when TOML allows one, else a quoted key."""
    return key if _BARE_KEY.match(key) else toml_literal(str(key))


def _table(values: dict[str, Any]) -> str:
    return "".join(f"{toml_key(k)} = {toml_literal(v)}\n" for k, v in values.items())


def site_toml(
    name: str, data_dir: str | Path, settings: SiteSettings, *, labels_csv: str | None,
    tables: dict[str, dict[str, Any] | None] | None = None,
) -> str:  # fmt: skip
    """The text of an emulated site's ``site.toml``: state in ``state/`` beside the file,
    `settings`' budget and release policy, and more `tables` (e.g. ``reader``, ``tasks``;
    a None table is left out). Relative paths are relative to the file."""
    top: dict[str, Any] = {"name": name, "data_dir": data_dir, "state_dir": "state"}
    if labels_csv is not None:
        top["labels_csv"] = labels_csv
    top["cache_dir"] = Path(settings.cache_dir).resolve()
    privacy = {"epsilon": float(settings.epsilon), "delta": settings.delta,
               **dict(sorted(settings.limits.items()))}  # fmt: skip
    release = None
    if settings.release is not None:
        release = settings.release.model_dump(mode="json", exclude_none=True)
    sections = {"privacy": privacy, "release": release, **(tables or {})}
    text = _table(top)
    for section, values in sections.items():
        if values is not None:
            text += f"\n[{section}]\n{_table(values)}"
    return text
