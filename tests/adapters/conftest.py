"""Small BatchNorm networks with non-trivial source statistics, for the adapter tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class Block(nn.Module):
    """A residual block: two conv-BN pairs and an identity shortcut."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


def tiny_net(seed: int = 0, channels: int = 6, classes: int = 5) -> nn.Module:
    """A conv-BN-residual-pool-linear network with random weights and source statistics."""
    generator = torch.Generator().manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        Block(channels),
        nn.Conv2d(channels, channels, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, classes),
    )
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.4)
            if isinstance(module, nn.Linear):
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.running_mean.copy_(torch.randn(c, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.3)
                module.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(c, generator=generator) * 0.3)
    return net.eval()


def images(n: int, seed: int, shift: float = 0.0, size: int = 8) -> torch.Tensor:
    """Random images, optionally shifted (a covariate shift the adapters should see)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((n, 3, size, size), generator=generator) * (1 + shift) + shift


@pytest.fixture
def net() -> nn.Module:
    return tiny_net()
