"""Tiny model factories that the user-model tests load by their "module:function" path."""

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn


def save_random(model: nn.Module, path: Path) -> Path:
    """Randomise every tensor of `model` (BN statistics included) and save it as safetensors."""
    torch.manual_seed(0)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) + 0.5)
    save_file(model.state_dict(), path)
    return path


def tiny_bn_net() -> nn.Module:
    """A 2-class conv net with one BatchNorm2d layer."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )


def tiny_gn_net() -> nn.Module:
    """The same net with GroupNorm instead of BatchNorm: nothing for BN adaptation to adapt."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.GroupNorm(1, 4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )


def not_a_module() -> str:
    """A factory that returns something else than a module."""
    return "not a module"


def needs_arguments(width: int) -> nn.Module:
    """A factory that cannot be called without arguments."""
    return nn.Conv2d(3, width, 1)
