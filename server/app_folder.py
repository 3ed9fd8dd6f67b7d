"""The one Flower app folder writer: a ``pyproject.toml`` that names BioFP's installed apps.

``biofp server app`` writes one for ``flwr run DIR biofp`` (no code ships to the sites: their
SuperNodes run the BioFP installed in their own image); ``biofp simulate`` writes one per run
with the run's own config.
"""

from __future__ import annotations

import json
import math
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from biofp_core.protocol import RunConfig, RunConfigValue


def toml_value(value: RunConfigValue) -> str:
    """A run-config value as a TOML literal (infinities included)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else "-inf"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def write_app_folder(
    out_dir: Path,
    run_config: dict[str, RunConfigValue] | None = None,
    *,
    name: str = "biofp-federation",
) -> Path:
    """Write ``out_dir/pyproject.toml``: BioFP's ServerApp and ClientApp and `run_config`
    (default: every key of :class:`RunConfig` at its default, each one ``flwr run
    --run-config`` may override)."""
    try:
        app_version = version("biofp")
    except PackageNotFoundError:
        app_version = "0.0.0"
    config = RunConfig().to_run_config() if run_config is None else run_config
    lines = [
        "[project]", f'name = "{name}"', f'version = "{app_version}"',
        'description = "BioFP federated pretraining (apps from the installed biofp package)"',
        'license = "Apache-2.0"', "",
        "[tool.flwr.app]", 'publisher = "biofp"', "",
        "[tool.flwr.app.components]", 'serverapp = "server.app:app"',
        'clientapp = "client.app:app"', "", "[tool.flwr.app.config]",
        *(f"{key} = {toml_value(value)}" for key, value in config.items()),
    ]  # fmt: skip
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return out
