"""Test-time batch normalisation (TBN): each call normalised with its own batch statistics.

Schneider et al., "Improving robustness against common corruptions by covariate shift
adaptation" (NeurIPS 2020); Nado et al., "Evaluating prediction-time batch normalization" (2020).
The baseline of the test-time adaptation literature: mean and biased variance of the stream's
images in this call (over N*H*W), no state. It fails on small N (N = 1 is instance normalisation)
and on label-correlated streams (ALGORITHMS.md section 2).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from torch import Tensor

from adapters.base import Adapter, HParams, Moments, SourceStats, State, no_state, no_update


class TBNConfig(BaseModel):
    """No hyperparameters."""

    model_config = ConfigDict(extra="forbid")


def norm_stats(
    state: State, moments: Moments, source: SourceStats, hp: HParams
) -> tuple[Tensor, Tensor]:
    """The batch statistics of each stream's segment."""
    return moments.mean, moments.var


ADAPTER = Adapter("tbn", TBNConfig, no_state, norm_stats, no_update)
