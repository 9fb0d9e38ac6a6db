"""Triton's own Python clients (``tritonclient.http`` and ``.grpc``), unmodified, on a real server.

What their examples do: health and metadata, stateless inference, Triton sequences
(``sequence_id`` with ``sequence_start``/``sequence_end``), binary tensors, compressed requests
and responses, the classification extension, statistics, config and the repository index. The
predictions are checked against the v1 API's for the same images and adapter.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from tests.service.helpers import (
    MODEL,
    Server,
    nchw,
    random_pixels,
    running_server,
    server_settings,
    v1_probabilities,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Server]:
    settings = server_settings(tmp_path_factory.mktemp("data"), model_cache, grpc_port=0)
    with running_server(settings) as running:
        yield running


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client() as http:
        yield http


@pytest.fixture
def triton(server: Server) -> Iterator[triton_http.InferenceServerClient]:
    client = triton_http.InferenceServerClient(url=server.url.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture
def triton_rpc(server: Server) -> Iterator[triton_grpc.InferenceServerClient]:
    port = server.app.state.tta.grpc_port
    client = triton_grpc.InferenceServerClient(url=f"127.0.0.1:{port}")
    yield client
    client.close()


def infer(
    triton: triton_http.InferenceServerClient,
    pixels: np.ndarray,
    outputs: tuple[str, ...] = ("probabilities",),
    **kwargs: object,
) -> triton_http.InferResult:
    """One inference through the client, the input and outputs as binary data."""
    tensor = triton_http.InferInput("input", [len(pixels), 3, 32, 32], "UINT8")
    tensor.set_data_from_numpy(nchw(pixels), binary_data=True)
    wanted = [triton_http.InferRequestedOutput(name, binary_data=True) for name in outputs]
    return triton.infer(MODEL, [tensor], outputs=wanted, **kwargs)


def test_health_and_metadata(triton: triton_http.InferenceServerClient) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready(MODEL) and triton.is_model_ready(MODEL, "1")
    assert not triton.is_model_ready("nope") and not triton.is_model_ready(MODEL, "2")
    metadata = triton.get_model_metadata(MODEL)
    assert metadata["inputs"] == [{"name": "input", "datatype": "UINT8", "shape": [-1, 3, 32, 32]}]
    assert metadata["parameters"]["stateless_adapter"] == "source"
    assert "sequence" in triton.get_server_metadata()["extensions"]
    config = triton.get_model_config(MODEL)
    assert config["name"] == MODEL and config["input"][0]["dims"] == [3, 32, 32]
    assert triton.get_model_repository_index() == [
        {"name": MODEL, "version": "1", "state": "READY", "reason": ""}
    ]


def test_stateless_inference_is_the_source_model_or_the_named_adapter(
    client: httpx.Client, triton: triton_http.InferenceServerClient
) -> None:
    pixels = random_pixels(4, 11)
    for adapter in ("source", "tbn"):
        client.post("/v1/streams", json={"id": f"ref-{adapter}", "adapter": adapter})
    source = v1_probabilities(client, "ref-source", pixels)
    tbn = v1_probabilities(client, "ref-tbn", pixels)
    assert not np.allclose(source, tbn, atol=1e-3)  # the adapters differ on these images
    result = infer(triton, pixels)
    assert result.get_response()["parameters"] == {"adapter": "source", "stateless": True}
    np.testing.assert_allclose(result.as_numpy("probabilities"), source, rtol=1e-5, atol=1e-6)
    result = infer(triton, pixels, parameters={"adapter": "tbn"})
    np.testing.assert_allclose(result.as_numpy("probabilities"), tbn, rtol=1e-5, atol=1e-6)
    # Nothing was kept: the same request again gives the same answer, and no stream appeared.
    again = infer(triton, pixels, parameters={"adapter": "tbn"})
    np.testing.assert_array_equal(again.as_numpy("probabilities"), result.as_numpy("probabilities"))
    ids = {s["id"] for s in client.get("/v1/streams").json()["data"]}
    assert ids == {"ref-source", "ref-tbn"}


def test_a_stateless_request_refuses_an_adapter_with_a_state(
    triton: triton_http.InferenceServerClient,
) -> None:
    with pytest.raises(InferenceServerException) as refused:
        infer(triton, random_pixels(1, 0), parameters={"adapter": "adabn"})
    assert refused.value.status() == "400"
    assert "adapter 'adabn' keeps a state, so it needs a stream" in refused.value.message()


@pytest.mark.parametrize("sequence_id", [7, "cam-7"])
def test_a_sequence_adapts_like_a_v1_stream_and_ends(
    client: httpx.Client, triton: triton_http.InferenceServerClient, sequence_id: int | str
) -> None:
    """sequence_start creates the stream (default adapter), the sequence adapts it, _end deletes."""
    reference = f"seq-ref-{sequence_id}"
    assert client.post("/v1/streams", json={"id": reference}).status_code == 201
    batches = [random_pixels(3, seed) for seed in (21, 22, 23)]
    flags = [{"sequence_start": True}, {}, {"sequence_end": True}]
    for pixels, flag in zip(batches, flags, strict=True):
        result = infer(triton, pixels, sequence_id=sequence_id, **flag)
        expected = v1_probabilities(client, reference, pixels)
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=1e-5, atol=1e-6)
        if not flag.get("sequence_end"):
            stream = client.get(f"/v1/streams/{sequence_id}").json()
            default = client.get(f"/v1/streams/{reference}").json()  # created without an adapter
            assert (stream["adapter"], stream["config"]) == (default["adapter"], default["config"])
    assert result.get_response()["parameters"]["samples"] == 9
    assert client.get(f"/v1/streams/{sequence_id}").status_code == 404


def test_sequence_start_resets_a_stream_in_progress(
    client: httpx.Client, triton: triton_http.InferenceServerClient
) -> None:
    first, second = random_pixels(4, 31), random_pixels(2, 32)
    infer(triton, first, sequence_id="restart", sequence_start=True)
    restarted = infer(triton, second, sequence_id="restart", sequence_start=True)
    assert restarted.get_response()["parameters"] == {"stream_id": "restart", "samples": 2}
    client.post("/v1/streams", json={"id": "restart-ref"})
    expected = v1_probabilities(client, "restart-ref", second)
    np.testing.assert_allclose(restarted.as_numpy("probabilities"), expected, rtol=1e-5, atol=1e-6)


def test_a_sequence_without_its_start_is_unknown(
    triton: triton_http.InferenceServerClient,
) -> None:
    with pytest.raises(InferenceServerException) as refused:
        infer(triton, random_pixels(1, 0), sequence_id=4242)
    assert refused.value.status() == "404"
    assert refused.value.message() == "stream '4242' not found"


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_and_responses(
    client: httpx.Client, triton: triton_http.InferenceServerClient, algorithm: str
) -> None:
    pixels = random_pixels(8, 41)
    plain = infer(triton, pixels, outputs=("probabilities", "label"))
    compressed = infer(
        triton,
        pixels,
        outputs=("probabilities", "label"),
        request_compression_algorithm=algorithm,
        response_compression_algorithm="gzip",
    )
    np.testing.assert_array_equal(
        compressed.as_numpy("probabilities"), plain.as_numpy("probabilities")
    )
    np.testing.assert_array_equal(compressed.as_numpy("label"), plain.as_numpy("label"))


def test_classification_extension(triton: triton_http.InferenceServerClient) -> None:
    pixels = random_pixels(2, 51)
    tensor = triton_http.InferInput("input", [2, 3, 32, 32], "UINT8")
    tensor.set_data_from_numpy(nchw(pixels))
    outputs = [
        triton_http.InferRequestedOutput("probabilities", class_count=3),
        triton_http.InferRequestedOutput("probabilities", binary_data=True),
    ]
    result = triton.infer(MODEL, [tensor], outputs=outputs[:1])
    probabilities = infer(triton, pixels).as_numpy("probabilities")
    ranked = result.as_numpy("probabilities")
    assert ranked.shape == (2, 3)
    labels = triton.get_model_metadata(MODEL)["parameters"]["labels"]
    for row in range(2):
        best = np.argsort(-probabilities[row])[:3]
        expected = [f"{probabilities[row, i]:f}:{i}:{labels[i]}" for i in best]
        assert [entry.decode() for entry in ranked[row]] == expected


def test_invalid_requests_answer_400(triton: triton_http.InferenceServerClient) -> None:
    pixels = random_pixels(1, 61)
    unknown = triton_http.InferInput("foo", [1, 3, 32, 32], "UINT8")
    unknown.set_data_from_numpy(nchw(pixels))
    wrong_shape = triton_http.InferInput("input", [1, 3, 16, 64], "UINT8")
    wrong_shape.set_data_from_numpy(np.zeros((1, 3, 16, 64), np.uint8))
    wrong_type = triton_http.InferInput("input", [1, 3, 32, 32], "INT32")
    wrong_type.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.int32))
    out_of_range = triton_http.InferInput("input", [1, 3, 32, 32], "FP32")
    out_of_range.set_data_from_numpy(np.full((1, 3, 32, 32), 1e6, np.float32))
    messages = {}
    for name, tensor in [
        ("unknown", unknown),
        ("shape", wrong_shape),
        ("type", wrong_type),
        ("range", out_of_range),
    ]:
        with pytest.raises(InferenceServerException) as refused:
            triton.infer(MODEL, [tensor])
        assert refused.value.status() == "400", (name, refused.value.message())
        messages[name] = refused.value.message()
    assert messages["unknown"] == "unknown input 'foo': the model's only input is 'input'"
    assert "unsupported datatype 'INT32'" in messages["type"]


def test_statistics_count_the_inferences(triton: triton_http.InferenceServerClient) -> None:
    before = triton.get_inference_statistics(MODEL)["model_stats"][0]
    infer(triton, random_pixels(5, 71))
    (stats,) = triton.get_inference_statistics(MODEL)["model_stats"]
    assert stats["name"] == MODEL and stats["version"] == "1"
    assert stats["inference_count"] == before["inference_count"] + 5
    assert stats["execution_count"] == before["execution_count"] + 1
    success = stats["inference_stats"]["success"]
    assert success["count"] == before["inference_stats"]["success"]["count"] + 1
    assert success["ns"] > before["inference_stats"]["success"]["ns"]
    everything = triton.get_inference_statistics()["model_stats"]
    assert [s["name"] for s in everything] == [MODEL]


def grpc_infer(
    triton_rpc: triton_grpc.InferenceServerClient,
    pixels: np.ndarray,
    outputs: tuple[str, ...] = ("probabilities",),
    **kwargs: object,
) -> triton_grpc.InferResult:
    """One inference through the gRPC client."""
    tensor = triton_grpc.InferInput("input", [len(pixels), 3, 32, 32], "UINT8")
    tensor.set_data_from_numpy(nchw(pixels))
    wanted = [triton_grpc.InferRequestedOutput(name) for name in outputs]
    return triton_rpc.infer(MODEL, [tensor], outputs=wanted, **kwargs)


def test_grpc_health_and_metadata(triton_rpc: triton_grpc.InferenceServerClient) -> None:
    assert triton_rpc.is_server_live() and triton_rpc.is_server_ready()
    assert triton_rpc.is_model_ready(MODEL) and not triton_rpc.is_model_ready("nope")
    metadata = triton_rpc.get_model_metadata(MODEL, as_json=True)
    assert metadata["inputs"] == [
        {"name": "input", "datatype": "UINT8", "shape": ["-1", "3", "32", "32"]}
    ]
    assert "sequence" in triton_rpc.get_server_metadata(as_json=True)["extensions"]
    with pytest.raises(InferenceServerException) as unknown:
        triton_rpc.get_model_metadata("nope")
    assert unknown.value.status() == "StatusCode.NOT_FOUND"


def test_grpc_stateless_inference_matches_http(
    triton: triton_http.InferenceServerClient, triton_rpc: triton_grpc.InferenceServerClient
) -> None:
    pixels = random_pixels(3, 81)
    for parameters in ({}, {"adapter": "tbn"}):
        outputs = ("probabilities", "label", "class_index")
        over_http = infer(triton, pixels, outputs, parameters=parameters)
        over_grpc = grpc_infer(triton_rpc, pixels, outputs, parameters=parameters)
        for name in outputs:
            np.testing.assert_array_equal(over_grpc.as_numpy(name), over_http.as_numpy(name))


def test_grpc_sequence_adapts_like_a_v1_stream_and_ends(
    client: httpx.Client, triton_rpc: triton_grpc.InferenceServerClient
) -> None:
    assert client.post("/v1/streams", json={"id": "grpc-seq-ref"}).status_code == 201
    flags = [{"sequence_start": True}, {}, {"sequence_end": True}]
    for seed, flag in zip((91, 92, 93), flags, strict=True):
        pixels = random_pixels(2, seed)
        result = grpc_infer(
            triton_rpc, pixels, sequence_id="grpc-seq", compression_algorithm="gzip", **flag
        )
        expected = v1_probabilities(client, "grpc-seq-ref", pixels)
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=1e-5, atol=1e-6)
    assert result.get_response(as_json=True)["parameters"]["samples"]["int64_param"] == "6"
    assert client.get("/v1/streams/grpc-seq").status_code == 404


def test_grpc_errors_have_their_status_codes(
    triton_rpc: triton_grpc.InferenceServerClient,
) -> None:
    unknown = triton_grpc.InferInput("foo", [1, 3, 32, 32], "UINT8")
    unknown.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.uint8))
    with pytest.raises(InferenceServerException) as refused:
        triton_rpc.infer(MODEL, [unknown])
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert refused.value.message() == "unknown input 'foo': the model's only input is 'input'"
    with pytest.raises(InferenceServerException) as missing:
        grpc_infer(triton_rpc, random_pixels(1, 0), sequence_id=99)
    assert missing.value.status() == "StatusCode.NOT_FOUND"


def test_many_concurrent_stateless_requests_all_succeed(
    client: httpx.Client, server: Server
) -> None:
    """More stateless requests at once than a pool has slots (16 here): batched, none refused."""
    pixels = random_pixels(1, 101)
    body = {
        "parameters": {"adapter": "tbn"},
        "inputs": [
            {
                "name": "input",
                "shape": [1, 3, 32, 32],
                "datatype": "UINT8",
                "data": nchw(pixels).ravel().tolist(),
            }
        ],
        "outputs": [{"name": "class_index"}],
    }

    def post(_: int) -> int:
        with server.client() as own:
            return own.post(f"/v2/models/{MODEL}/infer", json=body).status_code

    with ThreadPoolExecutor(40) as pool:
        statuses = list(pool.map(post, range(40)))
    assert statuses == [200] * 40
    listed = client.get("/v1/streams", params={"limit": 1000}).json()["data"]
    assert not any(stream["id"].startswith("~") for stream in listed)  # nothing was registered


def test_metrics_and_large_responses_are_gzipped(client: httpx.Client) -> None:
    plain = client.get("/metrics", headers={"accept-encoding": "identity"})
    gzipped = client.get("/metrics", headers={"accept-encoding": "gzip"})
    assert "content-encoding" not in plain.headers
    assert gzipped.headers["content-encoding"] == "gzip"
    assert int(gzipped.headers["content-length"]) < len(plain.content) / 3
    assert gzipped.text.splitlines()[:3] == plain.text.splitlines()[:3]


def test_grpc_names_a_v1_stream_with_its_metadata(
    client: httpx.Client, triton_rpc: triton_grpc.InferenceServerClient
) -> None:
    for stream_id in ("grpc-header", "grpc-header-ref"):
        client.post("/v1/streams", json={"id": stream_id, "adapter": "adabn"})
    pixels = random_pixels(2, 111)
    result = grpc_infer(triton_rpc, pixels, headers={"x-stream-id": "grpc-header"})
    expected = v1_probabilities(client, "grpc-header-ref", pixels)
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=1e-5, atol=1e-6)
    assert client.get("/v1/streams/grpc-header").json()["samples"] == 2


def test_the_protocol_settings(tmp_path: Path, model_cache: Path) -> None:
    """oip_sequence_end=keep keeps an ended sequence; oip_stateless_adapter replaces source."""
    settings = server_settings(
        tmp_path, model_cache, oip_sequence_end="keep", oip_stateless_adapter="tbn"
    )
    pixels = random_pixels(3, 121)
    with running_server(settings) as running, running.client() as client:
        triton = triton_http.InferenceServerClient(url=running.url.removeprefix("http://"))
        metadata = triton.get_model_metadata(MODEL)["parameters"]
        assert (metadata["stateless_adapter"], metadata["sequence_end"]) == ("tbn", "keep")
        client.post("/v1/streams", json={"id": "tbn-ref", "adapter": "tbn"})
        stateless = infer(triton, pixels)
        assert stateless.get_response()["parameters"] == {"adapter": "tbn", "stateless": True}
        expected = v1_probabilities(client, "tbn-ref", pixels)
        np.testing.assert_allclose(
            stateless.as_numpy("probabilities"), expected, rtol=1e-5, atol=1e-6
        )
        infer(triton, pixels, sequence_id=5, sequence_start=True, sequence_end=True)
        kept = client.get("/v1/streams/5")
        assert kept.status_code == 200 and kept.json()["samples"] == 3
        triton.close()
