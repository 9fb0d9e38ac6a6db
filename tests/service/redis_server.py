"""A real, throwaway `redis-server` on a free loopback port, for tests of the Redis state store.

No fake Redis: the tests talk to the Debian `redis-server` binary. When it is not installed the
tests that need it fail (never skip) with `RedisServerUnavailable`, whose message says how to
install it; CI installs the package.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
_START_ATTEMPTS = 3


class RedisServerUnavailable(RuntimeError):
    """redis-server is not installed, or did not start."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the server by its PID: SIGTERM, wait, SIGKILL if it does not exit in time."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT_S)


def _wait_for_ping(process: subprocess.Popen[bytes], url: str) -> bool:
    """True once the server answers PING; False if the process exited (e.g. port taken)."""
    client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return False
            with contextlib.suppress(redis.RedisError):
                if client.ping():
                    return True
            time.sleep(0.02)
    finally:
        client.close()
    raise RedisServerUnavailable(f"redis-server did not answer PING within {START_TIMEOUT_S} s")


def _binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisServerUnavailable(
            "redis-server not found on PATH: the Redis state store tests need a real server; "
            "install the Debian package with `apt-get install -y redis-server`"
        )
    return binary


@contextlib.contextmanager
def _server(workdir: Path, port: int | None, *extra: str) -> Iterator[str]:
    """One redis-server process in ``workdir``; yields its URL, stops it on exit."""
    log_path = workdir / f"redis-{port or 'any'}.log"
    for _ in range(_START_ATTEMPTS if port is None else 1):
        chosen = port or free_port()
        url = f"redis://127.0.0.1:{chosen}/0"
        command = [
            _binary(),
            "--port", str(chosen),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(workdir),
            "--logfile", str(log_path),
            *extra,
        ]  # fmt: skip
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            if _wait_for_ping(process, url):
                yield url
                return
        finally:
            _stop(process)
    log = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
    raise RedisServerUnavailable(
        f"redis-server did not start after {_START_ATTEMPTS} attempts; log tail:\n{log}"
    )


@contextlib.contextmanager
def running_redis(port: int | None = None) -> Iterator[str]:
    """Run a fresh redis-server on a free loopback port, yield its URL, stop it on exit.

    No persistence (`--save ""`, no AOF); its working directory is a temp directory removed on
    exit. A port taken between choosing and binding is retried on another port; with `port`
    given (a server that starts late, or again, where a client already points) only that one.

    Example:
        >>> with running_redis() as url:  # doctest: +SKIP
        ...     store = RedisStore(url)
    """
    with (
        tempfile.TemporaryDirectory(prefix="tta-redis-") as workdir,
        _server(Path(workdir), port) as url,
    ):
        yield url


@contextlib.contextmanager
def running_redis_cluster(nodes: int = 3) -> Iterator[str]:
    """Run a throwaway Redis Cluster of ``nodes`` primaries (no replicas) on loopback ports.

    Each node is a real redis-server with `--cluster-enabled yes`; `redis-cli --cluster create`
    splits the 16,384 slots between them. Yields the URL of the first node (a cluster client
    discovers the others from it).
    """
    cli = shutil.which("redis-cli")
    if cli is None:
        raise RedisServerUnavailable("redis-cli not found: install the Debian package redis-tools")
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tta-cluster-")))
        urls = []
        for index in range(nodes):
            node_dir = workdir / str(index)
            node_dir.mkdir()
            urls.append(
                stack.enter_context(
                    _server(node_dir, None, "--cluster-enabled", "yes",
                            "--cluster-node-timeout", "2000")
                )
            )  # fmt: skip
        addresses = [url.removeprefix("redis://").removesuffix("/0") for url in urls]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        _wait_for_cluster(urls)
        yield urls[0]


def _wait_for_cluster(urls: list[str]) -> None:
    """Wait until every node reports `cluster_state:ok` (slots assigned and agreed on)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    for url in urls:
        client = redis.Redis.from_url(url, socket_timeout=0.5)
        try:
            while client.cluster("info").get("cluster_state") != "ok":
                if time.monotonic() > deadline:
                    raise RedisServerUnavailable(f"the Redis Cluster at {url} did not become ok")
                time.sleep(0.05)
        finally:
            client.close()
