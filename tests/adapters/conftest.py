"""Small BatchNorm networks with non-trivial source statistics, for the adapter tests.

Every test here runs once per network backend: the engine built by ``Engine(model, ...)`` in a
test module is a PyTorch engine, or the same model exported to ONNX and served by ONNX Runtime.
A test that needs a PyTorch module in the engine is marked ``@pytest.mark.backends("torch")``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from engine import Engine
from engine.onnx_backend import OnnxNetwork
from models.export_onnx import to_onnx

BACKENDS = ("torch", "onnx")


def onnx_engine(model: nn.Module, **kwargs: Any) -> Engine:
    """An engine over ``model`` exported to ONNX (input size dynamic, channels from its first
    layer), on ONNX Runtime's CPU provider."""
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d | nn.BatchNorm2d))
    channels = first.in_channels if isinstance(first, nn.Conv2d) else first.num_features
    proto = to_onnx(model, (channels, 8, 8), dynamic_size=True)
    device = torch.device(kwargs.pop("device", "cpu"))
    return Engine(OnnxNetwork(proto, device, channels=None), **kwargs)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("backends")
        metafunc.parametrize("backend", marker.args if marker else BACKENDS, indirect=True)


@pytest.fixture(autouse=True)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The backend of every engine the test builds (its module's ``Engine`` is replaced)."""
    if request.param == "onnx" and hasattr(request.module, "Engine"):
        monkeypatch.setattr(request.module, "Engine", onnx_engine)
    return request.param


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
