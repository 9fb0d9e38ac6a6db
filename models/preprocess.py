"""Preprocessing from a `ModelSpec`, split where the server wants it split.

`pil_to_uint8` does the per-image geometry on the CPU (resize, center crop) and stops at uint8,
so a batch crosses to the GPU at a quarter of the float32 size; `Normalizer` then does the float
conversion and mean/std normalisation on whatever device the batch is on, with the same
operations (and so the same numbers) as torchvision's `ToTensor` + `Normalize`.
"""

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from models.spec import ModelSpec


def pil_to_uint8(image: Image.Image, spec: ModelSpec) -> torch.Tensor:
    """Convert an image to the model's input geometry: a [3, H, W] uint8 RGB tensor.

    With `spec.resize` set, the shorter side is resized to it and the center is cropped to
    `spec.input_size` (torchvision's ImageNet evaluation preset); otherwise the image is resized
    to `spec.input_size` only if its size differs. Resizing antialiases.

    Example:
        >>> pil_to_uint8(Image.new("RGB", (32, 32)), get_spec("cifar10_resnet20")).shape
        ... # doctest: +SKIP
        torch.Size([3, 32, 32])
    """
    image = image.convert("RGB")
    height, width = spec.input_size
    mode = InterpolationMode(spec.interpolation)
    if spec.resize is not None:
        image = TF.resize(image, [spec.resize], interpolation=mode, antialias=True)
        image = TF.center_crop(image, [height, width])
    elif image.size != (width, height):  # PIL sizes are (width, height)
        image = TF.resize(image, [height, width], interpolation=mode, antialias=True)
    return TF.pil_to_tensor(image).contiguous()


class Normalizer:
    """uint8 batch [N, 3, H, W] -> normalised float32 batch, on the batch's own device.

    The mean/std tensors are cached per device, so a GPU batch costs no host-to-device copy
    beyond the uint8 images themselves.

    Example:
        >>> normalizer = Normalizer(spec)  # doctest: +SKIP
        >>> x = normalizer(batch_uint8.to("cuda", non_blocking=True))  # doctest: +SKIP
    """

    def __init__(self, spec: ModelSpec) -> None:
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
        # 255 as a tensor, not a Python number: CUDA divides by a scalar as a multiplication by
        # its reciprocal (up to 1 ulp off); a tensor divisor gets a true division, as on the CPU.
        self._constants = (torch.tensor(255.0), mean, std)
        self._on_device: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise a uint8 batch: (x / 255 - mean) / std, in float32."""
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a uint8 batch [N, 3, H, W], got {x.dtype} {tuple(x.shape)}")
        if x.device not in self._on_device:
            self._on_device[x.device] = tuple(t.to(x.device) for t in self._constants)
        scale, mean, std = self._on_device[x.device]
        # The op sequence of ToTensor (div 255) + Normalize (sub, div): identical numbers.
        return x.to(torch.float32).div_(scale).sub_(mean).div_(std)


def normalize(x: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """Normalise a uint8 batch [N, 3, H, W] for `spec` on its own device (see `Normalizer`)."""
    return Normalizer(spec)(x)
