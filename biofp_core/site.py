"""A site's configuration (`site.toml`) and its labels file, parsed once at the boundary."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from biofp_core.config import ChannelAliases, PreprocessConfig, read_toml
from biofp_core.deployment import FederationConfig, resolve_federation_paths
from biofp_core.errors import ConfigError, DataError, first_error
from biofp_core.fingerprints.policy import ReleasePolicy
from biofp_core.signals.channels import normalise_name
from biofp_core.signals.formats import ReaderConfig

LABEL_KEYS = ("subject", "record")


def default_cache_dir() -> Path:
    """Where window stores live unless a site says otherwise (`$BIOFP_CACHE_DIR` overrides)."""
    env = os.environ.get("BIOFP_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "biofp" / "windows"


class AliasOverrides(BaseModel):
    """Extra channel names for this site; they are tried before the built-in aliases."""

    model_config = ConfigDict(extra="forbid")

    ecg: list[str] = []
    ppg: list[str] = []


class PrivacyBudget(BaseModel):
    """The site's own privacy budget and the limits it pins; the server can only ask.

    Every limit has a safe default that a site can loosen explicitly in ``[privacy]``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    epsilon: float = Field(8.0, gt=0, description="total ε this site will ever spend")
    delta: float = Field(1e-5, gt=0, lt=1, description="δ at which ε is reported")
    # --- what the site accepts from the server -------------------------------------------
    min_noise_multiplier: float = Field(0.8, gt=0, description="σ floor of a DP-SGD round")
    min_train_subjects: int = Field(4, ge=1, description="training subjects a round needs")
    max_holdout_fraction: float = Field(0.5, ge=0, lt=1, description="largest holdout asked")
    max_bag_size: int = Field(64, ge=1, description="most windows of one subject per bag")
    models: list[str] = Field(["m2ae", "siamquality"], description="models the site trains")
    model_options: dict[str, Any] | None = Field(
        None, description="a pinned architecture (model-options must equal it); None: any"
    )
    max_charged_queries: int = Field(
        16, ge=0, description="charged evaluate/probe/release answers per run key"
    )
    # --- the noise on every metric that leaves (see docs/privacy.md) -----------------------
    metric_clip: float = Field(10.0, gt=0, description="C: L2 clip of a subject's loss vector")
    train_metric_noise: float = Field(
        5.0, gt=0, description="σ of each step's noisy loss sum (× C), training"
    )
    eval_noise: float = Field(10.0, gt=0, description="σ of the noisy held-out loss sum (× C)")
    probe_epsilon: float = Field(1.0, gt=0, description="ε of one probe answer (Gaussian)")
    probe_groups: int = Field(
        8, ge=1, description="m: groups a probe is averaged over (fixed, whatever the subjects)"
    )


class TaskSpec(BaseModel):
    """A label column the site lets the server probe, and its kind: a setting of the site, never
    inferred from the labels (the kind of a probe leaves the site).

    In ``[tasks]``: ``af = "binary"`` (classes "0" and "1"), ``age = "regression"``, or
    ``rhythm = { kind = "multiclass", classes = ["sr", "af", "flutter"] }``. A cell that is not
    one of the classes (or not a number, for regression) counts as unlabelled.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["binary", "multiclass", "regression"]
    classes: tuple[str, ...] = Field((), description="class names in index order")

    @model_validator(mode="before")
    @classmethod
    def _binary_default(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("kind") == "binary" and not data.get("classes"):
            return {**data, "classes": ("0", "1")}
        return data

    @model_validator(mode="after")
    def _classes_of_kind(self) -> TaskSpec:
        if self.kind == "regression" and self.classes:
            raise ValueError("a regression task has no classes")
        if self.kind == "binary" and len(self.classes) != 2:
            raise ValueError("a binary task has exactly 2 classes")
        if self.kind == "multiclass" and len(self.classes) < 2:
            raise ValueError("a multiclass task lists its classes (at least 2)")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("classes repeat")
        return self


class SiteConfig(BaseModel):
    """Everything a site decides for itself. Relative paths are resolved against the TOML file."""

    model_config = ConfigDict(extra="forbid")

    name: str = "site"
    data_dir: Path
    cache_dir: Path = Field(default_factory=default_cache_dir)
    state_dir: Path | None = Field(
        None, description="ledger, audit log, secrets (default: beside data)"
    )
    labels_csv: Path | None = None
    subject_map_csv: Path | None = Field(None, description="CSV with columns record,subject")
    aliases: AliasOverrides = AliasOverrides()
    preprocess: dict = Field(default_factory=dict, description="PreprocessConfig overrides")
    reader: ReaderConfig = Field(
        default_factory=ReaderConfig, description="[reader]: the data folder's format"
    )
    privacy: PrivacyBudget = PrivacyBudget()
    release: ReleasePolicy = ReleasePolicy()  # what fingerprint exports may let out
    federation: FederationConfig | None = Field(None, description="how the SuperNode joins")
    tasks: dict[str, TaskSpec] = Field(
        default_factory=dict, description="label columns the server may probe, and their kinds"
    )

    @field_validator("tasks", mode="before")
    @classmethod
    def _kind_alone(cls, value: object) -> object:
        if isinstance(value, dict):
            return {k: {"kind": v} if isinstance(v, str) else v for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _check_preprocess(self) -> SiteConfig:
        self.preprocess_config()  # fail at parse time, not mid-run
        return self

    def preprocess_config(self) -> PreprocessConfig:
        """The preprocessing config with this site's channel aliases first."""
        base = ChannelAliases()
        aliases = ChannelAliases(
            ecg=_merge(self.aliases.ecg, base.ecg), ppg=_merge(self.aliases.ppg, base.ppg)
        )
        return PreprocessConfig(**{**self.preprocess, "aliases": aliases})

    def resolved_state_dir(self) -> Path:
        """The state folder: `state_dir`, else ``.biofp-<data folder name>`` beside the data
        folder (it does not move when the site's `name` changes).

        Raises
        ------
        ConfigError
            An older BioFP's default folder (named after the site) holds a ledger.
        """
        if self.state_dir is not None:
            return self.state_dir
        legacy = self.data_dir.parent / f".biofp-{self.name}"
        default = self.data_dir.parent / f".biofp-{self.data_dir.name}"
        moved = legacy != default and not default.exists()
        if moved and (legacy / "privacy_ledger.json").exists():
            raise ConfigError(
                f"{legacy}: this site's ledger is in an older default state folder; set "
                f'state_dir = "{legacy}" in site.toml'
            )
        return default


