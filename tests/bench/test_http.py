"""bench/http.py's load client against a real uvicorn server: it drives streams and cleans up."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from bench.http import percentile, sweep_level
from tests.service.helpers import running_server, server_settings


def test_sweep_level_measures_every_client_and_deletes_its_streams(
    tmp_path: Path, model_cache: Path
) -> None:
    payload = np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    with running_server(server_settings(tmp_path, model_cache)) as server:
        rate, latencies = asyncio.run(
            sweep_level(server.url, "adabn", 3, 2, 0.5, payload.tobytes())
        )
        with server.client() as client:
            left = client.get("/v1/streams").json()
            metrics = client.get("/metrics").text

    assert rate > 0 and len(latencies) >= 3  # every client completed at least one request
    assert 0 < percentile(latencies, 50) <= percentile(latencies, 99)
    assert left["count"] == 0 and left["data"] == []
    # 3 warm-up requests and the timed ones, 2 images each, all adapted
    images = [
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("tta_images_total{") and 'adapted="true"' in line
    ]
    assert sum(images) == 2 * (3 + len(latencies))
