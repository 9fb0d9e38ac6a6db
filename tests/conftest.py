"""Fixtures of every test package: the shared folder beside the repository, a weights cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared folder beside the repository (or $TTA_SHARED_DIR); the tests fail without it."""
    default = Path(__file__).resolve().parents[1].parent / "shared"
    path = Path(os.environ.get("TTA_SHARED_DIR", default)).resolve()
    if not (path / "models").is_dir():
        pytest.fail(f"shared folder with pretrained weights not found at {path}")
    return path


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory, shared_dir: Path) -> Path:
    """A weights cache seeded by symlinks to shared/models (never copied into the repo)."""
    cache = tmp_path_factory.mktemp("weights")
    for file in (shared_dir / "models").glob("*.th"):
        (cache / file.name).symlink_to(file)
    return cache
