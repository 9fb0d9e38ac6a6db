"""UnMix-TNS: un-mixing test-time normalisation statistics for label-correlated streams.

Tomar, Vray, Thiran, Bozorgtabar, "Un-Mixing Test-Time Normalization Statistics: Combatting Label
Temporal Correlation" (ICLR 2024, arXiv 2401.08328); behaviour follows the official code
(devavratTomar/unmixtns, ``unmixtns.py``), ALGORITHMS.md section 5.

The stream's features are modelled by K components (mean, var per channel). Each image is
normalised with its *own* statistics: its instance statistics mixed into every component with
its soft assignment p (cosine similarity of means, temperature tau), then the moments of the
uniform K-mixture. So an image's output depends on itself and the components only, never on the
other images of the call. The components are then updated with the images they explain, using
the components as they were before this batch ("normalise, then update").

Deviation (named): lam is computed per call from the stream's actual segment size B,
lam = 1 - (1 - m_bn)^(B / B_max), where the code fixes it once from the configured batch size;
forgetting is then the same per image whatever the batch sizes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from adapters.base import NONNEGATIVE, Adapter, HParams, Moments, SourceStats, State


class UnMixTNSConfig(BaseModel):
    """The paper's constants; K = 128 for mixed-domain streams."""

    model_config = ConfigDict(extra="forbid")

    components: int = Field(16, ge=1, le=512, description="number of mixture components K")
    tau: float = Field(0.07, gt=0, le=10, description="softmax temperature of the assignment")
    batch_size_max: int = Field(64, ge=1, le=65536, description="B_max of the update rate")
    alpha_init: float = Field(0.5, ge=0, lt=1, description="share of source variance in the spread")
    seed: int | None = Field(None, ge=0, description="seed of the random initial components")


def init_state(source: SourceStats, config: UnMixTNSConfig, generator: torch.Generator) -> State:
    """K components spread around the source: mu_s + sqrt(a K/(K-1)) sigma_s eps, var (1-a) var_s.

    The uniform mixture reproduces (mu_s, var_s) in expectation; with K = 1 exactly.
    """
    k = config.components
    coeff = config.alpha_init if k > 1 else 0.0
    noise = torch.randn((k, source.mean.numel()), generator=generator, dtype=torch.float32)
    noise = noise.to(source.mean.device)
    spread = math.sqrt(coeff * k / (k - 1)) if k > 1 else 0.0
    means = source.mean + spread * source.var.sqrt() * noise
    variances = ((1 - coeff) * source.var).expand(k, -1).clone()
    return {"means": means, "vars": variances}


def assign(state: State, moments: Moments, hp: HParams) -> Tensor:
    """Soft assignment p [N, K] of each image to its stream's components, on means only."""
    components = moments.per_image(F.normalize(state["means"], dim=-1))  # [N, K, C]
    instance = F.normalize(moments.sample_mean, dim=-1)  # [N, C]
    cosine = torch.bmm(components, instance.unsqueeze(-1)).squeeze(-1)  # [N, K]
    return torch.softmax(cosine / moments.per_image(hp["tau"])[:, None].float(), dim=-1)


def norm_stats(
    state: State, moments: Moments, source: SourceStats, hp: HParams
) -> tuple[Tensor, Tensor]:
    """Per image: the moments of the K components with the image mixed into each."""
    p = assign(state, moments, hp).unsqueeze(-1)  # [N, K, 1]
    means = moments.per_image(state["means"])  # [N, K, C]
    variances = moments.per_image(state["vars"])
    mixed_mean = torch.lerp(means, moments.sample_mean.unsqueeze(1), p)
    mixed_var = torch.lerp(variances, moments.sample_var.unsqueeze(1), p)
    mean = mixed_mean.mean(1)
    # The spread form of the law of total variance: E[m^2] - E[m]^2 cancels in fp32.
    var = mixed_var.mean(1) + (mixed_mean - mean.unsqueeze(1)).square().mean(1)
    return mean, var


def update(state: State, moments: Moments, source: SourceStats, hp: HParams) -> State:
    """Move every component towards the images it explains, by lam / B times their weight."""
    p = assign(state, moments, hp)  # [N, K]
    weight = moments.segment_sum(p)  # [S, K]
    pulled_mean = moments.segment_sum(p.unsqueeze(-1) * moments.sample_mean.unsqueeze(1))
    pulled_var = moments.segment_sum(p.unsqueeze(-1) * moments.sample_var.unsqueeze(1))
    lam = 1 - (1 - source.momentum) ** (moments.images / hp["batch_size_max"])
    rate = (lam / moments.images).float()[:, None, None]
    weight = weight.unsqueeze(-1)
    return {
        "means": state["means"] + rate * (pulled_mean - weight * state["means"]),
        "vars": state["vars"] + rate * (pulled_var - weight * state["vars"]),
    }


ADAPTER = Adapter(
    "unmix_tns",
    UnMixTNSConfig,
    init_state,
    norm_stats,
    update,
    per_sample=True,
    structural=("components",),
    bounds={"vars": NONNEGATIVE},
)
