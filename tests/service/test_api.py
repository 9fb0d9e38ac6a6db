"""The v1 API through a real uvicorn server: lifecycle, predictions equal to the engine's."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from adapters import ADAPTERS
from adapters.presets import preset_config
from tests.service.helpers import (
    MODEL,
    Server,
    normalized,
    png,
    random_pixels,
    reference_engine,
    running_server,
    server_settings,
    tensors,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Server]:
    """One server for this module's tests (each test uses its own stream ids)."""
    data = tmp_path_factory.mktemp("data")
    with running_server(server_settings(data, model_cache)) as running:
        yield running


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    """An HTTP client of the module's server."""
    with server.client() as http:
        yield http


def create(client: httpx.Client, stream_id: str, adapter: str = "adabn", **extra: object) -> dict:
    """Create a stream and return its JSON."""
    response = client.post("/v1/streams", json={"id": stream_id, "adapter": adapter, **extra})
    assert response.status_code == 201, response.text
    return response.json()


def test_stream_lifecycle(client: httpx.Client) -> None:
    created = create(client, "life-1", "alpha_bn", config={"alpha": 0.2}, ttl_seconds=600)
    assert created["model"] == MODEL
    assert created["config"]["alpha"] == 0.2
    assert created["ttl_seconds"] == 600
    assert created["samples"] == 0
    assert client.get("/v1/streams/life-1").json() == created

    duplicate = client.post("/v1/streams", json={"id": "life-1"})
    assert duplicate.status_code == 409
    assert duplicate.json() == {
        "error": {"code": "stream_exists", "message": "stream 'life-1' already exists"}
    }

    generated = client.post("/v1/streams", json={}).json()
    assert generated["id"].startswith("s-")
    assert generated["adapter"] == "balanced"  # the server's default (its 'gated' preset)
    gated = preset_config("balanced", "gated")
    assert {key: generated["config"][key] for key in gated} == gated

    listing = client.get("/v1/streams", params={"limit": 1000}).json()
    assert {"life-1", generated["id"]} <= {s["id"] for s in listing["data"]}
    page = client.get("/v1/streams", params={"offset": 0, "limit": 1}).json()
    assert len(page["data"]) == 1 and page["count"] == listing["count"]

    files = [
        ("images", (f"{i}.png", png(a), "image/png")) for i, a in enumerate(random_pixels(3, 1))
    ]
    predicted = client.post("/v1/streams/life-1/predict", files=files)
    assert predicted.status_code == 200, predicted.text
    assert predicted.json()["samples"] == 3
    assert client.get("/v1/streams/life-1").json()["samples"] == 3

    reset = client.post("/v1/streams/life-1/reset")
    assert reset.status_code == 200 and reset.json()["samples"] == 0

    assert client.delete("/v1/streams/life-1").status_code == 204
    missing = client.get("/v1/streams/life-1")
    assert missing.status_code == 404
    assert missing.json()["error"] == {
        "code": "stream_not_found",
        "message": "stream 'life-1' not found",
    }
    assert client.delete(f"/v1/streams/{generated['id']}").status_code == 204


