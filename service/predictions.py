"""What a prediction request is and what it gets back: the data the API and the batcher share."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from service.imaging import ImageBatch
from service.metrics import StreamSignal
from service.stores import StreamInfo


@dataclass(frozen=True)
class TopK:
    """The ``k`` most probable classes of one image, most probable first."""

    classes: list[int]
    probabilities: list[float]


@dataclass(frozen=True)
class PredictResult:
    """What a prediction request gets back from its forward."""

    predictions: list[TopK]
    source_predictions: list[TopK] | None
    logits: torch.Tensor  # [N, C] float32, CPU
    samples: int
    drift: dict[str, Any] | None  # the drift summary, when the request asked for it
    signal: StreamSignal | None  # the stream's signals after the forward (for the metrics)
    stored: Future[None] | None  # the sync-durability write of the new state, if any


@dataclass(eq=False)
class PredictRequest:
    """One request in the queue: a stream's images and what to do with them."""

    info: StreamInfo
    images: ImageBatch
    adapt: bool = True
    source: bool = False
    top_k: int = 5
    drift: bool = True  # compute the stream's drift summary after the forward
    # No stream: normalised by a scratch state of info's (stateless) adapter, opened for this
    # forward and closed after it; info is not registered anywhere.
    stateless: bool = False
    deadline: float = float("inf")  # event-loop time
    enqueued: float = 0.0
    future: asyncio.Future[PredictResult] = field(default_factory=lambda: _new_future())

    @property
    def count(self) -> int:
        """Images in the request."""
        return self.images.count


def _new_future() -> asyncio.Future[PredictResult]:
    return asyncio.get_running_loop().create_future()
