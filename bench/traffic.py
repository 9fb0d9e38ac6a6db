"""Replay clean and corrupted CIFAR-10 test images into a few streams of a running server.

The traffic of the reference deployment and of the end-to-end observability test: clean streams,
corrupted streams (which the metrics must show in trouble), and one corrupted stream fed only
over the Open Inference Protocol (``/v2/models/{model}/infer``), round-robin, for ``--duration``
seconds. Streams that already exist are reused, so a restarted generator continues them. Every
stream keeps label feedback: after each prediction the generator sends the images' true labels
(``POST /v1/streams/{id}/feedback``), so the live-accuracy panels show adapted against source.

    python -m bench.traffic --url http://127.0.0.1:8000 --duration 60
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from bench.corruptions import corrupt
from bench.data import load_cifar10


@dataclass(frozen=True)
class TrafficStream:
    """A stream of the generator: its id, its images' corruption, and the protocol it uses."""

    id: str
    corruption: str | None  # None: clean images
    severity: int
    protocol: str  # "v1" (raw tensor predict) or "v2" (OIP infer, binary tensor)
    offset: int  # first test image, so the streams see different images


STREAMS = (
    TrafficStream("clean-0", None, 0, "v1", 0),
    TrafficStream("clean-1", None, 0, "v1", 2500),
    TrafficStream("gaussian_noise-5", "gaussian_noise", 5, "v1", 5000),
    TrafficStream("contrast-5", "contrast", 5, "v1", 7500),
    TrafficStream("shot_noise-5-v2", "shot_noise", 5, "v2", 1000),
)


def stream_images(stream: TrafficStream, clean: np.ndarray, count: int) -> np.ndarray:
    """The stream's ``count`` images as uint8 [N, 3, H, W] (corrupted if it is corrupted)."""
    images = clean[stream.offset : stream.offset + count]
    if stream.corruption is not None:
        images = corrupt(images, stream.corruption, stream.severity, seed=0, start=stream.offset)
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


def ensure_stream(client: httpx.Client, stream_id: str, model: str | None) -> None:
    """Create the stream (default adapter, label feedback on), or reuse it if it exists."""
    body: dict[str, object] = {"id": stream_id, "feedback": True}
    if model is not None:
        body["model"] = model
    response = client.post("/v1/streams", json=body)
    if response.status_code not in (201, 409):
        response.raise_for_status()


def send_v1(client: httpx.Client, stream_id: str, batch: np.ndarray) -> httpx.Response:
    """One predict request with a raw uint8 tensor body."""
    return client.post(
        f"/v1/streams/{stream_id}/predict",
        content=batch.tobytes(),
        params={"shape": ",".join(map(str, batch.shape)), "dtype": "uint8", "top_k": 1},
        headers={"content-type": "application/octet-stream"},
    )


def send_v2(
    client: httpx.Client, model: str, stream_id: str, batch: np.ndarray, request_id: str = ""
) -> httpx.Response:
    """One OIP inference request with the binary tensor extension (its ``id``: request_id)."""
    data = batch.tobytes()
    header = json.dumps(
        {
            **({"id": request_id} if request_id else {}),
            "parameters": {"stream_id": stream_id},
            "inputs": [
                {
                    "name": "input",
                    "shape": list(batch.shape),
                    "datatype": "UINT8",
                    "parameters": {"binary_data_size": len(data)},
                }
            ],
            "outputs": [{"name": "class_index"}],
        }
    ).encode()
    return client.post(
        f"/v2/models/{model}/infer",
        content=header + data,
        headers={
            "content-type": "application/octet-stream",
            "inference-header-content-length": str(len(header)),
        },
    )


def send_feedback(
    client: httpx.Client, stream_id: str, request_id: str, labels: np.ndarray
) -> httpx.Response:
    """The true labels of a request's images (by its request id and image index)."""
    body = {
        "labels": [
            {"request_id": request_id, "index": i, "label": int(label)}
            for i, label in enumerate(labels)
        ]
    }
    return client.post(f"/v1/streams/{stream_id}/feedback", json=body)


def wait_ready(client: httpx.Client, timeout_s: float) -> None:
    """Wait until the server answers ready (SystemExit after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if client.get("/v2/health/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{client.base_url} is not ready after {timeout_s:g} s")
        time.sleep(0.5)


def run(args: argparse.Namespace) -> Counter[str]:
    """Replay the images for ``args.duration`` seconds; the response counts by stream and status."""
    clean, labels = load_cifar10("test", args.data_dir, args.data_cache)
    outcomes: Counter[str] = Counter()
    with httpx.Client(base_url=args.url, timeout=args.timeout) as client:
        wait_ready(client, args.wait_ready)
        model = args.model or client.get("/v1/models").json()["data"][0]["name"]
        streams = [(s, f"{args.prefix}{s.id}") for s in STREAMS]
        images = {s.id: stream_images(s, clean, args.images) for s, _ in streams}
        for _, stream_id in streams:
            ensure_stream(client, stream_id, model)
        position = 0
        deadline = time.monotonic() + args.duration
        while time.monotonic() < deadline:
            for stream, stream_id in streams:
                pool = images[stream.id]
                start = position % len(pool)
                batch = pool[start : start + args.batch]
                if stream.protocol == "v1":
                    response = send_v1(client, stream_id, batch)
                    request_id = (
                        response.json().get("request_id", "") if response.is_success else ""
                    )
                else:
                    request_id = f"{stream_id}-{position}"
                    response = send_v2(client, model, stream_id, batch, request_id)
                outcomes[f"{stream_id} {response.status_code}"] += 1
                if response.is_success and request_id:
                    first = stream.offset + start
                    truth = labels[first : first + len(batch)]
                    labelled = send_feedback(client, stream_id, request_id, truth)
                    outcomes[f"{stream_id} feedback {labelled.status_code}"] += 1
                if response.status_code in (429, 503):
                    time.sleep(0.5)  # saturated or restarting: back off
                if time.monotonic() >= deadline:
                    break
            position += args.batch
            if args.pause:
                time.sleep(args.pause)
    return outcomes


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments, replay, print the response counts; exit 1 if nothing succeeded."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of traffic")
    parser.add_argument(
        "--model", default=None, help="model of the streams (default: first served)"
    )
    parser.add_argument("--batch", type=int, default=16, help="images per request")
    parser.add_argument("--images", type=int, default=512, help="distinct images per stream")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds between rounds")
    parser.add_argument("--prefix", default="traffic-", help="prefix of the stream ids")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request timeout (s)")
    parser.add_argument(
        "--wait-ready", type=float, default=120.0, help="seconds to wait for readiness"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("TTA_CIFAR10_DIR", "../shared/data/cifar10")),
        help="the CIFAR-10 JPEG archives",
    )
    parser.add_argument("--data-cache", type=Path, default=Path(".cache/data"))
    args = parser.parse_args(argv)
    if not 1 <= args.batch <= args.images:
        parser.error("--batch must be between 1 and --images")
    outcomes = run(args)
    for key, count in sorted(outcomes.items()):
        print(f"{key}: {count}")
    if not any(key.endswith((" 200", " 201")) for key in outcomes):
        sys.exit(1)


if __name__ == "__main__":
    main()
