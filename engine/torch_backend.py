"""The PyTorch backend: an ``nn.Module`` whose ``BatchNorm2d`` layers become ``StreamNorm2d``.

Outside a batch context a ``StreamNorm2d`` is the source model's eval-mode BN. Inside one (set by
:meth:`TorchNetwork.forward` for the duration of one forward), it asks the batch for the
per-image statistics to normalise with. The batch in progress is held by a plain object shared by
the network's layers, not a ContextVar: ``torch.compile`` traces through an attribute write but
not through ``ContextVar.set`` (the engine is single-threaded: one forward at a time).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapters.base import SourceStats
from engine.network import NormLayer, Statistics, normalize


class ActiveBatch:
    """The batch in progress of one network (None outside a forward)."""

    def __init__(self) -> None:
        self.batch: Statistics | None = None


class StreamNorm2d(nn.Module):
    """A BatchNorm2d whose statistics come from each image's stream state."""

    running_mean: Tensor
    running_var: Tensor
    weight: Tensor
    bias: Tensor

    def __init__(self, bn: nn.BatchNorm2d, index: int, active: ActiveBatch) -> None:
        super().__init__()
        self.active = active
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("BatchNorm2d without running statistics cannot be served")
        self.index = index
        self.eps = bn.eps
        self.momentum = 0.1 if bn.momentum is None else bn.momentum
        self.register_buffer("running_mean", bn.running_mean.detach().clone().float())
        self.register_buffer("running_var", bn.running_var.detach().clone().float())
        ones = torch.ones_like(self.running_mean)
        weight = bn.weight.detach().clone() if bn.weight is not None else ones
        bias = bn.bias.detach().clone() if bn.bias is not None else torch.zeros_like(ones)
        self.register_buffer("weight", weight.float())
        self.register_buffer("bias", bias.float())

    def layer(self, name: str) -> NormLayer:
        """The layer as the engine sees it (tensors on the module's current device)."""
        source = SourceStats(self.running_mean, self.running_var, self.eps, self.momentum)
        return NormLayer(name, source, self.weight, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        batch = self.active.batch
        if batch is None:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        mean, var = batch.statistics(self.index, x)
        return normalize(x, mean, var, self.layer(""))

    def extra_repr(self) -> str:
        return f"{self.running_mean.numel()}, eps={self.eps}, index={self.index}"


def convert_batchnorm(model: nn.Module, active: ActiveBatch) -> list[StreamNorm2d]:
    """Replace every BatchNorm2d of ``model`` in place by a StreamNorm2d; return them in order.

    Only BatchNorm2d is adapted: BatchNorm1d layers (L = 1, no instance statistics) keep the
    source statistics, as in the reference codes (ALGORITHMS.md section 0).
    """
    layers: list[StreamNorm2d] = []
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.BatchNorm2d):
                layer = StreamNorm2d(child, len(layers), active)
                setattr(parent, name, layer)
                layers.append(layer)
    return layers


class TorchNetwork:
    """A PyTorch classifier as an engine network (a private, converted copy of the model).

    Args:
        model: an eval-mode classifier with BatchNorm2d layers (copied, never mutated).
        device: where the copy runs.
    """

    capturable = True

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model = copy.deepcopy(model).eval()
        self.active = ActiveBatch()
        modules = convert_batchnorm(self.model, self.active)
        if not modules:
            raise ValueError("the model has no BatchNorm2d layer: nothing to adapt")
        self.model.to(device).requires_grad_(False)
        names = {id(module): name for name, module in self.model.named_modules()}
        self.layers = [module.layer(names[id(module)]) for module in modules]
        self.device = device

    def forward(self, x: Tensor, batch: Statistics | None) -> Tensor:
        """The model's forward, its norm layers asking ``batch`` (None: source statistics)."""
        previous, self.active.batch = self.active.batch, batch
        try:
            return self.model(x)
        finally:
            self.active.batch = previous
