"""Fixtures for the benchmark tests: the shared CIFAR-10 JPEG archives and a few test images."""

import os
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from bench.data import load_cifar10


def _cifar10_dir() -> Path:
    default = Path(__file__).resolve().parents[2].parent / "shared"
    return Path(os.environ.get("TTA_SHARED_DIR", default)) / "data" / "cifar10"


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    """Folder of the CIFAR-10 JPEG archives (shared/data/cifar10); skip the test if absent."""
    path = _cifar10_dir()
    if not (path / "cifar10-test-jpeg.tar.gz").is_file():
        pytest.skip(f"CIFAR-10 JPEG archives not found in {path} (set TTA_SHARED_DIR)")
    return path


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data cache for the session, so the test archive is decoded once."""
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture(scope="session")
def cifar10_test(cifar10_dir: Path, data_cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """The decoded CIFAR-10 test split."""
    return load_cifar10("test", cifar10_dir, data_cache)


@pytest.fixture(scope="session")
def images(request: pytest.FixtureRequest) -> np.ndarray:
    """12 CIFAR-10 test images (classes 0-9, 0, 1), or smooth synthetic ones without the data."""
    if (_cifar10_dir() / "cifar10-test-jpeg.tar.gz").is_file():
        return request.getfixturevalue("cifar10_test")[0][:12]
    rng = np.random.default_rng(0)
    fields = ndimage.gaussian_filter(rng.uniform(0, 255, (12, 32, 32, 3)), (0, 2, 2, 0))
    return np.clip((fields - fields.mean()) * 8 + 128, 0, 255).astype(np.uint8)
