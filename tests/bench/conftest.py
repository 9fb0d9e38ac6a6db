"""Fixtures for the benchmark tests: the shared CIFAR-10 JPEG archives and a few test images."""

from pathlib import Path

import numpy as np
import pytest

from bench.data import load_cifar10


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


@pytest.fixture(scope="session")
def images(cifar10_test: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """12 CIFAR-10 test images (classes 0-9, 0, 1)."""
    return cifar10_test[0][:12]
