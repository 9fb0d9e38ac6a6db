"""Fixtures of every test package: the shared folder, a weights cache, the CIFAR-10 test set."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from bench.data import load_cifar10


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


@pytest.fixture(scope="session")
def cifar10_dir(shared_dir: Path) -> Path:
    """Folder of the CIFAR-10 JPEG archives (shared/data/cifar10); the tests fail without it."""
    path = shared_dir / "data" / "cifar10"
    if not (path / "cifar10-test-jpeg.tar.gz").is_file():
        pytest.fail(f"CIFAR-10 JPEG archives not found in {path} (set TTA_SHARED_DIR)")
    return path


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data cache for the session, so the test archive is decoded once."""
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture(scope="session")
def cifar10_test(cifar10_dir: Path, data_cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """The decoded CIFAR-10 test split."""
    return load_cifar10("test", cifar10_dir, data_cache)
