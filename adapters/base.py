"""What every adapter shares: the statistics it is given and the shape of an adapter.

An adapter decides, for each BatchNorm layer, which mean and variance normalise a stream's images,
and how the stream's state evolves after each batch. It is three pure tensor functions over the
stream dimension S (every stream of a batch at once, each with its own hyperparameters):

- ``init_state(source, config, generator)``: one stream's fresh state for one layer;
- ``norm_stats(state, moments, source, hparams)``: the (mean, var) that normalise each stream's
  segment ``[S, C]``, or each image ``[N, C]`` for per-instance methods;
- ``update(state, moments, source, hparams)``: the stream's next state.

``update_first`` says whether a batch is folded into the state before it is normalised
("update, then normalise": AdaBN, momentum) or after (UnMix-TNS), ALGORITHMS.md section 1.1.
``pseudo_labels`` adapters (class-balanced statistics) are updated after the whole forward, with
each image's predicted class in ``moments.labels``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel
from torch import Tensor

State = dict[str, Tensor]
HParams = Mapping[str, Tensor]
Bounds = Mapping[str, tuple[float, float]]  # state name -> closed interval of its valid values

NONNEGATIVE = (0.0, math.inf)


class AdapterError(Exception):
    """Base class of the adapters' typed errors."""


class UnknownAdapterError(AdapterError, KeyError):
    """An adapter name that is not in the registry."""

    def __init__(self, name: str, valid: list[str]) -> None:
        super().__init__(f"Unknown adapter '{name}'; valid: {', '.join(valid)}")
        self.name = name
        self.valid = valid

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class StateMismatchError(AdapterError, ValueError):
    """Imported state that does not fit the stream's model, adapter or configuration."""


class InvalidStateError(StateMismatchError):
    """A state (new or imported) that is not finite or breaks the adapter's bounds: refused."""


@dataclass(frozen=True)
class SourceStats:
    """A BatchNorm layer's source (training) statistics and constants, shared by all streams."""

    mean: Tensor  # [C] float32: running_mean of the checkpoint
    var: Tensor  # [C] float32: running_var of the checkpoint
    eps: float
    momentum: float  # the layer's BN momentum (UnMix-TNS derives its update rate from it)


@dataclass(frozen=True)
class Moments:
    """Statistics of one layer's input for the streams of one group in a batch.

    Per image (over its H*W positions) and per stream segment (over all images of that stream in
    this call, law of total variance). Variances are biased, as BatchNorm normalises with them.
    """

    sample_mean: Tensor  # [N, C] float32
    sample_var: Tensor  # [N, C] float32
    segment: Tensor  # [N] int64: which of the S streams each image belongs to
    images: Tensor  # [S] float64: images per stream in this call
    pixels: int  # L = H * W
    mean: Tensor  # [S, C] float64
    var: Tensor  # [S, C] float64
    members: Tensor  # [S, N] float64 one-hot: members[s, n] = 1 if image n is in stream s
    labels: Tensor | None = None  # [N] int64 predicted classes, for ``pseudo_labels`` adapters

    def segment_sum(self, values: Tensor) -> Tensor:
        """Sum ``values`` [N, ...] over each stream's images: [S, ...]."""
        return segment_sum(self.members, values)

    def per_image(self, values: Tensor) -> Tensor:
        """Each image's row of a per-stream tensor [S, ...]: [N, ...]."""
        return values.index_select(0, self.segment)


@dataclass(frozen=True)
class Adapter:
    """One registered adapter: its config model and its three tensor functions."""

    name: str
    config: type[BaseModel]
    init_state: Callable[[SourceStats, Any, torch.Generator], State]
    norm_stats: Callable[[State, Moments, SourceStats, HParams], tuple[Tensor, Tensor]]
    update: Callable[[State, Moments, SourceStats, HParams], State]
    update_first: bool = False
    per_sample: bool = False  # norm_stats returns [N, C] instead of [S, C]
    # update runs after the forward, with the forward's predicted classes in moments.labels
    pseudo_labels: bool = False
    structural: tuple[str, ...] = ()  # config fields that shape the state (e.g. UnMix-TNS's K)
    # The invariants of the state beyond finiteness (counts and variances are >= 0, ...): a row
    # outside them is never committed nor imported.
    bounds: Bounds = field(default_factory=dict)

    def hparams(self, config: BaseModel) -> dict[str, float]:
        """The numeric config fields that become per-stream tensors (bools as 0/1, None as inf)."""
        values: dict[str, float] = {}
        for key, value in config.model_dump().items():
            if key in self.structural or key == "seed":
                continue
            values[key] = float("inf") if value is None else float(value)
        return values


def segment_sum(members: Tensor, values: Tensor) -> Tensor:
    """Per-segment sums as a matrix product with the one-hot ``members`` [S, N].

    A matmul rather than ``index_add``: on the CPU, index_add over a few rows serialises and
    was the slowest op of the whole adapted forward. Compiled batches (engine/compiled.py) may
    hold padding rows in no stream: there the masked sum, which skips them, is always taken.
    """
    flat = values.reshape(values.shape[0], -1)
    if torch.compiler.is_dynamo_compiling():
        # A masked reduction: inductor fuses it with the values' producer and its consumers
        # (a matmul is a library call between two more passes), and NaN stays in its stream.
        picked = torch.where(members[:, :, None] > 0, flat[None], 0.0)
        return picked.sum(1).reshape(members.shape[0], *values.shape[1:])
    if members.shape[0] == 1:
        return values.sum(0, keepdim=True)
    return (members.to(flat.dtype) @ flat).reshape(members.shape[0], *values.shape[1:])


def no_update(state: State, moments: Moments, source: SourceStats, hp: HParams) -> State:
    """The update of a stateless adapter."""
    return state


def no_state(source: SourceStats, config: Any, generator: torch.Generator) -> State:
    """The state of a stateless adapter."""
    return {}


def chan_merge(
    n: Tensor, mean: Tensor, m2: Tensor, moments: Moments, window: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Fold each stream's batch into its running (pixel count, mean, M2): Chan et al.'s merge.

    Exact pooling of target batches (ALGORITHMS.md 1.5, 3.2): the delta^2 term carries the spread
    between batch means, which at N = 1 is the whole between-image variance. ``window`` (images,
    ``inf`` for none) caps the count, which turns the cumulative average into an EMA.
    """
    nb = moments.images * moments.pixels
    total = n + nb
    delta = moments.mean - mean
    mean = mean + delta * (nb / total)[:, None]
    m2 = m2 + moments.var * nb[:, None] + delta.square() * (n * nb / total)[:, None]
    if window is not None:
        shrink = (window * moments.pixels / total).clamp(max=1.0)
        total = total * shrink
        m2 = m2 * shrink[:, None]
    return total, mean, m2


def linear_mix(weight: Tensor, target_mean: Tensor, target_var: Tensor, source: SourceStats):
    """Source and target mixed linearly in mean and variance (ALGORITHMS.md 1.5).

    ``weight`` is the target's weight per stream ``[S]``; no mixture term (mu_T - mu_s)^2 is added:
    the source-target gap is a shift, not spread of the target.
    """
    a = weight[:, None]
    mean = (1 - a) * source.mean.double() + a * target_mean
    var = (1 - a) * source.var.double() + a * target_var
    return mean, var
