"""An ONNX classifier served like a PyTorch model, and a bad ONNX file refused at load alone."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from models.export_onnx import export_onnx
from tests.service.helpers import MODEL, png, random_pixels, running_server, server_settings

ONNX = "resnet20-onnx"


def test_an_onnx_model_is_served_like_a_pytorch_one(
    tmp_path: Path, model_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Streams, predict and OIP infer on the ONNX file give the PyTorch model's answers; a
    truncated file next to it is refused with its reason, and the server serves the others."""
    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    export_onnx(MODEL, good, cache_dir=model_cache)
    bad.write_bytes(good.read_bytes()[:1000])
    settings = server_settings(
        tmp_path,
        model_cache,
        onnx_models=[
            {"name": ONNX, "file": good, "labels": ["l" + str(i) for i in range(10)]},
            {"name": "broken", "file": bad},
        ],
    )
    pixels = random_pixels(4, 3)
    files = [("images", (f"{i}.png", png(a), "image/png")) for i, a in enumerate(pixels)]
    with caplog.at_level(logging.ERROR), running_server(settings) as server, server.client() as c:
        served = {m["name"]: m for m in c.get("/v1/models").json()["data"]}
        assert set(served) == {MODEL, ONNX}
        assert served[ONNX]["architecture"] == "onnx" and served[ONNX]["input_size"] == [32, 32]
        probabilities = {}
        for model in (MODEL, ONNX):
            created = c.post("/v1/streams", json={"id": model, "model": model, "adapter": "adabn"})
            assert created.status_code == 201, created.text
            for _ in range(2):
                response = c.post(f"/v1/streams/{model}/predict", files=files, params={"top_k": 10})
                assert response.status_code == 200, response.text
            rows = response.json()["predictions"]
            probabilities[model] = np.array(
                [sorted((s["index"], s["probability"]) for s in row["top_k"]) for row in rows]
            )[:, :, 1]
        np.testing.assert_allclose(probabilities[ONNX], probabilities[MODEL], atol=1e-5)
        body = {
            "parameters": {"stream_id": ONNX},
            "inputs": [
                {
                    "name": "input",
                    "shape": [4, 3, 32, 32],
                    "datatype": "UINT8",
                    "data": pixels.transpose(0, 3, 1, 2).flatten().tolist(),
                }
            ],
        }
        infer = c.post(f"/v2/models/{ONNX}/infer", json=body)
        assert infer.status_code == 200, infer.text
        outputs = {o["name"]: o for o in infer.json()["outputs"]}
        assert outputs["label"]["data"][0].startswith("l")
        metrics = c.get("/metrics").text
        assert f'model="{ONNX}"' in metrics and 'backend="onnx"' in metrics
    (refusal,) = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refusal.startswith(
        "model broken refused: bad.onnx is not a valid ONNX model (malformed or truncated file)"
    )


def test_model_names_must_not_repeat_across_backends(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from service.settings import Settings

    with pytest.raises(ValidationError, match=r"model names .* must not repeat"):
        Settings(models=[MODEL], onnx_models=[{"name": MODEL, "file": tmp_path / "m.onnx"}])
    with pytest.raises(ValidationError, match="no model to serve"):
        Settings(models=[])
