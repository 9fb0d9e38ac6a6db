"""The stream registry's lifecycle under interleavings the HTTP tests cannot pin down.

The registry runs on the event loop and hands work to each model's engine thread; a coroutine
that awaits that thread lets others run. These tests stop the engine thread at that point (a
runtime whose `call` waits for a gate) and check what another request sees meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from service.errors import StreamNotFoundError
from service.metrics import Metrics
from service.stores import MemoryStore, StreamInfo
from service.streams import StoreWriter, StreamEntry, StreamRegistry

INFO = StreamInfo(
    id="brief",
    model="m",
    adapter="adabn",
    config={},
    seed=1,
    created_at=0.0,
    ttl_seconds=None,
)


class GatedRuntime:
    """A model runtime whose engine thread does nothing until the test opens the gate."""

    def __init__(self) -> None:
        self.slots = SimpleNamespace()  # the registry hands its limits to the slots
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        self.entered.set()
        await self.gate.wait()
        return None, None  # what `discard` returns for a stream without a slot


def test_a_stream_being_deleted_is_not_found_in_the_store_again() -> None:
    """While a deletion waits for the engine thread, the store still holds the stream: a
    lookup must not register it again (it came back, and a TTL expired it a second time)."""
    asyncio.run(delete_while_looking_up())


async def delete_while_looking_up() -> None:
    metrics = Metrics()
    store = MemoryStore()
    store.put(INFO.record(b"state"))
    runtime = GatedRuntime()
    writer = StoreWriter(store, metrics)
    registry: StreamRegistry[Any] = StreamRegistry(
        {"m": runtime}, writer, sync=True, default_ttl_s=None, metrics=metrics
    )
    registry.entries[INFO.id] = StreamEntry(INFO)
    deleting = asyncio.create_task(registry.delete(INFO.id))
    await runtime.entered.wait()
    with pytest.raises(StreamNotFoundError):
        await registry.find(INFO.id)
    runtime.gate.set()
    await deleting
    assert INFO.id not in registry.entries and store.get(INFO.id) is None
    writer.close()
