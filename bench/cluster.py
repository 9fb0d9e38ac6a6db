"""A local scale-out cluster: tta-serve processes on one Redis behind the nginx gateway.

Used by the gateway test (tests/service/test_gateway.py) and the scale-out benchmark
(bench/scaleout.py). Loopback only; every process is stopped on exit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from string import Template

import httpx

from tests.service.redis_server import free_port

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "deploy" / "nginx" / "tta-gateway.conf.template"


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
    count: int,
    redis_url: str,
    cache: Path,
    tmp: Path,
    *,
    durability: str = "sync",
    lease_ttl_s: float = 2.0,
    first: int = 0,
) -> Iterator[dict[str, tuple[str, subprocess.Popen[bytes]]]]:
    """``count`` tta-serve processes on one Redis, named r<first>...: {id: (URL, process)}."""
    processes: dict[str, subprocess.Popen[bytes]] = {}
    urls = {}
    try:
        for index in range(first, first + count):
            name, port = f"r{index}", free_port()
            env = {
                **os.environ,
                "TTA_PORT": str(port),
                "TTA_HOST": "127.0.0.1",
                "TTA_STORE": "redis",
                "TTA_REDIS_URL": redis_url,
                "TTA_DURABILITY": durability,
                "TTA_REPLICA_ID": name,
                "TTA_LEASE_TTL_S": str(lease_ttl_s),
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
        raise RuntimeError("nginx is not installed: apt-get install -y nginx (scripts/test does)")
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
