"""Fixtures of the service tests: a few real CIFAR-10 JPEGs."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

IMAGES_PER_CLASS = 4


@pytest.fixture(scope="session")
def cifar_jpegs(shared_dir: Path) -> list[tuple[bytes, str]]:
    """A few real CIFAR-10 test JPEGs per class, (file bytes, class name), read from the archive."""
    archive = shared_dir / "data" / "cifar10" / "cifar10-test-jpeg.tar.gz"
    if not archive.is_file():
        pytest.fail(f"CIFAR-10 JPEG archive not found at {archive}")
    found: dict[str, list[bytes]] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if not member.isfile() or not member.name.endswith(".jpg"):
                continue
            label = Path(member.name).parent.name
            files = found.setdefault(label, [])
            if len(files) < IMAGES_PER_CLASS:
                extracted = tar.extractfile(member)
                assert extracted is not None
                files.append(extracted.read())
            if len(found) == 10 and all(len(v) == IMAGES_PER_CLASS for v in found.values()):
                break
    return [(data, label) for label, files in sorted(found.items()) for data in files]
