"""Stream state survives restarts (local directory and Redis), eviction, and expires by TTL."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis
import torch
from prometheus_client.parser import text_string_to_metric_families

from service.stores import LocalStore
from tests.service.helpers import (
    normalized,
    png,
    random_pixels,
    reference_engine,
    running_server,
    server_settings,
    snapshot,
    tensors,
)
from tests.service.redis_server import running_redis, running_redis_cluster

OCTET = {"content-type": "application/octet-stream"}


def predict(client: httpx.Client, stream_id: str, pixels: np.ndarray) -> dict[str, Any]:
    """Post raw uint8 images to a stream; the response JSON."""
    response = client.post(
        f"/v1/streams/{stream_id}/predict",
        content=np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)).tobytes(),
        params={"shape": f"{len(pixels)},3,32,32"},
        headers=OCTET,
    )
    assert response.status_code == 200, response.text
    return response.json()


def counter(client: httpx.Client, family: str) -> float:
    """The sum of a metric family's samples."""
    for metric in text_string_to_metric_families(client.get("/metrics").text):
        if metric.name == family:
            return sum(s.value for s in metric.samples)
    raise KeyError(family)


def populate(client: httpx.Client) -> None:
    """Three streams of three adapters, each adapted to a few images."""
    for index, (adapter, config) in enumerate(
        (("adabn", {}), ("unmix_tns", {"components": 4}), ("momentum", {}))
    ):
        client.post(
            "/v1/streams", json={"id": f"keep-{adapter}", "adapter": adapter, "config": config}
        )
        predict(client, f"keep-{adapter}", random_pixels(3, index))


def check_restart(settings_a: Any, settings_b: Any) -> None:
    """Streams and their states are the same after a graceful restart, and keep adapting."""
    with running_server(settings_a) as server, server.client() as client:
        populate(client)
        before = snapshot(client)
        listed = client.get("/v1/streams").json()["data"]
    with running_server(settings_b) as server, server.client() as client:
        assert client.get("/v1/streams").json()["data"] == listed
        assert snapshot(client) == before
        body = predict(client, "keep-adabn", random_pixels(2, 50))
        assert body["samples"] == 5


def test_restart_restores_state_local(tmp_path: Path, model_cache: Path) -> None:
    """durability=interval: the shutdown flush writes every changed stream."""
    settings = server_settings(tmp_path, model_cache, durability="interval")
    check_restart(settings, settings)


def test_restart_restores_state_redis(tmp_path: Path, model_cache: Path) -> None:
    with running_redis() as url:
        settings = server_settings(tmp_path, model_cache, store="redis", redis_url=url)
        check_restart(settings, settings)


def test_restart_restores_state_redis_cluster(tmp_path: Path, model_cache: Path) -> None:
    """The same on a real three-node Redis Cluster (`redis_cluster`): streams on every shard."""
    with running_redis_cluster() as url:
        settings = server_settings(
            tmp_path, model_cache, store="redis", redis_url=url, redis_cluster=True
        )
        check_restart(settings, settings)


def test_sync_durability_persists_before_the_response(tmp_path: Path, model_cache: Path) -> None:
    settings = server_settings(tmp_path, model_cache, durability="sync", flush_interval_s=3600)
    with running_server(settings) as server, server.client() as client:
        client.post("/v1/streams", json={"id": "durable", "adapter": "adabn"})
        predict(client, "durable", random_pixels(2, 1))
        # Read the store behind the server's back, while it runs: the new state is there.
        stored = LocalStore(tmp_path / "streams").get("durable")
        assert stored is not None
        assert stored.state == client.get("/v1/streams/durable/state").content
        assert stored.adapter == "adabn" and stored.model == "cifar10_resnet20"


def test_eviction_writes_back_and_reloads(tmp_path: Path, model_cache: Path) -> None:
    """With room for two streams, five streams still keep their own states."""
    settings = server_settings(tmp_path, model_cache, max_streams=2, slots_per_pool=2)
    engine = reference_engine(model_cache)
    with running_server(settings) as server, server.client() as client:
        handles = {}
        for index in range(5):
            stream = client.post("/v1/streams", json={"id": f"ev-{index}"}).json()
            adapter, config, seed = stream["adapter"], stream["config"], stream["seed"]
            handles[stream["id"]] = engine.open_stream(adapter, config, seed)
        for round_ in range(2):
            for index in range(5):
                pixels = random_pixels(2, 10 * round_ + index)
                body = predict(client, f"ev-{index}", pixels)
                assert body["samples"] == 2 * (round_ + 1)
                expected = engine.forward(normalized(pixels), [(handles[f"ev-{index}"], 2)]).logits
                assert body["predictions"][0]["index"] == int(expected[0].argmax())
        assert counter(client, "tta_streams_evicted") >= 8
        for stream_id, handle in handles.items():
            served = tensors(client.get(f"/v1/streams/{stream_id}/state").content)
            for key, value in tensors(engine.export_stream(handle)).items():
                torch.testing.assert_close(served[key], value, rtol=1e-5, atol=1e-7)
        assert client.get("/v1/streams/ev-0").json()["samples"] == 4


