"""User models (factory + safetensors), torchvision weights from a file, BatchNorm checks."""

import urllib.request
from pathlib import Path

import pytest
import torch
import torchvision.models
from torch import nn

from models import (
    IncompatibleModelError,
    ModelError,
    ModelSpec,
    check_batchnorm,
    create_model,
    load_torchvision_model,
    load_user_model,
)
from tests.models import toy_models

TOY = "tests.models.toy_models"
SPEC = ModelSpec("toy", "user", (8, 8), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), ("no", "yes"))


_save_random = toy_models.save_random


def test_user_model_round_trip(tmp_path: Path) -> None:
    source = toy_models.tiny_bn_net().eval()
    weights = _save_random(source, tmp_path / "toy.safetensors")
    model = load_user_model(f"{TOY}:tiny_bn_net", weights, SPEC)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x = torch.randn(3, 3, 8, 8)
    with torch.inference_mode():
        assert torch.equal(model(x), source(x))


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("tests.models.toy_models", "must look like 'package.module:function'"),
        (f"{TOY}:", "must look like 'package.module:function'"),
        (":tiny_bn_net", "must look like 'package.module:function'"),
        ("tests.models.no_such_module:build", "cannot import tests.models.no_such_module"),
        (f"{TOY}:missing", "tests.models.toy_models has no 'missing'"),
        (f"{TOY}:not_a_module", "returned str, not a Module"),
        (f"{TOY}:needs_arguments", "failed: TypeError"),
    ],
)
def test_bad_factory(factory: str, message: str, tmp_path: Path) -> None:
    weights = _save_random(toy_models.tiny_bn_net(), tmp_path / "toy.safetensors")
    with pytest.raises(ModelError, match=message):
        load_user_model(factory, weights, SPEC)


def test_model_without_batchnorm_is_refused(tmp_path: Path) -> None:
    weights = _save_random(toy_models.tiny_gn_net(), tmp_path / "gn.safetensors")
    with pytest.raises(IncompatibleModelError) as info:
        load_user_model(f"{TOY}:tiny_gn_net", weights, SPEC)
    assert str(info.value) == "model toy has no BatchNorm2d layer: nothing to adapt"


def test_batchnorm_without_running_stats_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(IncompatibleModelError, match="'1' has no running statistics"):
        check_batchnorm(model)


def test_user_weights_must_be_safetensors_and_fit(tmp_path: Path) -> None:
    pickle_file = tmp_path / "toy.pth"
    torch.save(toy_models.tiny_bn_net().state_dict(), pickle_file)
    with pytest.raises(ModelError, match=r"must be a \.safetensors file"):
        load_user_model(f"{TOY}:tiny_bn_net", pickle_file, SPEC)

    other = _save_random(nn.Sequential(nn.BatchNorm2d(3)), tmp_path / "other.safetensors")
    with pytest.raises(IncompatibleModelError, match="weights do not fit model toy"):
        load_user_model(f"{TOY}:tiny_bn_net", other, SPEC)


def test_user_model_output_must_match_labels(tmp_path: Path) -> None:
    weights = _save_random(toy_models.tiny_bn_net(), tmp_path / "toy.safetensors")
    three_labels = ModelSpec("toy3", "user", (8, 8), SPEC.mean, SPEC.std, ("a", "b", "c"))
    with pytest.raises(IncompatibleModelError, match=r"outputs \(1, 2\) .* expected \(1, 3\)"):
        load_user_model(f"{TOY}:tiny_bn_net", weights, three_labels)


def test_torchvision_model_from_local_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", pytest.fail)  # the file replaces the download
    source = torchvision.models.resnet18()
    weights = _save_random(source, tmp_path / "resnet18.safetensors")
    model, spec = create_model("resnet18", cache_dir=tmp_path / "cache", weights_path=weights)
    assert spec.name == "resnet18" and check_batchnorm(model) == 20
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    for key, tensor in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], tensor), key


def test_torchvision_architecture_with_own_classes(tmp_path: Path) -> None:
    """A torchvision architecture by name with a user's head (3 classes) and weights file."""
    source = torchvision.models.mobilenet_v3_small(num_classes=3)
    weights = _save_random(source, tmp_path / "mine.safetensors")
    spec = ModelSpec("mine", "mobilenet_v3_small", (32, 32), SPEC.mean, SPEC.std, ("a", "b", "c"))
    model = load_torchvision_model("mobilenet_v3_small", weights, spec)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(model(x), source.eval()(x))
    with pytest.raises(IncompatibleModelError, match="weights do not fit model mine"):
        load_torchvision_model("resnet18", weights, spec)
    with pytest.raises(ModelError, match="unknown torchvision architecture 'resnet2000'"):
        load_torchvision_model("resnet2000", weights, spec)
    with pytest.raises(IncompatibleModelError, match="model mine has no BatchNorm2d layer"):
        load_torchvision_model("vit_b_16", weights, spec)