def test_reset_restores_initial_state(client: httpx.Client) -> None:
    create(client, "reset-1", "unmix_tns", config={"components": 4})
    initial = client.get("/v1/streams/reset-1/state").content
    files = [("images", ("a.png", png(random_pixels(1, 2)[0]), "image/png"))]
    assert client.post("/v1/streams/reset-1/predict", files=files).status_code == 200
    assert client.get("/v1/streams/reset-1/state").content != initial
    client.post("/v1/streams/reset-1/reset")
    assert client.get("/v1/streams/reset-1/state").content == initial


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_predictions_equal_the_engine(
    client: httpx.Client, model_cache: Path, adapter: str
) -> None:
    """Three requests through HTTP give the engine's probabilities and final state."""
    stream = create(client, f"eq-{adapter}", adapter)
    engine = reference_engine(model_cache)
    handle = engine.open_stream(adapter, stream["config"], stream["seed"])
    for step in range(3):
        pixels = random_pixels(4, 10 + step)
        files = [("images", (f"{i}.png", png(a), "image/png")) for i, a in enumerate(pixels)]
        response = client.post(
            f"/v1/streams/eq-{adapter}/predict", files=files, params={"top_k": 10}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        expected = engine.forward(normalized(pixels), [(handle, 4)]).logits.softmax(1)
        for row, prediction in enumerate(body["predictions"]):
            got = torch.zeros(10)
            for score in prediction["top_k"]:
                got[score["index"]] = score["probability"]
            torch.testing.assert_close(got, expected[row], rtol=1e-5, atol=1e-6)
            assert prediction["label"] == prediction["top_k"][0]["label"]
        assert body["samples"] == 4 * (step + 1)
    served = tensors(client.get(f"/v1/streams/eq-{adapter}/state").content)
    reference = tensors(engine.export_stream(handle))
    assert served.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(served[key], reference[key], rtol=1e-5, atol=1e-7)


def test_body_formats_agree(client: httpx.Client) -> None:
    """Multipart, base64 JSON, raw uint8 and raw float32 bodies give the same prediction."""
    pixels = random_pixels(2, 3)
    results = []
    for index, kind in enumerate(("multipart", "json", "uint8", "float32")):
        stream_id = f"fmt-{index}"
        create(client, stream_id, "adabn")
        url = f"/v1/streams/{stream_id}/predict"
        if kind == "multipart":
            files = [("images", (f"{i}.png", png(a), "image/png")) for i, a in enumerate(pixels)]
            response = client.post(url, files=files)
        elif kind == "json":
            images = [base64.b64encode(png(a)).decode() for a in pixels]
            response = client.post(url, json={"images": images})
        elif kind == "uint8":
            raw = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)).tobytes()
            response = client.post(
                url,
                content=raw,
                headers={"content-type": "application/octet-stream", "x-tensor-shape": "2,3,32,32"},
            )
        else:
            raw = normalized(pixels).numpy().tobytes()
            response = client.post(
                url,
                content=raw,
                params={"shape": "2,3,32,32", "dtype": "float32"},
                headers={"content-type": "application/octet-stream"},
            )
        assert response.status_code == 200, response.text
        results.append([p["top_k"] for p in response.json()["predictions"]])
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert [s["index"] for s in a] == [s["index"] for s in b]
            np.testing.assert_allclose(
                [s["probability"] for s in a], [s["probability"] for s in b], rtol=1e-5
            )


def test_adapt_false_and_source(client: httpx.Client) -> None:
    create(client, "frozen-1", "adabn")
    before = client.get("/v1/streams/frozen-1/state").content
    files = [("images", ("a.png", png(random_pixels(1, 4)[0]), "image/png"))]
    response = client.post(
        "/v1/streams/frozen-1/predict", files=files, params={"adapt": "false", "source": "true"}
    )
    body = response.json()
    assert response.status_code == 200
    assert body["adapted"] is False and body["samples"] == 0
    assert len(body["source_predictions"]) == 1
    assert client.get("/v1/streams/frozen-1/state").content == before
    without_drift = client.post(
        "/v1/streams/frozen-1/predict", files=files, params={"drift": False}
    )
    assert without_drift.json()["drift"] is None


def test_real_cifar_jpegs(
    client: httpx.Client, cifar_jpegs: list[tuple[bytes, str]], model_cache: Path
) -> None:
    """Real CIFAR-10 JPEGs: the source stream's labels are the source model's, mostly right."""
    create(client, "cifar-src", "source")
    files = [
        ("images", (f"{i}.jpg", data, "image/jpeg")) for i, (data, _) in enumerate(cifar_jpegs)
    ]
    response = client.post("/v1/streams/cifar-src/predict", files=files, params={"top_k": 1})
    assert response.status_code == 200, response.text
    predicted = [p["label"] for p in response.json()["predictions"]]
    truth = [label for _, label in cifar_jpegs]
    accuracy = sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(truth)
    assert accuracy >= 0.6  # ~81% on this JPEG test set
    engine = reference_engine(model_cache)
    arrays = np.stack(
        [np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d, _ in cifar_jpegs]
    )
    expected = engine.forward_source(normalized(arrays)).argmax(1).tolist()
    labels = client.get("/v1/models").json()["data"][0]["labels"]
    assert predicted == [labels[i] for i in expected]


