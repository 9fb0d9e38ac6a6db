"""The batcher in-process: queue bound (429), deadlines (504), shutdown (503), failed forwards."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from models import get_spec
from service.errors import DeadlineExceededError, ForwardError, QueueFullError, UnavailableError
from service.imaging import ImageBatch
from service.metrics import Metrics
from service.predictions import PredictRequest
from service.runtime import ModelRuntime
from service.scheduler import Batcher
from service.stores import MemoryStore
from service.streams import StoreWriter, StreamInfo
from tests.service.helpers import MODEL, reference_engine


def make_runtime(model_cache: Path) -> ModelRuntime:
    metrics = Metrics()
    writer = StoreWriter(MemoryStore(), metrics)
    return ModelRuntime(reference_engine(model_cache), get_spec(MODEL), writer, 8, metrics)


async def open_stream(runtime: ModelRuntime, stream_id: str) -> StreamInfo:
    info = StreamInfo(stream_id, MODEL, "adabn", {}, -1, 0.0, None)
    resident = await runtime.call(runtime.slots.open, info)
    return resident.info


def images(count: int = 2) -> ImageBatch:
    return ImageBatch(torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8))


def batcher(runtime: ModelRuntime, max_queue: int = 8) -> Batcher:
    return Batcher(
        runtime,
        max_batch_size=64,
        max_delay_s=0.001,
        max_queue=max_queue,
        sync=False,
        metrics=runtime.slots.metrics,
    )


def test_full_queue_is_refused(model_cache: Path) -> None:
    async def scenario() -> None:
        runtime = make_runtime(model_cache)
        info = await open_stream(runtime, "q")
        queue = batcher(runtime, max_queue=1)  # not started: nothing drains the queue
        first = asyncio.create_task(queue.submit(PredictRequest(info, images())))
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError) as error:
            await queue.submit(PredictRequest(info, images()))
        assert error.value.status == 429 and error.value.headers == {"Retry-After": "1"}
        assert "full (1 requests)" in error.value.message
        queue.start()
        assert (await first).samples == 2
        await queue.stop()

    asyncio.run(scenario())


def test_expired_request_is_not_run(model_cache: Path) -> None:
    async def scenario() -> None:
        runtime = make_runtime(model_cache)
        info = await open_stream(runtime, "late")
        before = await runtime.call(runtime.slots.export, runtime.slots.resident["late"])
        queue = batcher(runtime)
        loop = asyncio.get_running_loop()
        late = PredictRequest(info, images(), deadline=loop.time() - 1)
        task = asyncio.create_task(queue.submit(late))
        await asyncio.sleep(0)
        queue.start()
        with pytest.raises(DeadlineExceededError):
            await task
        after = await runtime.call(runtime.slots.export, runtime.slots.resident["late"])
        assert after == before
        await queue.stop()

    asyncio.run(scenario())


def test_stopping_drains_then_refuses(model_cache: Path) -> None:
    async def scenario() -> None:
        runtime = make_runtime(model_cache)
        info = await open_stream(runtime, "drain")
        queue = batcher(runtime)
        tasks = [
            asyncio.create_task(queue.submit(PredictRequest(info, images(1)))) for _ in range(3)
        ]
        await asyncio.sleep(0)
        queue.start()
        await queue.stop()
        assert sorted([(await t).samples for t in tasks]) == [1, 2, 3]
        with pytest.raises(UnavailableError) as error:
            await queue.submit(PredictRequest(info, images()))
        assert error.value.status == 503 and error.value.headers == {"Retry-After": "1"}

    asyncio.run(scenario())


def test_failed_forward_fails_its_requests_and_changes_nothing(
    model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        runtime = make_runtime(model_cache)
        info = await open_stream(runtime, "boom")
        before = await runtime.call(runtime.slots.export, runtime.slots.resident["boom"])
        original = runtime.engine.network.model.forward

        def explode(x: torch.Tensor) -> torch.Tensor:
            original(x)  # the norm layers stage new statistics, then the forward fails
            raise RuntimeError("CUDA error: out of memory")

        monkeypatch.setattr(runtime.engine.network.model, "forward", explode)
        queue = batcher(runtime)
        queue.start()
        with pytest.raises(ForwardError) as error:
            await queue.submit(PredictRequest(info, images()))
        assert error.value.message == (
            "the forward failed, no state changed: CUDA error: out of memory"
        )
        after = await runtime.call(runtime.slots.export, runtime.slots.resident["boom"])
        assert after == before
        monkeypatch.undo()
        assert (await queue.submit(PredictRequest(info, images()))).samples == 2
        await queue.stop()

    asyncio.run(scenario())
