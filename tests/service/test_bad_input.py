"""Every bad input through real HTTP: the exact status and message, and no stream changes."""

from __future__ import annotations

import base64
import gzip
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.service.helpers import (
    Server,
    normalized,
    png,
    png_with_declared_size,
    random_pixels,
    running_server,
    server_settings,
    snapshot,
)

MAX_IMAGE_BYTES = 20_000
MAX_PIXELS = 1_000_000
MAX_BODY = 1_000_000
MAX_IMAGES = 8
OCTET = {"content-type": "application/octet-stream"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Server]:
    """A server with small limits and two streams that have seen some images."""
    settings = server_settings(
        tmp_path_factory.mktemp("data"),
        model_cache,
        max_image_bytes=MAX_IMAGE_BYTES,
        max_image_pixels=MAX_PIXELS,
        max_body_bytes=MAX_BODY,
        max_images_per_request=MAX_IMAGES,
    )
    with running_server(settings) as running, running.client() as client:
        client.post("/v1/streams", json={"id": "cam-a", "adapter": "adabn"})
        client.post(
            "/v1/streams", json={"id": "cam-b", "adapter": "unmix_tns", "config": {"components": 4}}
        )
        for stream_id in ("cam-a", "cam-b"):
            files = [("images", ("x.png", png(a), "image/png")) for a in random_pixels(2, 7)]
            assert client.post(f"/v1/streams/{stream_id}/predict", files=files).status_code == 200
        yield running


def upload(data: bytes, name: str = "x.png", kind: str = "image/png") -> dict:
    """A multipart body with one file."""
    return {"files": [("images", (name, data, kind))]}


def jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def encoded(mode: str, fmt: str = "PNG") -> bytes:
    """A 32x32 image of ``mode`` encoded as ``fmt``."""
    buffer = io.BytesIO()
    Image.new(mode, (32, 32)).save(buffer, fmt)
    return buffer.getvalue()


def raw(array: np.ndarray, shape: str, dtype: str) -> dict:
    return {
        "content": array.tobytes(),
        "params": {"shape": shape, "dtype": dtype},
        "headers": OCTET,
    }


PREDICT = "/v1/streams/cam-a/predict"
GOOD_FLOATS = normalized(random_pixels(1, 3)).numpy()
NAN = GOOD_FLOATS.copy()
NAN[0, 1, 2, 3] = np.nan
INF = GOOD_FLOATS.copy()
INF[0, 0, 0, 0] = np.inf
JPEG = jpeg(random_pixels(1, 1)[0])
NOISE = random_pixels(1, 9, size=120)[0]  # ~43 kB as PNG: over the 20 kB image limit

