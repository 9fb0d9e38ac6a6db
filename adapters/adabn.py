"""AdaBN: normalise with the target domain's population statistics, estimated online per stream.

Li, Wang, Shi, Liu, Hou, "Revisiting Batch Normalization For Practical Domain Adaptation"
(arXiv 1603.04779). The paper replaces every BN layer's statistics by the mean and variance of the
whole target domain. Online, per stream (ALGORITHMS.md 3.2): keep (pixel count n, mean, M2) per
channel in float64 and fold each batch in with Chan's parallel merge, then normalise the batch
with the updated estimate ("update, then normalise") and the biased variance M2 / n.

Service extensions, both off by default (faithful AdaBN):
- ``prior_images`` n0: Schneider et al.'s source prior, mixed linearly with weight
  a = n / (n + n0 * L) on the target (section 1.5);
- ``window``: cap the count at this many images, i.e. an EMA that forgets old batches.
With no images seen and no prior the source statistics are used (``adapt=False`` on a fresh stream).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from adapters.base import (
    NONNEGATIVE,
    Adapter,
    HParams,
    Moments,
    SourceStats,
    State,
    chan_merge,
    linear_mix,
)


class AdaBNConfig(BaseModel):
    """AdaBN's knobs: both extensions off by default."""

    model_config = ConfigDict(extra="forbid")

    prior_images: float = Field(
        0.0, ge=0, le=1e9, description="source prior strength n0, in images"
    )
    window: int | None = Field(
        None, ge=1, description="forget beyond this many images (None: never)"
    )


def init_state(source: SourceStats, config: AdaBNConfig, generator: torch.Generator) -> State:
    """Nothing seen yet: zero count, mean and M2 (float64 accumulators)."""
    zeros = torch.zeros_like(source.mean, dtype=torch.float64)
    return {"n": zeros.new_zeros(()), "mean": zeros, "m2": zeros.clone()}


def update(state: State, moments: Moments, source: SourceStats, hp: HParams) -> State:
    """Chan's merge of each stream's batch into its running estimate."""
    n, mean, m2 = chan_merge(state["n"], state["mean"], state["m2"], moments, hp["window"])
    return {"n": n, "mean": mean, "m2": m2}


def norm_stats(
    state: State, moments: Moments, source: SourceStats, hp: HParams
) -> tuple[Tensor, Tensor]:
    """The stream's population estimate, mixed with the source prior when n0 > 0."""
    n = state["n"]
    seen = n > 0
    weight = torch.where(seen, n / (n + hp["prior_images"] * moments.pixels), 0.0)
    var = state["m2"] / torch.where(seen, n, 1.0)[:, None]
    return linear_mix(weight, state["mean"], var, source)


ADAPTER = Adapter(
    "adabn",
    AdaBNConfig,
    init_state,
    norm_stats,
    update,
    update_first=True,
    bounds={"n": NONNEGATIVE, "m2": NONNEGATIVE},
)
