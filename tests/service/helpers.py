"""Test helpers: a real uvicorn server in a thread, test images, stream-state snapshots."""

from __future__ import annotations

import contextlib
import io
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
import uvicorn
from fastapi import FastAPI
from PIL import Image
from safetensors.torch import load as load_tensors

from bench.fuzz import snapshot as snapshot  # the fuzz harness compares states the same way
from engine.core import Engine
from models import create_model, normalize
from service.main import create_app
from service.settings import Settings
from service.stores import RedisStore
from service.streams import samples_of

MODEL = "cifar10_resnet20"
DEFAULT_ADAPTER = "balanced"  # what a stream of MODEL created without an adapter gets


def server_settings(data_dir: Path, cache_dir: Path, **overrides: Any) -> Settings:
    """Settings for a test server: local store in ``data_dir``, seeded weights cache, fast."""
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "data_dir": data_dir,
        "model_cache_dir": cache_dir,
        "store": "local",
        "max_delay_ms": 2.0,
        "slots_per_pool": 16,
        "max_streams": 64,
        "flush_interval_s": 60.0,
        "log_level": "warning",
    }
    values.update(overrides)
    return Settings(**values)


@dataclass
class Server:
    """A running uvicorn server and its app."""

    url: str
    app: FastAPI
    server: uvicorn.Server
    thread: threading.Thread

    def client(self, **kwargs: Any) -> httpx.Client:
        """An HTTP client for this server."""
        return httpx.Client(base_url=self.url, timeout=30.0, **kwargs)


@contextlib.contextmanager
def running_server(settings: Settings, start_timeout_s: float = 30.0) -> Iterator[Server]:
    """Serve ``create_app(settings)`` with uvicorn on 127.0.0.1 (a free port) in a thread."""
    app = create_app(settings)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=settings.port, log_level="warning", lifespan="on", workers=1
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            # stop it (once its start-up ends) rather than leave it to load the next tests
            server.should_exit = True
            thread.join(timeout=600)
            raise RuntimeError(f"the test server did not start within {start_timeout_s} s")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield Server(f"http://127.0.0.1:{port}", app, server, thread)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def post_pixels(client: httpx.Client, stream_id: str, pixels: np.ndarray) -> httpx.Response:
    """Raw uint8 images [N, 32, 32, 3] to a stream's predict; the response, whatever its status."""
    return client.post(
        f"/v1/streams/{stream_id}/predict",
        content=np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)).tobytes(),
        params={"shape": f"{len(pixels)},3,32,32"},
        headers={"content-type": "application/octet-stream"},
    )


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    """The value of the /metrics sample ``name`` with ``labels`` (KeyError if there is none)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise KeyError(name)


def stored_samples(url: str, stream_id: str) -> int:
    """The sample count in the stream's record in Redis (what survives every replica)."""
    store = RedisStore(url, replica_id="reader")
    try:
        record = store.get(stream_id)
        assert record is not None
        return samples_of(record.state)
    finally:
        store.close()


# --- images ---------------------------------------------------------------------------------


def png(array: np.ndarray) -> bytes:
    """An image array as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def random_pixels(count: int, seed: int, size: int = 32) -> np.ndarray:
    """``count`` random RGB images [count, size, size, 3] uint8."""
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def png_with_declared_size(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` (a decompression bomb's header)."""
    data = bytearray(png(random_pixels(1, 0, 8)[0]))
    # IHDR: 8-byte signature, 4-byte length, b"IHDR", width, height, ...; CRC over type + data.
    struct.pack_into(">II", data, 16, width, height)
    crc = zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF
    struct.pack_into(">I", data, 29, crc)
    return bytes(data)


# --- engine reference and states ------------------------------------------------------------


def reference_engine(cache_dir: Path, **kwargs: Any) -> Engine:
    """An engine of the test model built directly, as the server builds its own."""
    model, spec = create_model(MODEL, cache_dir=cache_dir)
    return Engine(
        model,
        name=spec.name,
        num_classes=spec.num_classes,
        device="cpu",
        capacity=kwargs.pop("capacity", 16),
        **kwargs,
    )


def nchw(pixels: np.ndarray) -> np.ndarray:
    """HWC images as the model's [N, 3, H, W] uint8 input."""
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))


def v1_probabilities(client: httpx.Client, stream_id: str, pixels: np.ndarray) -> np.ndarray:
    """The probabilities the v1 API gives for HWC ``pixels`` on ``stream_id`` (adapting it)."""
    response = client.post(
        f"/v1/streams/{stream_id}/predict",
        content=nchw(pixels).tobytes(),
        params={"shape": f"{len(pixels)},3,32,32", "top_k": 10},
        headers={"content-type": "application/octet-stream"},
    )
    assert response.status_code == 200, response.text
    out = np.zeros((len(pixels), 10), np.float32)
    for row, prediction in enumerate(response.json()["predictions"]):
        for score in prediction["top_k"]:
            out[row, score["index"]] = score["probability"]
    return out


def normalized(pixels: np.ndarray) -> torch.Tensor:
    """HWC uint8 images as the model's normalised float batch."""
    from models import get_spec

    batch = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    return normalize(batch, get_spec(MODEL))


def tensors(state: bytes) -> dict[str, torch.Tensor]:
    """The tensors of an exported state."""
    return load_tensors(state)
