"""The CIFAR-10 ResNets: option-A shortcuts, and the published weights load and classify."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from models import create_model, normalize, pil_to_uint8
from models.cifar_resnet import CifarResNet, PadShortcut


def test_pad_shortcut_is_option_a() -> None:
    x = torch.randn(2, 16, 8, 8)
    expected = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8))  # the reference LambdaLayer
    assert torch.equal(PadShortcut(16)(x), expected)


def test_shortcuts_have_no_parameters() -> None:
    names = CifarResNet(20).state_dict().keys()
    assert not [name for name in names if "shortcut" in name]


def test_depth_must_be_6n_plus_2() -> None:
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(21)


@pytest.mark.parametrize("name", ["cifar10_resnet20", "cifar10_resnet32"])
def test_pretrained_weights_load_and_classify(
    name: str, cifar_cache: Path, cifar10_test_images: list[tuple[Image.Image, int]]
) -> None:
    model, spec = create_model(name, cache_dir=cifar_cache)
    assert not model.training
    assert all(not p.requires_grad and p.device.type == "cpu" for p in model.parameters())

    batch = torch.stack([pil_to_uint8(image, spec) for image, _ in cifar10_test_images])
    labels = torch.tensor([label for _, label in cifar10_test_images])
    with torch.inference_mode():
        predictions = model(normalize(batch, spec)).argmax(1)
    accuracy = (predictions == labels).float().mean().item()
    # About 81-82% on this JPEG-compressed test set (published: 91.7%/92.6% on the originals).
    assert accuracy > 0.70, f"{name}: clean accuracy {accuracy:.1%} on 500 JPEG test images"
