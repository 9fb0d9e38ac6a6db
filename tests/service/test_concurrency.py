"""Concurrent load through real HTTP: streams stay isolated and each stream's updates are serial.

Threads post to three streams (three adapters) at once, several threads per stream. A response's
``samples`` is the stream's image count after its request, so it tells where the server put the
request in the stream's order; replaying each stream's requests in that order on an engine built
directly must give the same probabilities and the same final state.
"""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.service.helpers import (
    normalized,
    random_pixels,
    reference_engine,
    running_server,
    server_settings,
    tensors,
)

STREAMS = {
    "iso-momentum": ("momentum", {}),
    "iso-unmix": ("unmix_tns", {"components": 4}),
    "iso-adabn": ("adabn", {"window": 16}),
}
REQUESTS_PER_STREAM = 8
THREADS_PER_STREAM = 2


def test_concurrent_streams_are_isolated_and_ordered(tmp_path: Path, model_cache: Path) -> None:
    check_concurrent_streams(tmp_path, model_cache)


def check_concurrent_streams(
    tmp_path: Path,
    model_cache: Path,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-7,
    **overrides: object,
) -> None:
    """Run the concurrent scenario on a server with ``overrides``; compare with a CPU replay."""
    settings = server_settings(
        tmp_path, model_cache, max_delay_ms=20.0, max_batch_size=64, **overrides
    )
    with running_server(settings) as server, server.client() as client:
        created = {}
        for stream_id, (adapter, config) in STREAMS.items():
            response = client.post(
                "/v1/streams", json={"id": stream_id, "adapter": adapter, "config": config}
            )
            created[stream_id] = response.json()
        # Each request: its stream, its images; 1-3 images each, distinct pixels.
        work = {
            stream_id: [
                random_pixels(1 + (i + k) % 3, seed=100 * k + i) for i in range(REQUESTS_PER_STREAM)
            ]
            for k, stream_id in enumerate(STREAMS)
        }
        results: dict[str, list[tuple[int, np.ndarray, list]]] = {s: [] for s in STREAMS}
        lock = threading.Lock()
        errors: list[str] = []

        def post(stream_id: str, batches: list[np.ndarray]) -> None:
            with server.client() as http:
                for pixels in batches:
                    raw = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)).tobytes()
                    try:
                        response = http.post(
                            f"/v1/streams/{stream_id}/predict",
                            content=raw,
                            params={"shape": f"{len(pixels)},3,32,32", "top_k": 10},
                            headers={"content-type": "application/octet-stream"},
                        )
                    except httpx.HTTPError as error:  # a lost response: say so, not a state diff
                        errors.append(repr(error))
                        return
                    if response.status_code != 200:
                        errors.append(response.text)
                        continue
                    body = response.json()
                    with lock:
                        results[stream_id].append((body["samples"], pixels, body["predictions"]))

        threads = [
            threading.Thread(target=post, args=(stream_id, batches[t::THREADS_PER_STREAM]))
            for stream_id, batches in work.items()
            for t in range(THREADS_PER_STREAM)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        final = {s: tensors(client.get(f"/v1/streams/{s}/state").content) for s in STREAMS}
        metrics = client.get("/metrics").text

    engine = reference_engine(model_cache)
    for stream_id, (adapter, _) in STREAMS.items():
        ordered = sorted(results[stream_id], key=lambda item: item[0])
        # No update was lost, none applied twice: the counts are the running sums.
        counts = np.cumsum([len(pixels) for _, pixels, _ in ordered]).tolist()
        assert [samples for samples, _, _ in ordered] == counts
        handle = engine.open_stream(
            adapter, created[stream_id]["config"], created[stream_id]["seed"]
        )
        for _, pixels, predictions in ordered:
            expected = engine.forward(normalized(pixels), [(handle, len(pixels))]).logits.softmax(1)
            got = torch.zeros_like(expected)
            for row, prediction in enumerate(predictions):
                for score in prediction["top_k"]:
                    got[row, score["index"]] = score["probability"]
            torch.testing.assert_close(got, expected, rtol=max(rtol, 1e-4), atol=max(atol, 1e-6))
        reference = tensors(engine.export_stream(handle))
        for key, value in reference.items():
            torch.testing.assert_close(final[stream_id][key], value, rtol=rtol, atol=atol)

    # The load was really batched: some forward served several requests.
    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    batch = {s.name: s.value for s in families["tta_batch_requests"].samples}
    assert batch["tta_batch_requests_count"] < batch["tta_batch_requests_sum"]


@pytest.mark.parametrize("same_stream_requests", [6])
def test_same_stream_requests_never_share_a_forward(
    tmp_path: Path, model_cache: Path, same_stream_requests: int
) -> None:
    """Concurrent requests of one stream are applied one after another, none lost."""
    settings = server_settings(tmp_path, model_cache, max_delay_ms=20.0)
    with running_server(settings) as server, server.client() as client:
        client.post("/v1/streams", json={"id": "one", "adapter": "adabn"})
        samples: list[int] = []

        def post(seed: int) -> None:
            raw = np.ascontiguousarray(random_pixels(2, seed).transpose(0, 3, 1, 2)).tobytes()
            with server.client() as http:
                response = http.post(
                    "/v1/streams/one/predict",
                    content=raw,
                    params={"shape": "2,3,32,32"},
                    headers={"content-type": "application/octet-stream"},
                )
                samples.append(response.json()["samples"])

        threads = [threading.Thread(target=post, args=(s,)) for s in range(same_stream_requests)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(samples) == [2 * (i + 1) for i in range(same_stream_requests)]
        assert client.get("/v1/streams/one").json()["samples"] == 2 * same_stream_requests
