"""Reliability under failure, with real processes on 127.0.0.1: kill -9, a Redis outage, a soak.

    uv run python -m bench.reliability crash             # kill -9 under load, both durabilities
    uv run python -m bench.reliability redis             # kill redis-server mid-run, restart it
    uv run python -m bench.reliability soak --minutes 2  # mixed traffic: RSS and 5xx
    uv run python -m bench.reliability all               # the three, into docs/reliability.md

crash: a ``tta-serve`` process with the local store serves one load client per stream (raw
uint8 batches back to back); after a few seconds it is killed with SIGKILL while requests are
in flight and started again on the same directory. An update is acknowledged when its response
came back 200; its stream's count after it is the ``samples`` of that response. Lost
acknowledged images = acknowledged count - the count the restarted server restored, per stream.

redis: the same load against ``store=redis`` with ``durability=sync``; redis-server (append-only
file, fsync always) is killed with SIGKILL mid-run and started again on the same port and files.
The answers are counted per phase, readiness is polled, and after the run the server itself is
killed and restarted to compare acknowledged and restored counts.

soak: mixed traffic (PNG, raw uint8 and float32, OIP, drift, export/import, reset, streams
created and deleted, and invalid requests that must get a 4xx) from a few clients for
``--minutes``; the server's RSS is read from /proc at the start, every few seconds, and at the end.

Every phase stops by itself; every process it starts is stopped at exit.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import logging
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import numpy as np
from PIL import Image

from bench.report import command_line, machine, table, write_section

log = logging.getLogger(__name__)

NOT_READY = 400  # /v2/health/ready's "false" (the Open Inference Protocol's 4xx)

MODEL = "cifar10_resnet20"
START_TIMEOUT_S = 120.0
TITLE = "Reliability"
INTRO = """\
What the server does when things fail, measured with real processes on 127.0.0.1 by
`bench/reliability.py` (each section names its command and machine). Defects these runs found
are issue 13's; the sections are rewritten by the next run of the same command."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ServerProcess:
    """A ``tta-serve`` process (``python -m service.main``) that can be killed and restarted.

    Each start takes a fresh port; the environment (store, data directory, durability) stays.
    """

    def __init__(self, env: dict[str, str]) -> None:
        self.env = {
            **os.environ,
            "TTA_HOST": "127.0.0.1",
            "TTA_LOG_LEVEL": "warning",
            "TTA_MODEL_CACHE_DIR": os.environ.get("TTA_MODEL_CACHE_DIR", ".cache/models"),
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> None:
        """Start the server and wait until /v2/health/ready is 200."""
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.main"], env={**self.env, "TTA_PORT": str(port)}
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tta-serve exited at start-up ({self.process.returncode})")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"tta-serve was not ready within {START_TIMEOUT_S:g} s")

    @property
    def pid(self) -> int:
        """The server's process id."""
        assert self.process is not None
        return self.process.pid

    def rss_bytes(self) -> int:
        """The server's resident memory (VmRSS), from /proc."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc status")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush (a crash)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM and wait (a clean shutdown); SIGKILL if it does not exit in 60 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()


class RedisProcess:
    """redis-server on a fixed loopback port with an append-only file fsynced on every write,
    so that a SIGKILL loses nothing it acknowledged and a restart finds every stream again."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found: apt-get install -y redis-server")
        self.binary, self.directory, self.port = binary, directory, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it and wait until it answers PING."""
        import redis

        self.directory.mkdir(parents=True, exist_ok=True)
        command = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--daemonize", "no",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(command)
        client = redis.Redis.from_url(self.url, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 30
        try:
            while time.monotonic() < deadline:
                with contextlib.suppress(redis.RedisError):
                    if client.ping():
                        return
                time.sleep(0.05)
        finally:
            client.close()
        raise RuntimeError("redis-server did not answer PING within 30 s")

    def kill(self) -> None:
        """SIGKILL (an outage that is a crash, not a clean shutdown)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


# --- load ------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What a load run saw: answers by status (0: no answer), and acknowledged counts."""

    statuses: Counter[int] = field(default_factory=Counter)
    # stream -> its sample count after its last 200 answer
    acknowledged: dict[str, int] = field(default_factory=dict)

    def server_errors(self) -> int:
        """Answers with a 5xx status."""
        return sum(n for status, n in self.statuses.items() if status >= 500)


RAW = {"content-type": "application/octet-stream"}


