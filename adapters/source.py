"""Source: the unadapted model (the baseline every adapter is measured against).

Every image is normalised with the checkpoint's running statistics, exactly as the eval-mode model
does. The stream still keeps its drift-observer state, so source streams can be monitored.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from torch import Tensor

from adapters.base import Adapter, HParams, Moments, SourceStats, State, no_state, no_update


class SourceConfig(BaseModel):
    """No hyperparameters."""

    model_config = ConfigDict(extra="forbid")


def norm_stats(
    state: State, moments: Moments, source: SourceStats, hp: HParams
) -> tuple[Tensor, Tensor]:
    """The source statistics for every stream."""
    streams = moments.mean.shape[0]
    return source.mean.double().expand(streams, -1), source.var.double().expand(streams, -1)


ADAPTER = Adapter("source", SourceConfig, no_state, norm_stats, no_update)
