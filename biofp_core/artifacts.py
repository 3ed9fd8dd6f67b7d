"""Model artifacts: safetensors weights plus a JSON model card that loading checks against the code.

Layout: an artifact is a pair of files sharing a stem, ``<stem>.safetensors`` (the state dict) and
``<stem>.card.json`` (a `ModelCard`). The card holds the sha256 of the weights file's bytes, so the
pair is checked as a unit (``sha256sum <stem>.safetensors`` gives the same hash).

Writing is two-phase: both files are written and fsync'ed to temporary names in the target folder,
then each is moved into place with `os.replace`, weights first, card last. A failure while writing
leaves the previous artifact untouched; a crash between the two renames leaves new weights next to
the old card, which `load_model` rejects (sha256 mismatch) rather than loading silently.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

import biofp_core
from biofp_core.config import parse_versioned
from biofp_core.errors import ArtifactError, BioFPError, first_error
from biofp_core.fsutil import fsync_path, write_temp
from biofp_core.models.base import BioFPModel

FORMAT_VERSION = 1  # bump when the card or weights layout changes incompatibly
WEIGHTS_SUFFIX = ".safetensors"
CARD_SUFFIX = ".card.json"
OPACUS_PREFIX = "_module."  # what Opacus' GradSampleModule puts before every state-dict key


class _Card(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataSummary(_Card):
    """What the model was trained on, in counts only (no ids, no per-record values)."""

    sites: int = Field(0, ge=0)
    subjects: int = Field(0, ge=0)
    windows: int = Field(0, ge=0)
    hours: float = Field(0.0, ge=0)


class TrainingProvenance(_Card):
    """How the weights were produced."""

    rounds: int = Field(0, ge=0, description="federated rounds (0: centralised or untrained)")
    strategy: str = Field("", description="aggregation strategy name, e.g. 'fedavg'")
    local_steps: int = Field(0, ge=0, description="optimizer steps per site per round")
    seed: int | None = None
    initialised_from: str | None = Field(
        None, description="sha256 of the weights training started from; None: the seed's init"
    )
    created_at: datetime | None = None


class SitePrivacy(_Card):
    """(ε, δ) one site spent on this model, at the site's own δ."""

    epsilon: float = Field(ge=0)
    delta: float = Field(gt=0, lt=1)


