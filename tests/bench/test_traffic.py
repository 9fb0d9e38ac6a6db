"""The traffic generator against a real server: every stream gets images, one only over /v2."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.traffic import STREAMS, main
from tests.service.helpers import running_server, server_settings


@pytest.mark.slow  # decodes the CIFAR-10 test set and replays for seconds
def test_traffic_feeds_every_stream(
    tmp_path: Path, model_cache: Path, cifar10_dir: Path, data_cache: Path
) -> None:
    settings = server_settings(tmp_path, model_cache)
    with running_server(settings) as server, server.client() as client:
        args = ["--url", server.url, "--duration", "3", "--images", "64", "--batch", "16"]
        main([*args, "--data-dir", str(cifar10_dir), "--data-cache", str(data_cache)])
        views = {s["id"]: s for s in client.get("/v1/streams").json()["data"]}
        listed = {stream_id: view["samples"] for stream_id, view in views.items()}
        text = client.get("/metrics").text
    assert listed.keys() == {f"traffic-{s.id}" for s in STREAMS}
    assert all(samples >= 16 for samples in listed.values()), listed
    routes: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "tta_http_requests":
            for sample in family.samples:
                route = sample.labels["route"]
                routes[route] = routes.get(route, 0) + sample.value
    v2_only = [s for s in STREAMS if s.protocol == "v2"]
    assert len(v2_only) == 1
    # The /v2 stream's images all came over /v2: one request per 16 of its images.
    assert routes["/v2/models/{model}/infer"] == listed[f"traffic-{v2_only[0].id}"] / 16
    # every stream got its true labels back, over v1 and v2 alike: one label per image
    assert all(view["accuracy"]["labels_total"] == view["samples"] for view in views.values())
