"""No request poisons a stream, a stored state never blocks its own repair, and the store's
failures leave operations done entirely or not at all (issue 13, defects 1, 3, 6, 9).

The engine's refusal is tested on its own through a test-only hook (the model's normaliser
turns all-white images into 3e38): the server's input range check, which refuses such values
first, is another line of defence with its own tests.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import torch
from safetensors.torch import load, save

from adapters.state_io import METADATA_KEY, _header
from service.stores import LocalStore
from service.streams import SERVICE_METADATA_KEY
from tests.service.helpers import (
    MODEL,
    Server,
    metric,
    post_pixels,
    random_pixels,
    running_server,
    server_settings,
)
from tests.service.redis_server import running_redis

OCTET = {"content-type": "application/octet-stream"}
WHITE = np.full((2, 32, 32, 3), 255, dtype=np.uint8)


def poison_white_images(server: Server) -> None:
    """Test-only hook: the normaliser maps all-white images to 3e38 (finite, but overflowing)."""
    runtime = server.app.state.tta.runtimes[MODEL]
    normalize = runtime.normalizer

    def poisoned(batch: torch.Tensor) -> torch.Tensor:
        out = normalize(batch)
        white = (batch == 255).flatten(1).all(1)
        out[white] = 3e38
        return out

    runtime.normalizer = poisoned


def state_of(client: httpx.Client, stream_id: str) -> bytes:
    response = client.get(f"/v1/streams/{stream_id}/state")
    assert response.status_code == 200, response.text
    return response.content


def assert_finite_probabilities(body: dict[str, Any]) -> None:
    assert body["predictions"]
    for image in body["predictions"]:
        for score in [image, *image["top_k"]]:
            assert isinstance(score["probability"], float) and math.isfinite(score["probability"])


def edited(state: bytes, edit: Callable[[dict[str, torch.Tensor]], None], **service: Any) -> bytes:
    """An exported state with its tensors edited, and its service metadata replaced if given."""
    tensors = load(state)
    edit(tensors)
    metadata = dict(_header(state)["__metadata__"])
    if service:
        metadata[SERVICE_METADATA_KEY] = json.dumps(service)
    return save(tensors, metadata=metadata)


# --- defect 1: the engine refuses a stream whose statistics would break --------------------


def test_the_engine_refuses_a_poisoned_stream_alone(tmp_path: Path, model_cache: Path) -> None:
    """In one forward with another stream: the victim fails with 422, the other one commits."""
    # A batch closes when it holds 4 images (or after 10 s): the two 2-image requests share one.
    settings = server_settings(tmp_path, model_cache, max_delay_ms=10_000.0, max_batch_size=4)
    with running_server(settings) as server, server.client() as client:
        for sid in ("victim", "bystander"):
            assert (
                client.post("/v1/streams", json={"id": sid, "adapter": "adabn"}).status_code == 201
            )
        assert post_pixels(client, "victim", random_pixels(4, 0)).status_code == 200
        before = state_of(client, "victim")
        batches = metric(client, "tta_batch_requests_count", model=MODEL)
        poison_white_images(server)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            bad = pool.submit(post_pixels, server.client(), "victim", WHITE)
            good = pool.submit(post_pixels, server.client(), "bystander", random_pixels(2, 1))
            bad_response, good_response = bad.result(), good.result()
        assert bad_response.status_code == 422, bad_response.text
        error = bad_response.json()["error"]
        assert error["code"] == "invalid_state"
        assert error["message"].startswith(
            "refused, the stream's state is unchanged: NaN or infinite values in the statistics "
            "of BN layer 0 of 19 (bn1)"
        )
        assert good_response.status_code == 200, good_response.text
        assert_finite_probabilities(good_response.json())
        assert metric(client, "tta_batch_requests_count", model=MODEL) == batches + 1
        assert state_of(client, "victim") == before
        body = {
            "parameters": {"stream_id": "victim"},
            "inputs": [
                {
                    "name": "input",
                    "shape": [4, 3, 32, 32],
                    "datatype": "UINT8",
                    "data": [255] * (4 * 3 * 32 * 32),
                }
            ],
        }
        response = client.post(f"/v2/models/{MODEL}/infer", json=body)
        assert response.status_code == 400, response.text  # the protocol's invalid request
        assert response.json()["error"].startswith("refused, the stream's state is unchanged")
        assert state_of(client, "victim") == before
        assert client.get("/v1/streams/victim").json()["samples"] == 4
        healthy = post_pixels(client, "victim", random_pixels(4, 2))
        assert healthy.status_code == 200 and healthy.json()["samples"] == 8
        assert_finite_probabilities(healthy.json())


@pytest.mark.parametrize("value", [3e38, 1e20])
def test_a_huge_float_tensor_never_poisons_a_stream(
    tmp_path: Path, model_cache: Path, value: float
) -> None:
    """Whichever line refuses it (the input range check or the engine), nothing changes."""
    with running_server(server_settings(tmp_path, model_cache)) as server, server.client() as c:
        c.post("/v1/streams", json={"id": "target", "adapter": "adabn"})
        before = state_of(c, "target")
        response = c.post(
            "/v1/streams/target/predict",
            content=np.full((1, 3, 32, 32), value, dtype=np.float32).tobytes(),
            params={"shape": "1,3,32,32", "dtype": "float32"},
            headers=OCTET,
        )
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] in ("invalid_state", "invalid_tensor")
        assert state_of(c, "target") == before
        after = post_pixels(c, "target", random_pixels(1, 0))
        assert after.status_code == 200
        assert_finite_probabilities(after.json())


# --- defect 1 and 9: imported states are validated like new ones --------------------------


def negative(name: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name].fill_(-1.0)

    return edit


def test_import_refuses_invalid_statistics_and_sample_counts(
    tmp_path: Path, model_cache: Path
) -> None:
    with running_server(server_settings(tmp_path, model_cache)) as server, server.client() as c:
        c.post("/v1/streams", json={"id": "target", "adapter": "adabn"})
        c.post(
            "/v1/streams", json={"id": "unmix", "adapter": "unmix_tns", "config": {"components": 2}}
        )
        c.post("/v1/streams", json={"id": "mom", "adapter": "momentum"})
        for sid in ("target", "unmix", "mom"):
            post_pixels(c, sid, random_pixels(2, 0))
        cases = [
            (
                "target",
                negative("layer3.m2"),
                {},
                "invalid_state",
                "layer3.m2 holds values outside",
            ),
            ("target", negative("layer0.n"), {}, "invalid_state", "layer0.n holds values outside"),
            ("target", negative("layer0.obs.n"), {}, "invalid_state", "layer0.obs.n"),
            ("unmix", negative("layer5.vars"), {}, "invalid_state", "layer5.vars"),
            ("mom", lambda t: t["layer1.w"].fill_(1.5), {}, "invalid_state", "layer1.w"),
            ("target", negative("head.classes"), {}, "invalid_state", "head.classes"),
            ("target", lambda t: None, {"samples": 10**30}, "state_mismatch", "sample count"),
            ("target", lambda t: None, {"samples": True}, "state_mismatch", "sample count True"),
            ("target", lambda t: None, {"samples": -1}, "state_mismatch", "sample count"),
            ("target", lambda t: None, {"samples": 2.5}, "state_mismatch", "sample count"),
        ]
        for sid, edit, service, code, message in cases:
            before = state_of(c, sid)
            samples = c.get(f"/v1/streams/{sid}").json()["samples"]
            response = c.put(
                f"/v1/streams/{sid}/state", content=edited(before, edit, **service), headers=OCTET
            )
            assert response.status_code == 422, (sid, message, response.text)
            error = response.json()["error"]
            assert error["code"] == code and message in error["message"], error
            assert state_of(c, sid) == before
            assert c.get(f"/v1/streams/{sid}").json()["samples"] == samples
        fine = edited(state_of(c, "target"), lambda t: None, samples=2**53)
        response = c.put("/v1/streams/target/state", content=fine, headers=OCTET)
        assert response.status_code == 200 and response.json()["samples"] == 2**53


# --- defect 1: a stored state that cannot be loaded never blocks its repair ---------------


def test_an_unloadable_stored_state_never_blocks_reset_delete_or_import(
    tmp_path: Path, model_cache: Path
) -> None:
    settings = server_settings(tmp_path, model_cache)
    with running_server(settings) as server, server.client() as c:
        for sid in ("reset-me", "delete-me", "import-me", "fresh"):
            c.post("/v1/streams", json={"id": sid, "adapter": "adabn", "config": {}})
            post_pixels(c, sid, random_pixels(2, 0))
        good_state = state_of(c, "import-me")
        fresh = state_of(c, "fresh")
        assert c.post("/v1/streams/fresh/reset").status_code == 200
        fresh = state_of(c, "fresh")
    store = LocalStore(tmp_path / "streams")
    for sid in ("reset-me", "delete-me", "import-me"):  # written by an older, unguarded server
        record = store.get(sid)
        assert record is not None
        poisoned = edited(record.state, lambda t: t["layer2.mean"].fill_(float("nan")))
        store.put(dataclasses.replace(record, state=poisoned))
    store.close()
    with running_server(settings) as server, server.client() as c:
        response = post_pixels(c, "reset-me", random_pixels(1, 0))
        assert response.status_code == 409
        assert response.json()["error"]["code"] == "state_unusable"
        assert "reset the stream or import a state" in response.json()["error"]["message"]
        assert c.post("/v1/streams/reset-me/reset").status_code == 200
        assert load(state_of(c, "reset-me")).keys() == load(fresh).keys()
        assert post_pixels(c, "reset-me", random_pixels(1, 0)).status_code == 200
        assert c.delete("/v1/streams/delete-me").status_code == 204
        assert c.get("/v1/streams/delete-me").status_code == 404
        response = c.put("/v1/streams/import-me/state", content=good_state, headers=OCTET)
        assert response.status_code == 200, response.text
        assert state_of(c, "import-me") == good_state
    with running_server(settings) as server, server.client() as c:
        assert c.get("/v1/streams/delete-me").status_code == 404
        assert state_of(c, "import-me") == good_state
        assert post_pixels(c, "reset-me", random_pixels(1, 0)).status_code == 200


# --- defect 6: with the store down, delete and reset happen entirely or not at all --------


def test_delete_and_reset_while_the_store_is_down_change_nothing(
    tmp_path: Path, model_cache: Path
) -> None:
    with running_redis() as url:
        settings = server_settings(
            tmp_path, model_cache, store="redis", redis_url=url, durability="sync"
        )
        with running_server(settings) as server, server.client() as c:
            for sid in ("keep", "stay", "cold"):
                c.post("/v1/streams", json={"id": sid, "adapter": "adabn"})
                post_pixels(c, sid, random_pixels(2, 0))
            before = {sid: state_of(c, sid) for sid in ("keep", "stay")}
            redis.Redis.from_url(url).shutdown(nosave=True)
            response = c.post("/v1/streams/keep/reset")
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "store_unavailable"
            assert state_of(c, "keep") == before["keep"]
            assert c.get("/v1/streams/keep").json()["samples"] == 2
            response = c.delete("/v1/streams/stay")
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "store_unavailable"
            assert c.get("/v1/streams/stay").status_code == 200
            assert state_of(c, "stay") == before["stay"]
            assert "stay" in [s["id"] for s in c.get("/v1/streams").json()["data"]]


def test_delete_and_reset_while_the_store_is_down_interval(
    tmp_path: Path, model_cache: Path
) -> None:
    """Interval durability: reset is a change like any other (200, stored at the next flush);
    a deletion still needs the store's confirmation (503, nothing deleted)."""
    with running_redis() as url:
        settings = server_settings(tmp_path, model_cache, store="redis", redis_url=url)
        with running_server(settings) as server, server.client() as c:
            for sid in ("keep", "stay"):
                c.post("/v1/streams", json={"id": sid, "adapter": "adabn"})
                post_pixels(c, sid, random_pixels(2, 0))
            stay = state_of(c, "stay")
            redis.Redis.from_url(url).shutdown(nosave=True)
            assert c.post("/v1/streams/keep/reset").status_code == 200
            assert c.get("/v1/streams/keep").json()["samples"] == 0
            response = c.delete("/v1/streams/stay")
            assert response.status_code == 503, response.text
            assert state_of(c, "stay") == stay


