"""Artifacts: save/load round trips, every way loading can fail, and atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from opacus import GradSampleModule
from safetensors.torch import save as save_safetensors

from biofp_core import artifacts
from biofp_core.artifacts import (
    FORMAT_VERSION,
    ModelCard,
    artifact_paths,
    load_model,
    save_model,
)
from biofp_core.errors import ArtifactError
from biofp_core.models import MODEL_NAMES, build_model
from biofp_core.models.base import BioFPModel

T = 1250
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "siamquality": {
        "stem_channels": 8,
        "stage_channels": [8, 16],
        "groups": 4,
        "proj_dim": 32,
        "pred_hidden": 8,
        "fingerprint_dim": 16,
    },
    "m2ae": {
        "width": 16,
        "heads": 2,
        "mlp_ratio": 2,
        "modality_depth": 1,
        "fusion_depth": 1,
        "decoder_width": 16,
        "fingerprint_dim": 16,
    },
}


def test_every_registered_model_is_covered() -> None:
    assert set(TINY_CONFIGS) == set(MODEL_NAMES)


def tiny(name: str = "siamquality") -> BioFPModel:
    torch.manual_seed(0)
    return build_model(name, TINY_CONFIGS[name])


def fingerprints(model: BioFPModel) -> tuple[torch.Tensor, ...]:
    x = torch.randn(4, T, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return model.fingerprint(ppg=x), model.fingerprint(ecg=x), model.fingerprint(ecg=x, ppg=x)


def edit_card(stem: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    card_path = artifact_paths(stem)[1]
    card = json.loads(card_path.read_text())
    edit(card)
    card_path.write_text(json.dumps(card))


def replace_weights(stem: Path, blob: bytes) -> None:
    """Overwrite the weights and make the card's sha256 match them."""
    artifact_paths(stem)[0].write_bytes(blob)
    edit_card(stem, lambda c: c.update(weights_sha256=hashlib.sha256(blob).hexdigest()))


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    stem = tmp_path / "run" / "global"
    save_model(tiny(), stem)
    return stem


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_round_trip_gives_identical_fingerprints(tmp_path: Path, name: str) -> None:
    model = tiny(name).eval()
    card = {
        "data": {"sites": 2, "subjects": 40, "windows": 1900, "hours": 5.3},
        "training": {"rounds": 3, "strategy": "fedavg", "local_steps": 20, "seed": 7},
        "privacy": {
            "sites": {"a": {"epsilon": 1.5, "delta": 1e-5}, "b": {"epsilon": 2.5, "delta": 1e-4}}
        },
    }
    weights = save_model(model, tmp_path / "m", card)
    assert weights == tmp_path / "m.safetensors" and (tmp_path / "m.card.json").is_file()
    loaded, loaded_card = load_model(tmp_path / "m")
    assert type(loaded) is type(model) and not loaded.training
    for a, b in zip(fingerprints(model), fingerprints(loaded), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert loaded_card.model == name and loaded_card.format_version == FORMAT_VERSION
    assert loaded_card.num_parameters == model.num_parameters()
    assert loaded_card.fingerprint_dim == model.config.fingerprint_dim
    assert loaded_card.config == model.config.model_dump(mode="json")
    assert loaded_card.weights_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert loaded_card.training.strategy == "fedavg" and loaded_card.data.subjects == 40
    assert loaded_card.privacy is not None and loaded_card.privacy.max_epsilon == 2.5
    for path in (weights, tmp_path / "m.card.json"):  # either file names the artifact too
        assert load_model(path)[1] == loaded_card


def test_card_object_and_no_card(tmp_path: Path) -> None:
    model = tiny()
    card = ModelCard(model="ignored", training={"rounds": 5})
    save_model(model, tmp_path / "a.safetensors", card)
    loaded_card = load_model(tmp_path / "a")[1]
    assert loaded_card.model == "siamquality" and loaded_card.training.rounds == 5
    save_model(model, tmp_path / "b")
    assert load_model(tmp_path / "b")[1].privacy is None


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_opacus_wrapper_prefix_is_stripped(tmp_path: Path) -> None:
    model = tiny()
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    assert any(k.startswith("_module.") for k in wrapped.state_dict())
    save_model(wrapped, tmp_path / "dp")  # type: ignore[arg-type]
    loaded, card = load_model(tmp_path / "dp")
    assert not any(k.startswith("_module.") for k in loaded.state_dict())
    assert card.model == "siamquality"
    for a, b in zip(fingerprints(model.eval()), fingerprints(loaded), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _missing_weights(stem: Path) -> None:
    artifact_paths(stem)[0].unlink()


def _missing_card(stem: Path) -> None:
    artifact_paths(stem)[1].unlink()


def _bad_json(stem: Path) -> None:
    artifact_paths(stem)[1].write_text("{not json")


def _shapes_mismatch(stem: Path) -> None:
    edit_card(stem, lambda c: c["config"].update(fingerprint_dim=32))


def _other_weights(stem: Path) -> None:
    model = tiny()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    artifact_paths(stem)[0].write_bytes(save_safetensors(artifacts._plain_state_dict(model)))


def _missing_keys(stem: Path) -> None:
    state = artifacts._plain_state_dict(tiny())
    state.pop(sorted(state)[0])
    state["extra.weight"] = torch.zeros(2)
    replace_weights(stem, save_safetensors(state))


FAILURES: dict[str, tuple[Callable[[Path], None], str, str]] = {
    # case: (how to break the artifact, file named in the message, words in the message)
    "weights missing": (_missing_weights, ".safetensors", "missing"),
    "card missing": (_missing_card, ".card.json", "missing"),
    "card not json": (_bad_json, ".card.json", "not valid JSON"),
    "card field invalid": (
        lambda s: edit_card(s, lambda c: c.update(num_parameters="many")),
        ".card.json",
        "num_parameters",
    ),
    "card field unknown": (
        lambda s: edit_card(s, lambda c: c.update(colour="blue")),
        ".card.json",
        "colour",
    ),
    "model unknown": (
        lambda s: edit_card(s, lambda c: c.update(model="resnet9000")),
        ".card.json",
        "resnet9000",
    ),
    "config field unknown": (
        lambda s: edit_card(s, lambda c: c["config"].update(depth_multiplier=2)),
        ".card.json",
        "depth_multiplier",
    ),
    "format newer": (
        lambda s: edit_card(s, lambda c: c.update(format_version=FORMAT_VERSION + 1, new=1)),
        ".card.json",
        "newer",
    ),
    "sha mismatch": (_other_weights, ".safetensors", "sha256"),
    "weights corrupt": (
        lambda s: replace_weights(s, b"\x00" * 64),
        ".safetensors",
        "unreadable",
    ),
    "keys mismatch": (_missing_keys, ".safetensors", "extra.weight"),
    "shapes mismatch": (_shapes_mismatch, ".safetensors", "shape"),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_load_failures_raise_one_line_artifact_error(saved: Path, case: str) -> None:
    breaker, suffix, words = FAILURES[case]
    breaker(saved)
    with pytest.raises(ArtifactError) as info:
        load_model(saved)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(saved) + suffix + ":"), message
    assert words in message, message


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_failed_replace_keeps_previous_artifact(
    saved: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _snapshot(saved.parent)

    def fail(*args: object) -> None:
        raise OSError("No space left on device")

    with monkeypatch.context() as patch, pytest.raises(ArtifactError, match="cannot write"):
        patch.setattr(os, "replace", fail)
        save_model(tiny(), saved, {"training": {"rounds": 9}})
    assert _snapshot(saved.parent) == before  # old pair intact, no temporary files left
    assert load_model(saved)[1].training.rounds == 0


def test_failed_staging_keeps_previous_artifact(
    saved: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _snapshot(saved.parent)
    real_stage = artifacts.write_temp

    def stage_then_fail(target: Path, data: bytes) -> Path:
        if target.name.endswith(".card.json"):  # the weights are staged, then the disk fills
            raise OSError("No space left on device")
        return real_stage(target, data)

    monkeypatch.setattr(artifacts, "write_temp", stage_then_fail)
    with pytest.raises(ArtifactError, match="No space left"):
        save_model(tiny(), saved, {"training": {"rounds": 9}})
    assert _snapshot(saved.parent) == before
