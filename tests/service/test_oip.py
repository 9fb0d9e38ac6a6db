"""The Open Inference Protocol (v2) subset, with hand-built request bodies, and /metrics."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.service.helpers import (
    MODEL,
    Server,
    normalized,
    random_pixels,
    running_server,
    server_settings,
    v1_probabilities,
)

INFER = f"/v2/models/{MODEL}/infer"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Server]:
    settings = server_settings(tmp_path_factory.mktemp("data"), model_cache, metrics_top_k=2)
    with running_server(settings) as running:
        yield running


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client() as http:
        yield http


def twins(client: httpx.Client, name: str) -> tuple[str, str]:
    """Two fresh adabn streams (the v1 one is the reference for the v2 one)."""
    for suffix in ("v1", "v2"):
        client.post("/v1/streams", json={"id": f"{name}-{suffix}", "adapter": "adabn"})
    return f"{name}-v1", f"{name}-v2"


def test_health_and_metadata(client: httpx.Client) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    ready = client.get("/v2/health/ready")
    assert ready.status_code == 200 and ready.json() == {"ready": True}
    assert client.get(f"/v2/models/{MODEL}/ready").json() == {"name": MODEL, "ready": True}
    metadata = client.get(f"/v2/models/{MODEL}").json()
    assert metadata["name"] == MODEL
    assert {"name": "input", "datatype": "UINT8", "shape": [-1, 3, 32, 32]} in metadata["inputs"]
    assert "binary_tensor_data" in client.get("/v2").json()["extensions"]
    assert client.get(f"/v2/models/{MODEL}/versions/1").json() == metadata
    assert client.get(f"/v2/models/{MODEL}/versions/1/ready").json()["ready"] is True
    missing = client.get(f"/v2/models/{MODEL}/versions/2")
    assert missing.status_code == 404
    assert missing.json() == {"error": "model version '2' does not exist; versions: 1"}


def test_infer_json_uint8(client: httpx.Client) -> None:
    """A hand-built v2 JSON request, as a KServe/Triton client sends it."""
    reference, stream = twins(client, "oip-json")
    pixels = random_pixels(2, 1)
    body = {
        "id": "request-7",
        "parameters": {"stream_id": stream},
        "inputs": [
            {
                "name": "input",
                "shape": [2, 3, 32, 32],
                "datatype": "UINT8",
                "data": pixels.transpose(0, 3, 1, 2).flatten().tolist(),
            }
        ],
    }
    response = client.post(
        INFER, content=json.dumps(body), headers={"content-type": "application/json"}
    )
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["model_name"] == MODEL and result["id"] == "request-7"
    assert result["parameters"] == {"stream_id": stream, "samples": 2}
    outputs = {o["name"]: o for o in result["outputs"]}
    assert set(outputs) == {"logits", "probabilities", "class_index", "label"}
    assert outputs["probabilities"]["shape"] == [2, 10]
    probabilities = np.array(outputs["probabilities"]["data"], np.float32).reshape(2, 10)
    np.testing.assert_allclose(
        probabilities, v1_probabilities(client, reference, pixels), rtol=1e-5, atol=1e-7
    )
    assert outputs["class_index"]["data"] == probabilities.argmax(1).tolist()
    assert outputs["label"]["datatype"] == "BYTES" and len(outputs["label"]["data"]) == 2


def test_infer_fp32_with_header_stream_id(client: httpx.Client) -> None:
    reference, stream = twins(client, "oip-fp32")
    pixels = random_pixels(1, 2)
    body = {
        "inputs": [
            {
                "name": "input",
                "shape": [1, 3, 32, 32],
                "datatype": "FP32",
                "data": normalized(pixels).flatten().tolist(),
            }
        ],
        "outputs": [{"name": "probabilities"}],
    }
    response = client.post(
        f"/v2/models/{MODEL}/versions/1/infer", json=body, headers={"x-stream-id": stream}
    )
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    probabilities = np.array(output["data"], np.float32).reshape(1, 10)
    np.testing.assert_allclose(
        probabilities, v1_probabilities(client, reference, pixels), rtol=1e-5, atol=1e-7
    )


def test_infer_binary_extension(client: httpx.Client) -> None:
    """Binary input after the JSON header, binary outputs back (the Triton client's format)."""
    reference, stream = twins(client, "oip-bin")
    pixels = random_pixels(3, 3)
    data = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)).tobytes()
    header = json.dumps(
        {
            "parameters": {"stream_id": stream},
            "inputs": [
                {
                    "name": "input",
                    "shape": [3, 3, 32, 32],
                    "datatype": "UINT8",
                    "parameters": {"binary_data_size": len(data)},
                }
            ],
            "outputs": [
                {"name": "probabilities", "parameters": {"binary_data": True}},
                {"name": "label", "parameters": {"binary_data": True}},
                {"name": "class_index"},
            ],
        }
    ).encode()
    response = client.post(
        INFER,
        content=header + data,
        headers={
            "content-type": "application/octet-stream",
            "inference-header-content-length": str(len(header)),
        },
    )
    assert response.status_code == 200, response.text
    size = int(response.headers["inference-header-content-length"])
    result = json.loads(response.content[:size])
    binary = response.content[size:]
    outputs = {o["name"]: o for o in result["outputs"]}
    length = outputs["probabilities"]["parameters"]["binary_data_size"]
    assert length == 3 * 10 * 4
    probabilities = np.frombuffer(binary[:length], np.float32).reshape(3, 10)
    np.testing.assert_allclose(
        probabilities, v1_probabilities(client, reference, pixels), rtol=1e-5, atol=1e-7
    )
    labels, rest = [], binary[length:]
    while rest:
        (n,) = struct.unpack_from("<I", rest)
        labels.append(rest[4 : 4 + n].decode())
        rest = rest[4 + n :]
    assert len(labels) == 3
    assert outputs["class_index"]["data"] == probabilities.argmax(1).tolist()


