"""bench/http.py's load clients against a real uvicorn server: they drive streams, clean up."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from bench.http import percentile, sweep_level
from tests.service.helpers import running_server, server_settings


@pytest.mark.parametrize("client", ["aiohttp", "httpx"])
def test_sweep_level_measures_every_client_and_deletes_its_streams(
    tmp_path: Path, model_cache: Path, client: str
) -> None:
    payload = np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    with running_server(server_settings(tmp_path, model_cache)) as server:
        level = asyncio.run(sweep_level(server.url, "adabn", 3, 2, 0.5, payload.tobytes(), client))
        with server.client() as http:
            left = http.get("/v1/streams").json()
            metrics = http.get("/metrics").text

    assert len(level.latencies) >= 3  # every client completed at least one request
    assert level.images_per_s > 0 and level.client_cpu_ms > 0
    assert 0 < percentile(level.latencies, 50) <= percentile(level.latencies, 99)
    assert left["count"] == 0 and left["data"] == []
    # 3 warm-up requests and the timed ones, 2 images each, all adapted
    images = [
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("tta_images_total{") and 'adapted="true"' in line
    ]
    assert sum(images) == 2 * (3 + len(level.latencies))


def test_an_unknown_client_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown client 'curl'"):
        asyncio.run(sweep_level("http://127.0.0.1:9", "adabn", 1, 1, 0.1, b"", "curl"))