# (name, method, path, request kwargs (a callable gets the client), status, code, message)
Case = tuple[str, str, str, dict | Callable[[httpx.Client], dict], int, str, str]
CASES: list[Case] = [
    (
        "undecodable image",
        "POST",
        PREDICT,
        upload(b"this is not an image"),
        400,
        "invalid_image",
        "image 0: cannot decode image: not a JPEG, PNG or WebP file",
    ),
    (
        "jpeg truncated in the header",
        "POST",
        PREDICT,
        upload(JPEG[:300], "x.jpg", "image/jpeg"),
        400,
        "invalid_image",
        "image 0: cannot decode image: the file is truncated or corrupt",
    ),
    (
        "jpeg truncated in the data",
        "POST",
        PREDICT,
        upload(JPEG[: len(JPEG) - 400], "x.jpg", "image/jpeg"),
        400,
        "invalid_image",
        "image 0: cannot decode JPEG image: the file is truncated or corrupt (image file is "
        "truncated",
    ),
    (
        "truncated png",
        "POST",
        PREDICT,
        upload(png(random_pixels(1, 1)[0])[:1500]),
        400,
        "invalid_image",
        "image 0: cannot decode PNG image: the file is truncated or corrupt",
    ),
    (
        "image over the byte limit",
        "POST",
        PREDICT,
        upload(png(NOISE)),
        413,
        "payload_too_large",
        f"image 0: image is {len(png(NOISE))} bytes; the limit is {MAX_IMAGE_BYTES} bytes",
    ),
    (
        "decompression bomb over the pixel limit",
        "POST",
        PREDICT,
        upload(png_with_declared_size(5000, 5000)),
        413,
        "payload_too_large",
        f"image 0: image is 5000x5000 = 25000000 pixels; the limit is {MAX_PIXELS} pixels",
    ),
    (
        "decompression bomb refused by Pillow",
        "POST",
        PREDICT,
        upload(png_with_declared_size(100_000, 100_000)),
        413,
        "payload_too_large",
        "image 0: image refused as a decompression bomb:",
    ),
    (
        "16-bit image",
        "POST",
        PREDICT,
        upload(encoded("I;16")),
        400,
        "invalid_image",
        "image 0: unsupported image mode 'I;16': send 8-bit RGB, RGBA, grayscale or palette images",
    ),
    (
        "a GIF",
        "POST",
        PREDICT,
        upload(encoded("P", "GIF"), "x.gif", "image/gif"),
        400,
        "invalid_image",
        "image 0: cannot decode image: not a JPEG, PNG or WebP file",
    ),
    (
        "second image bad",
        "POST",
        PREDICT,
        {
            "files": [
                ("images", ("a.png", png(random_pixels(1, 1)[0]), "image/png")),
                ("images", ("b.png", b"\x89PNG\r\n\x1a\n broken", "image/png")),
            ]
        },
        400,
        "invalid_image",
        "image 1: cannot decode",
    ),
    (
        "too many images",
        "POST",
        PREDICT,
        {
            "files": [
                ("images", (f"{i}.png", png(a), "image/png"))
                for i, a in enumerate(random_pixels(MAX_IMAGES + 2, 2))
            ]
        },
        413,
        "payload_too_large",
        "more than 8 images in one request; the limit is 8",
    ),
    (
        "too many raw images",
        "POST",
        PREDICT,
        raw(np.zeros((9, 3, 32, 32), np.uint8), "9,3,32,32", "uint8"),
        413,
        "payload_too_large",
        "9 images in one request; the limit is 8",
    ),
    (
        "no images",
        "POST",
        PREDICT,
        {"data": {"field": "value"}, "files": [("other", ("x", b"", "x/y"))]},
        400,
        "invalid_image",
        "image 0: image is empty",
    ),
    (
        "invalid base64",
        "POST",
        PREDICT,
        {"json": {"images": ["not base64 !!"]}},
        400,
        "invalid_image",
        "image 0: not valid base64",
    ),
    (
        "JSON body without images",
        "POST",
        PREDICT,
        {"json": {"pictures": []}},
        400,
        "invalid_input",
        "invalid JSON images body: images: Field required",
    ),
    (
        "wrong tensor shape",
        "POST",
        PREDICT,
        raw(np.zeros((1, 3, 16, 16), np.uint8), "1,3,16,16", "uint8"),
        422,
        "invalid_tensor",
        "tensor shape [1, 3, 16, 16] does not fit model cifar10_resnet20: "
        "expected [N, 3, 32, 32] with N >= 1",
    ),
    (
        "channels last",
        "POST",
        PREDICT,
        raw(np.zeros((1, 32, 32, 3), np.uint8), "1,32,32,3", "uint8"),
        422,
        "invalid_tensor",
        "tensor shape [1, 32, 32, 3] does not fit model cifar10_resnet20",
    ),
    (
        "wrong tensor dtype",
        "POST",
        PREDICT,
        raw(np.zeros((1, 3, 32, 32), np.float64), "1,3,32,32", "float64"),
        422,
        "invalid_tensor",
        "unsupported tensor dtype 'float64': expected one of uint8, float32",
    ),
    (
        "tensor bytes do not match the shape",
        "POST",
        PREDICT,
        raw(np.zeros(100, np.uint8), "1,3,32,32", "uint8"),
        422,
        "invalid_tensor",
        "tensor data is 100 bytes; shape [1, 3, 32, 32] of uint8 needs 3072 bytes",
    ),
    (
        "malformed shape",
        "POST",
        PREDICT,
        raw(np.zeros(3072, np.uint8), "1x3x32x32", "uint8"),
        422,
        "invalid_tensor",
        "invalid tensor shape '1x3x32x32'",
    ),
    (
        "raw tensor without shape",
        "POST",
        PREDICT,
        {"content": b"\x00" * 3072, "headers": OCTET},
        400,
        "invalid_input",
        "a raw tensor needs its shape",
    ),
    (
        "NaN in a float tensor",
        "POST",
        PREDICT,
        raw(NAN, "1,3,32,32", "float32"),
        422,
        "invalid_tensor",
        "tensor holds NaN or infinite values",
    ),
    (
        "inf in a float tensor",
        "POST",
        PREDICT,
        raw(INF, "1,3,32,32", "float32"),
        422,
        "invalid_tensor",
        "tensor holds NaN or infinite values",
    ),
    (
        "OIP body over the size limit",
        "POST",
        "/v2/models/cifar10_resnet20/infer",
        {"content": b"\x00" * (MAX_BODY + 1), "headers": {"content-type": "application/json"}},
        413,
        "payload_too_large",
        f"request body is larger than the limit of {MAX_BODY} bytes",
    ),
    (
        "body over the size limit",
        "POST",
        PREDICT,
        {"content": b"\x00" * (MAX_BODY + 1), "headers": OCTET, "params": {"shape": "1,3,32,32"}},
        413,
        "payload_too_large",
        f"request body is larger than the limit of {MAX_BODY} bytes",
    ),
    (
        "unsupported content type",
        "POST",
        PREDICT,
        {"content": b"hello", "headers": {"content-type": "text/plain"}},
        415,
        "unsupported_media_type",
        "content type 'text/plain' is not accepted here; use multipart/form-data, "
        "application/json, application/octet-stream",
    ),
    (
        "unknown stream",
        "POST",
        "/v1/streams/ghost/predict",
        upload(png(random_pixels(1, 1)[0])),
        404,
        "stream_not_found",
        "stream 'ghost' not found",
    ),
    (
        "path-like stream id",
        "POST",
        "/v1/streams",
        {"json": {"id": "../../etc/passwd"}},
        422,
        "invalid_stream_id",
        "invalid stream id '../../etc/passwd': use 1-128 letters, digits, '.', '_' or '-', "
        "starting with a letter or digit",
    ),
    (
        "dot stream id in the path",
        "GET",
        "/v1/streams/..%2E/state",
        {},
        422,
        "invalid_stream_id",
        "invalid stream id '...'",
    ),
    (
        "unknown model",
        "POST",
        "/v1/streams",
        {"json": {"model": "resnet50"}},
        404,
        "model_not_found",
        "model 'resnet50' is not served here; served: cifar10_resnet20",
    ),
    (
        "unknown model in OIP",
        "GET",
        "/v2/models/nope",
        {},
        404,
        "model_not_found",
        "model 'nope' is not served here; served: cifar10_resnet20",
    ),
    (
        "unknown adapter",
        "POST",
        "/v1/streams",
        {"json": {"adapter": "tent"}},
        422,
        "unknown_adapter",
        "Unknown adapter 'tent'; valid: adabn, alpha_bn, balanced, gated, momentum, source, tbn, "
        "unmix_tns",
    ),
    (
        "invalid config value",
        "POST",
        "/v1/streams",
        {"json": {"adapter": "alpha_bn", "config": {"alpha": 2}}},
        422,
        "invalid_config",
        "invalid AlphaBNConfig config: alpha: Input should be less than or equal to 1",
    ),
    (
        "balanced statistics over another number of classes than the model's",
        "POST",
        "/v1/streams",
        {"json": {"adapter": "balanced", "config": {"classes": 100}}},
        422,
        "invalid_config",
        "invalid BalancedConfig config: classes: Value error, the model has 10 classes, not 100",
    ),
    (
        "unknown config field",
        "POST",
        "/v1/streams",
        {"json": {"adapter": "adabn", "config": {"momentum": 0.1}}},
        422,
        "invalid_config",
        "invalid AdaBNConfig config: momentum: Extra inputs are not permitted",
    ),
    (
        "invalid TTL",
        "POST",
        "/v1/streams",
        {"json": {"ttl_seconds": -1}},
        422,
        "invalid_request",
        "ttl_seconds: Input should be greater than 0",
    ),
    (
        "state of another adapter",
        "PUT",
        "/v1/streams/cam-a/state",
        lambda client: {"content": client.get("/v1/streams/cam-b/state").content, "headers": OCTET},
        422,
        "state_mismatch",
        "state is for adapter='unmix_tns', this stream has 'adabn'",
    ),
    (
        "malformed state",
        "PUT",
        "/v1/streams/cam-a/state",
        {"content": b"\x10" + b"\x00" * 20, "headers": OCTET},
        422,
        "state_mismatch",
        "not a tta-serve stream state",
    ),
    (
        "a pickle as state",
        "PUT",
        "/v1/streams/cam-a/state",
        {"content": b"\x80\x04\x95" + b"cos\nsystem\n" * 4, "headers": OCTET},
        422,
        "state_mismatch",
        "not a tta-serve stream state",
    ),
    (
        "safetensors without metadata",
        "PUT",
        "/v1/streams/cam-a/state",
        {
            "content": __import__("safetensors.torch").torch.save(
                {"x": __import__("torch").zeros(2)}
            ),
            "headers": OCTET,
        },
        422,
        "state_mismatch",
        "not a tta-serve stream state: no tta-serve metadata",
    ),
    (
        "empty state",
        "PUT",
        "/v1/streams/cam-a/state",
        {"content": b"", "headers": OCTET},
        400,
        "invalid_input",
        "the state body is empty",
    ),
    (
        "OIP without a stream, with an adapter that keeps a state",
        "POST",
        "/v2/models/cifar10_resnet20/infer",
        {
            "json": {
                "parameters": {"adapter": "adabn"},
                "inputs": [
                    {
                        "name": "input",
                        "shape": [1, 3, 32, 32],
                        "datatype": "UINT8",
                        "data": [0] * 3072,
                    }
                ],
            }
        },
        400,
        "invalid_input",
        "adapter 'adabn' keeps a state, so it needs a stream (sequence_id or stream_id); "
        "without one: alpha_bn, source, tbn",
    ),
    (
        "OIP unknown input",
        "POST",
        "/v2/models/cifar10_resnet20/infer",
        {
            "json": {
                "parameters": {"stream_id": "cam-a"},
                "inputs": [
                    {
                        "name": "foo",
                        "shape": [1, 3, 32, 32],
                        "datatype": "UINT8",
                        "data": [0] * 3072,
                    }
                ],
            }
        },
        400,
        "invalid_input",
        "unknown input 'foo': the model's only input is 'input'",
    ),
    (
        "OIP gzip bomb",
        "POST",
        "/v2/models/cifar10_resnet20/infer",
        {
            "content": gzip.compress(b"{" + b" " * (MAX_BODY + 1) + b"}"),
            "headers": {"content-type": "application/json", "content-encoding": "gzip"},
        },
        413,
        "payload_too_large",
        f"the request body inflates to more than the limit of {MAX_BODY} bytes",
    ),
    (
        "corrupt gzip body",
        "POST",
        "/v1/streams",
        {
            "content": b"\x1f\x8bnot gzip",
            "headers": {"content-type": "application/json", "content-encoding": "gzip"},
        },
        400,
        "invalid_input",
        "the gzip request body is corrupt",
    ),
    (
        "unsupported content encoding",
        "POST",
        "/v2/models/cifar10_resnet20/infer",
        {
            "content": b"{}",
            "headers": {"content-type": "application/json", "content-encoding": "br"},
        },
        415,
        "unsupported_media_type",
        "content encoding 'br' is not supported; use gzip or deflate",
    ),
    (
        "OIP wrong datatype",
        "POST",
        "/v2/models/cifar10_resnet20/infer",
        {
            "json": {
                "parameters": {"stream_id": "cam-a"},
                "inputs": [
                    {
                        "name": "input",
                        "shape": [1, 3, 32, 32],
                        "datatype": "FP64",
                        "data": [0.0] * 3072,
                    }
                ],
            }
        },
        400,
        "invalid_input",
        "unsupported datatype 'FP64': expected UINT8 or FP32",
    ),
    (
        "OIP uint8 out of range",
        "POST",
        "/v2/models/cifar10_resnet20/infer",
        {
            "json": {
                "parameters": {"stream_id": "cam-a"},
                "inputs": [
                    {
                        "name": "input",
                        "shape": [1, 3, 32, 32],
                        "datatype": "UINT8",
                        "data": [300] * 3072,
                    }
                ],
            }
        },
        400,  # the protocol's status for every invalid request (422 in v1)
        "invalid_tensor",
        "uint8 tensor data must be integers in 0..255",
    ),
    (
        "OIP NaN",
        "POST",
        "/v2/models/cifar10_resnet20/infer",
        {
            "content": json.dumps(
                {
                    "parameters": {"stream_id": "cam-a"},
                    "inputs": [
                        {
                            "name": "input",
                            "shape": [1, 3, 32, 32],
                            "datatype": "FP32",
                            "data": [float("nan")] * 3072,
                        }
                    ],
                }
            ),
            "headers": {"content-type": "application/json"},
        },
        400,  # the protocol's status for every invalid request (422 in v1)
        "invalid_tensor",
        "tensor holds NaN or infinite values",
    ),
    (
        "OIP binary size mismatch",
        "POST",
        "/v2/models/cifar10_resnet20/infer",
        lambda client: binary_infer(b"\x00" * 100, declared=3072),
        400,
        "invalid_input",
        "binary_data_size 3072 does not match the 100 bytes of binary data",
    ),
    (
        "OIP malformed JSON",
        "POST",
        "/v2/models/cifar10_resnet20/infer",
        {"content": b"{not json", "headers": {"content-type": "application/json"}},
        400,
        "invalid_input",
        "invalid inference request:",
    ),
]


