"""Hostile inputs at the edge, through real HTTP: huge float tensors, truncated and oversized
PNGs, and non-finite outputs. Each is refused (or reported) and no stream changes."""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from engine.core import ForwardResult
from models import get_spec
from service.settings import Settings
from tests.service.helpers import (
    MODEL,
    Server,
    normalized,
    png,
    png_with_declared_size,
    random_pixels,
    running_server,
    server_settings,
    snapshot,
)

PREDICT = "/v1/streams/cam-a/predict"
INFER = f"/v2/models/{MODEL}/infer"
OCTET = {"content-type": "application/octet-stream"}
MARGIN = Settings.model_fields["input_range_margin"].default
LOWS, HIGHS = get_spec(MODEL).input_range(MARGIN)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Server]:
    """A server with the default input limits and two streams that have seen some images."""
    settings = server_settings(tmp_path_factory.mktemp("data"), model_cache)
    with running_server(settings) as running, running.client() as client:
        client.post("/v1/streams", json={"id": "cam-a", "adapter": "adabn"})
        client.post("/v1/streams", json={"id": "cam-b", "adapter": "momentum"})
        for stream_id in ("cam-a", "cam-b"):
            files = [("images", ("x.png", png(a), "image/png")) for a in random_pixels(2, 7)]
            assert client.post(f"/v1/streams/{stream_id}/predict", files=files).status_code == 200
        yield running


def floats(value: float, channel: int = 0) -> np.ndarray:
    """A valid normalised image with one value of ``channel`` replaced by ``value``."""
    array = normalized(random_pixels(1, 3)).numpy().copy()
    array[0, channel, 4, 5] = value
    return array


def v1_raw(array: np.ndarray) -> dict[str, Any]:
    return {"content": array.tobytes(), "params": {"shape": "1,3,32,32", "dtype": "float32"}}


def oip_json(array: np.ndarray) -> dict[str, Any]:
    tensor = {"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32"}
    body = {"parameters": {"stream_id": "cam-a"}, "inputs": [{**tensor, "data": array.ravel()}]}
    # json.dumps writes 3e38 as 3e+38 (not Infinity): a finite, valid JSON number
    content = json.dumps(body, default=lambda a: [float(v) for v in a]).encode()
    return {"content": content, "headers": {"content-type": "application/json"}}


def oip_binary(array: np.ndarray) -> dict[str, Any]:
    data = array.astype("<f4").tobytes()
    header = json.dumps(
        {
            "parameters": {"stream_id": "cam-a"},
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 3, 32, 32],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(data)},
                }
            ],
        }
    ).encode()
    return {
        "content": header + data,
        "headers": {**OCTET, "inference-header-content-length": str(len(header))},
    }


def post(client: httpx.Client, path: str, request: dict[str, Any]) -> httpx.Response:
    if path == PREDICT:
        return client.post(path, headers=OCTET, **request)
    return client.post(path, **request)


def probabilities(client: httpx.Client, stream_id: str) -> list[Any]:
    """Every probability of a (uint8) prediction on the stream, and of its OIP twin."""
    files = [("images", ("x.png", png(a), "image/png")) for a in random_pixels(2, 11)]
    response = client.post(f"/v1/streams/{stream_id}/predict", files=files)
    assert response.status_code == 200, response.text
    values = [score["probability"] for p in response.json()["predictions"] for score in p["top_k"]]
    pixels = np.zeros((1, 3, 32, 32), np.uint8) + 100
    body = {
        "parameters": {"stream_id": stream_id},
        "inputs": [
            {"name": "input", "shape": [1, 3, 32, 32], "datatype": "UINT8",
             "data": pixels.ravel().tolist()}
        ],
    }  # fmt: skip
    response = client.post(INFER, json=body)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o["data"] for o in response.json()["outputs"]}
    return values + outputs["probabilities"] + outputs["logits"]


def all_finite(values: list[Any]) -> bool:
    """Every value a finite float (JSON null reads as None)."""
    return all(isinstance(v, float) and math.isfinite(v) for v in values)


# --- defect 1: float inputs are bounded before the forward -----------------------------------