class PrivacySummary(_Card):
    """DP-SGD spending per site; `max_epsilon` (the guarantee of the model) is derived."""

    sites: dict[str, SitePrivacy]
    max_epsilon: float = Field(0.0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _derive_max(cls, data: Any) -> Any:
        sites = data.get("sites") if isinstance(data, dict) else None
        if not isinstance(sites, dict):
            return data  # field validation reports it
        eps = [s.epsilon if isinstance(s, SitePrivacy) else s for s in sites.values()]
        eps = [e.get("epsilon") if isinstance(e, dict) else e for e in eps]
        if all(isinstance(e, int | float) for e in eps):
            data = {**data, "max_epsilon": max(eps, default=0.0)}
        return data


class ModelCard(_Card):
    """Everything needed to rebuild and judge a model. `save_model` fills the model fields."""

    format_version: int = FORMAT_VERSION
    model: str = Field("", description="registry name, e.g. 'siamquality' (set by save_model)")
    config: dict[str, Any] = Field(default_factory=dict, description="architecture config")
    num_parameters: int = Field(0, ge=0)
    fingerprint_dim: int = Field(0, ge=0)
    data: DataSummary = DataSummary()
    training: TrainingProvenance = TrainingProvenance()
    privacy: PrivacySummary | None = Field(None, description="None: trained without DP")
    code_version: str = Field(biofp_core.__version__, description="biofp_core.__version__")
    weights_sha256: str = ""


def artifact_paths(path: Path | str) -> tuple[Path, Path]:
    """(weights, card) paths of the artifact at `path`: its stem or either of its two files."""
    path = Path(path)
    for suffix in (WEIGHTS_SUFFIX, CARD_SUFFIX):
        if path.name.endswith(suffix):
            path = path.with_name(path.name[: -len(suffix)])
    return path.with_name(path.name + WEIGHTS_SUFFIX), path.with_name(path.name + CARD_SUFFIX)


def _plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the state dict, without Opacus' `_module.` prefixes (no shared storage)."""
    state = {}
    for key, value in model.state_dict().items():
        while key.startswith(OPACUS_PREFIX):
            key = key[len(OPACUS_PREFIX) :]
        state[key] = value.detach().to("cpu").clone().contiguous()
    return state


def save_model(
    model: BioFPModel, path: Path | str, card: ModelCard | dict[str, Any] | None = None
) -> Path:
    """Write `<stem>.safetensors` and `<stem>.card.json` atomically (see the module docstring).

    Parameters
    ----------
    model
        The model to save; an Opacus GradSampleModule around it is unwrapped.
    path
        The artifact stem (a `.safetensors` or `.card.json` suffix is stripped).
    card
        Data, training and privacy fields of the card; model name, config, parameter count,
        fingerprint size, code version and weights sha256 are always set from `model`.

    Returns
    -------
    Path
        The weights file; `load_model` accepts it, the card path or the stem.
    """
    while not isinstance(model, BioFPModel) and isinstance(
        getattr(model, "_module", None), nn.Module
    ):
        model = model._module  # Opacus wrappers
    weights_path, card_path = artifact_paths(path)
    blob = save_safetensors(_plain_state_dict(model), metadata={"format": "pt"})
    base = card if isinstance(card, ModelCard) else ModelCard.model_validate(card or {})
    final = base.model_copy(
        update={
            "format_version": FORMAT_VERSION,
            "model": model.name,
            "config": model.config.model_dump(mode="json"),
            "num_parameters": model.num_parameters(),
            "fingerprint_dim": model.config.fingerprint_dim,
            "code_version": biofp_core.__version__,
            "weights_sha256": hashlib.sha256(blob).hexdigest(),
        }
    )
    card_bytes = (final.model_dump_json(indent=2) + "\n").encode()
    staged: list[Path] = []
    try:
        weights_path.parent.mkdir(parents=True, exist_ok=True)
        for target, data in ((weights_path, blob), (card_path, card_bytes)):
            staged.append(write_temp(target, data))
        os.replace(staged[0], weights_path)
        os.replace(staged[1], card_path)
        fsync_path(weights_path.parent)
    except OSError as err:
        raise ArtifactError(f"{weights_path}: cannot write artifact ({err})") from err
    finally:
        for tmp in staged:
            tmp.unlink(missing_ok=True)
    return weights_path


def _read_card(card_path: Path) -> ModelCard:
    """Parse and validate the card; a newer format is reported before any field check."""
    try:
        raw = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{card_path}: model card is not valid JSON ({err})") from err
    return parse_versioned(
        ModelCard,
        raw,
        newest=FORMAT_VERSION,
        path=card_path,
        what="model card",
        error=ArtifactError,
    )


def _build(card: ModelCard, card_path: Path) -> BioFPModel:
    """The model named in the card, built by the registry from the card's config."""
    from biofp_core.models import MODEL_NAMES, build_model

    if card.model not in MODEL_NAMES:
        known = ", ".join(MODEL_NAMES)
        raise ArtifactError(f"{card_path}: unknown model {card.model!r} (known: {known})")
    try:
        return build_model(card.model, card.config)
    except (BioFPError, ValidationError) as err:
        reason = first_error(err, "card") if isinstance(err, ValidationError) else err
        raise ArtifactError(f"{card_path}: config does not match the code ({reason})") from err


def _check_state(state: dict[str, torch.Tensor], model: nn.Module, weights_path: Path) -> None:
    """Raise ArtifactError naming the first missing, unexpected or mis-shaped tensors."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = []
    if missing := sorted(expected.keys() - state.keys()):
        problems.append(f"missing {', '.join(missing[:3])}" + ("..." if len(missing) > 3 else ""))
    if unexpected := sorted(state.keys() - expected.keys()):
        extra = ", ".join(unexpected[:3]) + ("..." if len(unexpected) > 3 else "")
        problems.append(f"unexpected {extra}")
    for key in sorted(expected.keys() & state.keys()):
        if tuple(state[key].shape) != expected[key]:
            problems.append(f"{key} has shape {tuple(state[key].shape)}, expected {expected[key]}")
            break
    if problems:
        raise ArtifactError(f"{weights_path}: weights do not fit the model ({'; '.join(problems)})")


def load_model(path: Path | str) -> tuple[BioFPModel, ModelCard]:
    """Rebuild the model of an artifact and load its weights strictly, in eval mode.

    Raises
    ------
    ArtifactError
        One line naming the file at fault: a file is missing, the card is invalid or from a newer
        format, the model or a config field is unknown to this code, or the weights do not match
        the card's sha256 or the model's state dict.
    """
    weights_path, card_path = artifact_paths(path)
    for f in (card_path, weights_path):
        if not f.is_file():
            raise ArtifactError(f"{f}: artifact file is missing")
    card = _read_card(card_path)
    model = _build(card, card_path)
    try:
        blob = weights_path.read_bytes()
    except OSError as err:
        raise ArtifactError(f"{weights_path}: cannot read weights ({err})") from err
    if hashlib.sha256(blob).hexdigest() != card.weights_sha256:
        raise ArtifactError(
            f"{weights_path}: sha256 does not match the model card {card_path.name} "
            "(weights changed or card of another artifact)"
        )
    try:
        state = load_safetensors(blob)
    except (SafetensorError, ValueError) as err:
        raise ArtifactError(f"{weights_path}: unreadable safetensors ({err})") from err
    _check_state(state, model, weights_path)
    model.load_state_dict(state, strict=True)
    return model.eval(), card
