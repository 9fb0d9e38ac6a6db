"""Stream safety through a real server: auto-reset, idempotent predictions, label feedback,
fork, freeze and thaw, snapshots and rollback (docs/safety.md)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from tests.service.helpers import (
    Server,
    normalized,
    random_pixels,
    reference_engine,
    running_server,
    server_settings,
    tensors,
)

ALWAYS_COLLAPSED = {"entropy_low": 1.0, "min_images": 8}  # fires from 8 images on


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Server]:
    """One server for the module (each test uses its own streams); snapshots every 4 images."""
    data = tmp_path_factory.mktemp("data")
    settings = server_settings(
        data, model_cache, snapshot_interval_images=4, idempotency_max_keys=3
    )
    with running_server(settings) as running:
        yield running


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    """An HTTP client of the module's server."""
    with server.client() as http:
        yield http


def create(client: httpx.Client, stream_id: str, **extra: object) -> dict:
    """Create an adabn stream and return its JSON."""
    response = client.post("/v1/streams", json={"id": stream_id, "adapter": "adabn", **extra})
    assert response.status_code == 201, response.text
    return response.json()


def predict(
    client: httpx.Client, stream_id: str, pixels: np.ndarray, key: str | None = None
) -> httpx.Response:
    """Raw uint8 images to a stream's predict, with an Idempotency-Key if given."""
    headers = {"content-type": "application/octet-stream"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return client.post(
        f"/v1/streams/{stream_id}/predict",
        content=np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)).tobytes(),
        params={"shape": f"{len(pixels)},3,32,32"},
        headers=headers,
    )


def state(client: httpx.Client, stream_id: str) -> bytes:
    """The stream's exported state."""
    response = client.get(f"/v1/streams/{stream_id}/state")
    assert response.status_code == 200, response.text
    return response.content


