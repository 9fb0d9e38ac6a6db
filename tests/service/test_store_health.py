"""Readiness follows the state store; a store down at start-up is waited for; a crash's temp
files are removed. Real servers, a real redis-server, a real ``tta-serve`` process."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.health import StoreHealth
from service.stores import MemoryStore, StoreError
from tests.service.helpers import png, random_pixels, running_server, server_settings
from tests.service.redis_server import free_port, running_redis

WAIT_S = 30.0  # a bound against hanging, never a speed assertion


def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` until it holds (fail after WAIT_S)."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {WAIT_S} s: {what}")
        time.sleep(0.05)


def status(client: httpx.Client, path: str) -> int:
    return client.get(path).status_code


def gauge(client: httpx.Client, name: str) -> float:
    """The value of an unlabelled gauge of /metrics."""
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name == name:
            return family.samples[0].value
    raise KeyError(name)


def predict(client: httpx.Client, stream_id: str) -> httpx.Response:
    files = [("images", ("x.png", png(a), "image/png")) for a in random_pixels(2, 3)]
    return client.post(f"/v1/streams/{stream_id}/predict", files=files)


def test_redis_late_at_start_up_then_down_then_back(tmp_path: Path, model_cache: Path) -> None:
    """Redis down at start: live, not ready, 503 on the API; Redis up: ready and serving;
    Redis stopped: not ready; Redis back: ready again."""
    port = free_port()
    settings = server_settings(
        tmp_path,
        model_cache,
        store="redis",
        redis_url=f"redis://127.0.0.1:{port}/0",
        store_connect_timeout_s=120.0,
    )
    with running_server(settings) as server, server.client() as client:
        assert client.get("/v2/health/live").json() == {"live": True}
        ready = client.get("/v2/health/ready")
        assert (ready.status_code, ready.content) == (400, b"")  # the protocol's "false"
        assert (gauge(client, "tta_ready"), gauge(client, "tta_store_up")) == (0, 0)
        response = client.get("/v1/streams")
        assert response.status_code == 503
        assert response.json()["error"]["message"] == (
            "the server is starting: waiting for the state store to answer"
        )
        with running_redis(port):
            wait_for(lambda: status(client, "/v2/health/ready") == 200, "ready once Redis is up")
            assert client.post("/v1/streams", json={"id": "late"}).status_code == 201
            assert predict(client, "late").status_code == 200
            assert (gauge(client, "tta_ready"), gauge(client, "tta_store_up")) == (1, 1)
        # Redis stopped: the next ping (at most a second later) makes the server not ready.
        wait_for(lambda: status(client, "/v2/health/ready") == 400, "not ready without Redis")
        assert gauge(client, "tta_ready") == 0  # as the probe answered
        assert status(client, "/v2/health/live") == 200
        with running_redis(port):
            wait_for(lambda: status(client, "/v2/health/ready") == 200, "ready with Redis back")
            assert gauge(client, "tta_ready") == 1


def test_store_never_answering_fails_the_start(tmp_path: Path, model_cache: Path) -> None:
    """Past store_connect_timeout_s the start-up fails: live and ready 400, the API says why."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    settings = server_settings(
        tmp_path, model_cache, store="redis", redis_url=url, store_connect_timeout_s=0.5
    )
    with running_server(settings) as server, server.client() as client:
        wait_for(lambda: status(client, "/v2/health/live") == 400, "start-up failure")
        assert client.get("/v2/health/ready").status_code == 400
        message = client.get("/v1/streams").json()["error"]["message"]
        assert message.startswith(
            "the server failed to start: the state store did not answer within 0.5 s: "
            f"Redis at {url} is not reachable"
        ), message


def test_tta_serve_exits_when_the_store_never_answers(tmp_path: Path, model_cache: Path) -> None:
    """The entry point exits with status 1 once it gives up on the store."""
    env = {
        **os.environ,
        "TTA_PORT": str(free_port()),
        "TTA_STORE": "redis",
        "TTA_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "TTA_STORE_CONNECT_TIMEOUT_S": "0.5",
        "TTA_MODEL_CACHE_DIR": str(model_cache),
        "TTA_DATA_DIR": str(tmp_path),
        "TTA_LOG_LEVEL": "warning",
    }
    process = subprocess.run(
        [sys.executable, "-m", "service.main"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert process.returncode == 1, process.stderr
    assert "the state store did not answer within 0.5 s" in process.stderr


def test_without_retry_the_start_up_fails_at_once(tmp_path: Path, model_cache: Path) -> None:
    """store_connect_timeout_s=0 keeps the old behaviour: the lifespan raises the StoreError."""
    from service.main import create_app

    url = f"redis://127.0.0.1:{free_port()}/0"
    app = create_app(
        server_settings(tmp_path, model_cache, store="redis", redis_url=url,
                        store_connect_timeout_s=0)
    )  # fmt: skip

    async def start() -> None:
        async with app.router.lifespan_context(app):
            pass

    with pytest.raises(StoreError, match="is not reachable"):
        asyncio.run(start())


class CountingStore(MemoryStore):
    """A memory store that counts its pings and can be made to fail them."""

    def __init__(self) -> None:
        super().__init__()
        self.pings = 0
        self.down = False

    def ping(self) -> None:
        self.pings += 1
        if self.down:
            raise StoreError("down")


def test_store_health_pings_at_most_once_per_second() -> None:
    store, now = CountingStore(), [100.0]
    health = StoreHealth(store, cache_s=1.0, clock=lambda: now[0])

    async def probes(count: int) -> list[bool]:
        return list(await asyncio.gather(*(health.reachable() for _ in range(count))))

    async def scenario() -> None:
        assert await probes(50) == [True] * 50 and store.pings == 1
        store.down = True
        now[0] += 0.9
        assert await probes(5) == [True] * 5 and store.pings == 1  # the cached answer
        now[0] += 0.2
        assert await probes(5) == [False] * 5 and store.pings == 2

    asyncio.run(scenario())


def test_crash_temp_files_are_removed_at_start_up(tmp_path: Path, model_cache: Path) -> None:
    """Temp files left by a crash between write and rename are removed when the server opens
    its directory; the streams stay."""
    settings = server_settings(tmp_path, model_cache)
    with running_server(settings) as server, server.client() as client:
        assert client.post("/v1/streams", json={"id": "kept"}).status_code == 201
    directory = tmp_path / "streams"
    leftovers = [directory / ".tmp-crash1", directory / ".tmp-crash2"]
    for path in leftovers:
        path.write_bytes(b"half a record")
    with running_server(settings) as server, server.client() as client:
        assert not any(path.exists() for path in leftovers)
        assert [s["id"] for s in client.get("/v1/streams").json()["data"]] == ["kept"]
        assert not [p for p in directory.iterdir() if p.name.startswith(".tmp-")]
