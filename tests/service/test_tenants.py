"""Tenants and access control through real HTTP: each role's allowed operations, no stream of one
tenant visible to another (a property-based run of random interleavings), quotas, key reloads."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import ValidationError
from tritonclient.utils import InferenceServerException

from service.auth import ApiKey, Caller, KeyRing, Role, hash_key, key_id, new_key, verify_key
from service.auth import main as auth_cli
from service.settings import Settings
from tests.service.helpers import MODEL, Server, running_server, server_settings

PIXELS = bytes(3 * 32 * 32)  # one black image, as a raw uint8 tensor


@dataclass(frozen=True)
class Actor:
    """A client: its key (None: anonymous), the tenant and role the key is bound to."""

    name: str
    key: str | None
    tenant: str = ""
    role: Role | None = None

    @property
    def headers(self) -> dict[str, str]:
        """The request headers that carry the key."""
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}


def make_actor(name: str, tenant: str, role: Role) -> tuple[Actor, ApiKey]:
    """A fresh key for ``tenant`` and ``role``, and its settings entry."""
    key = new_key()
    entry = ApiKey(id=key_id(key) or "", hash=hash_key(key), tenant=tenant, role=role)
    return Actor(name, key, tenant, role), entry


ACTORS = dict(
    (actor.name, (actor, entry))
    for actor, entry in [
        make_actor("admin", "acme", "admin"),
        make_actor("user", "acme", "user"),
        make_actor("reader", "acme", "reader"),
        make_actor("metrics", "acme", "metrics"),
        make_actor("globex", "globex", "user"),
    ]
)
KEYS = [entry for _, entry in ACTORS.values()]
ADMIN, USER, READER, METRICS, GLOBEX = (ACTORS[n][0] for n in ACTORS)
ANONYMOUS = Actor("anonymous", None)
FORGED = Actor("forged", f"tta_{key_id(USER.key or '')}_not-the-secret", "acme", "user")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Server]:
    """A server with the keys above (two tenants), local store."""
    settings = server_settings(
        tmp_path_factory.mktemp("data"), model_cache, api_keys=KEYS, metrics_top_k=100
    )
    with running_server(settings) as running:
        yield running


def call(
    client: httpx.Client, actor: Actor, method: str, path: str, **kwargs: Any
) -> httpx.Response:
    """One request of ``actor``."""
    headers = {**actor.headers, **kwargs.pop("headers", {})}
    return client.request(method, path, headers=headers, **kwargs)


def predict(client: httpx.Client, actor: Actor, stream: str) -> httpx.Response:
    """Adapt ``stream`` to one image, through the v1 API."""
    return call(
        client,
        actor,
        "POST",
        f"/v1/streams/{stream}/predict",
        content=PIXELS,
        params={"shape": "1,3,32,32"},
        headers={"content-type": "application/octet-stream"},
    )


def infer(client: httpx.Client, actor: Actor, stream: str) -> httpx.Response:
    """Adapt ``stream`` to one image, through the Open Inference Protocol."""
    body = {
        "parameters": {"stream_id": stream},
        "inputs": [
            {"name": "input", "shape": [1, 3, 32, 32], "datatype": "UINT8", "data": [0] * 3072}
        ],
    }
    return call(client, actor, "POST", f"/v2/models/{MODEL}/infer", json=body)


def import_own_state(
    client: httpx.Client, actor: Actor, stream: str, exporter: Actor | None = None
) -> httpx.Response:
    """Export the stream's state (as ``exporter``, default ``actor``), import it as ``actor``.

    The export's response if it fails.
    """
    exported = call(client, exporter or actor, "GET", f"/v1/streams/{stream}/state")
    if exported.status_code != 200:
        return exported
    return call(
        client,
        actor,
        "PUT",
        f"/v1/streams/{stream}/state",
        content=exported.content,
        headers={"content-type": "application/octet-stream"},
    )


# --- each role's matrix of operations --------------------------------------------------------

Operation = Callable[[httpx.Client, Actor, str], httpx.Response]
# name -> (the permission it needs, its status when allowed, the request)
OPERATIONS: dict[str, tuple[str | None, int, Operation]] = {
    "list": ("read", 200, lambda c, a, s: call(c, a, "GET", "/v1/streams")),
    "read": ("read", 200, lambda c, a, s: call(c, a, "GET", f"/v1/streams/{s}")),
    "export": ("read", 200, lambda c, a, s: call(c, a, "GET", f"/v1/streams/{s}/state")),
    "drift": ("read", 200, lambda c, a, s: call(c, a, "GET", f"/v1/streams/{s}/drift")),
    "models": ("read", 200, lambda c, a, s: call(c, a, "GET", "/v1/models")),
    "adapters": ("read", 200, lambda c, a, s: call(c, a, "GET", "/v1/adapters")),
    "oip-model": ("read", 200, lambda c, a, s: call(c, a, "GET", f"/v2/models/{MODEL}")),
    "oip-ready": ("read", 200, lambda c, a, s: call(c, a, "GET", f"/v2/models/{MODEL}/ready")),
    "create": (
        "write",
        201,
        lambda c, a, s: call(c, a, "POST", "/v1/streams", json={"id": s + "x"}),
    ),
    "predict": ("write", 200, predict),
    "infer": ("write", 200, infer),
    "reset": ("write", 200, lambda c, a, s: call(c, a, "POST", f"/v1/streams/{s}/reset")),
    "import": ("write", 200, lambda c, a, s: import_own_state(c, a, s, exporter=ADMIN)),
    "delete": ("write", 204, lambda c, a, s: call(c, a, "DELETE", f"/v1/streams/{s}")),
    "metrics": ("metrics", 200, lambda c, a, s: call(c, a, "GET", "/metrics")),
    "docs": ("docs", 200, lambda c, a, s: call(c, a, "GET", "/docs")),
    "openapi": ("docs", 200, lambda c, a, s: call(c, a, "GET", "/openapi.json")),
    "redoc": ("docs", 200, lambda c, a, s: call(c, a, "GET", "/redoc")),
    "live": (None, 200, lambda c, a, s: call(c, a, "GET", "/v2/health/live")),
    "ready": (None, 200, lambda c, a, s: call(c, a, "GET", "/v2/health/ready")),
    "server": (None, 200, lambda c, a, s: call(c, a, "GET", "/v2")),
}
ALLOWED = {
    "admin": {"read", "write", "metrics", "docs"},
    "user": {"read", "write", "docs"},
    "reader": {"read", "docs"},
    "metrics": {"metrics"},
    "anonymous": set(),
    "forged": set(),
}


@pytest.mark.parametrize("who", list(ALLOWED))
def test_each_role_may_do_exactly_its_operations(server: Server, who: str) -> None:
    actor = {a.name: a for a in [ADMIN, USER, READER, METRICS, GLOBEX, ANONYMOUS, FORGED]}[who]
    with server.client() as client:
        for name, (permission, success, operation) in OPERATIONS.items():
            stream = f"m-{who}-{name}"
            created = call(client, ADMIN, "POST", "/v1/streams", json={"id": stream})
            assert created.status_code == 201, created.text
            response = operation(client, actor, stream)
            if permission is None or permission in ALLOWED[who]:
                expected, code = success, None
            elif actor.key is None or actor is FORGED:
                expected, code = 401, "unauthorized"
            else:
                expected, code = 403, "forbidden"
            assert response.status_code == expected, (who, name, response.text)
            if code is not None:
                error = response.json()["error"]
                if response.request.url.path.startswith("/v2"):  # the OIP body: a message
                    assert isinstance(error, str) and "key" in error, (who, name, error)
                else:
                    assert error["code"] == code and "key" in error["message"], (who, name)
            if expected == 401:
                assert response.headers["www-authenticate"].startswith("Bearer")


OPEN_ROUTES = {"/v2", "/v2/health/live", "/v2/health/ready"}


def test_every_route_but_health_needs_a_key(server: Server) -> None:
    """Every operation of the API document (those added after this test included), the docs."""
    paths = server.app.openapi()["paths"]
    routes = [
        (method.upper(), path)
        for path, operations in paths.items()
        if path not in OPEN_ROUTES
        for method in operations
    ]
    routes += [("GET", "/docs"), ("GET", "/redoc"), ("GET", "/openapi.json")]
    assert len(routes) > 20
    with server.client() as client:
        for method, path in routes:
            url = re.sub(r"\{[^}]+\}", "x", path)
            response = client.request(method, url, headers={"content-type": "application/json"})
            assert response.status_code == 401, (method, path, response.text)


def test_a_refusal_does_not_change_the_stream(server: Server) -> None:
    with server.client() as client:
        call(client, USER, "POST", "/v1/streams", json={"id": "kept"}).raise_for_status()
        predict(client, USER, "kept").raise_for_status()
        for actor in (READER, METRICS, ANONYMOUS, FORGED):
            assert predict(client, actor, "kept").status_code in (401, 403)
            assert call(client, actor, "POST", "/v1/streams/kept/reset").status_code in (401, 403)
            assert call(client, actor, "DELETE", "/v1/streams/kept").status_code in (401, 403)
        assert call(client, USER, "GET", "/v1/streams/kept").json()["samples"] == 1


def test_another_tenants_stream_is_not_found_and_ids_are_per_tenant(server: Server) -> None:
    with server.client() as client:
        created = call(client, USER, "POST", "/v1/streams", json={"id": "cam-1"})
        assert created.status_code == 201 and created.json()["tenant"] == "acme"
        assert created.json()["id"] == "cam-1"
        predict(client, USER, "cam-1").raise_for_status()
        for name in ("read", "export", "drift", "predict", "infer", "reset", "delete"):
            response = OPERATIONS[name][2](client, GLOBEX, "cam-1")
            assert response.status_code == 404, (name, response.text)
            assert "cam-1" in response.text and "acme" not in response.text
        # the same id in the other tenant is another stream
        assert call(client, GLOBEX, "POST", "/v1/streams", json={"id": "cam-1"}).status_code == 201
        predict(client, GLOBEX, "cam-1").raise_for_status()
        predict(client, GLOBEX, "cam-1").raise_for_status()
        assert call(client, USER, "GET", "/v1/streams/cam-1").json()["samples"] == 1
        assert call(client, GLOBEX, "GET", "/v1/streams/cam-1").json()["samples"] == 2
        listed = call(client, GLOBEX, "GET", "/v1/streams").json()
        assert [s["id"] for s in listed["data"]] == ["cam-1"] and listed["count"] == 1


def test_the_safety_routes_obey_tenants_and_roles(server: Server) -> None:
    """Feedback, fork, freeze, thaw, snapshots and rollback: another tenant's stream is not
    found, a reader may only list snapshots, and a fork belongs to the forking tenant."""
    routes = [
        ("POST", "feedback", {"labels": [{"request_id": "r", "index": 0, "label": 0}]}),
        ("POST", "fork", {"id": "cam-fork"}),
        ("POST", "freeze", None),
        ("POST", "thaw", None),
        ("GET", "snapshots", None),
        ("POST", "rollback", {}),
    ]
    with server.client() as client:
        body = {"id": "safe-1", "feedback": True, "snapshots": 2}
        assert call(client, USER, "POST", "/v1/streams", json=body).status_code == 201
        for method, route, payload in routes:
            path = f"/v1/streams/safe-1/{route}"
            other = call(client, GLOBEX, method, path, json=payload)
            assert other.status_code == 404, (route, other.text)
            if method == "POST":
                refused = call(client, READER, method, path, json=payload)
                assert refused.status_code == 403, (route, refused.text)
        assert call(client, READER, "GET", "/v1/streams/safe-1/snapshots").status_code == 200
        fork = call(client, USER, "POST", "/v1/streams/safe-1/fork", json={"id": "cam-fork"})
        assert fork.status_code == 201 and fork.json()["tenant"] == "acme"
        assert call(client, GLOBEX, "GET", "/v1/streams/cam-fork").status_code == 404


def test_an_admin_acts_for_another_tenant_with_x_tenant_others_may_not(server: Server) -> None:
    with server.client() as client:
        call(client, GLOBEX, "POST", "/v1/streams", json={"id": "g-only"}).raise_for_status()
        as_globex = {"X-Tenant": "globex"}
        response = call(client, ADMIN, "GET", "/v1/streams/g-only", headers=as_globex)
        assert response.status_code == 200 and response.json()["tenant"] == "globex"
        assert call(client, ADMIN, "GET", "/v1/streams/g-only").status_code == 404
        response = call(client, USER, "GET", "/v1/streams/g-only", headers=as_globex)
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "forbidden"
        # an empty X-Tenant: the streams of no tenant (made before keys were configured)
        no_tenant = {"X-Tenant": ""}
        made = call(client, ADMIN, "POST", "/v1/streams", json={"id": "legacy"}, headers=no_tenant)
        assert made.status_code == 201 and made.json()["tenant"] == ""
        assert call(client, USER, "GET", "/v1/streams/legacy").status_code == 404
        assert (
            call(client, ADMIN, "GET", "/v1/streams/legacy", headers=no_tenant).status_code == 200
        )
        response = call(client, ADMIN, "GET", "/v1/streams", headers={"X-Tenant": "Not/Valid"})
        assert response.status_code == 403


def test_per_stream_metrics_name_the_tenant(server: Server) -> None:
    with server.client() as client:
        call(client, USER, "POST", "/v1/streams", json={"id": "metered"}).raise_for_status()
        predict(client, USER, "metered").raise_for_status()
        text = call(client, METRICS, "GET", "/metrics").text
    assert 'stream="acme/metered"' in text
    assert 'stream="metered"' not in text


def test_keys_are_never_logged(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG), server.client() as client:
        for actor in (USER, FORGED, READER):
            call(client, actor, "GET", "/v1/streams")
            call(client, actor, "DELETE", "/v1/streams/nothing")
    secrets = [a.key.rsplit("_", 1)[1] for a in (USER, FORGED, READER) if a.key]
    server_side = [r.getMessage() for r in caplog.records if not r.name.startswith("http")]
    assert not any(secret in line for secret in secrets for line in server_side)


# --- the property: no cross-tenant read or write, in any interleaving ------------------------

FUZZ_ACTORS = [USER, GLOBEX, ANONYMOUS]
FUZZ_IDS = ["a", "b", "c"]
FUZZ_OPERATIONS = [
    "create",
    "read",
    "list",
    "predict",
    "infer",
    "reset",
    "export",
    "import",
    "drift",
    "delete",
]


def clear_streams(client: httpx.Client) -> None:
    """Delete every stream of both tenants."""
    for actor in (USER, GLOBEX):
        for stream in call(client, actor, "GET", "/v1/streams?limit=1000").json()["data"]:
            call(client, actor, "DELETE", f"/v1/streams/{stream['id']}").raise_for_status()


@hypothesis_settings(
    # TTA_TENANT_FUZZ_EXAMPLES=300 for a longer run (docs/security.md)
    max_examples=int(os.environ.get("TTA_TENANT_FUZZ_EXAMPLES", "60")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(FUZZ_ACTORS),
            st.sampled_from(FUZZ_OPERATIONS),
            st.sampled_from(FUZZ_IDS),
        ),
        min_size=1,
        max_size=20,
    )
)
def test_no_cross_tenant_read_or_write_in_any_interleaving(
    server: Server, steps: list[tuple[Actor, str, str]]
) -> None:
    """Two tenants and an anonymous client; a model of what each tenant holds predicts every answer.

    Each tenant's streams and their sample counts are tracked; every status, every listing and
    every sample count must be the model's, so a read or write that reached another tenant's
    stream (or an anonymous request that did anything) fails the run.
    """
    held: dict[str, dict[str, int]] = {"acme": {}, "globex": {}}
    with server.client() as client:
        clear_streams(client)
        for actor, name, stream in steps:
            response = (
                call(client, actor, "POST", "/v1/streams", json={"id": stream})
                if name == "create"
                else import_own_state(client, actor, stream)
                if name == "import"
                else OPERATIONS[name][2](client, actor, stream)
            )
            if actor is ANONYMOUS:
                assert response.status_code == 401, (name, response.text)
                continue
            mine = held[actor.tenant]
            if name == "list":
                listed = {s["id"]: s["samples"] for s in response.json()["data"]}
                assert listed == mine, (actor.name, listed, held)
                continue
            if name == "create":
                assert response.status_code == (409 if stream in mine else 201), response.text
                mine.setdefault(stream, 0)
                continue
            if stream not in mine:
                assert response.status_code == 404, (actor.name, name, stream, response.text)
                continue
            assert response.status_code == OPERATIONS[name][1], (name, response.text)
            if name in ("predict", "infer"):
                mine[stream] += 1
            elif name == "reset":
                mine[stream] = 0
            elif name == "delete":
                del mine[stream]
            if name in ("read", "reset", "import", "predict"):
                assert response.json()["samples"] == mine[stream], (name, stream, held)
        for actor in (USER, GLOBEX):  # every stream ends as the model says
            for stream, samples in held[actor.tenant].items():
                read = call(client, actor, "GET", f"/v1/streams/{stream}")
                assert read.status_code == 200, (stream, read.text, held)
                assert read.json()["samples"] == samples, (stream, read.text, held)
                assert read.json()["tenant"] == actor.tenant


# --- quotas ----------------------------------------------------------------------------------


def test_quotas_of_streams_and_state_memory(tmp_path: Path, model_cache: Path) -> None:
    """acme may hold 2 streams; globex the state memory of 1 stream and a half."""
    probe_settings = server_settings(tmp_path / "probe", model_cache)
    with running_server(probe_settings) as probe, probe.client() as client:
        client.post("/v1/streams", json={"id": "p"}).raise_for_status()
        one_stream = len(client.get("/v1/streams/p/state").content)
    settings = server_settings(
        tmp_path,
        model_cache,
        api_keys=KEYS,
        tenant_max_streams=2,
        tenant_quotas={"globex": {"max_state_bytes": one_stream * 3 // 2}},
    )
    with running_server(settings) as quota_server, quota_server.client() as client:
        for stream in ("q1", "q2"):
            assert call(client, USER, "POST", "/v1/streams", json={"id": stream}).status_code == 201
        refused = call(client, USER, "POST", "/v1/streams", json={"id": "q3"})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "quota_exceeded"
        assert "2 streams" in refused.json()["error"]["message"]
        call(client, USER, "DELETE", "/v1/streams/q1").raise_for_status()
        assert call(client, USER, "POST", "/v1/streams", json={"id": "q3"}).status_code == 201

        assert call(client, GLOBEX, "POST", "/v1/streams", json={"id": "g1"}).status_code == 201
        refused = call(client, GLOBEX, "POST", "/v1/streams", json={"id": "g2"})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "quota_exceeded"
        assert "state-memory quota" in refused.json()["error"]["message"]
        assert call(client, GLOBEX, "GET", "/v1/streams/g2").status_code == 404  # nothing stored
        assert call(client, GLOBEX, "GET", "/v1/streams").json()["count"] == 1


# --- keys: the file is reloaded, the bind is refused without keys, the CLI ------------------


def test_the_keys_file_is_reloaded_without_restart(tmp_path: Path, model_cache: Path) -> None:
    keys_file = tmp_path / "keys.json"
    first, first_entry = make_actor("first", "acme", "user")
    second, second_entry = make_actor("second", "acme", "user")

    def write(entries: list[ApiKey]) -> None:
        temp = tmp_path / "keys.tmp"
        temp.write_text(json.dumps({"keys": [e.model_dump() for e in entries]}))
        temp.replace(keys_file)  # atomic, as a deployment tool writes it

    write([first_entry])
    settings = server_settings(tmp_path / "data", model_cache, api_keys_file=keys_file)
    with running_server(settings) as running, running.client() as client:
        assert call(client, first, "GET", "/v1/streams").status_code == 200
        assert call(client, second, "GET", "/v1/streams").status_code == 401
        write([second_entry])  # first revoked, second added
        assert call(client, second, "GET", "/v1/streams").status_code == 200
        assert call(client, first, "GET", "/v1/streams").status_code == 401
        keys_file.write_text("{not json")  # a broken file: the keys in force stay
        assert call(client, second, "GET", "/v1/streams").status_code == 200


def test_a_broken_keys_file_fails_the_start_up(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text('[[keys]]\nid = "short"\n')
    from service.main import create_app

    with pytest.raises(ValueError, match="invalid entries"):
        create_app(Settings(store="memory", api_keys_file=keys_file))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "tta.example.com"])
def test_a_non_loopback_bind_without_keys_is_refused(host: str) -> None:
    with pytest.raises(ValidationError, match="not a loopback address and no API key"):
        Settings(host=host)
    assert Settings(host=host, allow_unauthenticated=True).host == host
    assert Settings(host=host, api_keys=KEYS[:1]).auth_enabled


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.53"])
def test_a_loopback_bind_needs_no_keys(host: str) -> None:
    assert not Settings(host=host).auth_enabled


def test_the_cli_makes_a_key_and_its_entry_and_hashes_a_key(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    auth_cli(["new", "--tenant", "acme", "--role", "reader"])  # python -m service.auth new ...
    made = capsys.readouterr()
    key = made.err.strip().rsplit(" ", 1)[1]
    (entry,) = tomllib.loads(made.out)["keys"]
    assert key not in made.out  # only the hash is meant to be stored
    parsed = ApiKey.model_validate(entry)
    assert parsed.id == key_id(key) and parsed.tenant == "acme" and parsed.role == "reader"
    assert verify_key(key, parsed.hash) and not verify_key(key + "x", parsed.hash)
    monkeypatch.setattr(sys, "stdin", io.StringIO(key + "\n"))
    auth_cli(["hash"])
    hashed = capsys.readouterr().out.strip()
    assert verify_key(key, hashed) and hashed != parsed.hash  # a fresh salt
    monkeypatch.setattr(sys, "stdin", io.StringIO("not-a-key\n"))
    with pytest.raises(SystemExit):
        auth_cli(["hash"])


def test_a_key_is_checked_by_scrypt_once_right_or_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    checks: list[str] = []

    def counted(key: str, stored: str) -> bool:
        checks.append(key)
        return verify_key(key, stored)

    monkeypatch.setattr("service.auth.verify_key", counted)
    ring = KeyRing.of([ACTORS["user"][1]])
    assert ring.known(USER.key or "") == (False, None)
    assert ring.check(USER.key or "") == Caller("acme", "user", key_id(USER.key or ""))
    assert ring.check(FORGED.key or "") is None
    assert ring.known(USER.key or "")[0] and ring.known(FORGED.key or "") == (True, None)
    assert ring.check("tta_0123456789abcdef_unknown-id") is None  # no entry: no scrypt
    assert checks == [USER.key, FORGED.key]
    assert not verify_key(USER.key or "", "scrypt$broken")


def test_without_keys_every_caller_is_the_anonymous_admin(
    tmp_path: Path, model_cache: Path
) -> None:
    with running_server(server_settings(tmp_path, model_cache)) as running, running.client() as c:
        created = c.post("/v1/streams", json={"id": "open"})
        assert created.status_code == 201 and created.json()["tenant"] == ""
        assert c.get("/metrics").status_code == 200
        assert c.get("/docs").status_code == 200
        assert c.get("/openapi.json").status_code == 200


def triton_infer(module: Any, client: Any, actor: Actor, sequence: int, start: bool) -> Any:
    """One black image into Triton sequence ``sequence``, the actor's key in the headers."""
    tensor = module.InferInput("input", [1, 3, 32, 32], "UINT8")
    tensor.set_data_from_numpy(np.zeros((1, 3, 32, 32), dtype=np.uint8))
    headers = {k.lower(): v for k, v in actor.headers.items()}
    return client.infer(
        MODEL, [tensor], sequence_id=sequence, sequence_start=start, headers=headers
    )