def assert_same_tensors(first: bytes, second: bytes) -> None:
    """Two exported states hold the same tensors (their metadata may differ)."""
    a, b = tensors(first), tensors(second)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    """The value of one sample of /metrics (0 if absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    assert wanted is not None
    return 0.0


# --- auto-reset ---------------------------------------------------------------------------------


def test_auto_reset_is_off_by_default(client: httpx.Client) -> None:
    created = create(client, "ar-off")
    assert created["auto_reset"] is None
    for seed in range(3):
        assert predict(client, "ar-off", random_pixels(4, seed)).json()["auto_reset"] is None
    assert client.get("/v1/streams/ar-off").json()["auto_resets"] == 0


def test_auto_reset_resets_a_collapsed_stream_and_counts_it(client: httpx.Client) -> None:
    created = create(client, "ar-reset", auto_reset=ALWAYS_COLLAPSED)
    assert created["auto_reset"]["entropy_low"] == 1.0
    assert created["auto_reset"]["action"] == "reset"
    before = metric(client, "tta_auto_resets_total", cause="entropy_collapse", action="reset")
    first = predict(client, "ar-reset", random_pixels(4, 1)).json()
    assert (first["samples"], first["auto_reset"]) == (4, None)  # 4 images: below min_images
    second = predict(client, "ar-reset", random_pixels(4, 2)).json()
    assert second["auto_reset"] == "entropy_collapse"
    view = client.get("/v1/streams/ar-reset").json()
    assert view["samples"] == 0  # reset after the prediction
    assert view["auto_resets"] == 1
    assert view["last_auto_reset"]["reason"] == "entropy_collapse"
    fresh = create(client, "ar-fresh", auto_reset=ALWAYS_COLLAPSED)
    assert fresh["seed"] != created["seed"]
    assert (
        metric(client, "tta_auto_resets_total", cause="entropy_collapse", action="reset")
        == before + 1
    )
    assert metric(client, "tta_stream_auto_resets", stream="ar-reset") == 1


def test_auto_reset_can_roll_back_to_the_last_good_snapshot(client: httpx.Client) -> None:
    policy = {**ALWAYS_COLLAPSED, "action": "rollback"}
    create(client, "ar-roll", auto_reset=policy, snapshots=2)
    predict(client, "ar-roll", random_pixels(4, 1))  # good (below min_images): a snapshot
    good = state(client, "ar-roll")
    assert predict(client, "ar-roll", random_pixels(4, 2)).json()["auto_reset"] == (
        "entropy_collapse"
    )
    view = client.get("/v1/streams/ar-roll").json()
    assert (view["samples"], view["auto_resets"]) == (4, 1)
    assert_same_tensors(state(client, "ar-roll"), good)


def test_recommended_preset_and_invalid_policies(client: httpx.Client) -> None:
    created = create(client, "ar-preset", auto_reset="recommended")
    assert created["auto_reset"]["drift_jump"] == 1.3
    for body, field in (
        ({"auto_reset": "bold"}, "auto_reset"),
        ({"auto_reset": {"entropy_low": 2}}, "entropy_low"),
        ({"auto_reset": {"surprise": 1}}, "surprise"),
        ({"snapshots": 65}, "snapshots"),
    ):
        response = client.post("/v1/streams", json={"id": "ar-bad", **body})
        assert response.status_code == 422, response.text
        assert field in response.json()["error"]["message"]
    assert client.get("/v1/streams/ar-bad").status_code == 404


# --- idempotency --------------------------------------------------------------------------------


def test_a_retry_gets_the_first_response_and_adapts_once(client: httpx.Client) -> None:
    create(client, "idem-1")
    pixels = random_pixels(4, 5)
    first = predict(client, "idem-1", pixels, key="k-1")
    after_first = state(client, "idem-1")
    again = predict(client, "idem-1", pixels, key="k-1")
    assert again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert again.json() == first.json()
    assert first.json()["request_id"] == "k-1"
    assert state(client, "idem-1") == after_first
    assert client.get("/v1/streams/idem-1").json()["samples"] == 4

    reused = predict(client, "idem-1", random_pixels(4, 6), key="k-1")
    assert reused.status_code == 422
    assert reused.json()["error"]["code"] == "idempotency_key_reused"
    assert state(client, "idem-1") == after_first

    assert predict(client, "idem-1", pixels, key="k-2").json()["samples"] == 8
    bad = predict(client, "idem-1", pixels, key="has space")
    assert bad.status_code == 422
    assert "Idempotency-Key" in bad.json()["error"]["message"]


def test_the_key_window_is_bounded(client: httpx.Client) -> None:
    create(client, "idem-window")
    pixels = random_pixels(2, 7)
    for key in ("a", "b", "c", "d"):  # the server remembers 3 keys per stream
        predict(client, "idem-window", pixels, key=key)
    assert predict(client, "idem-window", pixels, key="d").json()["samples"] == 8  # replayed
    assert predict(client, "idem-window", pixels, key="a").json()["samples"] == 10  # forgotten


def test_keys_survive_a_restart(tmp_path: Path, model_cache: Path) -> None:
    settings = server_settings(tmp_path, model_cache, durability="sync")
    pixels = random_pixels(3, 8)
    with running_server(settings) as first, first.client() as http:
        create(http, "idem-restart")
        answered = predict(http, "idem-restart", pixels, key="once").json()
    with running_server(settings) as second, second.client() as http:
        retried = predict(http, "idem-restart", pixels, key="once")
        assert retried.headers["idempotent-replayed"] == "true"
        assert retried.json() == answered
        assert http.get("/v1/streams/idem-restart").json()["samples"] == 3
        exported = http.get("/v1/streams/idem-restart/state").content
        assert b"once" not in exported  # an export is a state: the keys stay in the store


@pytest.mark.slow
def test_retries_around_a_server_kill_apply_each_request_once(tmp_path: Path) -> None:
    from bench.reliability import ServerProcess

    server = ServerProcess(
        {"TTA_STORE": "local", "TTA_DATA_DIR": str(tmp_path), "TTA_DURABILITY": "sync"}
    )
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            create(http, "idem-kill")
            answered = predict(http, "idem-kill", random_pixels(4, 1), key="before").json()
        server.kill()  # SIGKILL: no shutdown, no flush
        server.start()
        with httpx.Client(base_url=server.url, timeout=60) as http:
            retried = predict(http, "idem-kill", random_pixels(4, 1), key="before")
            assert retried.json() == answered
            # A request whose answer the kill may have lost: retried until it is answered.
            pixels = random_pixels(4, 2)
            for attempt in range(2):
                try:
                    outcome = predict(http, "idem-kill", pixels, key="during")
                except httpx.TransportError:
                    outcome = None
                if attempt == 0:
                    server.kill()
                    server.start()
                    http.base_url = httpx.URL(server.url)
            assert outcome is not None and outcome.status_code == 200
            assert outcome.json()["samples"] == 8
            assert http.get("/v1/streams/idem-kill").json()["samples"] == 8
    finally:
        server.stop()


# --- feedback -----------------------------------------------------------------------------------


def jpeg_pixels(cifar_jpegs: list[tuple[bytes, str]]) -> tuple[np.ndarray, list[str]]:
    """The test JPEGs decoded to uint8 [N, 32, 32, 3], with their labels."""
    import io

    pixels = np.stack(
        [np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d, _ in cifar_jpegs]
    )
    return pixels, [label for _, label in cifar_jpegs]


def test_feedback_accuracy_equals_the_offline_computation(
    client: httpx.Client, model_cache: Path, cifar_jpegs: list[tuple[bytes, str]]
) -> None:
    created = create(client, "fb-1", feedback=True)
    assert created["feedback"] is True and created["accuracy"]["labels"] == 0
    pixels, names = jpeg_pixels(cifar_jpegs)
    requests = []
    for start in range(0, len(pixels), 8):
        response = predict(client, "fb-1", pixels[start : start + 8])
        assert response.status_code == 200, response.text
        requests.append((start, response.json()))
    labels = [
        {"request_id": body["request_id"], "index": i, "label": names[start + i]}
        for start, body in requests
        for i in range(len(body["predictions"]))
    ]
    posted = client.post("/v1/streams/fb-1/feedback", json={"labels": labels})
    assert posted.status_code == 200, posted.text

    adapted = [p["label"] for _, body in requests for p in body["predictions"]]
    engine = reference_engine(model_cache)
    classes = engine.forward_source(normalized(pixels)).argmax(1).tolist()
    source = [engine_label for engine_label in (created_labels(client)[c] for c in classes)]
    expected_adapted = np.mean([a == n for a, n in zip(adapted, names, strict=True)])
    expected_source = np.mean([s == n for s, n in zip(source, names, strict=True)])
    accuracy = posted.json()["accuracy"]
    assert accuracy["labels"] == len(names) == posted.json()["scored"]
    assert accuracy["adapted"] == pytest.approx(expected_adapted)
    assert accuracy["source"] == pytest.approx(expected_source)
    assert accuracy["gain"] == pytest.approx(expected_adapted - expected_source)
    assert client.get("/v1/streams/fb-1").json()["accuracy"] == accuracy
    assert metric(client, "tta_stream_feedback_accuracy", stream="fb-1", prediction="source") == (
        pytest.approx(expected_source)
    )

    again = client.post("/v1/streams/fb-1/feedback", json={"labels": labels[:3]}).json()
    assert (again["scored"], again["duplicates"]) == (0, 3)
    assert again["accuracy"] == accuracy


def created_labels(client: httpx.Client) -> list[str]:
    """The served model's label names."""
    return client.get("/v1/models").json()["data"][0]["labels"]


