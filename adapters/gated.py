"""Divergence-gated momentum: statistics that move fast on a domain switch and settle when stable.

In the spirit of MECTA (Hong et al., ICLR 2023), whose normalisation layer adapts its momentum to
the distance between the batch's and the running statistics, and of the exponential-moving-
average variants of test-time BN; not a reproduction of either (named: a project method). Per BN
layer and stream, the running statistics start at the source and follow an EMA whose per-image
momentum rises with the divergence between recent images and the running statistics:

    D   = mean over channels of the symmetric KL (Jeffreys) between N(recent) and N(running)
    eta = eta_min + (eta_max - eta_min) * D / (D + d0)

the same measure the drift observer reports (ALGORITHMS.md section 10, BN eps added to both
variances). A domain switch makes D large, so the layer re-adapts within about 1 / eta_max images;
in a stable domain D falls to its sampling floor and eta towards eta_min, so the statistics
average over a long history (close to AdaBN's population estimate).

"Recent" is an EMA of the stream's last ~``recent_images`` images, not the call's own batch: at
N = 1 a batch is one image, whose statistics are instance statistics far from any population
Gaussian whatever the domain; the recent EMA gives every batch size the same comparison.

Mixing rule (ALGORITHMS.md 1.5), as in the momentum adapter: the source enters linearly through
its weight w = prod(1 - eta); the stream's images are pooled exactly through float64 EMAs S1, S2
of their first and second moments (shifted by the source mean), so at N = 1 the between-image
variance is kept. A batch of B images moves the state by (1 - eta)^B, eta gated once per batch.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from adapters.base import NONNEGATIVE, Adapter, HParams, Moments, SourceStats, State


class GatedConfig(BaseModel):
    """The gate: momentum range per image, the divergence scale and the recent window."""

    model_config = ConfigDict(extra="forbid")

    eta_max: float = Field(1 / 64, gt=0, le=0.5, description="momentum per image at large D")
    eta_min: float = Field(1e-4, ge=0, le=0.5, description="momentum per image at D = 0")
    d0: float = Field(0.1, gt=0, le=1e6, description="divergence at which eta is half-way")
    recent_images: float = Field(
        64.0, ge=1, le=1e6, description="memory of the recent statistics, in images"
    )


def init_state(source: SourceStats, config: GatedConfig, generator: torch.Generator) -> State:
    """Running and recent statistics at the source: source weight 1, empty target EMAs."""
    zeros = torch.zeros_like(source.mean, dtype=torch.float64)
    one = zeros.new_ones(())
    return {
        "w": one,
        "s1": zeros,
        "s2": zeros.clone(),
        "recent.w": one.clone(),
        "recent.s1": zeros.clone(),
        "recent.s2": zeros.clone(),
    }


def ema_fold(
    w: Tensor, s1: Tensor, s2: Tensor, keep: Tensor, moments: Moments, source: SourceStats
):
    """One EMA step with weight ``keep`` [S] on the past: (w, S1, S2) with the batch folded in."""
    shifted = moments.mean - source.mean.double()
    k = keep[:, None]
    return keep * w, k * s1 + (1 - k) * shifted, k * s2 + (1 - k) * (moments.var + shifted.square())


def ema_gaussian(w: Tensor, s1: Tensor, s2: Tensor, source: SourceStats) -> tuple[Tensor, Tensor]:
    """Mean and variance of (w, S1, S2): w on the source, 1 - w on the pooled target images."""
    w = w[:, None]
    target = 1 - w
    spread = torch.where(target > 0, s2 - s1.square() / torch.where(target > 0, target, 1.0), 0.0)
    return source.mean.double() + s1, w * source.var.double() + spread.clamp(min=0)


def divergence(mean_a: Tensor, var_a: Tensor, mean_b: Tensor, var_b: Tensor, eps: float):
    """Channel mean of the Jeffreys divergence between two diagonal Gaussians, [S]."""
    va, vb = var_a + eps, var_b + eps
    d2 = (mean_a - mean_b).square()
    return (0.5 * (va / vb + vb / va - 2 + d2 * (1 / va + 1 / vb))).mean(-1)


def update(state: State, moments: Moments, source: SourceStats, hp: HParams) -> State:
    """Fold the batch into the recent EMA, gate the momentum by D, fold it into the running one."""
    images = moments.images
    recent_keep = (1 - 1 / hp["recent_images"]) ** images
    recent = ema_fold(
        state["recent.w"], state["recent.s1"], state["recent.s2"], recent_keep, moments, source
    )
    d = divergence(
        *ema_gaussian(recent[0], recent[1], recent[2], source),
        *ema_gaussian(state["w"], state["s1"], state["s2"], source),
        source.eps,
    )
    eta = hp["eta_min"] + (hp["eta_max"] - hp["eta_min"]).clamp(min=0) * d / (d + hp["d0"])
    w, s1, s2 = ema_fold(state["w"], state["s1"], state["s2"], (1 - eta) ** images, moments, source)
    return {
        "w": w,
        "s1": s1,
        "s2": s2,
        "recent.w": recent[0],
        "recent.s1": recent[1],
        "recent.s2": recent[2],
    }


def norm_stats(
    state: State, moments: Moments, source: SourceStats, hp: HParams
) -> tuple[Tensor, Tensor]:
    """The running statistics: source weight w, 1 - w on the exactly pooled images."""
    return ema_gaussian(state["w"], state["s1"], state["s2"], source)


ADAPTER = Adapter(
    "gated",
    GatedConfig,
    init_state,
    norm_stats,
    update,
    update_first=True,
    bounds={
        "w": (0.0, 1.0),
        "s2": NONNEGATIVE,
        "recent.w": (0.0, 1.0),
        "recent.s2": NONNEGATIVE,
    },
)
