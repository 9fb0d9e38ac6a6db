"""Scale-out: throughput of 1, 2 and 3 replicas behind the nginx gateway, the handoff time when
a replica dies, and the Redis round-trips per predict with each durability.

    uv run python -m bench.scaleout       # writes the "scaleout" section of docs/scaling.md
    uv run python -m bench.scaleout --seconds 5 --clients 6

Every replica is a real tta-serve process (CPU) on one real redis-server, behind the nginx of
deploy/nginx; every client owns one stream and posts batches of raw uint8 images back to back
for ``--seconds``. Loopback only; everything it starts is stopped when it ends.
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import httpx
import redis

from bench.cluster import gateway, replicas
from bench.report import command_line, machine, table, write_section
from tests.service.helpers import post_pixels, random_pixels
from tests.service.redis_server import running_redis

DOC = Path(__file__).resolve().parents[1] / "docs" / "scaling.md"
CACHE = Path(__file__).resolve().parents[1] / ".cache" / "models"


def throughput(url: str, clients: int, images: int, seconds: float, tag: str) -> float:
    """Images/s acknowledged through ``url`` by ``clients`` streams posting back to back."""
    done = [0] * clients
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(index: int) -> None:
        sid = f"{tag}-{index}"
        with httpx.Client(base_url=url, timeout=60, headers={"X-Stream-Id": sid}) as c:
            c.post("/v1/streams", json={"id": sid, "adapter": "adabn"})
            pixels = random_pixels(images, index)
            post_pixels(c, sid, pixels)  # loaded and leased before the timed window
            start.wait()
            while time.monotonic() < stop_at[0]:
                if post_pixels(c, sid, pixels).status_code == 200:
                    done[index] += images

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    stop_at[0] = time.monotonic() + 3600
    start.wait()
    began = time.monotonic()
    stop_at[0] = began + seconds
    for thread in threads:
        thread.join()
    return sum(done) / (time.monotonic() - began)


# What the replicas send over the network; the commands inside a Lua script (HGET, HSET, ...)
# are counted by INFO commandstats too, but cost no round-trip.
TOP_LEVEL = ("evalsha", "eval", "hgetall", "smembers", "ping", "multi", "del")


def round_trips(url: str, redis_url: str, predicts: int) -> float:
    """Redis round-trips per predict of one resident stream (INFO commandstats)."""
    raw = redis.Redis.from_url(redis_url)

    def calls() -> int:
        stats = raw.info("commandstats")
        return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in TOP_LEVEL)

    with httpx.Client(base_url=url, timeout=60) as c:
        c.post("/v1/streams", json={"id": "rt", "adapter": "adabn"})
        post_pixels(c, "rt", random_pixels(1, 0))
        before = calls()
        for step in range(predicts):
            assert post_pixels(c, "rt", random_pixels(1, step)).status_code == 200
        after = calls()
    raw.close()
    return (after - before) / predicts


def handoff(url: str, running: dict, tag: str) -> tuple[float, str, str]:
    """Seconds from kill -9 of a stream's replica to its next acknowledged prediction."""
    with httpx.Client(base_url=url, timeout=60, headers={"X-Stream-Id": tag}) as c:
        c.post("/v1/streams", json={"id": tag, "adapter": "adabn"})
        owner = post_pixels(c, tag, random_pixels(1, 0)).headers["x-served-by"]
        os.kill(running[owner][1].pid, signal.SIGKILL)
        killed = time.monotonic()
        while True:
            response = post_pixels(c, tag, random_pixels(1, 1))
            if response.status_code == 200:
                return time.monotonic() - killed, owner, response.headers["x-served-by"]
            time.sleep(0.05)


def state_sizes(cache: Path) -> list[str]:
    """Bytes of one stored stream (its exported state with the service metadata) per adapter."""
    from service.streams import attach_metadata
    from tests.service.helpers import reference_engine

    engine = reference_engine(cache)
    sizes = []
    for adapter, config in (("adabn", {}), ("momentum", {}), ("unmix_tns", {"components": 4})):
        state = engine.export_stream(engine.open_stream(adapter, config, 0))
        sizes.append(f"{adapter} {len(attach_metadata(state, {'samples': 0})) / 1000:.1f} KB")
    return sizes


def main() -> None:
    """Run the three measurements and write them into docs/scaling.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="timed window per level")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--images", type=int, default=8, help="images per request")
    parser.add_argument("--lease", type=float, default=2.0, help="lease_ttl_s of the replicas")
    parser.add_argument("--cache", type=Path, default=CACHE, help="model weights cache")
    args = parser.parse_args()
    rows, figures = [], []
    with tempfile.TemporaryDirectory() as tmp, running_redis() as redis_url:
        work = Path(tmp)
        with replicas(3, redis_url, args.cache, work, lease_ttl_s=args.lease) as running:
            urls = [u for u, _ in running.values()]
            for count in (1, 2, 3):
                (work / f"g{count}").mkdir()
                with gateway(urls[:count], work / f"g{count}") as url:
                    rate = throughput(url, args.clients, args.images, args.seconds, f"n{count}")
                rows.append([count, f"{rate:.0f}"])
                print(f"{count} replicas: {rate:.0f} images/s", flush=True)
            sync_rt = round_trips(urls[0], redis_url, 50)
            (work / "h").mkdir()
            with gateway(urls, work / "h") as url:
                seconds, old, new = handoff(url, running, "handoff")
            print(f"handoff {old} -> {new}: {seconds:.2f} s", flush=True)
        with replicas(
            1, redis_url, args.cache, work / "i", durability="interval", first=9
        ) as interval:
            interval_rt = round_trips(next(iter(interval.values()))[0], redis_url, 50)
        figures = [
            "- one stored stream of cifar10_resnet20 (its state as written to Redis): "
            + ", ".join(state_sizes(args.cache)),
            f"- handoff after kill -9 (lease_ttl_s={args.lease:g}): {seconds:.2f} s "
            f"from the kill to the stream's next acknowledged prediction ({old} -> {new})",
            f"- Redis round-trips per predict of a resident stream: durability=sync "
            f"{sync_rt:.2f}, durability=interval {interval_rt:.2f} (INFO commandstats of the "
            "commands a replica sends, not those run inside its Lua scripts; 50 predicts of "
            "1 image)",
        ]
    body = "\n".join(
        [
            f"Measured on {machine()} (shared with other jobs), `{command_line()}`; "
            f"{args.clients} clients, each its own stream, {args.images} images per request, "
            f"{args.seconds:g} s per level, through nginx (deploy/nginx).",
            "",
            table(["replicas", "images/s"], rows),
            "",
            *figures,
        ]
    )
    write_section(DOC, "scaleout", body, title="Scaling out")
    print(body)


if __name__ == "__main__":
    main()