def test_infer_stream_of_another_model_or_unknown(client: httpx.Client) -> None:
    body = {
        "parameters": {"stream_id": "nobody"},
        "inputs": [
            {"name": "input", "shape": [1, 3, 32, 32], "datatype": "UINT8", "data": [0] * 3072}
        ],
    }
    response = client.post(INFER, json=body)
    assert response.status_code == 404
    assert response.json() == {"error": "stream 'nobody' not found"}


def test_metrics_are_exposed_and_parse(client: httpx.Client) -> None:
    for index in range(4):
        client.post("/v1/streams", json={"id": f"met-{index}", "adapter": "adabn"})
        v1_probabilities(client, f"met-{index}", random_pixels(2 + index, index) // (index + 1))
    text = client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "tta_http_requests",
        "tta_http_request_duration_seconds",
        "tta_stage_duration_seconds",
        "tta_batch_images",
        "tta_batch_requests",
        "tta_queue_depth",
        "tta_images",
        "tta_streams",
        "tta_streams_active",
        "tta_streams_evicted",
        "tta_store_errors",
        "tta_model_info",
        "tta_stream_drift",
        "tta_stream_entropy",
    ):
        assert name in families, name
    assert families["tta_stage_duration_seconds"].type == "histogram"
    stages = {s.labels["stage"] for s in families["tta_stage_duration_seconds"].samples}
    assert {"queue", "decode", "forward", "store"} <= stages
    routes = {s.labels["route"] for s in families["tta_http_requests"].samples}
    assert "/v1/streams/{stream_id}/predict" in routes
    assert not any("met-" in route for route in routes)
    # Per-stream gauges: only the top-K (K = 2) streams by severity, each at two depths.
    drift = families["tta_stream_drift"].samples
    assert len({s.labels["stream"] for s in drift}) == 2
    assert sorted(s.labels["depth"] for s in drift) == ["early", "early", "late", "late"]
    (info,) = families["tta_model_info"].samples
    assert info.labels["model"] == MODEL and info.labels["device"] == "cpu"


def test_an_unknown_output_is_refused_before_the_stream_adapts(client: httpx.Client) -> None:
    client.post("/v1/streams", json={"id": "oip-outputs", "adapter": "adabn"})
    before = client.get("/v1/streams/oip-outputs/state").content
    pixels = random_pixels(1, 3).transpose(0, 3, 1, 2)
    body = {
        "parameters": {"stream_id": "oip-outputs"},
        "inputs": [
            {
                "name": "input",
                "shape": [1, 3, 32, 32],
                "datatype": "UINT8",
                "data": pixels.ravel().tolist(),
            }
        ],
        "outputs": [{"name": "embedding"}],
    }
    response = client.post(INFER, json=body)
    assert response.status_code == 400
    assert response.json() == {
        "error": "unknown output 'embedding'; valid: logits, probabilities, class_index, label"
    }
    assert client.get("/v1/streams/oip-outputs/state").content == before
    assert client.get("/v1/streams/oip-outputs").json()["samples"] == 0