HUGE = [3e38, -3e38, 1e20, HIGHS[1] + 0.5, LOWS[2] - 0.5]
ROUTES = {
    "v1 raw": (PREDICT, v1_raw),
    "OIP JSON": (INFER, oip_json),
    "OIP binary": (INFER, oip_binary),
}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("value", HUGE)
def test_out_of_range_floats_are_refused(server: Server, route: str, value: float) -> None:
    """Finite but huge float32 values get 422 (OIP: 400) naming the range; no stream changes."""
    path, build = ROUTES[route]
    channel = 1 if value == HUGE[3] else 2 if value == HUGE[4] else 0
    with server.client() as client:
        before = snapshot(client)
        response = post(client, path, build(floats(value, channel)))
        assert response.status_code == (400 if path.startswith("/v2") else 422), response.text
        error = response.json()["error"]
        message = error if isinstance(error, str) else error["message"]
        low, high = LOWS[channel], HIGHS[channel]
        assert f"in channel {channel} is outside model {MODEL}'s input range " in message
        assert f"[{low:.4g}, {high:.4g}]" in message
        assert snapshot(client) == before
        assert all_finite(probabilities(client, "cam-a"))


def test_models_list_their_input_limits(server: Server) -> None:
    with server.client() as client:
        (model,) = client.get("/v1/models").json()["data"]
    assert model["input_min"] == pytest.approx(LOWS) and model["input_max"] == pytest.approx(HIGHS)
    assert model["max_image_pixels"] == 2048 * 2048


@pytest.mark.parametrize("route", ROUTES)
def test_floats_at_the_range_edges_are_accepted(server: Server, route: str) -> None:
    """Values at the edges of the input range are valid inputs."""
    path, build = ROUTES[route]
    array = floats(0.0)
    for channel in range(3):
        array[0, channel, 0, 0] = np.float32(LOWS[channel]) + np.float32(1e-5)
        array[0, channel, 0, 1] = np.float32(HIGHS[channel]) - np.float32(1e-5)
    with server.client() as client:
        response = post(client, path, build(array))
        assert response.status_code == 200, response.text


def test_the_range_follows_the_margin_setting(tmp_path: Path, model_cache: Path) -> None:
    """input_range_margin=1 allows exactly the normalised pixel range: every image, black to
    white, normalised in float32, and nothing beyond."""
    lows, highs = get_spec(MODEL).input_range(1.0)
    settings = server_settings(tmp_path, model_cache, input_range_margin=1.0)
    extremes = np.zeros((2, 32, 32, 3), np.uint8)
    extremes[1] = 255
    with running_server(settings) as running, running.client() as client:
        client.post("/v1/streams", json={"id": "cam-a"})
        for image in normalized(extremes).numpy():
            response = post(client, PREDICT, v1_raw(image[None]))
            assert response.status_code == 200, response.text
        response = post(client, PREDICT, v1_raw(floats(highs[0] + 0.01)))
        assert response.status_code == 422, response.text
        assert f"[{lows[0]:.4g}, {highs[0]:.4g}]" in response.json()["error"]["message"]


# --- defect 4: truncated PNGs and dimensions checked before decoding --------------------------