def test_feedback_errors(client: httpx.Client) -> None:
    create(client, "fb-off")
    response = predict(client, "fb-off", random_pixels(2, 1)).json()
    label = {"request_id": response["request_id"], "index": 0, "label": 1}
    off = client.post("/v1/streams/fb-off/feedback", json={"labels": [label]})
    assert off.status_code == 409 and off.json()["error"]["code"] == "feedback_off"

    create(client, "fb-errors", feedback=True)
    rid = predict(client, "fb-errors", random_pixels(2, 1)).json()["request_id"]
    for labels, status, code in (
        ([{"request_id": "nope", "index": 0, "label": 1}], 404, "prediction_not_found"),
        ([{"request_id": rid, "index": 2, "label": 1}], 404, "prediction_not_found"),
        ([{"request_id": rid, "index": 0, "label": 10}], 422, "invalid_request"),
        ([{"request_id": rid, "index": 0, "label": "unicorn"}], 422, "invalid_request"),
        ([], 422, "invalid_request"),
    ):
        answer = client.post("/v1/streams/fb-errors/feedback", json={"labels": labels})
        assert (answer.status_code, answer.json()["error"]["code"]) == (status, code), labels
    view = client.get("/v1/streams/fb-errors").json()
    assert view["accuracy"]["labels"] == 0  # nothing was scored
    named = client.post(
        "/v1/streams/fb-errors/feedback",
        json={"labels": [{"request_id": rid, "index": 1, "label": "cat"}]},
    )
    assert named.json()["scored"] == 1


