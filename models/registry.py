"""The registry of named models, and the loaders that turn a name (or a user factory) into a model.

Every model comes out the same way: on the CPU, in eval mode, with `requires_grad` False on every
parameter, and with at least one BatchNorm2d layer (test-time adaptation re-estimates their
statistics; a model without any is refused rather than served silently unadapted).
"""

import importlib
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torchvision.models
from torch import nn

from models.cifar_resnet import CifarResNet
from models.download import fetch_weights, read_state_dict
from models.errors import IncompatibleModelError, ModelError, UnknownModelError
from models.spec import CIFAR10_LABELS, IMAGENET_MEAN, IMAGENET_STD, ModelSpec

_AKAMASTER_URL = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"

# Architecture name -> builder(num_classes=...) of a randomly initialised network.
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    **{f"cifar_resnet{d}": partial(CifarResNet, d) for d in (20, 32, 44, 56)},
    **{
        arch: partial(torchvision.models.get_model, arch, weights=None)
        for arch in ("resnet18", "resnet50", "wide_resnet50_2", "mobilenet_v3_large",
                     "efficientnet_b0")
    },
}  # fmt: skip


def _cifar10(depth: int, filename: str, sha256: str | None) -> ModelSpec:
    """Spec of an akamaster CIFAR-10 ResNet (trained on 32x32 inputs with ImageNet mean/std)."""
    return ModelSpec(
        name=f"cifar10_resnet{depth}",
        architecture=f"cifar_resnet{depth}",
        input_size=(32, 32),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        labels=CIFAR10_LABELS,
        weights_url=_AKAMASTER_URL + filename,
        weights_sha256=sha256,
    )


def _imagenet(arch: str) -> ModelSpec:
    """Spec of a torchvision ImageNet classifier with its IMAGENET1K_V1 weights.

    V1 are the weights of the classic recipe (resize 256, crop 224) that TTA papers evaluate;
    torchvision publishes no full sha256, only a prefix in the file name, which fetch_weights
    checks. The labels come from torchvision's metadata, which is packaged (no download).
    """
    weights = torchvision.models.get_model_weights(arch)["IMAGENET1K_V1"]
    preset = weights.transforms()
    return ModelSpec(
        name=arch,
        architecture=arch,
        input_size=(preset.crop_size[0], preset.crop_size[0]),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        labels=tuple(weights.meta["categories"]),
        weights_url=weights.url,
        weights_sha256=None,
        resize=preset.resize_size[0],
        interpolation="bicubic" if preset.interpolation.value == "bicubic" else "bilinear",
    )


# The full sha256 of resnet20/32 is known (../shared/models/README.md); for 44/56 only the
# 8-digit prefix in the file name is, and that is what gets checked.
MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        _cifar10(20, "resnet20-12fca82f.th",
                 "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8"),
        _cifar10(32, "resnet32-d509ac18.th",
                 "d509ac1820d7f25398913559d7e81a13229b1e7adc5648e3bfa5e22dc137f850"),
        _cifar10(44, "resnet44-014dd654.th", None),
        _cifar10(56, "resnet56-4bfd9763.th", None),
        *(_imagenet(arch) for arch in ("resnet18", "resnet50", "wide_resnet50_2",
                                       "mobilenet_v3_large", "efficientnet_b0")),
    )
}  # fmt: skip


def list_models() -> list[str]:
    """Names of the registered models, sorted; builds and downloads nothing."""
    return sorted(MODELS)


def get_spec(name: str) -> ModelSpec:
    """The spec of a registered model; raises UnknownModelError listing the valid names."""
    try:
        return MODELS[name]
    except KeyError:
        raise UnknownModelError(name, MODELS) from None


def build_architecture(spec: ModelSpec) -> nn.Module:
    """A randomly initialised network of `spec.architecture` with `spec.num_classes` outputs."""
    try:
        builder = ARCHITECTURES[spec.architecture]
    except KeyError:
        raise ModelError(
            f"unknown architecture {spec.architecture!r} for model {spec.name}; "
            f"valid: {', '.join(sorted(ARCHITECTURES))}"
        ) from None
    return builder(num_classes=spec.num_classes)


def create_model(
    name: str, *, cache_dir: Path, weights_path: Path | None = None, download_timeout: float = 10.0
) -> tuple[nn.Module, ModelSpec]:
    """Build a registered model with its pretrained weights, ready to serve.

    Args:
        name: a registered name (see `list_models()`).
        cache_dir: where downloaded weights are kept (seed it with the files for offline use).
        weights_path: a local state-dict file (`.safetensors`, or a `torch.save` file read with
            weights_only=True) to use instead of the published weights.
        download_timeout: seconds to wait for the weights server.

    Returns:
        The model (CPU, eval mode, no parameter requires grad) and its spec.

    Raises:
        UnknownModelError, WeightsUnavailableError, WeightsChecksumError,
        IncompatibleModelError (the weights do not fit the architecture), ModelError.

    Example:
        >>> model, spec = create_model("cifar10_resnet20", cache_dir=Path("../shared/models"))
        ... # doctest: +SKIP
    """
    spec = get_spec(name)
    model = build_architecture(spec)
    check_batchnorm(model, name)
    if weights_path is None:
        if spec.weights_url is None:
            raise ModelError(f"model {name} has no published weights: pass a weights file")
        weights_path = fetch_weights(
            spec.weights_url, spec.weights_sha256, cache_dir, timeout=download_timeout, name=name
        )
    _load_strict(model, read_state_dict(weights_path), name)
    return _frozen(model), spec