async def predict_loop(
    session: aiohttp.ClientSession,
    stream_id: str,
    payload: bytes,
    images: int,
    until: Callable[[], bool],
    tally: Tally,
    phase: Callable[[], Tally] | None = None,
) -> None:
    """Post ``payload`` to the stream back to back until ``until()``; stop at a lost server."""
    params = {"shape": f"{images},3,32,32", "dtype": "uint8", "top_k": "1", "drift": "false"}
    while not until():
        try:
            async with session.post(
                f"/v1/streams/{stream_id}/predict", data=payload, params=params, headers=RAW
            ) as response:
                body = await response.read()
                status = response.status
        except (TimeoutError, aiohttp.ClientError):
            status, body = 0, b""
        tally.statuses[status] += 1
        if phase is not None:
            phase().statuses[status] += 1
        if status == 200:
            tally.acknowledged[stream_id] = json.loads(body)["samples"]
        elif status == 0:
            await asyncio.sleep(0.05)  # the server is gone or restarting: do not spin


def create_streams(url: str, ids: list[str], adapter: str = "adabn") -> None:
    """Create the streams (each once; a restarted server already has them)."""
    with httpx.Client(base_url=url, timeout=30) as client:
        for stream_id in ids:
            response = client.post("/v1/streams", json={"id": stream_id, "adapter": adapter})
            if response.status_code not in (201, 409):
                raise RuntimeError(f"cannot create stream {stream_id}: {response.text}")


def restored_samples(url: str, ids: list[str]) -> dict[str, int]:
    """Each stream's sample count as the (restarted) server has it."""
    with httpx.Client(base_url=url, timeout=30) as client:
        return {sid: client.get(f"/v1/streams/{sid}").json()["samples"] for sid in ids}


def lost(acknowledged: dict[str, int], restored: dict[str, int]) -> int:
    """Acknowledged images the restored streams do not have (more restored is not a loss)."""
    return sum(max(0, count - restored.get(sid, 0)) for sid, count in acknowledged.items())


# --- crash ----------------------------------------------------------------------------------


@dataclass
class CrashResult:
    """kill -9 rounds of one durability mode."""

    durability: str
    acknowledged: int  # images acknowledged over all rounds
    lost_per_kill: list[int]
    statuses: Counter[int]


def crash(
    durability: str,
    workdir: Path,
    *,
    kills: int = 3,
    seconds: float = 8.0,
    streams: int = 4,
    images: int = 8,
    flush_interval_s: float = 5.0,
    seed: int = 0,
) -> CrashResult:
    """Kill -9 a loaded server ``kills`` times (after ``seconds`` x U(0.5, 1) of load each),
    restart it on the same directory, and count the acknowledged images it lost."""
    rng = random.Random(seed)
    server = ServerProcess(
        {
            "TTA_STORE": "local",
            "TTA_DATA_DIR": str(workdir / f"crash-{durability}"),
            "TTA_DURABILITY": durability,
            "TTA_FLUSH_INTERVAL_S": str(flush_interval_s),
        }
    )
    ids = [f"crash-{i}" for i in range(streams)]
    payload = np.random.default_rng(seed).integers(0, 256, (images, 3, 32, 32), np.uint8)
    result = CrashResult(durability, 0, [], Counter())
    server.start()
    try:
        create_streams(server.url, ids)
        restored = restored_samples(server.url, ids)
        for _ in range(kills):
            tally = Tally(acknowledged=dict(restored))
            kill_after = seconds * rng.uniform(0.5, 1.0)
            asyncio.run(_load_then_kill(server, ids, payload.tobytes(), images, kill_after, tally))
            server.start()
            restored = restored_samples(server.url, ids)
            result.lost_per_kill.append(lost(tally.acknowledged, restored))
            result.statuses.update(tally.statuses)
            result.acknowledged += tally.statuses[200] * images
    finally:
        server.stop()
    return result


async def _load_then_kill(
    server: ServerProcess, ids: list[str], payload: bytes, images: int, kill_after: float,
    tally: Tally,
) -> None:  # fmt: skip
    killed = False

    async def killer() -> None:
        nonlocal killed
        await asyncio.sleep(kill_after)
        deadline = time.monotonic() + START_TIMEOUT_S
        while tally.statuses[200] < len(ids) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # a slow machine: let each stream be acknowledged once
        server.kill()  # requests are in flight: one per stream, back to back
        killed = True

    async with aiohttp.ClientSession(
        server.url, timeout=aiohttp.ClientTimeout(total=60)
    ) as session:
        await asyncio.gather(
            killer(),
            *(predict_loop(session, i, payload, images, lambda: killed, tally) for i in ids),
        )


