"""The server on a CUDA device: pinned copies, on-device normalisation, AMP (marked ``gpu``).

The reference is the engine on the CPU. cuDNN convolutions use TF32 by default, so the
comparison tolerances are those of TF32 arithmetic, not bit equality.
"""

from __future__ import annotations

from pathlib import Path

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
from tests.service.test_concurrency import check_concurrent_streams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

OCTET = {"content-type": "application/octet-stream"}


def probabilities(predictions: list[dict]) -> torch.Tensor:
    out = torch.zeros(len(predictions), 10)
    for row, prediction in enumerate(predictions):
        for score in prediction["top_k"]:
            out[row, score["index"]] = score["probability"]
    return out


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp"])
def test_cuda_predictions_match_the_cpu_engine(
    tmp_path: Path, model_cache: Path, amp: bool
) -> None:
    settings = server_settings(tmp_path, model_cache, device="cuda", amp=amp)
    engine = reference_engine(model_cache)
    with running_server(settings) as server, server.client() as client:
        for adapter in ("adabn", "unmix_tns", "momentum", "alpha_bn"):
            stream = client.post("/v1/streams", json={"id": f"gpu-{adapter}", "adapter": adapter})
            stream_json = stream.json()
            handle = engine.open_stream(adapter, stream_json["config"], stream_json["seed"])
            agree = total = 0
            for step in range(3):
                pixels = random_pixels(32, 100 + step)
                response = client.post(
                    f"/v1/streams/gpu-{adapter}/predict",
                    content=np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)).tobytes(),
                    params={"shape": "32,3,32,32", "top_k": 10},
                    headers=OCTET,
                )
                assert response.status_code == 200, response.text
                got = probabilities(response.json()["predictions"])
                expected = engine.forward(normalized(pixels), [(handle, 32)]).logits.softmax(1)
                if not amp:
                    torch.testing.assert_close(got, expected, rtol=0, atol=1e-2)  # TF32: 3e-3 seen
                agree += int((got.argmax(1) == expected.argmax(1)).sum())
                total += 32
            assert agree / total >= (0.99 if not amp else 0.9)
            served = tensors(client.get(f"/v1/streams/gpu-{adapter}/state").content)
            for key, value in tensors(engine.export_stream(handle)).items():
                assert torch.isfinite(served[key]).all()
                if not amp and value.is_floating_point():
                    torch.testing.assert_close(served[key], value, rtol=2e-2, atol=2e-3)


def test_cuda_concurrent_streams(tmp_path: Path, model_cache: Path) -> None:
    check_concurrent_streams(tmp_path, model_cache, rtol=2e-2, atol=2e-3, device="cuda")


def test_cuda_memory_metrics(tmp_path: Path, model_cache: Path) -> None:
    settings = server_settings(tmp_path, model_cache, device="cuda")
    with running_server(settings) as server, server.client() as client:
        client.post("/v1/streams", json={"id": "gpu-metrics"})
        response = client.post(
            "/v1/streams/gpu-metrics/predict",
            content=bytes(4 * 3 * 32 * 32),
            params={"shape": "4,3,32,32"},
            headers=OCTET,
        )
        assert response.status_code == 200, response.text
        text = client.get("/metrics").text
    memory = {
        sample.labels["kind"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "tta_gpu_memory_bytes"
        for sample in family.samples
    }
    # The model's weights and the stream's state live on the GPU.
    assert memory.keys() == {"allocated", "reserved"}
    assert 0 < memory["allocated"] <= memory["reserved"]