def load_user_model(factory: str, weights: Path, spec: ModelSpec) -> nn.Module:
    """Build a user's model from a `"package.module:function"` factory and a safetensors file.

    The factory is called without arguments and must return an `nn.Module`; the weights must
    match its state dict exactly, and its output for one input of `spec.input_size` must have
    `spec.num_classes` values. Only safetensors is accepted: a user's pickle could run code.

    Args:
        factory: import path of a function that builds the (randomly initialised) model.
        weights: a `.safetensors` state-dict file.
        spec: the model's spec (input size, normalisation, labels).

    Returns:
        The model (CPU, eval mode, no parameter requires grad).

    Raises:
        ModelError: a malformed factory string, a missing module or function, a factory that
            does not return a module, or weights that are not safetensors.
        IncompatibleModelError: no BatchNorm2d, mismatching weights, or a wrong output size.

    Example:
        >>> model = load_user_model("my_pkg.nets:build", Path("net.safetensors"), spec)
        ... # doctest: +SKIP
    """
    module_name, sep, attr = factory.partition(":")
    if not sep or not module_name or not attr.isidentifier():
        raise ModelError(f"model factory {factory!r} must look like 'package.module:function'")
    try:
        build = getattr(importlib.import_module(module_name), attr)
    except ImportError as err:
        raise ModelError(f"model factory {factory!r}: cannot import {module_name}: {err}") from err
    except AttributeError:
        raise ModelError(f"model factory {factory!r}: {module_name} has no {attr!r}") from None
    try:
        model = build()
    except Exception as err:  # user code: whatever it raises, the caller gets one typed error
        raise ModelError(f"model factory {factory!r} failed: {err!r}") from err
    if not isinstance(model, nn.Module):
        raise ModelError(f"model factory {factory!r} returned {type(model).__name__}, not a Module")
    if weights.suffix != ".safetensors":
        raise ModelError(f"user model weights must be a .safetensors file, got {weights}")
    return _with_weights(model, weights, spec)


def load_torchvision_model(architecture: str, weights: Path, spec: ModelSpec) -> nn.Module:
    """Build torchvision's ``architecture`` with ``spec.num_classes`` outputs and a weights file.

    The weights are a `.safetensors` file or a `torch.save` state dict (read with
    weights_only=True, which runs no code), e.g. a fine-tuned ResNet-50 with 5 classes.

    Raises:
        ModelError: an architecture torchvision does not have.
        IncompatibleModelError: no BatchNorm2d, mismatching weights, or a wrong output size.

    Example:
        >>> model = load_torchvision_model("resnet18", Path("r18.safetensors"), spec)
        ... # doctest: +SKIP
    """
    if architecture not in torchvision.models.list_models(torchvision.models):
        raise ModelError(
            f"unknown torchvision architecture {architecture!r} for model {spec.name}; "
            "see torchvision.models.list_models()"
        )
    model = torchvision.models.get_model(architecture, weights=None, num_classes=spec.num_classes)
    return _with_weights(model, weights, spec)


def _with_weights(model: nn.Module, weights: Path, spec: ModelSpec) -> nn.Module:
    """Check BatchNorm2d, load ``weights`` strictly, freeze, and check one forward's output."""
    check_batchnorm(model, spec.name)
    _load_strict(model, read_state_dict(weights), spec.name)
    model = _frozen(model)
    try:
        with torch.inference_mode():
            out = model(torch.zeros(1, 3, *spec.input_size))
    except RuntimeError as err:  # e.g. a layer that does not fit the input size
        raise IncompatibleModelError(
            f"model {spec.name} fails on an input of size {spec.input_size}: {err}"
        ) from err
    if not isinstance(out, torch.Tensor) or out.shape != (1, spec.num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise IncompatibleModelError(
            f"model {spec.name} outputs {shape} for one image, expected (1, {spec.num_classes})"
        )
    return model


def check_batchnorm(model: nn.Module, name: str | None = None) -> int:
    """Count the model's BatchNorm2d layers; raise IncompatibleModelError if there is none.

    A BatchNorm2d without running statistics (`track_running_stats=False`) is refused too: the
    source statistics are what every adapter starts from.
    """
    name = name or type(model).__name__
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if not layers:
        raise IncompatibleModelError(f"model {name} has no BatchNorm2d layer: nothing to adapt")
    for layer_name, layer in layers:
        if layer.running_mean is None or layer.running_var is None:
            raise IncompatibleModelError(
                f"model {name}: BatchNorm2d {layer_name!r} has no running statistics "
                "(track_running_stats=False), so there are no source statistics to adapt from"
            )
    return len(layers)


def _load_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], name: str) -> None:
    """Load every tensor of `state_dict` into `model`; any mismatch is an IncompatibleModelError."""
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:  # missing/unexpected keys or shape mismatches
        raise IncompatibleModelError(f"weights do not fit model {name}: {err}") from err


def _frozen(model: nn.Module) -> nn.Module:
    """Put the model in eval mode with gradients off: it is served, never trained."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model
