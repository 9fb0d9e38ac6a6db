"""HTTP load: a concurrency sweep against a tta-serve server, adapted against source.

    uv run python -m bench.http                      # starts its own server on a free port
    uv run python -m bench.http --url http://127.0.0.1:8000

Every client owns one stream and posts raw uint8 tensors of 1 or 64 images back to back for a
fixed time; the sweep reports throughput (images/s) and p50/p95/p99 latency per concurrency
level, for an adapted stream (adabn) and for ``source`` in the same run. The engine's own
throughput for the same batches is measured in-process in the same run, so that the ratio
server / engine shows what the HTTP edge and the scheduler cost. Loopback only; every level
stops by itself after ``--seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import httpx
import numpy as np
import torch

from bench.report import command_line, machine, table, write_section

log = logging.getLogger(__name__)

MODEL = "cifar10_resnet20"


@contextlib.contextmanager
def local_server(device: str) -> Iterator[str]:
    """A tta-serve process on a free loopback port (memory store), stopped at exit."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "TTA_PORT": str(port),
        "TTA_HOST": "127.0.0.1",
        "TTA_STORE": "memory",
        "TTA_DEVICE": device,
        "TTA_LOG_LEVEL": "warning",
        "TTA_MAX_STREAMS": "4096",
        "TTA_SLOTS_PER_POOL": "512",
    }
    with tempfile.TemporaryDirectory() as data:
        env["TTA_DATA_DIR"] = data
        process = subprocess.Popen([sys.executable, "-m", "service.main"], env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                        break
                if process.poll() is not None:
                    raise RuntimeError("the server exited during start-up")
                time.sleep(0.3)
            else:
                raise RuntimeError("the server did not become ready in 120 s")
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


async def sweep_level(
    url: str, adapter: str, clients: int, images: int, seconds: float, payload: bytes
) -> tuple[float, list[float]]:
    """Images/s and the request latencies of ``clients`` concurrent streams for ``seconds``.

    The clients use aiohttp: httpx's AsyncClient spends ~12 ms of CPU per request at 128 open
    connections (2 ms at 16), so on a small machine it, not the server, set the throughput of
    the single-image levels (docs/performance.md).
    """
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as session:
        ids = []
        for _ in range(clients):
            body = {"model": MODEL, "adapter": adapter}
            async with session.post("/v1/streams", json=body, raise_for_status=True) as reply:
                ids.append((await reply.json())["id"])
        latencies: list[float] = []
        done = 0
        params = {"shape": f"{images},3,32,32", "dtype": "uint8", "top_k": "1"}
        headers = {"content-type": "application/octet-stream"}

        async def predict(stream_id: str) -> None:
            async with session.post(
                f"/v1/streams/{stream_id}/predict",
                data=payload,
                params=params,
                headers=headers,
                raise_for_status=True,
            ) as reply:
                await reply.read()

        async def one_client(stream_id: str, stop: float) -> None:
            nonlocal done
            while time.perf_counter() < stop:
                start = time.perf_counter()
                await predict(stream_id)
                latencies.append(time.perf_counter() - start)
                done += images

        # Warm-up (one request per client), then the timed window.
        await asyncio.gather(*(predict(i) for i in ids))
        begin = time.perf_counter()
        await asyncio.gather(*(one_client(i, begin + seconds) for i in ids))
        elapsed = time.perf_counter() - begin
        for stream_id in ids:
            async with session.delete(f"/v1/streams/{stream_id}", raise_for_status=True):
                pass
    return done / elapsed, latencies


def engine_throughput(adapter: str, images: int, device: str, seconds: float) -> float:
    """Images/s of the engine alone on the same batches (uint8 in, normalised on device)."""
    from adapters.engine import Engine
    from models import create_model, normalize

    cache = Path(os.environ.get("TTA_MODEL_CACHE_DIR", ".cache/models"))
    model, spec = create_model(MODEL, cache_dir=cache)
    engine = Engine(model, name=MODEL, num_classes=spec.num_classes, device=device)
    stream = engine.open_stream(adapter)
    x = torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8)
    for _ in range(3):
        engine.forward(normalize(x.to(device), spec), [(stream, images)])
    done, begin = 0, time.perf_counter()
    while time.perf_counter() - begin < seconds:
        logits = engine.forward(normalize(x.to(device), spec), [(stream, images)])
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
    parser.add_argument("--out", type=Path, default=Path("docs/performance.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise

    rng = np.random.default_rng(0)
    # The engine alone first, before a server process shares the machine.
    engine = {
        (adapter, images): engine_throughput(adapter, images, args.device, args.seconds)
        for images in args.images
        for adapter in ("adabn", "source")
    }
    rows, ratios = [], {}
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(local_server(args.device))
        for images in args.images:
            payload = rng.integers(0, 256, (images, 3, 32, 32), dtype=np.uint8).tobytes()
            for adapter in ("adabn", "source"):
                best = 0.0
                for clients in args.clients:
                    rate, latencies = asyncio.run(
                        sweep_level(url, adapter, clients, images, args.seconds, payload)
                    )
                    best = max(best, rate)
                    log.info(
                        "%s images=%d clients=%d: %.0f images/s", adapter, images, clients, rate
                    )
                    rows.append(
                        (
                            adapter,
                            images,
                            clients,
                            f"{rate:.0f}",
                            *(f"{percentile(latencies, q) * 1e3:.1f}" for q in (50, 95, 99)),
                        )
                    )
                ratios[(adapter, images)] = (best, engine[(adapter, images)])

    where = machine(args.device)
    lines = [
        f"## HTTP load, {MODEL} on {args.device.upper()}",
        "",
        f"Machine: {where}; client, server and engine on the same machine. "
        f"Command: `{command_line()}`. {args.seconds:g} s per level, one stream per client.",
        "",
        table(
            ["adapter", "images/request", "clients", "images/s", "p50 ms", "p95 ms", "p99 ms"],
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
    write_section(args.out, f"bench.http:{torch.device(args.device).type}", "\n".join(lines))
    log.info("\n".join(lines))


if __name__ == "__main__":
    main()