def test_full_pool_evicts_within_the_pool(tmp_path: Path, model_cache: Path) -> None:
    """One slot per pool: a second stream of the adapter evicts the first, not other pools."""
    settings = server_settings(tmp_path, model_cache, max_streams=10, slots_per_pool=1)
    with running_server(settings) as server, server.client() as client:
        client.post("/v1/streams", json={"id": "tbn-0", "adapter": "tbn"})
        client.post("/v1/streams", json={"id": "ada-0", "adapter": "adabn"})
        predict(client, "ada-0", random_pixels(2, 1))
        state = client.get("/v1/streams/ada-0/state").content
        client.post("/v1/streams", json={"id": "ada-1", "adapter": "adabn"})
        predict(client, "ada-1", random_pixels(2, 2))
        assert counter(client, "tta_streams_evicted") == 1
        assert client.get("/v1/streams/ada-0/state").content == state
        assert client.get("/v1/streams/ada-0").json()["samples"] == 2


def test_ttl_expiry(tmp_path: Path, model_cache: Path) -> None:
    settings = server_settings(tmp_path, model_cache)
    with running_server(settings) as server, server.client() as client:
        client.post("/v1/streams", json={"id": "brief", "ttl_seconds": 0.3})
        client.post("/v1/streams", json={"id": "lasting"})
        deadline = time.monotonic() + 5
        # the expiry counts once the store confirms the deletion; the stream 404s from its start
        while counter(client, "tta_streams_expired") < 1:
            assert time.monotonic() < deadline, "the stream did not expire"
            time.sleep(0.2)
        assert client.get("/v1/streams/brief").status_code == 404
        assert client.get("/v1/streams/lasting").status_code == 200
        assert LocalStore(tmp_path / "streams").get("brief") is None
        assert counter(client, "tta_streams_expired") == 1


def test_state_export_import_moves_a_stream(tmp_path: Path, model_cache: Path) -> None:
    """A state exported from one stream imports into a fresh one of the same adapter."""
    settings = server_settings(tmp_path, model_cache)
    with running_server(settings) as server, server.client() as client:
        client.post("/v1/streams", json={"id": "from", "adapter": "unmix_tns"})
        client.post("/v1/streams", json={"id": "to", "adapter": "unmix_tns"})
        files = [("images", ("a.png", png(random_pixels(1, 3)[0]), "image/png"))]
        client.post("/v1/streams/from/predict", files=files)
        state = client.get("/v1/streams/from/state").content
        response = client.put("/v1/streams/to/state", content=state, headers=OCTET)
        assert response.status_code == 200, response.text
        source = client.get("/v1/streams/from").json()
        assert response.json()["seed"] == source["seed"]
        assert response.json()["samples"] == 1
        assert client.get("/v1/streams/to/state").content == state


def test_interval_flush_writes_changed_streams(tmp_path: Path, model_cache: Path) -> None:
    """durability=interval: a changed stream reaches the store without a shutdown."""
    settings = server_settings(tmp_path, model_cache, durability="interval", flush_interval_s=0.2)
    with running_server(settings) as server, server.client() as client:
        client.post("/v1/streams", json={"id": "flushed", "adapter": "adabn"})
        created = LocalStore(tmp_path / "streams").get("flushed")
        assert created is not None  # a new stream is written at once
        predict(client, "flushed", random_pixels(2, 1))
        exported = client.get("/v1/streams/flushed/state").content
        deadline = time.monotonic() + 5
        while (stored := LocalStore(tmp_path / "streams").get("flushed")) is None or (
            stored.state != exported
        ):
            assert time.monotonic() < deadline, "the interval flush did not write the stream"
            time.sleep(0.1)


def test_replicas_share_streams_through_redis(tmp_path: Path, model_cache: Path) -> None:
    """A stream created on one replica is found by another through the shared store."""
    with running_redis() as url:
        settings = server_settings(
            tmp_path, model_cache, store="redis", redis_url=url, durability="sync"
        )
        with (
            running_server(settings) as first,
            running_server(settings) as second,
            first.client() as a,
            second.client() as b,
        ):
            a.post("/v1/streams", json={"id": "roaming", "adapter": "adabn"})
            predict(a, "roaming", random_pixels(2, 1))
            state = a.get("/v1/streams/roaming/state").content
            assert b.get("/v1/streams/roaming/state").content == state
            assert b.get("/v1/streams/roaming").json()["samples"] == 2
            assert b.get("/v1/streams/elsewhere").status_code == 404


def test_store_failure_is_a_503_and_counted(tmp_path: Path, model_cache: Path) -> None:
    """durability=sync with the store gone: 503 with a clear message, and a counted error."""
    with running_redis() as url:
        settings = server_settings(
            tmp_path, model_cache, store="redis", redis_url=url, durability="sync"
        )
        with running_server(settings) as server, server.client() as client:
            client.post("/v1/streams", json={"id": "fragile", "adapter": "adabn"})
            assert counter(client, "tta_store_up") == 1
            with contextlib.suppress(redis.RedisError):
                redis.Redis.from_url(url).shutdown(nosave=True)
            response = client.post(
                "/v1/streams/fragile/predict",
                content=bytes(3072),
                params={"shape": "1,3,32,32"},
                headers=OCTET,
            )
            assert response.status_code == 503
            assert response.headers["retry-after"] == "1"
            error = response.json()["error"]
            assert error["code"] == "store_unavailable"
            assert error["message"].startswith(
                "the prediction was made but the stream's new state was not saved: "
                f"Redis at {url}: cannot write stream 'fragile'"
            )
            created = client.post("/v1/streams", json={"id": "unsaved"})
            assert created.status_code == 503
            assert created.json()["error"]["message"].startswith("cannot save stream 'unsaved'")
            assert client.get("/v1/streams/unsaved").status_code == 404
            assert counter(client, "tta_store_errors") >= 2
            assert counter(client, "tta_store_up") == 0
