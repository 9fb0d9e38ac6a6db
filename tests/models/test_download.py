"""Weights download and cache: sha256 checks, offline failures, safe reading."""

import dataclasses
import shutil
import urllib.request
from pathlib import Path

import pytest
import torch

from models import (
    ModelError,
    WeightsChecksumError,
    WeightsUnavailableError,
    create_model,
    fetch_weights,
    get_spec,
    read_state_dict,
)
from models.registry import MODELS

RESNET20 = "resnet20-12fca82f.th"


def _no_network(*args: object, **kwargs: object) -> None:
    raise AssertionError("no network access expected")


@pytest.fixture
def source_dir(tmp_path: Path, shared_dir: Path) -> Path:
    """A folder to "download" from with file:// URLs: urllib's real download path, offline."""
    source = tmp_path / "server"
    source.mkdir()
    shutil.copy(shared_dir / "models" / RESNET20, source / RESNET20)
    return source


def test_cached_file_is_used_without_network(
    cifar_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    spec = get_spec("cifar10_resnet20")
    assert spec.weights_url is not None
    path = fetch_weights(spec.weights_url, spec.weights_sha256, cifar_cache)
    assert path == cifar_cache / RESNET20


def test_download_checks_and_caches(source_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "new" / "cache"
    sha256 = get_spec("cifar10_resnet20").weights_sha256
    path = fetch_weights((source_dir / RESNET20).as_uri(), sha256, cache)
    assert path == cache / RESNET20
    assert [p.name for p in cache.iterdir()] == [RESNET20]  # no temporary file left behind
    assert "linear.weight" in read_state_dict(path)


def test_download_with_wrong_sha256_is_discarded(source_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(WeightsChecksumError, match="discarded"):
        fetch_weights((source_dir / RESNET20).as_uri(), "0" * 64, cache)
    assert list(cache.iterdir()) == []


def test_hash_prefix_in_file_name_is_checked(tmp_path: Path) -> None:
    source = tmp_path / "resnet-deadbeef.pth"
    source.write_bytes(b"not the file the name promises")
    with pytest.raises(WeightsChecksumError, match="expected deadbeef"):
        fetch_weights(source.as_uri(), None, tmp_path / "cache")


def test_missing_weights_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Port 9 (discard) on localhost refuses at once: the real download path fails fast, offline.
    spec = get_spec("cifar10_resnet44")
    url = "http://127.0.0.1:9/resnet44-014dd654.th"
    monkeypatch.setitem(MODELS, spec.name, dataclasses.replace(spec, weights_url=url))
    cache = tmp_path / "cache"
    with pytest.raises(WeightsUnavailableError) as info:
        create_model("cifar10_resnet44", cache_dir=cache, download_timeout=1.0)
    message = str(info.value)
    assert message.startswith(
        f"weights for cifar10_resnet44 are not in the cache ({cache / 'resnet44-014dd654.th'}) "
        f"and could not be downloaded from {url}: "
    )
    assert list(cache.iterdir()) == []


def test_corrupted_cache_file_is_refused(tmp_path: Path, shared_dir: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    data = bytearray((shared_dir / "models" / RESNET20).read_bytes())
    data[-100] ^= 0xFF
    (cache / RESNET20).write_bytes(bytes(data))
    with pytest.raises(WeightsChecksumError, match="cached weights for cifar10_resnet20"):
        create_model("cifar10_resnet20", cache_dir=cache)


def test_read_state_dict_refuses_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Payload()}, path)
    with pytest.raises(ModelError, match="full unpickler"):
        read_state_dict(path)


def test_read_state_dict_errors(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        read_state_dict(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"garbage")
    with pytest.raises(ModelError, match="cannot read weights file"):
        read_state_dict(garbage)
    not_tensors = tmp_path / "numbers.pth"
    torch.save({"a": 1}, not_tensors)
    with pytest.raises(ModelError, match="does not hold a state dict of tensors"):
        read_state_dict(not_tensors)


class _Payload:
    """Any class: unpickling it needs the full unpickler that weights_only=True refuses."""
