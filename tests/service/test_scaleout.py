"""Replicas sharing one Redis: one owner per stream, fenced and versioned writes, no lost update.

Real uvicorn servers and a real redis-server; leases are short (``lease_ttl_s``) so a stream
changes owner within a test. Waiting for a lease to lapse is a sleep before a request, never a
timed assertion: every check is on counts and states.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from service.stores import RedisStore, StoreConflictError, StreamRecord
from tests.service.helpers import post_pixels as send
from tests.service.helpers import random_pixels, running_server, server_settings, stored_samples
from tests.service.redis_server import running_redis

LEASE_S = 0.5


def lapse() -> None:
    """Wait until every lease taken so far has expired."""
    time.sleep(LEASE_S * 1.5)


def settings(tmp_path: Path, cache: Path, url: str, name: str, **extra: Any) -> Any:
    """A sync-durability replica named ``name`` on the shared Redis, with short leases."""
    values: dict[str, Any] = {"durability": "sync", "lease_ttl_s": LEASE_S}
    values.update(extra)
    return server_settings(
        tmp_path / name, cache, store="redis", redis_url=url, replica_id=name, **values
    )


def test_a_stale_replica_reloads_instead_of_overwriting(tmp_path: Path, model_cache: Path) -> None:
    """The issue's reproduction: a stream moves A -> B -> A -> B; every update is kept.

    Before fencing, B adapted from its stale resident copy and overwrote A's newer state.
    """
    with (
        running_redis() as url,
        running_server(settings(tmp_path, model_cache, url, "a")) as a_server,
        running_server(settings(tmp_path, model_cache, url, "b")) as b_server,
        a_server.client() as a,
        b_server.client() as b,
    ):
        assert a.post("/v1/streams", json={"id": "s", "adapter": "adabn"}).status_code == 201
        acknowledged = 0
        for step, (client, count) in enumerate(((a, 2), (b, 1), (a, 3), (b, 2), (a, 1))):
            lapse()  # the previous owner's lease lapses: the stream moves
            response = send(client, "s", random_pixels(count, step))
            assert response.status_code == 200, response.text
            acknowledged += count
            assert response.json()["samples"] == acknowledged
        assert stored_samples(url, "s") == acknowledged == 9
        assert a.get("/v1/streams/s").headers["x-served-by"] == "a"


def test_two_replicas_at_once_lose_no_update(tmp_path: Path, model_cache: Path) -> None:
    """Requests of one stream alternate between two replicas with live leases: the one that
    does not own the stream answers 409 with Retry-After and applies nothing."""
    with (
        running_redis() as url,
        running_server(settings(tmp_path, model_cache, url, "a", lease_ttl_s=30)) as a_server,
        running_server(settings(tmp_path, model_cache, url, "b", lease_ttl_s=30)) as b_server,
        a_server.client() as a,
        b_server.client() as b,
    ):
        assert b.post("/v1/streams", json={"id": "t", "adapter": "adabn"}).status_code == 201
        acknowledged, refused = 0, 0
        for step in range(8):
            response = send((a, b)[step % 2], "t", random_pixels(2, step))
            if response.status_code == 200:
                acknowledged += 2
            else:
                assert response.status_code == 409, response.text
                assert response.json()["error"]["code"] == "stream_conflict"
                assert int(response.headers["retry-after"]) >= 1
                refused += 1
        assert refused == 4  # every request sent to a, which does not own the stream
        assert stored_samples(url, "t") == acknowledged == 8
        # a can still read the stream's last stored state without taking it over
        assert a.get("/v1/streams/t/state").content == b.get("/v1/streams/t/state").content


def test_a_write_lost_after_the_forward_is_not_counted(tmp_path: Path, model_cache: Path) -> None:
    """A's lease vanishes from Redis (a failover lost it) while A still trusts its copy; B takes
    the stream and writes. A's next request is forwarded on the stale copy, its fenced write loses:
    409, and A lists the stream with the stored count, not with the lost request's images."""
    with (
        running_redis() as url,
        running_server(settings(tmp_path, model_cache, url, "a", lease_ttl_s=30)) as a_server,
        running_server(settings(tmp_path, model_cache, url, "b", lease_ttl_s=30)) as b_server,
        a_server.client() as a,
        b_server.client() as b,
    ):
        assert a.post("/v1/streams", json={"id": "u", "adapter": "adabn"}).status_code == 201
        assert send(a, "u", random_pixels(2, 0)).status_code == 200
        drop_lease(url, "u")
        assert send(b, "u", random_pixels(3, 1)).status_code == 200  # stored: 5
        lost = send(a, "u", random_pixels(4, 2))  # A's copy is at 2: its write is fenced
        assert lost.status_code == 409, lost.text
        assert stored_samples(url, "u") == 5
        assert a.get("/v1/streams/u").json()["samples"] == 5
        listed = {s["id"]: s["samples"] for s in a.get("/v1/streams").json()["data"]}
        assert listed["u"] == 5