def crash_section(results: list[CrashResult], settings: str) -> str:
    """The "Crash (kill -9)" section."""
    rows = [
        (
            r.durability,
            len(r.lost_per_kill),
            r.acknowledged,
            ", ".join(str(n) for n in r.lost_per_kill),
            max(r.lost_per_kill, default=0),
            sum(n for s, n in r.statuses.items() if s >= 500),
        )
        for r in results
    ]
    return "\n".join(
        [
            "## Crash (kill -9)",
            "",
            f"Machine: {machine()}. Command: `{command_line()}`. {settings}",
            "",
            table(
                [
                    "durability",
                    "kills",
                    "acknowledged images",
                    "lost acknowledged images, per kill",
                    "max lost",
                    "5xx",
                ],
                rows,
            ),
            "",
            "With `durability=sync` a response is sent after its state is stored: no kill may "
            "lose an acknowledged image. With `interval` (the default) a kill loses what was "
            "acknowledged since the last flush (`flush_interval_s`), as documented in "
            "`service/settings.py` and the README.",
        ]
    )


# --- redis outage ---------------------------------------------------------------------------


@dataclass
class OutageResult:
    """A Redis outage under load, with durability=sync."""

    phases: dict[str, Tally]  # before / during / after the outage
    not_ready_after_s: float | None  # from the kill of Redis to the first 400 of /ready
    ready_again_after_s: float | None  # from the restart of Redis to the first 200 of /ready
    acknowledged: int
    counts: dict[str, int]  # stream -> its sample count after its last 200 answer
    lost: int = 0


def redis_outage(
    workdir: Path,
    *,
    before_s: float = 5.0,
    outage_s: float = 10.0,
    after_s: float = 5.0,
    streams: int = 4,
    images: int = 8,
    seed: int = 0,
) -> OutageResult:
    """Load a server on Redis (durability=sync), kill Redis, restart it, check the counts."""
    redis = RedisProcess(workdir / "redis")
    redis.start()
    server = ServerProcess(
        {
            "TTA_STORE": "redis",
            "TTA_REDIS_URL": redis.url,
            "TTA_DURABILITY": "sync",
            "TTA_DATA_DIR": str(workdir / "outage"),
        }
    )
    ids = [f"outage-{i}" for i in range(streams)]
    payload = np.random.default_rng(seed).integers(0, 256, (images, 3, 32, 32), np.uint8)
    try:
        server.start()
        create_streams(server.url, ids)
        result = asyncio.run(
            _outage(server, redis, ids, payload.tobytes(), images, (before_s, outage_s, after_s))
        )
        server.kill()  # and restart: what did Redis keep of the acknowledged updates?
        server.start()
        restored = restored_samples(server.url, ids)
        result.lost = lost(result.counts, restored)
    finally:
        server.stop()
        redis.kill()
    return result


async def _outage(
    server: ServerProcess,
    redis: RedisProcess,
    ids: list[str],
    payload: bytes,
    images: int,
    durations: tuple[float, float, float],
) -> OutageResult:
    phases = {name: Tally() for name in ("before", "during", "after")}
    current = ["before"]
    overall = Tally()
    done = False
    marks: dict[str, float] = {}
    readiness: list[tuple[float, int]] = []

    async def controller() -> None:
        nonlocal done
        await asyncio.sleep(durations[0])
        await asyncio.to_thread(redis.kill)
        marks["killed"], current[0] = time.monotonic(), "during"
        await asyncio.sleep(durations[1])
        await asyncio.to_thread(redis.start)
        marks["restarted"], current[0] = time.monotonic(), "after"
        await asyncio.sleep(durations[2])
        done = True

    async def probe(session: aiohttp.ClientSession) -> None:
        while not done:
            try:
                async with session.get("/v2/health/ready") as response:
                    readiness.append((time.monotonic(), response.status))
            except aiohttp.ClientError:
                readiness.append((time.monotonic(), 0))
            await asyncio.sleep(0.1)

    async with aiohttp.ClientSession(
        server.url, timeout=aiohttp.ClientTimeout(total=60)
    ) as session:
        await asyncio.gather(
            controller(),
            probe(session),
            *(
                predict_loop(
                    session, i, payload, images, lambda: done, overall, lambda: phases[current[0]]
                )
                for i in ids
            ),
        )

    def first(after: float, status: int) -> float | None:
        return next((t - after for t, s in readiness if t >= after and s == status), None)

    return OutageResult(
        phases=phases,
        not_ready_after_s=first(marks["killed"], NOT_READY),
        ready_again_after_s=first(marks["restarted"], 200),
        acknowledged=overall.statuses[200] * images,
        counts=overall.acknowledged,
    )


