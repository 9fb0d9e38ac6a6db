"""alpha-BN: a fixed convex mix of source and current-batch statistics.

You, Li, Zhao, "Test-time Batch Statistics Calibration for Covariate Shift" (arXiv 2110.04065).
m = (1 - alpha) mu_s + alpha mu_B and v = (1 - alpha) var_s + alpha var_B, mixed linearly (no
(mu_B - mu_s)^2 term). ``alpha`` weighs the *test* side, as in TTA-LIB's AlphaBatchNorm (default
0.1, i.e. 90 % source): alpha = 0 is the source model, alpha = 1 is TBN. Stateless.

Biased vs unbiased (ALGORITHMS.md 4.1): TTA-LIB takes the test variance from an inner
``BatchNorm2d`` and so mixes the *unbiased* batch variance (x NL / (NL - 1)). We default to the
biased variance BN normalises with (alpha = 1 is then exactly TBN) and offer ``unbiased=True`` to
reproduce TTA-LIB.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from adapters.base import (
    Adapter,
    HParams,
    Moments,
    SourceStats,
    State,
    linear_mix,
    no_state,
    no_update,
)


class AlphaBNConfig(BaseModel):
    """The test-side weight and the variance convention."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(0.1, ge=0, le=1, description="weight of the test batch statistics")
    unbiased: bool = Field(False, description="mix the unbiased batch variance, as TTA-LIB does")


def norm_stats(
    state: State, moments: Moments, source: SourceStats, hp: HParams
) -> tuple[Tensor, Tensor]:
    """Source and batch statistics mixed with weight alpha on the batch."""
    values = moments.images * moments.pixels
    correction = (values / (values - 1).clamp(min=1)) ** hp["unbiased"]
    return linear_mix(hp["alpha"], moments.mean, moments.var * correction[:, None], source)


ADAPTER = Adapter("alpha_bn", AlphaBNConfig, no_state, norm_stats, no_update)