def test_triton_clients_carry_the_key_and_sequences_are_per_tenant(
    tmp_path: Path, model_cache: Path
) -> None:
    """tritonclient over HTTP and gRPC, unmodified, with the key in its headers: no key is
    refused (401 / UNAUTHENTICATED), a reader may not infer (403 / PERMISSION_DENIED), and two
    tenants' sequences with the same sequence id are two streams."""
    settings = server_settings(tmp_path, model_cache, api_keys=KEYS, grpc_port=0)
    with running_server(settings) as running:
        rpc_url = f"127.0.0.1:{running.app.state.tta.grpc_port}"
        clients = [
            (triton_http, triton_http.InferenceServerClient(running.url.removeprefix("http://"))),
            (triton_grpc, triton_grpc.InferenceServerClient(rpc_url)),
        ]
        for sequence, (module, client) in enumerate(clients, start=7):
            for actor, codes in [
                (ANONYMOUS, ("401", "UNAUTHENTICATED")),
                (READER, ("403", "PERMISSION_DENIED")),
            ]:
                with pytest.raises(InferenceServerException) as refused:
                    triton_infer(module, client, actor, sequence, True)
                assert any(code in str(refused.value.status()) for code in codes)
            for step in range(3):
                for actor in (USER, GLOBEX):
                    triton_infer(module, client, actor, sequence, step == 0)
            with running.client() as http:
                for actor in (USER, GLOBEX):
                    view = call(http, actor, "GET", f"/v1/streams/{sequence}").json()
                    assert view["samples"] == 3 and view["tenant"] == actor.tenant
            client.close()
