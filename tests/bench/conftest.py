"""Fixtures for the benchmark tests: a few CIFAR-10 test images."""

import numpy as np
import pytest


@pytest.fixture(scope="session")
def images(cifar10_test: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """12 CIFAR-10 test images (classes 0-9, 0, 1)."""
    return cifar10_test[0][:12]