# --- defect 3: imports are parsed off the engine thread and bounded ------------------------


def many_tensors(count: int, like: bytes) -> bytes:
    """A safetensors file of ``count`` tiny tensors with the metadata of the state ``like``."""
    metadata = {METADATA_KEY: _header(like)["__metadata__"][METADATA_KEY]}
    return save({f"t{i}": torch.zeros(1) for i in range(count)}, metadata=metadata)


def test_a_huge_import_is_refused_before_parsing(tmp_path: Path, model_cache: Path) -> None:
    with running_server(server_settings(tmp_path, model_cache)) as server, server.client() as c:
        c.post("/v1/streams", json={"id": "target", "adapter": "adabn"})
        before = state_of(c, "target")
        huge = many_tensors(100_000, before)
        response = c.put("/v1/streams/target/state", content=huge, headers=OCTET)
        assert response.status_code == 422
        assert response.json()["error"]["message"].startswith("the state's header is ")
        expected = len(load(before))
        response = c.put(
            "/v1/streams/target/state", content=many_tensors(200, before), headers=OCTET
        )
        assert response.status_code == 422
        message = response.json()["error"]["message"]
        assert f"holds 200 tensors, a state of this stream has {expected}" in message
        assert state_of(c, "target") == before


def test_an_import_is_parsed_off_the_engine_thread(
    tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While an import is being parsed, other streams' predictions go through."""
    import engine.core

    parsing, release = threading.Event(), threading.Event()
    threads: list[str] = []
    read_state = engine.core.read_state

    def slow_read_state(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        parsing.set()
        assert release.wait(60), "the test never released the parser"
        return read_state(*args, **kwargs)

    with running_server(server_settings(tmp_path, model_cache)) as server, server.client() as c:
        for sid in ("target", "other"):
            c.post("/v1/streams", json={"id": sid, "adapter": "adabn"})
        exported = state_of(c, "target")
        monkeypatch.setattr(engine.core, "read_state", slow_read_state)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            imported = pool.submit(
                server.client().put, "/v1/streams/target/state", content=exported, headers=OCTET
            )
            assert parsing.wait(60)
            response = post_pixels(c, "other", random_pixels(2, 0))  # the import is mid-parse
            assert response.status_code == 200
            assert not imported.done()
            release.set()
            assert imported.result().status_code == 200
        assert threads and not threads[0].startswith("tta-engine")


# --- defect 2: state memory is bounded per model -----------------------------------------


def test_state_memory_is_bounded_and_freed(tmp_path: Path, model_cache: Path) -> None:
    """UnMix-TNS with K = 512 costs ~2.8 MB per stream: 16 MiB hold five of them.

    Beyond, a pool that may not grow evicts its least recently used stream (to the store), as
    a full pool does; a configuration whose pool does not fit at all is refused with 507.
    """
    limit = 16 << 20
    settings = server_settings(tmp_path, model_cache, max_state_bytes=limit)
    with running_server(settings) as server, server.client() as c:
        assert metric(c, "tta_state_memory_limit_bytes", model=MODEL) == limit
        assert c.post("/v1/streams", json={"id": "small", "adapter": "adabn"}).status_code == 201
        big = {"adapter": "unmix_tns", "config": {"components": 512}}
        created = [f"big-{index}" for index in range(8)]
        for sid in created:
            assert c.post("/v1/streams", json={"id": sid, **big}).status_code == 201
        assert metric(c, "tta_streams_evicted_total", model=MODEL) >= 3
        held = metric(c, "tta_state_memory_bytes", model=MODEL, adapter="unmix_tns")
        assert 4 * 2.8e6 < held <= limit
        other = {"adapter": "unmix_tns", "config": {"components": 500}}
        response = c.post("/v1/streams", json={"id": "other", **other})
        assert response.status_code == 507, response.text
        error = response.json()["error"]
        assert error["code"] == "state_memory_exhausted"
        assert "max_state_bytes" in error["message"]
        assert metric(c, "tta_state_memory_refusals_total", model=MODEL) == 1
        assert c.get("/v1/streams/other").status_code == 404
        for sid in created:
            assert c.delete(f"/v1/streams/{sid}").status_code == 204
        assert metric(c, "tta_state_memory_bytes", model=MODEL, adapter="unmix_tns") == 0
        assert metric(c, "tta_state_memory_bytes", model=MODEL, adapter="adabn") > 0
        assert c.post("/v1/streams", json={"id": "other", **other}).status_code == 201