def png_chunks(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(type, payload) of every chunk of a PNG."""
    position = 8
    while position < len(data):
        (length,) = struct.unpack_from(">I", data, position)
        yield data[position + 4 : position + 8], data[position + 8 : position + 8 + length]
        position += 12 + length


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_rewritten(data: bytes, idat: Any) -> bytes:
    """The PNG with each IDAT payload replaced by ``idat(payload)``, every CRC valid."""
    chunks = (
        png_chunk(kind, idat(payload) if kind == b"IDAT" else payload)
        for kind, payload in png_chunks(data)
    )
    return data[:8] + b"".join(chunks)


GOOD_PNG = png(random_pixels(1, 1)[0])
# The image data cut in half and re-wrapped as a complete zlib stream in valid chunks: Pillow
# decodes it without an error and zero-fills the 16 missing rows.
HALF_ROWS = png_rewritten(GOOD_PNG, lambda d: zlib.compress(zlib.decompress(d)[: 16 * 97]))
LAST_ROW = png_rewritten(GOOD_PNG, lambda d: zlib.compress(zlib.decompress(d)[: 31 * 97]))
CUT_IDAT = png_rewritten(GOOD_PNG, lambda d: d[: len(d) // 2])  # a cut zlib stream


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        (HALF_ROWS, "its image data holds 1552 of the 3104 bytes that its 32x32 header promises"),
        (LAST_ROW, "its image data holds 3007 of the 3104 bytes that its 32x32 header promises"),
        (CUT_IDAT, "image file is truncated (0 bytes not processed)"),
    ],
    ids=["half the rows", "last row missing", "cut IDAT"],
)
def test_truncated_png_is_refused(server: Server, data: bytes, detail: str) -> None:
    with server.client() as client:
        before = snapshot(client)
        response = client.post(PREDICT, files=[("images", ("x.png", data, "image/png"))])
        assert response.status_code == 400, response.text
        assert response.json()["error"] == {
            "code": "invalid_image",
            "message": "image 0: cannot decode PNG image: the file is truncated or corrupt "
            f"({detail})",
        }
        assert snapshot(client) == before


def test_complete_pngs_of_every_layout_are_accepted(server: Server) -> None:
    """The row check knows interlaced, palette, gray+alpha and odd-sized PNGs."""
    import io

    from PIL import Image

    pixels = random_pixels(1, 5, size=33)[0][:, :21]
    with server.client() as client:
        for mode in ("RGB", "RGBA", "L", "LA", "P", "1"):
            for interlace in (0, 1):
                buffer = io.BytesIO()
                Image.fromarray(pixels).convert(mode).save(buffer, "PNG", interlace=interlace)
                files = [("images", ("x.png", buffer.getvalue(), "image/png"))]
                response = client.post("/v1/streams/cam-b/predict", files=files)
                assert response.status_code == 200, (mode, interlace, response.text)


def test_pixel_limit_is_the_models(server: Server) -> None:
    """A 32x32 classifier refuses a 4000x4000 header before decoding it (the server-wide limit
    is 16,000,000 pixels; the model's own, 2048 x 2048)."""
    limit = get_spec(MODEL).pixel_limit
    assert limit == 2048 * 2048 < Settings.model_fields["max_image_pixels"].default
    with server.client() as client:
        before = snapshot(client)
        for width, height in ((4000, 4000), (2049, 2048)):
            bomb = png_with_declared_size(width, height)
            response = client.post(PREDICT, files=[("images", ("x.png", bomb, "image/png"))])
            assert response.status_code == 413, response.text
            assert response.json()["error"]["message"] == (
                f"image 0: image is {width}x{height} = {width * height} pixels; "
                f"the limit is {limit} pixels"
            )
        assert snapshot(client) == before


def test_pixel_limit_per_model_setting(tmp_path: Path, model_cache: Path) -> None:
    """model_max_image_pixels replaces the model's own limit (under max_image_pixels)."""
    settings = server_settings(
        tmp_path, model_cache, model_max_image_pixels={MODEL: 1000}, max_image_pixels=900
    )
    with running_server(settings) as running, running.client() as client:
        client.post("/v1/streams", json={"id": "cam-a"})
        (model,) = client.get("/v1/models").json()["data"]
        assert model["max_image_pixels"] == 900
        bomb = png_with_declared_size(31, 31)  # 961 pixels
        response = client.post(PREDICT, files=[("images", ("x.png", bomb, "image/png"))])
        assert response.status_code == 413, response.text
        assert response.json()["error"]["message"].endswith("the limit is 900 pixels")
    settings = server_settings(tmp_path, model_cache, model_max_image_pixels={MODEL: 1000})
    with running_server(settings) as running, running.client() as client:
        bomb = png_with_declared_size(40, 40)
        response = client.post(PREDICT, files=[("images", ("x.png", bomb, "image/png"))])
        assert response.status_code == 413, response.text
        assert response.json()["error"]["message"] == (
            "image 0: image is 40x40 = 1600 pixels; the limit is 1000 pixels"
        )


# --- defect 7: no response carries null (or NaN) probabilities ------------------------------


def test_non_finite_outputs_are_never_sent_as_null(server: Server) -> None:
    """If the forward ever produced NaN, the request fails with a named error, never null."""
    engine = server.app.state.tta.runtimes[MODEL].engine

    real_forward = engine.forward

    def nan_forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> ForwardResult:
        # NaN logits that the engine's own refusal did not flag: the JSON layer's backstop
        result = real_forward(x, *args, **kwargs)
        return dataclasses.replace(result, logits=torch.full_like(result.logits, float("nan")))

    with server.client() as client:
        before = snapshot(client)
        engine.forward = nan_forward
        try:
            # adapt=false: the patched forward leaves the state alone, the sample count too
            files = [("images", ("x.png", GOOD_PNG, "image/png"))]
            v1 = client.post(PREDICT, files=files, params={"adapt": "false"})
            body = json.loads(oip_json(floats(0.0))["content"])
            oip = client.post(
                INFER, json={**body, "parameters": {"stream_id": "cam-a", "adapt": False}}
            )
        finally:
            del engine.forward  # back to the class's method
        for response in (v1, oip):
            assert response.status_code == 500, response.text
            assert "null" not in response.text and "NaN" not in response.text
        assert v1.json()["error"] == {
            "code": "forward_failed",
            "message": "the model produced non-finite outputs for stream 'cam-a'; "
            "no prediction is returned (reset the stream if this persists)",
        }
        assert snapshot(client) == before
        assert all_finite(probabilities(client, "cam-a"))
