"""The nginx gateway of deploy/nginx in front of three real tta-serve processes on one Redis.

Slow (three processes load the model): run by CI. nginx and redis-server are the Debian
packages (scripts/test installs them); a missing binary fails the test, never skips it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from string import Template

import httpx
import pytest

from tests.service.helpers import post_pixels as send
from tests.service.helpers import random_pixels, stored_samples
from tests.service.redis_server import free_port, running_redis

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "deploy" / "nginx" / "tta-gateway.conf.template"
LEASE_S = 2.0
RETRYABLE = {409, 502, 503, 504}


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    """Until ``url``/v2/health/ready answers 200 (the replica loaded its model)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the process behind {url} exited"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise AssertionError(f"{url} was not ready within {timeout_s} s")


@contextlib.contextmanager
def replicas(
    count: int, redis_url: str, cache: Path, tmp: Path
) -> Iterator[dict[str, tuple[str, subprocess.Popen[bytes]]]]:
    """``count`` tta-serve processes (durability=sync) on one Redis: {id: (URL, process)}."""
    processes: dict[str, subprocess.Popen[bytes]] = {}
    urls = {}
    try:
        for index in range(count):
            name, port = f"r{index}", free_port()
            env = {
                **os.environ,
                "TTA_PORT": str(port),
                "TTA_HOST": "127.0.0.1",
                "TTA_STORE": "redis",
                "TTA_REDIS_URL": redis_url,
                "TTA_DURABILITY": "sync",
                "TTA_REPLICA_ID": name,
                "TTA_LEASE_TTL_S": str(LEASE_S),
                "TTA_MODEL_CACHE_DIR": str(cache),
                "TTA_DATA_DIR": str(tmp / name),
                "TTA_MAX_DELAY_MS": "2",
                "TTA_LOG_LEVEL": "warning",
            }
            processes[name] = subprocess.Popen(
                [sys.executable, "-c", "from service.main import main; main()"], env=env
            )
            urls[name] = f"http://127.0.0.1:{port}"
        for name, url in urls.items():
            wait_ready(url, processes[name])
        yield {name: (url, processes[name]) for name, url in urls.items()}
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.terminate()
        for process in processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


@contextlib.contextmanager
def gateway(upstreams: list[str], tmp: Path) -> Iterator[str]:
    """nginx with deploy/nginx's config in front of ``upstreams``; yields its URL."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        pytest.fail("nginx is not installed: apt-get install -y nginx (scripts/test does)")
    prefix = tmp / "nginx"
    prefix.mkdir()
    port = free_port()
    servers = "\n        ".join(
        f"server {u.removeprefix('http://')} max_fails=1 fail_timeout=10s;" for u in upstreams
    )
    config = prefix / "nginx.conf"
    config.write_text(
        Template(TEMPLATE.read_text()).safe_substitute(
            TTA_GATEWAY_LISTEN=f"127.0.0.1:{port}",
            TTA_GATEWAY_PREFIX=str(prefix),
            TTA_UPSTREAM_SERVERS=servers,
        )
    )
    process = subprocess.Popen(
        [binary, "-p", str(prefix), "-c", str(config), "-g", "daemon off;"],
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 10
        while True:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(f"{url}/v2/health/live", timeout=1)
                break
            assert time.monotonic() < deadline, "nginx did not answer"
            time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


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
