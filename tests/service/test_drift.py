"""The batched drift summaries equal the engine's per-stream drift reports."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from adapters import ADAPTERS
from tests.service.helpers import normalized, random_pixels, reference_engine


def test_summaries_equal_the_engine_reports(model_cache: Path) -> None:
    engine = reference_engine(model_cache)
    handles = [engine.open_stream(name, None, seed=7) for name in sorted(ADAPTERS)]
    handles += [engine.open_stream("adabn", None, seed=1)]  # stays fresh: nothing observed
    adapted = handles[:-1]
    for step in range(2):
        pixels = random_pixels(3 * len(adapted), step)
        engine.forward(normalized(pixels), [(h, 3) for h in adapted])
    summaries = engine.drift_summaries(handles)
    for handle, summary in zip(handles, summaries, strict=True):
        report = engine.drift(handle)
        assert summary["images"] == report["images"]
        for depth in ("overall", "early", "late"):
            assert summary[depth] == pytest.approx(report[depth], rel=1e-9, abs=1e-12)
        for key in ("entropy", "confidence"):
            if report[key] is None:
                assert summary[key] is None
            else:
                assert summary[key] == pytest.approx(report[key], rel=1e-9)
        if report["images"]:
            frequencies = report["class_frequencies"]
            assert summary["dominant_class_share"] == pytest.approx(max(frequencies), rel=1e-9)
            normalized_entropy = report["entropy"] / math.log(len(frequencies))
            assert summary["entropy_normalized"] == pytest.approx(normalized_entropy, rel=1e-9)
        else:
            assert summary["dominant_class_share"] is None
            assert summary["entropy_normalized"] is None
    assert summaries[-1]["images"] == 0 and summaries[-1]["overall"]["jeffreys"] == 0.0
    assert summaries[0]["overall"]["jeffreys"] > 0
    assert engine.drift_summaries([]) == []
    assert torch.is_inference_mode_enabled() is False
