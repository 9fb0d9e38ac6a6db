"""A server whose engine runs the compiled forward (engine_mode=compiled): its warm-up layout is
compiled before it is ready, and every answer is the eager engine's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.service.helpers import (
    MODEL,
    metric,
    normalized,
    random_pixels,
    reference_engine,
    running_server,
    server_settings,
    v1_probabilities,
)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_compiled_server_answers_as_the_eager_engine(tmp_path: Path, model_cache: Path) -> None:
    settings = server_settings(
        tmp_path, model_cache, engine_mode="compiled", compile_warmup=[(1, 1)]
    )
    reference = reference_engine(model_cache)
    pixels = random_pixels(4, seed=3)
    # the warm-up compiles the default adapter's (balanced) forward: minutes on 2 CPU cores
    with running_server(settings, start_timeout_s=900) as server, server.client() as client:
        assert client.get("/v2/health/ready").status_code == 200
        assert metric(client, "tta_compiled_layouts", model=MODEL) == 1  # the warm-up's
        stream = client.post("/v1/streams", json={"model": MODEL}).json()  # the default
        got = [v1_probabilities(client, stream["id"], pixels[i : i + 1]) for i in range(4)]
        assert metric(client, "tta_compiled_layouts", model=MODEL) == 1  # no new layout
    expected_stream = reference.open_stream(stream["adapter"], stream["config"])
    for index, probabilities in enumerate(got):
        logits = reference.forward(normalized(pixels[index : index + 1]), [(expected_stream, 1)])
        expected = torch.softmax(logits.logits, 1).numpy()
        np.testing.assert_allclose(probabilities, expected, atol=1e-4)
