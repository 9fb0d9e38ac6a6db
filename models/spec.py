"""`ModelSpec`: what a served model expects (input size, normalisation, labels, weights)."""

from dataclasses import dataclass
from typing import Literal

CIFAR10_LABELS = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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

    @property
    def num_classes(self) -> int:
        """Number of model outputs (one per label)."""
        return len(self.labels)
