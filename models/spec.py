"""`ModelSpec`: what a served model expects (input size, normalisation, labels, weights)."""

from dataclasses import dataclass
from typing import Literal

CIFAR10_LABELS = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The default pixel limit of an encoded image: this many times the area the model resizes to,
# but never under the floor (a 2048 x 2048 photo), so a 32x32 classifier refuses a 16 Mpx image
# before decoding it while an ImageNet model (resize 256) still takes a 16 Mpx photo.
PIXEL_LIMIT_AREAS = 256
PIXEL_LIMIT_FLOOR = 2048 * 2048


@dataclass(frozen=True)
class ModelSpec:
    """Metadata of one model: everything needed to preprocess its inputs and read its outputs.

    Args:
        name: canonical lowercase name, the same in the API, configs, logs and metric labels.
        architecture: the architecture builder's name (e.g. "cifar_resnet20", "resnet50").
        input_size: (height, width) of the network input.
        mean: per-channel RGB mean, on the [0, 1] scale.
        std: per-channel RGB standard deviation, on the [0, 1] scale.
        labels: class names, in the order of the model's outputs.
        weights_url: where the pretrained weights are published; None for user models.
        weights_sha256: full sha256 hex digest of the weights file; None when unknown (then
            the hash prefix in a torch.hub-style file name, "name-<hex>.ext", is checked).
        resize: shorter side the image is resized to before the center crop to `input_size`
            (256 for the ImageNet models); None resizes straight to `input_size`.
        interpolation: resampling filter of that resize (the one the weights were trained with).
        max_image_pixels: largest encoded image (width x height) worth decoding for this model;
            None: `PIXEL_LIMIT_AREAS` times the area it is resized to, at least
            `PIXEL_LIMIT_FLOOR` (see `pixel_limit`).
        backend: the network backend that runs it: "torch" (a registered architecture) or
            "onnx" (a file named in the settings, served through ONNX Runtime).

    Example:
        >>> spec = ModelSpec("toy", "toy_net", (32, 32), (0.5,) * 3, (0.25,) * 3, ("a", "b"))
        >>> spec.num_classes
        2
    """

    name: str
    architecture: str
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    labels: tuple[str, ...]
    weights_url: str | None = None
    weights_sha256: str | None = None
    resize: int | None = None
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    max_image_pixels: int | None = None
    backend: Literal["torch", "onnx"] = "torch"

    def __post_init__(self) -> None:
        """Reject specs that would fail later, far from where they were written."""
        if len(self.input_size) != 2 or min(self.input_size) < 1:
            raise ValueError(f"{self.name}: input_size must be (height, width) >= 1")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"{self.name}: mean and std need 3 values, std > 0")
        if not self.labels:
            raise ValueError(f"{self.name}: labels must not be empty")
        if self.resize is not None and self.resize < min(self.input_size):
            raise ValueError(f"{self.name}: resize must be >= the input size")
        if self.max_image_pixels is not None and self.max_image_pixels < 1:
            raise ValueError(f"{self.name}: max_image_pixels must be >= 1")

    @property
    def num_classes(self) -> int:
        """Number of model outputs (one per label)."""
        return len(self.labels)

    @property
    def pixel_limit(self) -> int:
        """The most pixels (width x height) an encoded image for this model may declare.

        Checked on the header, before any pixel is decoded: `max_image_pixels` if set, else
        `PIXEL_LIMIT_AREAS` times the area the image is resized to, at least `PIXEL_LIMIT_FLOOR`
        (4,194,304 for the CIFAR models, 16,777,216 for the ImageNet ones).
        """
        if self.max_image_pixels is not None:
            return self.max_image_pixels
        side = self.resize or max(self.input_size)
        return max(PIXEL_LIMIT_FLOOR, PIXEL_LIMIT_AREAS * side * side)

    def input_range(self, margin: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per channel, the (lows, highs) a normalised float input may take.

        A pixel in [0, 1] normalises to [(0 - mean) / std, (1 - mean) / std]; that interval is
        widened `margin` times about its centre (margin 1: exactly the pixel range). Inputs far
        outside it are no image this model has seen, and huge finite values (1e20, 3e38) would
        overflow the BatchNorm moments into inf/NaN.

        Example:
            >>> spec = ModelSpec("toy", "toy_net", (32, 32), (0.5,) * 3, (0.25,) * 3, ("a",))
            >>> spec.input_range(2.0)
            ((-4.0, -4.0, -4.0), (4.0, 4.0, 4.0))
        """
        lows, highs = [], []
        for mean, std in zip(self.mean, self.std, strict=True):
            low, high = (0 - mean) / std, (1 - mean) / std
            centre, half = (low + high) / 2, (high - low) / 2
            lows.append(centre - margin * half)
            highs.append(centre + margin * half)
        return tuple(lows), tuple(highs)
