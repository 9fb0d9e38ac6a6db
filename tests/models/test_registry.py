"""The registry: every registered spec is valid and its architecture builds with BatchNorm."""

import re
import urllib.request
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import pytest
import torch
from torch import nn

from models import UnknownModelError, check_batchnorm, create_model, get_spec, list_models
from models.registry import ARCHITECTURES, MODELS, build_architecture
from models.spec import CIFAR10_LABELS

CIFAR_MODELS = [name for name in list_models() if name.startswith("cifar10_")]
# depth -> (BatchNorm2d layers, parameters in millions, as published by He et al. / akamaster)
CIFAR_SIZES = {20: (19, 0.27), 32: (31, 0.46), 44: (43, 0.66), 56: (55, 0.85)}


def test_listing_builds_and_downloads_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("listing models must not build or download anything")

    monkeypatch.setattr(nn.Module, "__init__", forbidden)
    monkeypatch.setattr(urllib.request, "urlopen", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    names = list_models()
    assert names == sorted(MODELS)
    assert all(get_spec(name).name == name for name in names)


def test_registry_has_the_required_models() -> None:
    cifar = {f"cifar10_resnet{depth}" for depth in (20, 32, 44, 56)}
    imagenet = {"resnet18", "resnet50", "wide_resnet50_2", "mobilenet_v3_large", "efficientnet_b0"}
    assert cifar | imagenet <= set(list_models())


@pytest.mark.parametrize("name", list_models())
def test_spec_is_valid(name: str) -> None:
    spec = get_spec(name)
    assert spec.name == name == name.lower()
    assert spec.architecture in ARCHITECTURES
    assert spec.num_classes == len(spec.labels) == len(set(spec.labels))
    assert all(0 < s < 1 for s in spec.std) and all(0 < m < 1 for m in spec.mean)
    assert spec.weights_url is not None and spec.weights_url.startswith("https://")
    filename = PurePosixPath(urlparse(spec.weights_url).path).name
    # Without a full sha256, the hash prefix in the file name is what gets checked.
    assert spec.weights_sha256 is None or re.fullmatch(r"[0-9a-f]{64}", spec.weights_sha256)
    assert re.search(r"-[0-9a-f]{8,}\.", filename)
    if spec.weights_sha256:
        assert spec.weights_sha256.startswith(re.findall(r"-([0-9a-f]{8,})\.", filename)[0])
    if name.startswith("cifar10_"):
        assert spec.labels == CIFAR10_LABELS and spec.input_size == (32, 32)
        assert spec.resize is None
    else:
        assert spec.num_classes == 1000 and spec.labels[0] == "tench"
        assert spec.input_size == (224, 224) and spec.resize == 256


@pytest.mark.parametrize("name", list_models())
def test_architecture_builds_with_batchnorm(name: str) -> None:
    spec = get_spec(name)
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = build_architecture(spec)
        out = model(torch.empty(2, 3, *spec.input_size))
    assert out.shape == (2, spec.num_classes)
    assert check_batchnorm(model) > 0


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_cifar_resnet_size(name: str) -> None:
    bn_layers, params_m = CIFAR_SIZES[int(name.removeprefix("cifar10_resnet"))]
    model = build_architecture(get_spec(name))
    assert check_batchnorm(model) == bn_layers
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params_m, abs=0.006)


def test_unknown_name_lists_valid_names(tmp_path: Path) -> None:
    valid = ", ".join(sorted(MODELS))
    with pytest.raises(UnknownModelError) as info:
        get_spec("resnet9000")
    assert str(info.value) == f"Unknown model 'resnet9000'; valid: {valid}"
    assert isinstance(info.value, KeyError)
    with pytest.raises(UnknownModelError, match="valid: cifar10_resnet20, "):
        create_model("CIFAR10_ResNet20", cache_dir=tmp_path)