def test_an_interval_flush_that_loses_is_not_counted(tmp_path: Path, model_cache: Path) -> None:
    """The same under durability=interval: A acknowledged 4 images on its stale copy; its flush
    is fenced (those updates are lost, as docs/scaling.md says) and A lists the stored count."""
    interval = {"durability": "interval", "flush_interval_s": 0.2, "lease_ttl_s": 30}
    with (
        running_redis() as url,
        running_server(settings(tmp_path, model_cache, url, "a", **interval)) as a_server,
        running_server(settings(tmp_path, model_cache, url, "b", lease_ttl_s=30)) as b_server,
        a_server.client() as a,
        b_server.client() as b,
    ):
        assert a.post("/v1/streams", json={"id": "v", "adapter": "adabn"}).status_code == 201
        assert send(a, "v", random_pixels(2, 0)).status_code == 200
        wait_until(lambda: stored_samples(url, "v") == 2)  # A's flush wrote it
        drop_lease(url, "v")
        assert send(b, "v", random_pixels(3, 1)).status_code == 200  # stored: 5
        assert send(a, "v", random_pixels(4, 2)).json()["samples"] == 6  # acknowledged, stale
        wait_until(lambda: a.get("/v1/streams/v").json()["samples"] == 5)
        assert stored_samples(url, "v") == 5


def drop_lease(url: str, stream_id: str) -> None:
    """Delete a stream's lease behind its owner's back, as a Redis failover can."""
    client = redis.Redis.from_url(url)
    try:
        assert client.delete(f"tta:lease:{{{stream_id}}}") == 1
    finally:
        client.close()


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail if it does not within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.05)


def record(samples_marker: bytes, version: int) -> StreamRecord:
    """A minimal record of stream ``f``, its state a marker."""
    return StreamRecord(
        id="f",
        model="m",
        adapter="adabn",
        config={},
        seed=0,
        created_at=1.0,
        ttl_seconds=None,
        state=samples_marker,
        version=version,
    )


def test_a_paused_replica_is_fenced_after_it_resumes() -> None:
    """A replica that stalls past its lease (GC, SIGSTOP, partition) cannot write on resuming,
    neither over the newer owner's state nor before the newer owner's first write."""
    with running_redis() as url:
        a = RedisStore(url, replica_id="a", lease_ttl_s=0.2)
        b = RedisStore(url, replica_id="b", lease_ttl_s=0.2)
        try:
            first = a.acquire("f")
            a.put(record(b"a1", 1), first.token)
            a.put(record(b"a1", 1), first.token)  # a retried write that was applied succeeds
            with pytest.raises(StoreConflictError):
                b.acquire("f")  # a's lease is live
            time.sleep(0.3)  # a is "paused" past its lease
            second = b.acquire("f")
            assert second.token > first.token and second.version == 1
            with pytest.raises(StoreConflictError):  # b took over, has not written yet
                a.put(record(b"a2", 2), first.token)
            b.put(record(b"b2", 2), second.token)
            with pytest.raises(StoreConflictError):  # b wrote: a's copy is stale too
                a.put(record(b"a3", 3), first.token)
            with pytest.raises(StoreConflictError):  # a version not past the stored one
                b.put(record(b"old", 1), second.token)
            stored = b.get("f")
            assert stored is not None and stored.state == b"b2" and stored.version == 2
            with pytest.raises(StoreConflictError):
                a.acquire("f")  # b's lease is live
            b.release("f", second.token)
            assert a.acquire("f").token > second.token
        finally:
            a.close()
            b.close()
