"""The nginx gateway of deploy/nginx in front of three real tta-serve processes on one Redis.

Slow (three processes load the model): run by CI. nginx and redis-server are the Debian
packages (scripts/test installs them); a missing binary fails the test, never skips it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from bench.cluster import gateway, replicas
from tests.service.helpers import post_pixels as send
from tests.service.helpers import random_pixels, stored_samples
from tests.service.redis_server import running_redis

RETRYABLE = {409, 502, 503, 504}


def predict_until_ok(client: httpx.Client, stream_id: str, count: int, seed: int) -> str:
    """Send until acknowledged (retrying 409/502/503 as a client does); the replica's id."""
    deadline = time.monotonic() + 60
    while True:
        response = send(client, stream_id, random_pixels(count, seed))
        if response.status_code == 200:
            return response.headers["x-served-by"]
        assert response.status_code in RETRYABLE, response.text
        assert time.monotonic() < deadline, f"stream {stream_id} never moved: {response.text}"
        time.sleep(0.2)


@pytest.mark.slow
def test_gateway_routes_by_stream_and_a_killed_replica_loses_nothing(
    tmp_path: Path, model_cache: Path
) -> None:
    streams = [f"cam-{i}" for i in range(6)]
    acknowledged = dict.fromkeys(streams, 0)
    with (
        running_redis() as redis_url,
        replicas(3, redis_url, model_cache, tmp_path) as running,
        gateway([u for u, _ in running.values()], tmp_path) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        owner = {}
        for sid in streams:
            created = client.post(
                "/v1/streams", json={"id": sid, "adapter": "adabn"}, headers={"X-Stream-Id": sid}
            )
            assert created.status_code == 201, created.text
            owner[sid] = created.headers["x-served-by"]
        assert len(set(owner.values())) >= 2  # six streams spread over the ring
        for step in range(3):  # interleaved: every stream, round after round
            for sid in streams:
                assert predict_until_ok(client, sid, 2, step) == owner[sid]
                acknowledged[sid] += 2
        victim = streams[0]
        os.kill(running[owner[victim]][1].pid, signal.SIGKILL)  # kill -9, mid-stream
        for step in range(3, 6):
            for sid in streams:
                served = predict_until_ok(client, sid, 2, step)
                acknowledged[sid] += 2
                if owner[sid] == owner[victim]:
                    assert served != owner[victim]
                else:
                    assert served == owner[sid]  # the others did not move
        for sid in streams:
            body = client.get(f"/v1/streams/{sid}").json()
            assert body["samples"] == acknowledged[sid] == 12
            assert stored_samples(redis_url, sid) == acknowledged[sid]

        # one stream forced onto two live replicas at once, bypassing the gateway
        alive = [u for name, (u, _) in running.items() if name != owner[victim]]
        with (
            httpx.Client(base_url=alive[0], timeout=60) as first,
            httpx.Client(base_url=alive[1], timeout=60) as second,
        ):
            assert first.post("/v1/streams", json={"id": "both"}).status_code == 201
            count = 0
            for step in range(10):
                response = send((first, second)[step % 2], "both", random_pixels(1, step))
                assert response.status_code in (200, 409), response.text
                count += response.status_code == 200
        assert count >= 5 and stored_samples(redis_url, "both") == count
