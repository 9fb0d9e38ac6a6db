"""Source-free momentum adaptation with exponential momentum decay (EMD).

Liu, Xing, Yang, El Fakhri, Woo, "Adapting Off-the-Shelf Source Segmenter for Target Medical Image
Segmentation" (MICCAI 2021, arXiv 2106.12497), low-order statistics only; the schedule follows
UBNA (Klingner et al., arXiv 2011.08502), ALGORITHMS.md section 6. The running statistics start
at the source and move towards each batch with momentum eta_t = eta_0 exp(-beta t), so they
freeze after a few dozen steps (the source keeps ~26 % at the defaults). Reset restarts t = 0.

Deviations (named):
- Variance: the source enters linearly, the stream's batches are pooled exactly (section 1.5).
  We keep the source weight w = prod(1 - eta_t) and fp64 EMAs S1, S2 of the batches' first and
  second moments (shifted by the source mean, against cancellation), so
  mean = w mu_s + (1 - w) mu_T is the paper's EMA mean and var = w var_s + (1 - w) var_T counts the
  spread between batch means, which an EMA of batch variances drops (all of it at N = 1).
- Batch size: time runs in reference batches of ``batch_ref`` images. A batch of B images
  advances t by B / batch_ref with momentum 1 - (1 - eta_t)^(B / batch_ref); B = batch_ref is
  exactly the paper's step.
- ``eta_min`` (extension, default 0): a floor on the momentum for continual streams.
The paper's optional affine-parameter losses (sections 6.2-6.4) need backprop: out of scope.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from adapters.base import Adapter, HParams, Moments, SourceStats, State


class MomentumConfig(BaseModel):
    """The decay schedule; defaults from UBNA's GTA-to-Cityscapes script."""

    model_config = ConfigDict(extra="forbid")

    eta0: float = Field(0.1, ge=0, le=1, description="initial momentum eta_0")
    beta: float = Field(0.08, ge=0, le=10, description="decay rate per reference batch")
    batch_ref: float = Field(6.0, gt=0, le=65536, description="images per step of the schedule")
    eta_min: float = Field(0.0, ge=0, le=1, description="momentum floor (extension; 0 = paper)")


def init_state(source: SourceStats, config: MomentumConfig, generator: torch.Generator) -> State:
    """The source statistics, step 0: source weight 1 and empty target EMAs."""
    zeros = torch.zeros_like(source.mean, dtype=torch.float64)
    return {"step": zeros.new_zeros(()), "w": zeros.new_ones(()), "s1": zeros, "s2": zeros.clone()}


def update(state: State, moments: Moments, source: SourceStats, hp: HParams) -> State:
    """One (possibly fractional) step of the decaying-momentum EMA."""
    steps = moments.images / hp["batch_ref"]
    eta_t = torch.maximum(hp["eta0"] * torch.exp(-hp["beta"] * state["step"]), hp["eta_min"])
    keep = (1 - eta_t) ** steps
    shifted = moments.mean - source.mean.double()
    keep_c = keep[:, None]
    return {
        "step": state["step"] + steps,
        "w": keep * state["w"],
        "s1": keep_c * state["s1"] + (1 - keep_c) * shifted,
        "s2": keep_c * state["s2"] + (1 - keep_c) * (moments.var + shifted.square()),
    }


def norm_stats(
    state: State, moments: Moments, source: SourceStats, hp: HParams
) -> tuple[Tensor, Tensor]:
    """Source weight w on the source, 1 - w on the exactly pooled target batches."""
    w = state["w"][:, None]
    target = 1 - w
    s1, s2 = state["s1"], state["s2"]
    # (1 - w) var_T = S2 - S1^2 / (1 - w); zero before the first step.
    spread = torch.where(target > 0, s2 - s1.square() / torch.where(target > 0, target, 1.0), 0.0)
    mean = source.mean.double() + s1
    var = w * source.var.double() + spread.clamp(min=0)
    return mean, var


ADAPTER = Adapter("momentum", MomentumConfig, init_state, norm_stats, update, update_first=True)
