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
- Batch size (ALGORITHMS.md 6.1): time runs in reference batches of ``batch_ref`` images. Each
  image advances t by 1 / batch_ref with momentum 1 - (1 - eta_t)^(1 / batch_ref), eta_t decaying
  image by image, so a batch of B images moves the source weight exactly as B single images do
  (the batch's statistics enter with the batch's total weight). With batch_ref = 1 and one
  image per call this is the paper's schedule step for step.
- ``eta_min`` (extension, default 0): a floor on the momentum for continual streams.
The paper's optional affine-parameter losses (sections 6.2-6.4) need backprop: out of scope.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from adapters.base import NONNEGATIVE, Adapter, HParams, Moments, SourceStats, State


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
    """Fold each stream's batch in with the momentum of its images' decaying schedule."""
    keep = _keep(state["step"], moments.images, hp, moments.sample_mean.shape[0])
    shifted = moments.mean - source.mean.double()
    keep_c = keep[:, None]
    return {
        "step": state["step"] + moments.images / hp["batch_ref"],
        "w": keep * state["w"],
        "s1": keep_c * state["s1"] + (1 - keep_c) * shifted,
        "s2": keep_c * state["s2"] + (1 - keep_c) * (moments.var + shifted.square()),
    }


def _keep(step: Tensor, images: Tensor, hp: HParams, longest: int) -> Tensor:
    """prod over a stream's B images of (1 - eta(t + j / batch_ref))^(1 / batch_ref), [S].

    ``longest`` bounds every B (the group's row count), so the product is one masked sum of
    logs over a [S, longest] grid: no loop over images or streams.
    """
    j = torch.arange(longest, dtype=torch.float64, device=step.device)
    batch_ref = hp["batch_ref"][:, None]
    t = step[:, None] + j / batch_ref
    eta = torch.maximum(
        hp["eta0"][:, None] * torch.exp(-hp["beta"][:, None] * t), hp["eta_min"][:, None]
    )
    log_keep = torch.where(j < images[:, None], torch.log1p(-eta) / batch_ref, 0.0)
    return torch.exp(log_keep.sum(1))


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


ADAPTER = Adapter(
    "momentum",
    MomentumConfig,
    init_state,
    norm_stats,
    update,
    update_first=True,
    # w is the source's weight; s2 an EMA of second moments.
    bounds={"step": NONNEGATIVE, "w": (0.0, 1.0), "s2": NONNEGATIVE},
)
