"""The per-model batcher: queued predictions coalesced into one engine forward.

Requests wait in a bounded asyncio queue (full: 429). The batcher takes the oldest ones, up to
``max_batch_size`` images or until ``max_delay`` has passed since the first, and runs them as one
``engine.forward`` on the model's engine thread: each request one stream segment, streams of any
adapter mixed. A stream appears at most once per forward: a second request of the same stream
waits for the next forward, ahead of anything queued after it. So per stream, requests are
applied in arrival order, and each request's result is exactly what the engine would give for
that request alone. A failed forward fails only its own requests and changes no state.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections import deque

import torch

from adapters import InvalidStateError
from adapters.pool import PoolFullError
from engine.core import StreamHandle
from service.errors import (
    CapacityError,
    DeadlineExceededError,
    ForwardError,
    IdempotencyKeyReusedError,
    InvalidTensorError,
    QueueFullError,
    UnavailableError,
)
from service.idempotency import Remembered
from service.metrics import Metrics, StreamSignal
from service.predictions import PredictRequest, PredictResult, TopK
from service.runtime import ModelRuntime
from service.streams import Resident, SafetyOutcome

logger = logging.getLogger(__name__)


class _Defer:
    """Marker: the request could not get a slot in this forward; it goes into the next."""


DEFER = _Defer()
Outcome = PredictResult | Exception | _Defer


class Batcher:
    """Coalesces one model's queued requests into forwards on its engine thread.

    Args:
        runtime: the model's runtime.
        max_batch_size: images per forward (a single larger request runs alone).
        max_delay_s: how long the first request of a batch waits for others.
        max_queue: queued requests before submit raises QueueFullError.
        sync: persist each adapted stream's new state before its request completes.
        metrics: the app's metrics.
    """

    def __init__(
        self,
        runtime: ModelRuntime,
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue: int,
        sync: bool,
        metrics: Metrics,
    ) -> None:
        self.runtime = runtime
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.sync = sync
        self.metrics = metrics
        self.queue: asyncio.Queue[PredictRequest | None] = asyncio.Queue(max_queue)
        self._carry: deque[PredictRequest] = deque()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        metrics.max_queue.labels(runtime.name).set(max_queue)
        metrics.queue_depth.labels(runtime.name).set_function(
            lambda: self.queue.qsize() + len(self._carry)
        )

    def start(self) -> None:
        """Start the batching task on the running loop."""
        self._task = asyncio.create_task(self._run(), name=f"batcher-{self.runtime.name}")

    async def stop(self) -> None:
        """Refuse new requests, finish the queued ones, and end the task."""
        self._closing = True
        # Wake a batcher waiting on an empty queue; a full one is busy and sees _closing later.
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(None)
        if self._task is not None:
            await self._task

    async def submit(self, request: PredictRequest) -> PredictResult:
        """Queue a request and wait for its result."""
        if self._closing:
            raise UnavailableError("the server is shutting down")
        request.enqueued = asyncio.get_running_loop().time()
        try:
            self.queue.put_nowait(request)
        except asyncio.QueueFull:
            raise QueueFullError(
                f"the request queue of model {self.runtime.name} is full "
                f"({self.queue.maxsize} requests); retry later"
            ) from None
        return await request.future

    # --- the loop ---

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            if batch is None:
                return
            if batch:
                await self._forward(batch)

    async def _next(self, timeout: float | None) -> PredictRequest | None:
        """The oldest pending request (deferred ones first); None on timeout or when drained."""
        if self._carry:
            return self._carry.popleft()
        while True:
            if self.queue.empty() and self._closing:
                return None
            if timeout is not None and timeout <= 0:
                if self.queue.empty():
                    return None
                item = self.queue.get_nowait()
            elif timeout is None:
                item = await self.queue.get()
            else:
                try:
                    item = await asyncio.wait_for(self.queue.get(), timeout)
                except TimeoutError:
                    return None
            if item is not None:
                return item

    def _usable(self, request: PredictRequest, now: float) -> bool:
        """False for a request cancelled by its client or past its deadline (failed here)."""
        if request.future.done():
            return False
        if now > request.deadline:
            request.future.set_exception(
                DeadlineExceededError(
                    f"the request waited longer than its deadline "
                    f"({request.deadline - request.enqueued:.3g} s) in the queue"
                )
            )
            return False
        return True

    async def _collect(self) -> list[PredictRequest] | None:
        """The next batch; None once closing and drained."""
        loop = asyncio.get_running_loop()
        first = await self._next(None)
        if first is None:
            return None
        if not self._usable(first, loop.time()):
            return []
        batch, streams, images = [first], {first.info.id}, first.count
        deferred: list[PredictRequest] = []
        close_at = loop.time() + self.max_delay_s
        while images < self.max_batch_size:
            request = await self._next(close_at - loop.time())
            if request is None:
                break
            if not self._usable(request, loop.time()):
                continue
            if request.info.id in streams:
                deferred.append(request)  # its stream is in this forward: next one
                continue
            if images + request.count > self.max_batch_size:
                deferred.append(request)
                break
            batch.append(request)
            streams.add(request.info.id)
            images += request.count
        # Deferred requests keep their place ahead of everything not yet looked at.
        self._carry.extendleft(reversed(deferred))
        return batch

    async def _forward(self, batch: list[PredictRequest]) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        model = self.runtime.name
        for request in batch:
            self.metrics.stage_latency.labels(model, "queue").observe(now - request.enqueued)
        started = time.perf_counter()
        try:
            outcomes = await self.runtime.call(run_batch, self.runtime, batch, self.sync)
        except Exception as error:  # the engine's failure: fail these requests, keep serving
            logger.exception("forward of %d requests failed", len(batch))
            self.metrics.forward_errors.labels(model).inc()
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(
                        ForwardError(f"the forward failed, no state changed: {error}")
                    )
            return
        self.metrics.stage_latency.labels(model, "forward").observe(time.perf_counter() - started)
        done = [r for r, o in zip(batch, outcomes, strict=True) if not isinstance(o, _Defer)]
        self.metrics.batch_requests.labels(model).observe(len(done))
        self.metrics.batch_images.labels(model).observe(sum(r.count for r in done))
        retry = []
        for request, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, _Defer):
                retry.append(request)
            elif request.future.done():
                continue
            elif isinstance(outcome, PredictResult):
                adapted = "true" if request.adapt else "false"
                self.metrics.images.labels(model, request.info.adapter, adapted).inc(request.count)
                request.future.set_result(outcome)
            else:
                request.future.set_exception(outcome)
        self._carry.extendleft(reversed(retry))


def run_batch(runtime: ModelRuntime, batch: list[PredictRequest], sync: bool) -> list[Outcome]:
    """Run one forward for ``batch`` (on the engine thread): every request's outcome, in order.

    Streams are loaded into slots first (streams of this batch are never evicted for each
    other); a request whose stream cannot get a slot now is deferred, one whose stream is gone
    fails alone, and so does one the engine refused (its new state would not have been finite
    or valid: InvalidStateError, the stream unchanged). An exception of the engine's forward
    propagates: the whole batch failed.
    """
    slots, engine = runtime.slots, runtime.engine
    pinned = frozenset(r.info.id for r in batch)
    outcomes: list[Outcome | None] = [None] * len(batch)
    ready = []
    scratch: list[StreamHandle] = []  # the stateless requests' states, closed after the forward
    for index, request in enumerate(batch):
        try:
            if request.stateless:
                handle = engine.open_stream(request.info.adapter, request.info.config, seed=0)
                scratch.append(handle)
                resident = Resident(request.info, handle)
            else:
                resident = slots.ensure(request.info, pinned)
        except CapacityError:
            outcomes[index] = DEFER
            continue
        except PoolFullError as error:  # scratch states free their slots after this forward
            outcomes[index] = DEFER if scratch else CapacityError(str(error))
            continue
        except Exception as error:  # this stream cannot be loaded: fail it alone, not the batch
            outcomes[index] = error
            continue
        if request.idempotency_key is not None:
            remembered = resident.requests.get(request.idempotency_key, time.time())
            if remembered is not None:
                outcomes[index] = _replay(runtime, request, remembered)
                continue
        ready.append((index, request, resident))
    try:
        return _run_ready(runtime, ready, outcomes, sync)
    finally:
        for handle in scratch:
            engine.close_stream(handle)


def _run_ready(
    runtime: ModelRuntime,
    ready: list[tuple[int, PredictRequest, Resident]],
    outcomes: list[Outcome | None],
    sync: bool,
) -> list[Outcome]:
    """The forward of the requests whose streams hold a slot; fills in their outcomes."""
    slots, engine = runtime.slots, runtime.engine
    if not ready:
        return [o if o is not None else DEFER for o in outcomes]
    # uint8 requests first, so their pixels cross to the device and are normalised in one piece.
    ready.sort(key=lambda item: item[1].images.normalized)
    parts = []
    pixels = [r.images.tensor for _, r, _ in ready if not r.images.normalized]
    if pixels:
        parts.append(runtime.normalizer(runtime.to_device(torch.cat(pixels))))
    inputs = [r.images.tensor for _, r, _ in ready if r.images.normalized]
    if inputs:
        parts.append(runtime.to_device(torch.cat(inputs)))
    x = parts[0] if len(parts) == 1 else torch.cat(parts)
    segments = [(resident.handle, request.count) for _, request, resident in ready]
    result = engine.forward(
        x,
        segments,
        adapt=[request.adapt for _, request, _ in ready],
        source=[request.source or request.info.feedback for _, request, _ in ready],
    )
    logits, source_logits = result.logits, result.source_logits
    k = min(max(r.top_k for _, r, _ in ready), engine.num_classes)
    top = _top_k(logits, k)
    source_top = _top_k(source_logits, k) if source_logits is not None else None
    source_classes = source_top[1] if source_top is not None else None
    logits_cpu = logits.cpu()
    refusals = result.refusals()  # the forward is over: reading its flags back waits no more
    # The observer changes only when a stream adapts: only then are its signals new. Every
    # protocol's requests go through here, so every stream's signals stay current.
    observed = [
        res.handle
        for (_, r, res), no in zip(ready, refusals, strict=True)
        if (r.adapt or r.drift) and not no
    ]
    summaries = iter(engine.drift_summaries(observed))
    now = time.time()
    source_offset = 0
    for start, (index, request, resident), refusal in zip(
        _starts(ready), ready, refusals, strict=True
    ):
        stop = start + request.count
        source_predictions = feedback_classes = None
        if source_classes is not None and (request.source or request.info.feedback):
            end = source_offset + request.count
            if request.source and source_top is not None:
                source_predictions = _slice(source_top, source_offset, end, request.top_k)
            feedback_classes = [row[0] for row in source_classes[source_offset:end]]
            source_offset = end
        if refusal is not None:
            outcomes[index] = InvalidStateError(refusal)
            continue
        summary = next(summaries) if request.adapt or request.drift else None
        if source_predictions is not None and not _finite(source_predictions):
            outcomes[index] = InvalidTensorError(
                "the unadapted model's probabilities for these inputs are not finite "
                "(the stream's state did adapt to them); send inputs within the model's range"
            )
            continue
        safety = None
        samples = resident.samples + (request.count if request.adapt else 0)
        if request.adapt:
            resident.samples = samples
            resident.signal = StreamSignal.of(summary or {}, now)
            resident.dirty = True
            reset = slots.after_adapt(resident, summary or {}, request.count)
            snapshots = [(s.samples, s.taken_at) for s in resident.snapshots]
            safety = SafetyOutcome(reset, resident.samples, resident.watch.resets, snapshots)
        answer = PredictResult(
            predictions=_slice(top, start, stop, request.top_k),
            source_predictions=source_predictions,
            logits=logits_cpu[start:stop],
            samples=samples,
            drift=summary if request.drift else None,
            signal=resident.signal,
            stored=None,
            adapted=request.adapt,
            source_classes=feedback_classes,
            safety=safety,
        )
        if request.idempotency_key is not None:  # stored with the state it made, in one write
            remembered = Remembered(request.fingerprint, answer.to_json(), now)
            resident.requests.put(request.idempotency_key, remembered)
        if request.adapt and sync:
            answer = dataclasses.replace(answer, stored=slots.persist(resident))
        outcomes[index] = answer
    return [o if o is not None else DEFER for o in outcomes]


def _replay(runtime: ModelRuntime, request: PredictRequest, remembered: Remembered) -> Outcome:
    """The first answer of a request sent again with its Idempotency-Key; nothing changes."""
    if remembered.fingerprint != request.fingerprint:
        return IdempotencyKeyReusedError(
            f"Idempotency-Key {request.idempotency_key!r} was used for a different request "
            "(other images or parameters) on this stream; use a new key for a new request"
        )
    runtime.slots.metrics.idempotent_replays.labels(runtime.name).inc()
    return PredictResult.replay(remembered.result, runtime.engine.num_classes)


def _finite(predictions: list[TopK]) -> bool:
    return all(math.isfinite(p) for top in predictions for p in top.probabilities)


def _starts(ready: list) -> list[int]:
    starts, offset = [], 0
    for _, request, _ in ready:
        starts.append(offset)
        offset += request.count
    return starts


def _top_k(logits: torch.Tensor, k: int) -> tuple[list[list[float]], list[list[int]]]:
    values, indices = logits.float().softmax(1).topk(k, dim=1)
    return values.cpu().tolist(), indices.cpu().tolist()


def _slice(
    top: tuple[list[list[float]], list[list[int]]], start: int, stop: int, k: int
) -> list[TopK]:
    values, indices = top
    return [TopK(indices[i][:k], values[i][:k]) for i in range(start, stop)]