def binary_infer(data: bytes, declared: int) -> dict:
    header = json.dumps(
        {
            "parameters": {"stream_id": "cam-a"},
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 3, 32, 32],
                    "datatype": "UINT8",
                    "parameters": {"binary_data_size": declared},
                }
            ],
        }
    ).encode()
    return {
        "content": header + data,
        "headers": {
            "content-type": "application/octet-stream",
            "inference-header-content-length": str(len(header)),
        },
    }


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_bad_input_changes_nothing(server: Server, case: Case) -> None:
    _, method, path, kwargs, status, code, message = case
    with server.client() as client:
        before = snapshot(client)
        assert set(before) == {"cam-a", "cam-b"}
        request = kwargs(client) if callable(kwargs) else kwargs
        response = client.request(method, path, **request)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        if path.startswith("/v2"):  # the OIP error shape: the message as a plain string
            assert isinstance(error, str) and error.startswith(message), error
        else:
            assert error["code"] == code
            assert error["message"].startswith(message), error["message"]
        assert snapshot(client) == before


def test_base64_image_over_the_limit(server: Server) -> None:
    with server.client() as client:
        before = snapshot(client)
        text = base64.b64encode(png(NOISE)).decode()
        response = client.post(PREDICT, json={"images": [text]})
        assert response.status_code == 413
        assert response.json()["error"]["message"] == (
            f"image 0: image is over the limit of {MAX_IMAGE_BYTES} bytes"
        )
        assert snapshot(client) == before


