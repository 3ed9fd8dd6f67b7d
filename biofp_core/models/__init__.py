"""BioFP models and their registry: ``build_model("m2ae" | "siamquality", config)``."""

from __future__ import annotations

import importlib
from typing import Any

from pydantic import ValidationError

from biofp_core.errors import ConfigError, first_error
from biofp_core.models.base import BioFPModel, ModelConfig, SubjectWindows

# name -> (module, model class, config class); modules are imported on first use
_REGISTRY: dict[str, tuple[str, str, str]] = {
    "m2ae": ("biofp_core.models.m2ae", "M2AE", "M2AEConfig"),
    "siamquality": ("biofp_core.models.siamquality", "SiamQuality", "SiamQualityConfig"),
}
MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def model_classes(name: str) -> tuple[type[BioFPModel], type[ModelConfig]]:
    """The model class and its config class registered under `name`."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    module_name, model_name, config_name = _REGISTRY[name]
    module = importlib.import_module(module_name)
    return getattr(module, model_name), getattr(module, config_name)


def build_model(name: str, config: dict[str, Any] | ModelConfig | None = None) -> BioFPModel:
    """A fresh model `name` built from a config object, a dict of its fields, or the defaults."""
    model_cls, config_cls = model_classes(name)
    if config is None:
        config = config_cls()
    elif isinstance(config, dict):
        try:
            config = config_cls.model_validate(config)
        except ValidationError as e:
            raise ConfigError(f"{name} config: {first_error(e)}") from None
    elif not isinstance(config, config_cls):
        raise ConfigError(f"{name} needs a {config_cls.__name__}, got {type(config).__name__}")
    return model_cls(config)


__all__ = [
    "MODEL_NAMES",
    "BioFPModel",
    "ModelConfig",
    "SubjectWindows",
    "build_model",
    "model_classes",
]