def test_drift_report(client: httpx.Client) -> None:
    create(client, "drift-1", "adabn")
    pixels = random_pixels(4, 5)
    files = [("images", (f"{i}.png", png(a), "image/png")) for i, a in enumerate(pixels)]
    summary = client.post("/v1/streams/drift-1/predict", files=files).json()["drift"]
    report = client.get("/v1/streams/drift-1/drift").json()
    assert report["images"] == summary["images"] == 4
    assert report["overall"] == pytest.approx(summary["overall"], rel=1e-9)
    assert len(report["class_frequencies"]) == 10


def test_models_and_adapters(client: httpx.Client) -> None:
    models = client.get("/v1/models").json()["data"]
    assert [m["name"] for m in models] == [MODEL]
    assert models[0]["input_size"] == [32, 32] and models[0]["ready"] is True
    adapters = {a["name"]: a for a in client.get("/v1/adapters").json()["data"]}
    assert set(adapters) == set(ADAPTERS)
    assert adapters["alpha_bn"]["config_schema"] == ADAPTERS["alpha_bn"].config.model_json_schema()


def test_openapi_docs(client: httpx.Client) -> None:
    schema = client.get("/openapi.json").json()
    assert "/v1/streams/{stream_id}/predict" in schema["paths"]
    assert "/v2/models/{model}/infer" in schema["paths"]
    assert client.get("/docs").status_code == 200


def test_unknown_route_has_error_body(client: httpx.Client) -> None:
    response = client.get("/v1/nothing")
    assert response.status_code == 404
    assert response.json() == {"error": {"code": "not_found", "message": "Not Found"}}


def test_stream_without_adapter_gets_the_server_default(tmp_path: Path, model_cache: Path) -> None:
    settings = server_settings(
        tmp_path, model_cache, default_adapter="adabn", default_adapter_config={"window": 500}
    )
    with running_server(settings) as server, server.client() as http:
        created = http.post("/v1/streams", json={"id": "defaulted"})
        assert created.status_code == 201, created.text
        assert created.json()["adapter"] == "adabn"
        assert created.json()["config"]["window"] == 500
        explicit = http.post("/v1/streams", json={"id": "explicit", "adapter": "tbn"})
        assert explicit.json()["adapter"] == "tbn"


def test_a_model_where_the_default_state_is_too_large_gets_the_fallback(
    tmp_path: Path, model_cache: Path
) -> None:
    # balanced keeps 2 x classes x channels per BN layer: 135.6 KB on ResNet-20, 223.7 KB on
    # ResNet-32 (docs/performance.md); a budget between them splits the two models.
    models = ["cifar10_resnet20", "cifar10_resnet32"]
    settings = server_settings(tmp_path, model_cache, models=models, default_state_bytes=180_000)
    with running_server(settings) as server, server.client() as http:
        served = {m["name"]: m for m in http.get("/v1/models").json()["data"]}
        assert served["cifar10_resnet20"]["default_adapter"] == "balanced"
        assert served["cifar10_resnet32"]["default_adapter"] == "adabn"
        assert served["cifar10_resnet32"]["default_adapter_config"] == {"prior_images": 64}
        for model, adapter in [("cifar10_resnet20", "balanced"), ("cifar10_resnet32", "adabn")]:
            created = http.post("/v1/streams", json={"model": model}).json()
            assert (created["adapter"], created["model"]) == (adapter, model)
            oip = http.get(f"/v2/models/{model}").json()["parameters"]
            assert oip["sequence_adapter"] == adapter
        # a named adapter is never replaced, whatever its state's size
        named = http.post("/v1/streams", json={"model": models[1], "adapter": "balanced"})
        assert named.json()["adapter"] == "balanced"
