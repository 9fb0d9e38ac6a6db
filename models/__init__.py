"""What a model is: specs, the registry of named models, loaders, weights and preprocessing.

Example:
    >>> from models import create_model, normalize, pil_to_uint8
    >>> model, spec = create_model("cifar10_resnet20", cache_dir=cache)  # doctest: +SKIP
    >>> x = normalize(pil_to_uint8(image, spec)[None], spec)  # doctest: +SKIP
    >>> labels = [spec.labels[i] for i in model(x).argmax(1)]  # doctest: +SKIP
"""

from models.download import fetch_weights, read_state_dict
from models.errors import (
    IncompatibleModelError,
    ModelError,
    UnknownModelError,
    WeightsChecksumError,
    WeightsUnavailableError,
)
from models.preprocess import Normalizer, normalize, pil_to_uint8
from models.registry import (
    build_architecture,
    check_batchnorm,
    create_model,
    get_spec,
    list_models,
    load_torchvision_model,
    load_user_model,
)
from models.spec import ModelSpec

__all__ = [
    "IncompatibleModelError",
    "ModelError",
    "ModelSpec",
    "Normalizer",
    "UnknownModelError",
    "WeightsChecksumError",
    "WeightsUnavailableError",
    "build_architecture",
    "check_batchnorm",
    "create_model",
    "fetch_weights",
    "get_spec",
    "list_models",
    "load_torchvision_model",
    "load_user_model",
    "normalize",
    "pil_to_uint8",
    "read_state_dict",
]