def test_convertible_modes_are_accepted(server: Server) -> None:
    """Grayscale, RGBA, palette and CMYK images are converted to RGB, not refused."""
    with server.client() as client:
        client.post("/v1/streams", json={"id": "modes", "adapter": "source"})
        for mode, fmt in (("L", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"),
                          ("RGB", "WEBP"), ("LA", "PNG")):  # fmt: skip
            response = client.post("/v1/streams/modes/predict", **upload(encoded(mode, fmt)))
            assert response.status_code == 200, (mode, response.text)
        client.delete("/v1/streams/modes")


@pytest.mark.parametrize("path", [PREDICT, "/v1/streams"])
def test_chunked_body_over_the_limit(server: Server, path: str) -> None:
    """A body without Content-Length is cut off once it passes the limit."""

    def chunks() -> Iterator[bytes]:
        for _ in range(MAX_BODY // 65536 + 2):
            yield b"\x00" * 65536

    with server.client() as client:
        before = snapshot(client)
        response = client.post(path, content=chunks(), params={"shape": "1,3,32,32"}, headers=OCTET)
        assert response.status_code == 413, response.text
        assert response.json()["error"] == {
            "code": "payload_too_large",
            "message": f"request body is larger than the limit of {MAX_BODY} bytes",
        }
        assert snapshot(client) == before
