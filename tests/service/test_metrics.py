"""The metrics through a real server: every stream is seen, whichever protocol feeds it.

Streams are fed real CIFAR-10 test images, clean or corrupted by ``bench.corruptions``, with
the server's default adapter, so the trouble counts are those of the calibrated thresholds.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.corruptions import corrupt
from bench.traffic import send_v1, send_v2
from service.metrics import StreamSignal, TroubleThresholds
from tests.service.helpers import DEFAULT_ADAPTER, MODEL, running_server, server_settings

Families = dict[str, dict[tuple[tuple[str, str], ...], float]]


def scrape(client: httpx.Client) -> Families:
    """Every sample of /metrics: {sample name: {sorted labels: value}}."""
    samples: Families = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            key = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[key] = sample.value
    return samples


def value(samples: Families, name: str, **labels: str) -> float:
    """The value of the one sample of ``name`` with exactly ``labels``."""
    return samples[name][tuple(sorted(labels.items()))]


def per_stream(samples: Families, name: str) -> dict[str, float]:
    """A per-stream gauge by stream id."""
    return {dict(key)["stream"]: v for key, v in samples.get(name, {}).items()}


def images_of(
    cifar10_test: tuple[np.ndarray, np.ndarray], offset: int, count: int, corruption: str | None
) -> np.ndarray:
    """``count`` test images from ``offset`` as NCHW, corrupted if asked ("fog-4": fog, 4)."""
    images = cifar10_test[0][offset : offset + count]
    if corruption is not None:
        name, severity = corruption.split("-")
        images = corrupt(images, name, int(severity), seed=0, start=offset)
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


def feed(client: httpx.Client, stream_id: str, images: np.ndarray, v2: bool = False) -> None:
    """Create the stream (default adapter) and send it ``images`` in requests of 32."""
    assert client.post("/v1/streams", json={"id": stream_id}).status_code == 201
    for start in range(0, len(images), 32):
        batch = images[start : start + 32]
        response = (
            send_v2(client, MODEL, stream_id, batch) if v2 else send_v1(client, stream_id, batch)
        )
        assert response.status_code == 200, response.text


def test_a_stream_fed_only_over_v2_shows_in_every_view(
    tmp_path: Path, model_cache: Path, cifar10_test: tuple[np.ndarray, np.ndarray]
) -> None:
    settings = server_settings(tmp_path, model_cache)
    with running_server(settings) as server, server.client() as client:
        before = time.time()
        feed(client, "oip-only", images_of(cifar10_test, 0, 128, "gaussian_noise-5"), v2=True)
        after = time.time()
        report = client.get("/v1/streams/oip-only/drift").json()
        samples = scrape(client)
    assert value(samples, "tta_fleet_stream_entropy_gcount", model=MODEL) == 1
    assert value(samples, "tta_fleet_stream_drift_gcount", model=MODEL, depth="late") == 1
    # The signals are the stream's drift report, as GET /drift computes it.
    drift = per_stream(samples, "tta_stream_drift")
    early = value(samples, "tta_stream_drift", model=MODEL, stream="oip-only", depth="early")
    late = value(samples, "tta_stream_drift", model=MODEL, stream="oip-only", depth="late")
    assert drift.keys() == {"oip-only"}
    assert early == pytest.approx(report["early"]["jeffreys"], rel=1e-9)
    assert late == pytest.approx(report["late"]["jeffreys"], rel=1e-9)
    entropy = per_stream(samples, "tta_stream_entropy")["oip-only"]
    assert entropy == pytest.approx(report["entropy"] / math.log(10), rel=1e-9)
    share = per_stream(samples, "tta_stream_dominant_class_share")["oip-only"]
    assert share == pytest.approx(max(report["class_frequencies"]), rel=1e-9)
    assert per_stream(samples, "tta_stream_confidence")["oip-only"] == pytest.approx(
        report["confidence"], rel=1e-9
    )
    assert per_stream(samples, "tta_stream_samples")["oip-only"] == 128
    updated = per_stream(samples, "tta_stream_last_update_timestamp_seconds")["oip-only"]
    assert before <= updated <= after
    # Severe noise: the calibrated thresholds put the stream in trouble by its entropy.
    assert value(samples, "tta_streams_in_trouble", model=MODEL, reason="high_entropy") == 1
    assert value(samples, "tta_streams_in_trouble", model=MODEL, reason="any") == 1
    assert value(samples, "tta_streams_by_adapter", model=MODEL, adapter=DEFAULT_ADAPTER) == 1
    requests = value(
        samples,
        "tta_http_requests_total",
        route="/v2/models/{model}/infer",
        method="POST",
        status="200",
    )
    assert requests == 4


def test_a_broken_stream_is_not_hidden_behind_drifting_ones(
    tmp_path: Path, model_cache: Path, cifar10_test: tuple[np.ndarray, np.ndarray]
) -> None:
    """The issue's scenario: more drifting streams than metrics_top_k, one of them broken.

    Fog (severity 3) moves the early layers' statistics far, but the adapted model still
    predicts as well as on clean images: harmless drift. Gaussian noise drifts less and breaks
    the predictions (high entropy). By drift alone the broken stream ranks last of the three.
    """
    settings = server_settings(tmp_path, model_cache, metrics_top_k=2)
    with running_server(settings) as server, server.client() as client:
        feed(client, "fog-a", images_of(cifar10_test, 0, 128, "fog-3"))
        feed(client, "fog-b", images_of(cifar10_test, 5000, 128, "fog-3"))
        feed(client, "broken", images_of(cifar10_test, 2500, 128, "gaussian_noise-5"))
        feed(client, "clean", images_of(cifar10_test, 7500, 128, None))
        reports = {
            s: client.get(f"/v1/streams/{s}/drift").json() for s in ("fog-a", "fog-b", "broken")
        }
        samples = scrape(client)
    for depth in ("early", "overall"):
        assert reports["broken"][depth]["jeffreys"] < reports["fog-a"][depth]["jeffreys"]
        assert reports["broken"][depth]["jeffreys"] < reports["fog-b"][depth]["jeffreys"]
    severity = per_stream(samples, "tta_stream_severity")
    assert len(severity) == 2 and "broken" in severity
    assert severity["broken"] >= 2 > max(v for s, v in severity.items() if s != "broken") >= 1
    # Every stream counts in the fleet views, not only the top-K.
    trouble = {
        reason: value(samples, "tta_streams_in_trouble", model=MODEL, reason=reason)
        for reason in ("drift_early", "drift_late", "high_entropy", "collapse", "any")
    }
    assert trouble["drift_early"] == 2 and trouble["high_entropy"] == 1
    assert trouble["collapse"] == 0 and trouble["any"] == 3  # clean is fine
    assert value(samples, "tta_fleet_stream_entropy_gcount", model=MODEL) == 4


def test_restored_streams_publish_their_last_signals_at_start_up(
    tmp_path: Path, model_cache: Path, cifar10_test: tuple[np.ndarray, np.ndarray]
) -> None:
    settings = server_settings(tmp_path, model_cache)
    names = (
        "tta_stream_severity",
        "tta_stream_drift",
        "tta_stream_entropy",
        "tta_stream_confidence",
        "tta_stream_dominant_class_share",
        "tta_stream_samples",
        "tta_stream_last_update_timestamp_seconds",
        "tta_streams_in_trouble",
        "tta_fleet_stream_drift_bucket",
        "tta_fleet_stream_entropy_gsum",
    )
    with running_server(settings) as server, server.client() as client:
        feed(client, "noisy", images_of(cifar10_test, 0, 96, "gaussian_noise-5"))
        feed(client, "clean", images_of(cifar10_test, 2500, 96, None), v2=True)
        client.post("/v1/streams", json={"id": "fresh"})  # no image: no signals to publish
        before = scrape(client)
    with running_server(settings) as server, server.client() as client:
        after = scrape(client)  # the first request of the new server
    for name in names:
        assert after[name] == before[name], name
    assert per_stream(after, "tta_stream_samples") == {"noisy": 96, "clean": 96}
    assert value(after, "tta_streams_in_trouble", model=MODEL, reason="any") == 1
    assert value(after, "tta_streams_by_adapter", model=MODEL, adapter=DEFAULT_ADAPTER) == 3


def test_service_gauges_and_process_metrics(tmp_path: Path, model_cache: Path) -> None:
    settings = server_settings(tmp_path, model_cache, max_queue=77)
    with running_server(settings) as server, server.client() as client:
        client.post("/v1/streams", json={"id": "one"})
        samples = scrape(client)
    assert value(samples, "tta_ready") == 1
    assert value(samples, "tta_store_up") == 1
    assert value(samples, "tta_max_queue", model=MODEL) == 77
    # The scrape itself is the one request in flight.
    assert value(samples, "tta_http_requests_in_flight", route="/metrics") == 1
    assert value(samples, "tta_http_requests_in_flight", route="/v1/streams") == 0
    thresholds = {dict(key)["signal"]: v for key, v in samples["tta_trouble_threshold"].items()}
    assert thresholds == {
        "drift_early": settings.trouble_drift_early,
        "drift_late": settings.trouble_drift_late,
        "entropy_high": settings.trouble_entropy_high,
        "entropy_low": settings.trouble_entropy_low,
        "dominant_share": settings.trouble_dominant_share,
        "min_images": settings.trouble_min_images,
    }
    for name in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "python_info",
        "python_gc_collections_total",
    ):
        assert name in samples, name
    # No signals yet: the stream counts per adapter, not in the signal views.
    assert value(samples, "tta_streams_by_adapter", model=MODEL, adapter=DEFAULT_ADAPTER) == 1
    assert value(samples, "tta_fleet_stream_drift_gcount", model=MODEL, depth="early") == 0
    assert "tta_stream_severity" not in samples
    # On the CPU there is no GPU family at all.
    assert not any(name.startswith("tta_gpu_") for name in samples)


THRESHOLDS = TroubleThresholds(
    drift_early=0.15,
    drift_late=0.04,
    entropy_high=0.15,
    entropy_low=0.03,
    dominant_share=0.5,
    min_images=64,
)


def signal(**values: float) -> StreamSignal:
    """A clean stream's signals with ``values`` changed."""
    clean = {
        "images": 256.0,
        "drift_early": 0.03,
        "drift_late": 0.015,
        "entropy": 0.1,
        "confidence": 0.9,
        "dominant_share": 0.12,
        "updated_at": 0.0,
    }
    return StreamSignal(**{**clean, **values})


@pytest.mark.parametrize(
    ("changed", "reasons", "tier"),
    [
        ({}, [], 0),
        ({"drift_early": 4.0}, ["drift_early"], 1),
        ({"drift_late": 0.05}, ["drift_late"], 1),
        ({"entropy": 0.2}, ["high_entropy"], 2),
        ({"entropy": 0.01}, ["collapse"], 2),
        ({"dominant_share": 0.7}, ["collapse"], 2),
        ({"drift_early": 0.2, "entropy": 0.3}, ["drift_early", "high_entropy"], 2),
        ({"images": 63.0, "entropy": 0.9, "dominant_share": 1.0}, [], 0),  # too few images
    ],
)
def test_trouble_reasons_and_severity_tiers(
    changed: dict[str, float], reasons: list[str], tier: int
) -> None:
    stream = signal(**changed)
    assert THRESHOLDS.reasons(stream) == reasons
    assert tier <= THRESHOLDS.severity(stream) < tier + 1
