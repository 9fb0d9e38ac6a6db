"""A server whose engine runs the compiled forward (engine_mode=compiled) with layouts compiling
in the background: ready at once, every answer the eager engine's, before and after the layout
is compiled."""

from __future__ import annotations

import time
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
def test_a_compiled_server_serves_while_its_layouts_compile(tmp_path: Path, model_cache: Path):
    settings = server_settings(
        tmp_path,
        model_cache,
        engine_mode="compiled",
        compile_warmup=[(1, 1)],
        compile_in_background=True,
    )
    reference = reference_engine(model_cache)
    pixels = random_pixels(5, seed=3)
    expected_stream = None

    def expected(index: int) -> np.ndarray:
        assert expected_stream is not None
        x = normalized(pixels[index : index + 1])
        logits = reference.forward(x, [(expected_stream, 1)]).logits
        return torch.softmax(logits, 1).numpy()

    with running_server(settings) as server, server.client() as client:
        # Start-up did not wait for the warm-up layout: it compiles in the background.
        assert client.get("/v2/health/ready").status_code == 200
        stream = client.post("/v1/streams", json={"model": MODEL, "adapter": "adabn"}).json()
        stream_id = stream["id"]
        expected_stream = reference.open_stream("adabn", stream["config"])  # the preset's
        got = [v1_probabilities(client, stream_id, pixels[i : i + 1]) for i in range(2)]
        deadline = time.monotonic() + 1200
        while metric(client, "tta_compiled_layouts", model=MODEL, state="ready") < 1:
            assert metric(client, "tta_compiled_layouts", model=MODEL, state="failed") == 0
            assert time.monotonic() < deadline, "the warm-up layout did not compile"
            time.sleep(2)
        got += [v1_probabilities(client, stream_id, pixels[i : i + 1]) for i in range(2, 5)]
        assert metric(client, "tta_compiled_layouts", model=MODEL, state="compiling") == 0
    for index, probabilities in enumerate(got):
        np.testing.assert_allclose(probabilities, expected(index), atol=1e-4)
