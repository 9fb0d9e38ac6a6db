"""The seam between the engine and a network backend: what a network is and what it does.

A network backend is its BatchNorm layers (source statistics and affine parameters, in forward
order) and a forward in which each of those layers asks the batch in progress for the per-image
statistics to normalise with, then normalises with :func:`normalize`. The PyTorch backend
(``engine.torch_backend``) and the ONNX Runtime backend (``engine.onnx_backend``) implement it; the
engine, the adapters, the pools and the state export are the same for both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from adapters.base import Adapter, SourceStats, State
from adapters.pool import StatePool


@dataclass(frozen=True)
class NormLayer:
    """One adapted BatchNorm layer: its name, source statistics and affine parameters."""

    name: str
    source: SourceStats
    weight: Tensor  # [C] float32, on the network's device
    bias: Tensor  # [C] float32


class Group(Protocol):
    """The rows of a batch whose streams share an adapter, a state structure and ``adapt``."""

    adapter: Adapter
    pool: StatePool
    adapt: bool
    segment: Tensor  # [rows] int64: each row's stream within the group
    images: Tensor  # [streams] float64: rows per stream
    members: Tensor  # [streams, rows] float64 one-hot
    layers: list[State]  # per BN layer, the streams' states before the batch
    hparams: dict[str, Tensor]  # per hyperparameter, [streams]


class Statistics(Protocol):
    """What a norm layer needs from the forward in progress."""

    @property
    def groups(self) -> Sequence[Group]:
        """The batch's groups of streams, in row order."""
        ...

    @property
    def source_rows(self) -> int:
        """Rows after the groups' rows, normalised with the source statistics (copies of
        images whose source prediction is asked for in the same forward)."""
        ...

    def statistics(self, index: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-image (mean, var) ``[N, C]`` to normalise input ``x`` of layer ``index`` with."""
        ...

    def from_moments(
        self, index: int, sample_mean: Tensor, sample_var: Tensor, pixels: int
    ) -> tuple[Tensor, Tensor]:
        """As :meth:`statistics`, from the input's per-image moments ``[N, C]`` over ``pixels``.

        For a backend that computes the moments itself (the fused ONNX graph); like
        :meth:`statistics`, it stages the streams' new states.
        """
        ...


class Network(Protocol):
    """A classifier whose BatchNorm layers normalise with statistics the batch gives them."""

    @property
    def layers(self) -> Sequence[NormLayer]:
        """The adapted BatchNorm layers, in forward order."""
        ...

    @property
    def device(self) -> torch.device:
        """Where the network runs; inputs, statistics and logits live there."""
        ...

    @property
    def capturable(self) -> bool:
        """Whether the forward can be captured in a CUDA graph (pure PyTorch on CUDA)."""
        ...

    def forward(self, x: Tensor, batch: Statistics | None) -> Tensor:
        """Logits of ``x``; each BN layer normalises with ``batch``'s statistics (None: source)."""
        ...


def normalize(x: Tensor, mean: Tensor, var: Tensor, layer: NormLayer) -> Tensor:
    """Normalise each image of ``x`` [N, C, H, W] with its own (mean, var) ``[N, C]``, then scale.

    Each (image, channel) pair is a channel of one eval-mode BatchNorm over [1, N*C, H, W]: the
    backend's fused per-channel kernel, with the same arithmetic as the source layer.
    """
    n, c = mean.shape
    out = F.batch_norm(
        x.reshape(1, n * c, *x.shape[2:]),
        mean.float().reshape(-1),
        var.float().reshape(-1),
        layer.weight.repeat(n),
        layer.bias.repeat(n),
        False,
        0.0,
        layer.source.eps,
    )
    return out.reshape(x.shape)


def instance_moments(x: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image, per-channel mean and biased variance over H*W, in float32.

    Raw moments (a mean and a sum of squares, each one fast pass) of ``x - shift``: the source
    mean, so the second moment does not cancel when |mean| >> std as long as the stream's mean
    stays within a few hundred of its std from the source's (ALGORITHMS.md section 11.3).
    ``torch.var_mean`` would be exact but ran 30-60x slower than these two reductions on the CPU.
    """
    centered = x - shift.to(x.dtype)[:, None, None]
    mean = centered.mean((2, 3), dtype=torch.float32)
    square = torch.linalg.vector_norm(centered, dim=(2, 3), dtype=torch.float32).square()
    var = (square / (x.shape[2] * x.shape[3]) - mean.square()).clamp(min=0)
    return mean + shift, var
