"""Shared fixtures: the real data in $BIOFP_SHARED_DATA (default ../shared/data)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("BIOFP_SHARED_DATA", ROOT.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    assert (path / "bidmc" / "bidmc01.hea").exists(), f"shared data not found at {path}"
    return path


@pytest.fixture(scope="session")
def bidmc_dir(shared_data: Path) -> Path:
    return shared_data / "bidmc"


@pytest.fixture(scope="session")
def samples_dir(shared_data: Path) -> Path:
    return shared_data / "wfdb-samples"