def _merge(extra: list[str], base: tuple[str, ...]) -> tuple[str, ...]:
    names = [normalise_name(n) for n in extra] + list(base)
    return tuple(dict.fromkeys(n for n in names if n))


def load_site_config(path: Path | None = None, *, data_dir: Path | None = None) -> SiteConfig:
    """Read `site.toml` (if given); `data_dir` overrides the file's `data_dir`."""
    raw: dict = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        raw = read_toml(path, "site config")
        raw = raw.get("site", raw)
        base = path.parent
    if data_dir is not None:
        raw["data_dir"] = str(data_dir)
    if "data_dir" not in raw:
        raise ConfigError(f"{path or 'site config'}: data_dir is not set (give --data DIR)")
    for key in ("data_dir", "cache_dir", "state_dir", "labels_csv", "subject_map_csv"):
        if raw.get(key) is not None:
            if not isinstance(raw[key], str):
                raise ConfigError(f"{path or 'site config'}: {key}: must be a path (a string)")
            raw[key] = (base / Path(raw[key]).expanduser()).resolve()
    if isinstance(raw.get("federation"), dict):
        raw["federation"] = resolve_federation_paths(raw["federation"], base)
    try:
        return SiteConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path or 'site config'}: {first_error(exc)}") from None


def read_csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a CSV file, with a one-line error if it cannot be read."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            return [c.strip() for c in reader.fieldnames or []], rows
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: unreadable CSV: {exc}") from None


def read_subject_map(path: Path) -> dict[str, str]:
    """record id -> subject id from a CSV with columns `record` and `subject`."""
    columns, rows = read_csv_rows(path)
    missing = [c for c in LABEL_KEYS if c not in columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(columns)})"
        )
    return {r["record"].strip(): r["subject"].strip() for r in rows}


def check_label_ids(
    path: Path, *, subjects: set[str] | None = None, records: set[str] | None = None
) -> tuple[str, list[dict[str, str]]]:
    """Rows of a labels CSV keyed by raw `subject` (preferred) or `record` id, each id checked
    against the site's own (``biofp site validate``); evaluation reads labels with
    ``biofp_core.evaluation.read_labels``, which pseudonymises them.

    Raises DataError when the key column is missing or a row names an unknown subject/record.
    """
    columns, rows = read_csv_rows(path)
    key = next((k for k in LABEL_KEYS if k in columns), None)
    if key is None:
        raise DataError(
            f"{path}: missing key column 'subject' or 'record' (has: {', '.join(columns)})"
        )
    known = subjects if key == "subject" else records
    if known is not None:
        unknown = sorted({r[key].strip() for r in rows} - known)
        if unknown:
            shown = ", ".join(repr(u) for u in unknown[:3])
            raise DataError(f"{path}: {len(unknown)} unknown {key}(s) in labels, e.g. {shown}")
    return key, rows
