"""Shared fixtures: the real data in $BIOFP_SHARED_DATA (default ../shared/data)."""

from __future__ import annotations

import os
from collections.abc import Iterator
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


def copy_records(src: Path, dst: Path, names: list[str]) -> Path:
    """Copy the header and signal files of the named records into `dst`."""
    import shutil

    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        for f in src.glob(f"{name}.*"):
            if f.suffix in (".hea", ".dat", ".mat"):
                shutil.copy(f, dst / f.name)
    return dst


@pytest.fixture(scope="session")
def bidmc_store(bidmc_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The window store of the whole BIDMC folder, built once per test session."""
    from biofp_core.store import build_store

    return build_store(bidmc_dir, cache_dir=tmp_path_factory.mktemp("bidmc-cache"))


@pytest.fixture(scope="session", autouse=True)
def isolated_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every test (and every process it starts) caches window stores and record bindings in a
    folder of this session, never in the user's ~/.cache: `biofp site init` binds records there,
    and a binding left by an earlier run would refuse a new site for the same synthetic records."""
    path = tmp_path_factory.mktemp("biofp-cache")
    previous = os.environ.get("BIOFP_CACHE_DIR")
    os.environ["BIOFP_CACHE_DIR"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("BIOFP_CACHE_DIR", None)
    else:
        os.environ["BIOFP_CACHE_DIR"] = previous
