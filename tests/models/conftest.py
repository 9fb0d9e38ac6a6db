"""Fixtures for the models tests: a fresh weights cache, CIFAR-10 test images."""

import io
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from models.spec import CIFAR10_LABELS

IMAGES_PER_CLASS = 50  # 500 test images, balanced over the 10 classes


@pytest.fixture
def cifar_cache(tmp_path: Path, shared_dir: Path) -> Path:
    """A fresh weights cache seeded (by symlinks) with the CIFAR ResNet files from shared/models."""
    cache = tmp_path / "cache"
    cache.mkdir()
    for file in (shared_dir / "models").glob("*.th"):
        (cache / file.name).symlink_to(file)
    return cache


@pytest.fixture(scope="session")
def cifar10_test_images(shared_dir: Path) -> list[tuple[Image.Image, int]]:
    """The first 50 images of each class of the CIFAR-10 JPEG test set, read from the archive."""
    archive = shared_dir / "data" / "cifar10" / "cifar10-test-jpeg.tar.gz"
    if not archive.is_file():
        pytest.fail(f"CIFAR-10 JPEG test set not found at {archive}")
    samples: list[tuple[Image.Image, int]] = []
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:  # test/<class>/<NNNN>.jpg
            parts = Path(member.name).parts
            if len(parts) != 3 or int(Path(parts[2]).stem) >= IMAGES_PER_CLASS:
                continue
            file = tar.extractfile(member)
            assert file is not None
            image = Image.open(io.BytesIO(file.read()))
            image.load()
            samples.append((image, CIFAR10_LABELS.index(parts[1])))
    assert len(samples) == IMAGES_PER_CLASS * len(CIFAR10_LABELS)
    return samples
