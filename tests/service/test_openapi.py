"""The API as documented: a valid OpenAPI 3.1 document, 405 with Allow, strict TTLs (real HTTP)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openapi_spec_validator import OpenAPIV31SpecValidator

from models import ModelError
from service import errors
from service.streams import STREAM_ID
from tests.service.helpers import Server, running_server, server_settings


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Server]:
    """One server for this module's tests."""
    with running_server(server_settings(tmp_path_factory.mktemp("data"), model_cache)) as running:
        yield running


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    """An HTTP client of the module's server."""
    with server.client() as http:
        yield http


@pytest.fixture(scope="module")
def document(server: Server) -> dict[str, Any]:
    """The server's OpenAPI document, as a client fetches it."""
    with server.client() as http:
        response = http.get("/openapi.json")
    assert response.status_code == 200
    result: dict[str, Any] = response.json()
    return result


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Every (method, path, operation) of the document."""
    for path, item in document["paths"].items():
        for method, operation in item.items():
            yield method.upper(), path, operation


def test_the_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1")
    errors = [str(e).splitlines()[0] for e in OpenAPIV31SpecValidator(document).iter_errors()]
    assert errors == []


def test_every_reference_resolves(document: dict[str, Any]) -> None:
    def refs(node: object) -> Iterator[str]:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                yield node["$ref"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    found = set(refs(document))
    assert "#/components/schemas/InferRequest" in found
    schemas = document["components"]["schemas"]
    prefix = "#/components/schemas/"
    unresolved = {r for r in found if not r.startswith(prefix) or r[len(prefix) :] not in schemas}
    assert unresolved == set()


def test_no_fastapi_default_validation_error(document: dict[str, Any]) -> None:
    assert "HTTPValidationError" not in document["components"]["schemas"]
    assert "ValidationError" not in document["components"]["schemas"]


def test_errors_are_documented_with_the_bodies_the_server_sends(document: dict[str, Any]) -> None:
    for method, path, operation in operations(document):
        body = "OipError" if path.startswith("/v2") else "ErrorPublic"
        health = path.startswith("/v2/health/") or path.endswith("/ready")
        for status, response in operation["responses"].items():
            if int(status) < 400:
                continue
            if health:  # the protocol's health answer: 200, or 400 without a body
                assert (status, response.get("content")) == ("400", {}), (method, path, status)
                continue
            schema = response["content"]["application/json"]["schema"]
            assert schema == {"$ref": f"#/components/schemas/{body}"}, (method, path, status)
            assert "example" in response["content"]["application/json"], (method, path, status)
            if status in ("429", "503"):
                assert "Retry-After" in response["headers"], (method, path, status)


def test_stream_routes_document_their_statuses_and_the_id_pattern(
    document: dict[str, Any],
) -> None:
    predict = document["paths"]["/v1/streams/{stream_id}/predict"]["post"]
    assert set(predict["responses"]) == {
        "200",
        "400",
        "401",
        "403",
        "404",
        "409",
        "413",
        "415",
        "422",
        "429",
        "500",
        "503",
        "504",
        "507",
    }
    stream_id = next(p for p in predict["parameters"] if p["name"] == "stream_id")
    assert stream_id["schema"]["pattern"] == STREAM_ID.pattern
    body = predict["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json", "application/octet-stream"}
    create = document["paths"]["/v1/streams"]["post"]
    assert set(create["responses"]) == {
        *("201", "400", "401", "403", "404", "409", "413", "422", "503", "507")
    }
    assert "invalid_config" in create["responses"]["422"]["description"]


def test_every_operation_has_an_example_request_and_response(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]

    def has_example(media: dict[str, Any]) -> bool:
        schema = media.get("schema", {})
        if schema.get("format") == "binary":  # raw bytes: described, not exemplified
            return True
        target = schemas[schema["$ref"].rsplit("/", 1)[-1]] if "$ref" in schema else schema
        return "example" in media or "examples" in media or "examples" in target

    for method, path, operation in operations(document):
        for media in operation.get("requestBody", {}).get("content", {}).values():
            if "properties" not in media.get("schema", {}):  # multipart: files
                assert has_example(media), (method, path)
        success = next(r for s, r in operation["responses"].items() if s.startswith("2"))
        for media in success.get("content", {}).values():
            if path.startswith("/v2") and "Infer" not in str(media):
                continue  # the protocol's small fixed bodies
            assert has_example(media), (method, path)


@pytest.mark.parametrize(
    "method, path, allowed, body",
    [
        ("DELETE", "/v1/streams", "GET, POST", "v1"),
        ("PATCH", "/v1/streams/cam-1", "DELETE, GET", "v1"),
        ("POST", "/v1/streams/cam-1/state", "GET, PUT", "v1"),
        ("GET", "/v2/models/cifar10_resnet20/infer", "POST", "v2"),
        ("HEAD", "/metrics", "GET", "head"),
    ],
)
def test_405_names_every_allowed_method(
    client: httpx.Client, method: str, path: str, allowed: str, body: str
) -> None:
    response = client.request(method, path)
    assert response.status_code == 405
    assert response.headers["allow"] == allowed
    if body == "head":  # no body, and HEAD is not served where GET is (FastAPI adds no HEAD)
        assert response.content == b""
    elif body == "v1":
        assert response.json() == {
            "error": {"code": "method_not_allowed", "message": "Method Not Allowed"}
        }
    else:
        assert response.json() == {"error": "Method Not Allowed"}


@pytest.mark.parametrize(
    "ttl, message",
    [
        ("Infinity", "ttl_seconds: Input should be a finite number"),
        ("-Infinity", "ttl_seconds: Input should be a finite number"),
        ("NaN", "ttl_seconds: Input should be a finite number"),
        ("1e309", "ttl_seconds: Input should be a finite number"),
        ("true", "ttl_seconds: Input should be a valid number"),
        ('"60"', "ttl_seconds: Input should be a valid number"),
        ("1e12", "ttl_seconds: Input should be less than or equal to 31622400"),
        ("0", "ttl_seconds: Input should be greater than 0"),
    ],
)
def test_an_invalid_ttl_is_refused_with_422_and_creates_nothing(
    client: httpx.Client, ttl: str, message: str
) -> None:
    content = f'{{"id": "ttl-probe", "ttl_seconds": {ttl}}}'
    response = client.post(
        "/v1/streams", content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_request"
    assert response.json()["error"]["message"].startswith(message)
    assert client.get("/v1/streams/ttl-probe").status_code == 404


def test_a_ttl_in_range_is_accepted(client: httpx.Client) -> None:
    response = client.post("/v1/streams", json={"id": "ttl-ok", "ttl_seconds": 31622400})
    assert response.status_code == 201, response.text
    assert response.json()["ttl_seconds"] == 31622400


def test_every_typed_error_is_documented_on_some_route(document: dict[str, Any]) -> None:
    def subclasses(kind: type[errors.ServiceError]) -> Iterator[type[errors.ServiceError]]:
        for sub in kind.__subclasses__():
            yield sub
            yield from subclasses(sub)

    kinds: list[type[Exception]] = [*subclasses(errors.ServiceError)]
    # ModelError is raised while the models load (at start-up), never by a request.
    kinds += [kind for kind, _, _ in errors.DOMAIN_ERRORS if kind is not ModelError]
    described = " ".join(
        response["description"]
        for _, _, operation in operations(document)
        for response in operation["responses"].values()
    )
    missing = {errors.classify(kind)[1] for kind in kinds} - {
        code for code in described.replace("`", " ").split()
    }
    assert missing == set()
