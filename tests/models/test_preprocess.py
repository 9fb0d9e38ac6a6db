"""Preprocessing: the same pixels and numbers as torchvision's reference transforms."""

import numpy as np
import pytest
import torch
import torchvision.models
import torchvision.transforms as T
from PIL import Image

from models import Normalizer, get_spec, normalize, pil_to_uint8


def _random_image(width: int, height: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def test_cifar_image_of_the_right_size_is_untouched() -> None:
    image = _random_image(32, 32)
    x = pil_to_uint8(image, get_spec("cifar10_resnet20"))
    assert x.dtype == torch.uint8 and x.is_contiguous()
    assert torch.equal(x, torch.from_numpy(np.array(image)).permute(2, 0, 1))


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK"])
def test_any_mode_becomes_rgb_at_input_size(mode: str) -> None:
    x = pil_to_uint8(_random_image(64, 48, mode), get_spec("cifar10_resnet20"))
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_b0"])
def test_imagenet_matches_torchvision_preset(name: str) -> None:
    """pil_to_uint8 + normalize reproduces the weights' own evaluation transforms exactly."""
    spec = get_spec(name)
    preset = torchvision.models.get_model_weights(name)["IMAGENET1K_V1"].transforms()
    image = _random_image(400, 300)
    x = pil_to_uint8(image, spec)
    assert x.shape == (3, 224, 224)
    assert torch.equal(normalize(x[None], spec)[0], preset(image))


def test_normalize_matches_torchvision_normalize() -> None:
    spec = get_spec("cifar10_resnet20")
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    reference = T.Normalize(spec.mean, spec.std)(x.float() / 255)
    out = normalize(x, spec)
    assert out.dtype == torch.float32
    assert torch.equal(out, reference)


@pytest.mark.parametrize("shape", [(3, 32, 32), (2, 1, 32, 32)])
def test_normalize_rejects_non_batches(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"uint8 batch \[N, 3, H, W\]"):
        normalize(torch.zeros(shape, dtype=torch.uint8), get_spec("cifar10_resnet20"))
    with pytest.raises(ValueError, match=r"got torch\.float32"):
        normalize(torch.zeros(2, 3, 8, 8), get_spec("cifar10_resnet20"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_normalize_on_cuda_matches_cpu() -> None:
    spec = get_spec("resnet50")
    normalizer = Normalizer(spec)
    x = torch.randint(0, 256, (8, 3, 224, 224), dtype=torch.uint8)
    x.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)  # every value at least once
    on_gpu = normalizer(x.cuda())
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu.cpu(), normalizer(x))
