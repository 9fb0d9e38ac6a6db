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
from service.streams import SafetyOutcome


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
    adapted: bool = True  # whether the stream's state was updated (not when frozen)
    source_classes: list[int] | None = None  # the source model's classes (feedback on)
    safety: SafetyOutcome | None = None  # what the safety checks did after an adapted forward
    replayed: bool = False  # the answer of an earlier request with the same Idempotency-Key
    request_id: str = ""  # names the request in label feedback (set by the API)

    def to_json(self) -> dict[str, Any]:
        """What a retry with the same Idempotency-Key gets back (no logits: it needs top-k)."""
        return {
            "predictions": [[t.classes, t.probabilities] for t in self.predictions],
            "source_predictions": (
                None
                if self.source_predictions is None
                else [[t.classes, t.probabilities] for t in self.source_predictions]
            ),
            "samples": self.samples,
            "drift": self.drift,
            "adapted": self.adapted,
        }

    @classmethod
    def replay(cls, values: dict[str, Any], num_classes: int) -> PredictResult:
        """The result stored by :meth:`to_json`, marked as replayed."""

        def tops(rows: list[list[list[Any]]] | None) -> list[TopK] | None:
            return None if rows is None else [TopK(list(c), list(p)) for c, p in rows]

        return cls(
            predictions=tops(values["predictions"]) or [],
            source_predictions=tops(values.get("source_predictions")),
            logits=torch.empty(0, num_classes),
            samples=int(values["samples"]),
            drift=values.get("drift"),
            signal=None,
            stored=None,
            adapted=bool(values.get("adapted", True)),
            replayed=True,
        )


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
    idempotency_key: str | None = None
    fingerprint: str = ""  # of the request, to tell a retry from a reused key
    deadline: float = float("inf")  # event-loop time
    enqueued: float = 0.0
    future: asyncio.Future[PredictResult] = field(default_factory=lambda: _new_future())

    @property
    def count(self) -> int:
        """Images in the request."""
        return self.images.count


def _new_future() -> asyncio.Future[PredictResult]:
    return asyncio.get_running_loop().create_future()