def outage_section(result: OutageResult, settings: str) -> str:
    """The "Redis outage" section."""

    def answers(tally: Tally) -> str:
        return ", ".join(
            f"{status or 'no answer'}: {n}" for status, n in sorted(tally.statuses.items())
        )

    rows = [(name, answers(t), t.server_errors()) for name, t in result.phases.items()]
    seconds = [result.not_ready_after_s, result.ready_again_after_s]
    not_ready, ready = (f"{s:.1f} s" if s is not None else "never" for s in seconds)
    return "\n".join(
        [
            "## Redis outage",
            "",
            f"Machine: {machine()}. Command: `{command_line()}`. {settings}",
            "",
            table(["phase", "predict answers by status", "5xx"], rows),
            "",
            f"Readiness: `/v2/health/ready` answered {NOT_READY} {not_ready} after Redis was "
            f"killed, and 200 again {ready} after it was restarted. Acknowledged images: "
            f"{result.acknowledged}; lost after the server, too, was killed and restarted: "
            f"{result.lost}. During the outage a prediction answers 503 `store_unavailable` "
            "(its state was not stored, so it is not acknowledged); the server recovers by "
            "itself when Redis is back.",
        ]
    )


# --- soak -----------------------------------------------------------------------------------


@dataclass
class SoakResult:
    """A soak run: answers by operation and status, and the server's memory over time."""

    seconds: float
    answers: Counter[tuple[str, int]]
    rss: list[tuple[float, int]]  # (seconds since the start, bytes)

    def count(self, predicate: Callable[[int], bool]) -> int:
        """Answers whose status satisfies ``predicate``."""
        return sum(n for (_, status), n in self.answers.items() if predicate(status))


def _png(rng: np.random.Generator, count: int) -> list[bytes]:
    files = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(buffer, "PNG")
        files.append(buffer.getvalue())
    return files