def test_request_id_from_the_header(client: httpx.Client) -> None:
    create(client, "fb-header", feedback=True)
    response = client.post(
        "/v1/streams/fb-header/predict",
        content=np.ascontiguousarray(random_pixels(1, 3).transpose(0, 3, 1, 2)).tobytes(),
        params={"shape": "1,3,32,32"},
        headers={"content-type": "application/octet-stream", "X-Request-ID": "frame-42"},
    )
    assert response.json()["request_id"] == "frame-42"


# --- fork, freeze, snapshots ----------------------------------------------------------------------


def test_fork_copies_the_state_and_then_the_streams_part(client: httpx.Client) -> None:
    create(client, "fork-a", ttl_seconds=600)
    predict(client, "fork-a", random_pixels(4, 1))
    forked = client.post("/v1/streams/fork-a/fork", json={"id": "fork-b", "feedback": True})
    assert forked.status_code == 201, forked.text
    body = forked.json()
    original = client.get("/v1/streams/fork-a").json()
    assert (body["samples"], body["feedback"], body["ttl_seconds"]) == (4, True, 600)
    assert (body["adapter"], body["config"], body["seed"]) == (
        original["adapter"],
        original["config"],
        original["seed"],
    )
    assert state(client, "fork-b") == state(client, "fork-a")
    predict(client, "fork-b", random_pixels(4, 2))
    assert state(client, "fork-b") != state(client, "fork-a")
    assert client.get("/v1/streams/fork-a").json()["samples"] == 4

    assert client.post("/v1/streams/fork-a/fork", json={"id": "fork-b"}).status_code == 409
    assert client.post("/v1/streams/nope/fork").status_code == 404
    generated = client.post("/v1/streams/fork-a/fork")
    assert generated.status_code == 201 and generated.json()["id"].startswith("s-")


def test_freeze_predicts_without_updating_and_thaw_resumes(client: httpx.Client) -> None:
    create(client, "frozen-1")
    predict(client, "frozen-1", random_pixels(4, 1))
    frozen = client.post("/v1/streams/frozen-1/freeze")
    assert frozen.status_code == 200 and frozen.json()["frozen"] is True
    before = state(client, "frozen-1")
    answer = predict(client, "frozen-1", random_pixels(4, 2)).json()
    assert (answer["adapted"], answer["samples"]) == (False, 4)
    assert state(client, "frozen-1") == before
    thawed = client.post("/v1/streams/frozen-1/thaw").json()
    assert thawed["frozen"] is False
    assert predict(client, "frozen-1", random_pixels(4, 2)).json()["samples"] == 8


def test_frozen_survives_a_restart(tmp_path: Path, model_cache: Path) -> None:
    settings = server_settings(tmp_path, model_cache)
    with running_server(settings) as first, first.client() as http:
        create(http, "frozen-restart", frozen=True)
    with running_server(settings) as second, second.client() as http:
        assert http.get("/v1/streams/frozen-restart").json()["frozen"] is True
        assert predict(http, "frozen-restart", random_pixels(2, 1)).json()["adapted"] is False


def test_snapshots_are_bounded_and_roll_back(client: httpx.Client) -> None:
    create(client, "snap-1", snapshots=2)
    states = {}
    for seed in range(3):  # a snapshot every 4 images: at 4, 8, 12; two kept
        predict(client, "snap-1", random_pixels(4, seed))
        states[4 * (seed + 1)] = state(client, "snap-1")
    kept = client.get("/v1/streams/snap-1/snapshots").json()["data"]
    assert [s["samples"] for s in kept] == [8, 12]
    predict(client, "snap-1", random_pixels(4, 9))  # a snapshot at 16: 8 leaves
    rolled = client.post("/v1/streams/snap-1/rollback", json={"samples": 12})
    assert rolled.status_code == 200, rolled.text
    assert rolled.json()["samples"] == 12
    assert_same_tensors(state(client, "snap-1"), states[12])
    last = client.post("/v1/streams/snap-1/rollback").json()
    assert last["samples"] == 16  # the newest
    missing = client.post("/v1/streams/snap-1/rollback", json={"samples": 8})
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "snapshot_not_found"
    create(client, "snap-none")
    none = client.post("/v1/streams/snap-none/rollback")
    assert none.status_code == 404
