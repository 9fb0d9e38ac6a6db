"""HTTP load: a concurrency sweep against a tta-serve server, adapted against source.

    uv run python -m bench.http                      # starts its own server on a free port
    uv run python -m bench.http --url http://127.0.0.1:8000
    uv run python -m bench.http --client httpx --images 1 --clients 16 128 --adapters adabn
    uv run python -m bench.http --engine-mode compiled --clients 1 4   # engine/compiled.py

Every client owns one stream and posts raw uint8 tensors of 1 or 64 images back to back for a
fixed time; the sweep reports throughput (images/s), p50/p95/p99 latency and the load clients'
own CPU time per request (on a small machine they share the cores with the server) per
concurrency level, for an adapted stream (adabn) and for ``source`` in the same run. The
engine's own throughput for the same batches is measured in-process in the same run, so that the
ratio server / engine shows what the HTTP edge and the scheduler cost. Loopback only; every level
stops by itself after ``--seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiohttp
import httpx
import numpy as np
import torch

from bench.report import command_line, machine, table, write_section
from deploy.local import tta_server

log = logging.getLogger(__name__)

MODEL = "cifar10_resnet20"


@contextlib.contextmanager
def local_server(device: str, store: str = "memory", engine_mode: str = "auto") -> Iterator[str]:
    """A tta-serve process on a free loopback port (its data in a temp dir), stopped at exit."""
    with (
        tempfile.TemporaryDirectory() as data,
        tta_server(
            Path(data),
            store=store,
            device=device,
            max_streams="4096",
            slots_per_pool="512",
            engine_mode=engine_mode,
        ) as url,
    ):
        yield url


class LoadClient:
    """One HTTP connection pool for a level's clients: aiohttp (the default) or httpx.

    httpx's AsyncClient costs far more CPU per request with many connections open (the table's
    client-CPU column; docs/performance.md), so it is kept only to show that difference.
    """

    def __init__(self, kind: str, url: str, connections: int) -> None:
        self.kind = kind
        if kind == "aiohttp":
            self._aiohttp = aiohttp.ClientSession(
                url,
                connector=aiohttp.TCPConnector(limit=connections),
                timeout=aiohttp.ClientTimeout(total=120),
            )
        elif kind == "httpx":
            limits = httpx.Limits(
                max_connections=connections, max_keepalive_connections=connections
            )
            self._httpx = httpx.AsyncClient(base_url=url, timeout=120, limits=limits)
        else:
            raise ValueError(f"unknown client {kind!r}; valid: aiohttp, httpx")

    async def request(self, method: str, path: str, **kwargs: Any) -> bytes:
        """The response body of a request that must succeed (json=, content=, params=, ...)."""
        if self.kind == "httpx":
            reply = await self._httpx.request(method, path, **kwargs)
            reply.raise_for_status()
            return reply.content
        if "content" in kwargs:
            kwargs["data"] = kwargs.pop("content")
        async with self._aiohttp.request(method, path, raise_for_status=True, **kwargs) as r:
            return await r.read()

    async def close(self) -> None:
        await (self._httpx.aclose() if self.kind == "httpx" else self._aiohttp.close())


@dataclass
class Level:
    """What one concurrency level measured."""

    images_per_s: float
    latencies: list[float]  # seconds, one per timed request
    client_cpu_ms: float  # CPU time of the load clients per request (this process)


async def sweep_level(
    url: str,
    adapter: str,
    clients: int,
    images: int,
    seconds: float,
    payload: bytes,
    client_kind: str = "aiohttp",
) -> Level:
    """``clients`` concurrent streams posting ``payload`` back to back for ``seconds``."""
    client = LoadClient(client_kind, url, clients)
    try:
        ids = []
        for _ in range(clients):
            body = {"model": MODEL, "adapter": adapter}
            ids.append(json.loads(await client.request("POST", "/v1/streams", json=body))["id"])
        latencies: list[float] = []
        params = {"shape": f"{images},3,32,32", "dtype": "uint8", "top_k": "1"}
        headers = {"content-type": "application/octet-stream"}

        async def predict(stream_id: str) -> None:
            path = f"/v1/streams/{stream_id}/predict"
            await client.request("POST", path, content=payload, params=params, headers=headers)

        async def one_client(stream_id: str, stop: float) -> None:
            while time.perf_counter() < stop:
                start = time.perf_counter()
                await predict(stream_id)
                latencies.append(time.perf_counter() - start)

        # Warm-up (one request per client), then the timed window.
        await asyncio.gather(*(predict(i) for i in ids))
        cpu = time.process_time()
        begin = time.perf_counter()
        await asyncio.gather(*(one_client(i, begin + seconds) for i in ids))
        elapsed = time.perf_counter() - begin
        cpu = time.process_time() - cpu
        for stream_id in ids:
            await client.request("DELETE", f"/v1/streams/{stream_id}")
    finally:
        await client.close()
    requests = max(1, len(latencies))
    return Level(len(latencies) * images / elapsed, latencies, cpu / requests * 1e3)


def engine_throughput(
    adapter: str,
    images: int,
    device: str,
    seconds: float,
    mode: Literal["eager", "compiled"] = "eager",
) -> float:
    """Images/s of the engine alone on the same batches (uint8 in, normalised on device)."""
    from engine.core import Engine
    from models import create_model, normalize

    cache = Path(os.environ.get("TTA_MODEL_CACHE_DIR", ".cache/models"))
    model, spec = create_model(MODEL, cache_dir=cache)
    engine = Engine(model, name=MODEL, num_classes=spec.num_classes, device=device, mode=mode)
    stream = engine.open_stream(adapter)
    x = torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8)
    for _ in range(3):
        engine.forward(normalize(x.to(device), spec), [(stream, images)])
    done, begin = 0, time.perf_counter()
    while time.perf_counter() - begin < seconds:
        logits = engine.forward(normalize(x.to(device), spec), [(stream, images)]).logits
        logits.argmax(1).cpu()  # the server sends results back too
        done += images
    return done / (time.perf_counter() - begin)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64, 128])
    parser.add_argument("--images", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--seconds", type=float, default=5.0, help="timed window per level")
    parser.add_argument("--adapters", nargs="+", default=["adabn", "source"])
    parser.add_argument(
        "--client",
        choices=["aiohttp", "httpx"],
        default="aiohttp",
        help="HTTP client of the load (httpx: to show its cost; its own report section)",
    )
    parser.add_argument(
        "--engine-mode",
        choices=["eager", "compiled"],
        default="eager",
        help="the server's and the engine's forward (compiled: a level's first layout compiles "
        "on its warm-up request, untimed; a layout met later compiles in its timed window)",
    )
    parser.add_argument("--out", type=Path, default=Path("docs/performance.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise

    rng = np.random.default_rng(0)
    # The engine alone first, before a server process shares the machine.
    engine = {
        (adapter, images): engine_throughput(
            adapter, images, args.device, args.seconds, args.engine_mode
        )
        for images in args.images
        for adapter in args.adapters
    }
    rows, ratios = [], {}
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(
            local_server(args.device, engine_mode=args.engine_mode)
        )
        for images in args.images:
            payload = rng.integers(0, 256, (images, 3, 32, 32), dtype=np.uint8).tobytes()
            for adapter in args.adapters:
                best = 0.0
                for clients in args.clients:
                    level = asyncio.run(
                        sweep_level(
                            url, adapter, clients, images, args.seconds, payload, args.client
                        )
                    )
                    best = max(best, level.images_per_s)
                    log.info(
                        "%s images=%d clients=%d: %.0f images/s",
                        adapter,
                        images,
                        clients,
                        level.images_per_s,
                    )
                    rows.append(
                        (
                            adapter,
                            images,
                            clients,
                            f"{level.images_per_s:.0f}",
                            *(f"{percentile(level.latencies, q) * 1e3:.1f}" for q in (50, 95, 99)),
                            f"{level.client_cpu_ms:.2f}",
                        )
                    )
                ratios[(adapter, images)] = (best, engine[(adapter, images)])

    where = machine(args.device)
    lines = [
        f"## HTTP load, {MODEL} on {args.device.upper()}"
        + ("" if args.client == "aiohttp" else f", {args.client} load clients")
        + ("" if args.engine_mode == "eager" else f", {args.engine_mode} engine"),
        "",
        f"Machine: {where}; client, server and engine on the same machine. "
        f"Command: `{command_line()}`. {args.seconds:g} s per level, one stream per client; "
        f"{args.client} load clients, whose CPU time per request is the last column.",
        "",
        table(
            [
                "adapter",
                "images/request",
                "clients",
                "images/s",
                "p50 ms",
                "p95 ms",
                "p99 ms",
                "client CPU ms/request",
            ],
            rows,
        ),
        "",
        "Best server throughput against the engine alone (same batches, same run):",
        "",
        table(
            ["adapter", "images/request", "server images/s", "engine images/s", "server / engine"],
            [(a, n, f"{s:.0f}", f"{e:.0f}", f"{s / e:.2f}") for (a, n), (s, e) in ratios.items()],
        ),
    ]
    big = [s / e for (a, n), (s, e) in ratios.items() if n == 64]
    if big:
        worst = min(big)
        verdict = "met" if worst >= 0.8 else "MISSED"
        lines += [
            "",
            f"Target (64-image requests, server >= 0.8x engine): {verdict} ({worst:.2f}).",
        ]
    key = f"bench.http:{torch.device(args.device).type}"
    key += "" if args.client == "aiohttp" else f":{args.client}"
    key += "" if args.engine_mode == "eager" else f":{args.engine_mode}"
    write_section(args.out, key, "\n".join(lines))
    log.info("\n".join(lines))


if __name__ == "__main__":
    main()
