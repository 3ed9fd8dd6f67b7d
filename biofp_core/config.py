"""Pydantic configs shared across biofp_core: preprocessing and channel aliases."""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from biofp_core.errors import BioFPError, ConfigError, first_error

M = TypeVar("M", bound=BaseModel)

# Channel names are compared after lower-casing and stripping everything but letters and digits,
# so 'II,' == 'ii' and 'PLETH' == 'pleth' == 'Pleth.'.
DEFAULT_ECG_ALIASES: tuple[str, ...] = (
    "ii", "ecgii", "leadii", "ecg2", "mlii",  # lead II first: it is preferred
    "ecg", "ecg1", "i", "iii", "avr", "avl", "avf", "v", "v1", "v2", "v3", "v4", "v5", "v6",
    "mcl", "mcl1", "ml", "ekg",
)  # fmt: skip
# Not "pulse": in MIMIC/BIDMC monitor numerics PULSE is the pulse rate (bpm), not a waveform.
DEFAULT_PPG_ALIASES: tuple[str, ...] = ("pleth", "ppg", "plethysmogram", "spo2wave", "pl")
LEAD_II_ALIASES: frozenset[str] = frozenset({"ii", "ecgii", "leadii", "ecg2", "mlii"})


def read_toml(path: Path, what: str, error: type[BioFPError] = ConfigError) -> dict[str, Any]:
    """The top-level table of the TOML file `path` (a `what`, e.g. 'site config'); `error`
    naming the file when it is missing or not valid TOML."""
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: invalid TOML: {exc}") from None


def parse_versioned(
    model: type[M], doc: object, *, newest: int, path: Path, what: str, error: type[BioFPError]
) -> M:
    """`doc` (parsed JSON, a `what` read from `path`) validated as `model`.

    A ``format_version`` newer than `newest` is reported first (a newer BioFP wrote the file: its
    fields may differ), then the first invalid field; both as `error`, one line naming the file.
    """
    version = doc.get("format_version") if isinstance(doc, dict) else None
    if isinstance(version, int) and version > newest:
        raise error(
            f"{path}: {what} format {version} is newer than this BioFP reads ({newest}); "
            "upgrade biofp"
        )
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        raise error(f"{path}: invalid {what} ({first_error(exc, what)})") from None


def one_of(kind: str, value: str, choices: Iterable[str]) -> str:
    """`value` if it is one of `choices`, else ValueError naming the valid ones (for validators)."""
    valid = list(choices)
    if value not in valid:
        raise ValueError(f"unknown {kind} {value!r}; valid: {', '.join(valid)}")
    return value


class Frozen(BaseModel):
    """Base for configs: immutable, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def digest(self) -> str:
        """Stable short hash of the config, for cache keys."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class ChannelAliases(Frozen):
    """Ordered alias lists (normalised names); the first match in list order wins."""

    ecg: tuple[str, ...] = DEFAULT_ECG_ALIASES
    ppg: tuple[str, ...] = DEFAULT_PPG_ALIASES


class PreprocessConfig(Frozen):
    """How records become windows: 10 s windows at 125 Hz, band-passed, z-scored."""

    fs_hz: float = Field(125.0, gt=0, description="target sampling rate")
    window_s: float = Field(10.0, gt=0, description="window length")
    hop_s: float = Field(10.0, gt=0, description="hop between window starts")
    ecg_band_hz: tuple[float, float] = (0.5, 40.0)
    ppg_band_hz: tuple[float, float] = (0.5, 12.0)
    filter_order: int = Field(2, ge=1, le=8, description="Butterworth order (doubled by filtfilt)")
    max_gap_s: float = Field(1.0, ge=0, description="NaN gaps up to this long are interpolated")
    max_flat_frac: float = Field(0.25, ge=0, le=1, description="windows flatter than this drop")
    min_duration_s: float = Field(
        2.0, ge=0, description="shorter records drop; longer ones shorter than a window are padded"
    )
    aliases: ChannelAliases = ChannelAliases()

    @property
    def window_samples(self) -> int:
        return round(self.fs_hz * self.window_s)