class SoakClient:
    """One client of the soak: a random operation at a time, each with the status it expects."""

    def __init__(self, session: aiohttp.ClientSession, index: int, seed: int) -> None:
        self.session, self.rng = session, np.random.default_rng(seed + index)
        self.stream = f"soak-{index}"
        self.temporary = 0
        self.operations: list[tuple[Callable[[], Any], int]] = [
            (self.predict_png, 6),
            (self.predict_raw, 6),
            (self.predict_float, 3),
            (self.infer, 3),
            (self.drift, 2),
            (self.export_import, 1),
            (self.reset, 1),
            (self.create_delete, 1),
            (self.invalid, 2),
        ]

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, bytes]:
        async with self.session.request(method, path, **kwargs) as response:
            return response.status, await response.read()

    async def step(self) -> tuple[str, int]:
        """One weighted random operation: (its name, the status it got)."""
        weights = np.array([w for _, w in self.operations], float)
        operation, _ = self.operations[self.rng.choice(len(weights), p=weights / weights.sum())]
        return operation.__name__, await operation()

    async def predict_png(self) -> int:
        form = aiohttp.FormData()
        for data in _png(self.rng, int(self.rng.integers(1, 5))):
            form.add_field("images", data, filename="x.png", content_type="image/png")
        return (await self.call("POST", f"/v1/streams/{self.stream}/predict", data=form))[0]

    async def predict_raw(self) -> int:
        data = self.rng.integers(0, 256, (8, 3, 32, 32), np.uint8).tobytes()
        params = {"shape": "8,3,32,32", "dtype": "uint8"}
        path = f"/v1/streams/{self.stream}/predict"
        return (await self.call("POST", path, data=data, params=params, headers=RAW))[0]

    async def predict_float(self) -> int:
        data = self.rng.normal(0, 1, (4, 3, 32, 32)).astype("<f4").tobytes()
        params = {"shape": "4,3,32,32", "dtype": "float32", "adapt": "false"}
        path = f"/v1/streams/{self.stream}/predict"
        return (await self.call("POST", path, data=data, params=params, headers=RAW))[0]

    async def infer(self) -> int:
        pixels = self.rng.integers(0, 256, 3 * 32 * 32).tolist()
        body = {
            "parameters": {"stream_id": self.stream},
            "inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "UINT8",
                        "data": pixels}],
        }  # fmt: skip
        return (await self.call("POST", f"/v2/models/{MODEL}/infer", json=body))[0]

    async def drift(self) -> int:
        return (await self.call("GET", f"/v1/streams/{self.stream}/drift"))[0]

    async def export_import(self) -> int:
        status, state = await self.call("GET", f"/v1/streams/{self.stream}/state")
        if status != 200:
            return status
        path = f"/v1/streams/{self.stream}/state"
        return (await self.call("PUT", path, data=state, headers=RAW))[0]

    async def reset(self) -> int:
        return (await self.call("POST", f"/v1/streams/{self.stream}/reset"))[0]

    async def create_delete(self) -> int:
        self.temporary += 1
        stream_id = f"{self.stream}-t{self.temporary}"
        body = {"id": stream_id, "adapter": "unmix_tns", "config": {"components": 4}}
        status, _ = await self.call("POST", "/v1/streams", json=body)
        if status != 201:
            return status
        return (await self.call("DELETE", f"/v1/streams/{stream_id}"))[0]

    async def invalid(self) -> int:
        """A request the server must refuse with a 4xx (a 2xx or 5xx counts against it)."""
        kind = int(self.rng.integers(3))
        path = f"/v1/streams/{self.stream}/predict"
        if kind == 0:  # a PNG cut in half
            data = _png(self.rng, 1)[0]
            body = json.dumps({"images": [base64.b64encode(data[: len(data) // 2]).decode()]})
            status, _ = await self.call(
                "POST", path, data=body, headers={"content-type": "application/json"}
            )
        elif kind == 1:  # finite but huge floats
            data = np.full((1, 3, 32, 32), 3e38, "<f4").tobytes()
            params = {"shape": "1,3,32,32", "dtype": "float32"}
            status, _ = await self.call("POST", path, data=data, params=params, headers=RAW)
        else:  # a stream that does not exist
            status, _ = await self.call("GET", "/v1/streams/no-such-stream/drift")
        return status if 400 <= status < 500 else 1000 + status  # 1xxx: the wrong answer


def soak(
    workdir: Path, *, seconds: float = 120.0, clients: int = 4, rss_every_s: float = 5.0,
    seed: int = 0,
) -> SoakResult:  # fmt: skip
    """``clients`` clients of mixed traffic for ``seconds`` against one server process."""
    server = ServerProcess(
        {"TTA_STORE": "local", "TTA_DATA_DIR": str(workdir / "soak"), "TTA_FLUSH_INTERVAL_S": "2"}
    )
    server.start()
    try:
        create_streams(server.url, [f"soak-{i}" for i in range(clients)])
        return asyncio.run(_soak(server, seconds, clients, rss_every_s, seed))
    finally:
        server.stop()


async def _soak(
    server: ServerProcess, seconds: float, clients: int, rss_every_s: float, seed: int
) -> SoakResult:
    answers: Counter[tuple[str, int]] = Counter()
    rss = [(0.0, server.rss_bytes())]
    begin = time.monotonic()
    stop = begin + seconds

    async def client(index: int, session: aiohttp.ClientSession) -> None:
        soak_client = SoakClient(session, index, seed)
        while time.monotonic() < stop:
            try:
                answers[await soak_client.step()] += 1
            except (TimeoutError, aiohttp.ClientError) as error:
                answers[(type(error).__name__, 0)] += 1

    async def memory() -> None:
        while time.monotonic() < stop:
            await asyncio.sleep(min(rss_every_s, max(0.0, stop - time.monotonic())))
            rss.append((time.monotonic() - begin, server.rss_bytes()))

    async with aiohttp.ClientSession(
        server.url, timeout=aiohttp.ClientTimeout(total=60)
    ) as session:
        await asyncio.gather(memory(), *(client(i, session) for i in range(clients)))
    return SoakResult(time.monotonic() - begin, answers, rss)


def soak_section(result: SoakResult, settings: str) -> str:
    """The "Soak" section."""
    operations = sorted({name for name, _ in result.answers})
    rows = []
    for name in operations:
        statuses = {s: n for (op, s), n in result.answers.items() if op == name}
        rows.append(
            (
                name,
                sum(statuses.values()),
                ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items())),
            )
        )
    mib = [b / 2**20 for _, b in result.rss]
    trajectory = ", ".join(f"{mib[round(q * (len(mib) - 1))]:.0f}" for q in (0, 0.25, 0.5, 0.75, 1))
    total = sum(result.answers.values())
    return "\n".join(
        [
            "## Soak",
            "",
            f"Machine: {machine()}. Command: `{command_line()}`. {settings}",
            "",
            table(["operation", "requests", "answers by status"], rows),
            "",
            f"{total} requests in {result.seconds:.0f} s ({total / result.seconds:.0f}/s); "
            f"5xx: {result.count(lambda s: 500 <= s < 600)}; wrong answers to invalid requests "
            f"(a 2xx or 5xx, shown as 1000 + status): {result.count(lambda s: s >= 1000)}; "
            f"no answer: {result.count(lambda s: s == 0)}. Server RSS: {mib[0]:.0f} MiB at the "
            f"start (after loading the model), {mib[-1]:.0f} MiB at the end, {max(mib):.0f} MiB "
            f"at most; at 0, 25, 50, 75 and 100 % of the run: {trajectory} MiB "
            f"({len(mib)} readings).",
        ]
    )


# --- command --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Run the chosen scenarios and write their sections into ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=["crash", "redis", "soak", "all"])
    parser.add_argument("--kills", type=int, default=3, help="crash: kills per durability mode")
    parser.add_argument("--load-seconds", type=float, default=8.0, help="crash: load per kill")
    parser.add_argument("--flush-interval", type=float, default=5.0, help="crash: interval mode")
    parser.add_argument("--streams", type=int, default=4, help="crash, redis: load clients")
    parser.add_argument("--images", type=int, default=8, help="crash, redis: images/request")
    parser.add_argument("--outage", type=float, default=10.0, help="redis: seconds down")
    parser.add_argument("--phase", type=float, default=5.0, help="redis: seconds before/after")
    parser.add_argument("--minutes", type=float, default=2.0, help="soak: duration")
    parser.add_argument("--clients", type=int, default=4, help="soak: concurrent clients")
    parser.add_argument("--out", type=Path, default=Path("docs/reliability.md"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if not args.out.exists():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# {TITLE}\n\n{INTRO}\n")
    run = {args.scenario} if args.scenario != "all" else {"crash", "redis", "soak"}
    with tempfile.TemporaryDirectory(prefix="tta-reliability-") as tmp:
        workdir = Path(tmp)
        if "crash" in run:
            results = [
                crash(
                    mode,
                    workdir,
                    kills=args.kills,
                    seconds=args.load_seconds,
                    streams=args.streams,
                    images=args.images,
                    flush_interval_s=args.flush_interval,
                )
                for mode in ("sync", "interval")
            ]
            settings = (
                f"{args.streams} streams (adabn), one client each posting {args.images} uint8 "
                f"images per request back to back; a kill after {args.load_seconds / 2:g} to "
                f"{args.load_seconds:g} s of load; local store; interval mode: "
                f"flush_interval_s={args.flush_interval:g}."
            )
            _write(args.out, "crash", crash_section(results, settings))
        if "redis" in run:
            result = redis_outage(
                workdir,
                before_s=args.phase,
                outage_s=args.outage,
                after_s=args.phase,
                streams=args.streams,
                images=args.images,
            )
            settings = (
                f"{args.streams} streams, one client each posting {args.images} uint8 images "
                f"per request back to back; store=redis, durability=sync; redis-server with "
                f"appendfsync always, killed (SIGKILL) after {args.phase:g} s, restarted "
                f"{args.outage:g} s later, then {args.phase:g} s more load."
            )
            _write(args.out, "redis", outage_section(result, settings))
        if "soak" in run:
            soak_result = soak(workdir, seconds=args.minutes * 60, clients=args.clients)
            settings = (
                f"{args.clients} clients of mixed traffic for {args.minutes:g} min; local store, "
                "durability=interval, flush_interval_s=2."
            )
            _write(args.out, "soak", soak_section(soak_result, settings))


def _write(out: Path, name: str, body: str) -> None:
    write_section(out, f"bench.reliability:{name}", body, title=TITLE)
    log.info("%s\n", body)


if __name__ == "__main__":
    main()
