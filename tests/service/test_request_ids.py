"""Request ids: X-Request-Id accepted or generated, echoed on every route, in every log line."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from asgi_correlation_id import CorrelationIdFilter

from service.logs import configure_logging
from tests.service.helpers import running_server, server_settings

HEX_ID = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[httpx.Client]:
    settings = server_settings(
        tmp_path_factory.mktemp("ids"), model_cache, store="memory", max_body_bytes=4096
    )
    with running_server(settings) as server, server.client() as http:
        yield http


@pytest.fixture
def access_log() -> Iterator[list[logging.LogRecord]]:
    """The access-log records written during the test, with their request ids."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    handler.addFilter(CorrelationIdFilter())
    logger = logging.getLogger("service.access")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v2/health/live", 200),
        ("GET", "/v1/models", 200),
        ("GET", "/v1/streams/nobody", 404),
        ("GET", "/v2/models/nothing/ready", 400),
        ("DELETE", "/v1/models", 405),
        ("GET", "/metrics", 200),
        ("GET", "/docs", 200),
    ],
)
def test_client_id_is_echoed_and_logged(
    client: httpx.Client, access_log: list[logging.LogRecord], method: str, path: str, status: int
) -> None:
    response = client.request(method, path, headers={"X-Request-Id": "job-7/step-3"})
    assert response.status_code == status
    assert response.headers["x-request-id"] == "job-7/step-3"
    (record,) = [r for r in access_log if getattr(r, "path", None) == path]
    assert record.correlation_id == "job-7/step-3"  # type: ignore[attr-defined]
    assert (record.method, record.status) == (method, status)  # type: ignore[attr-defined]


def test_body_over_the_limit_carries_the_id(client: httpx.Client) -> None:
    response = client.post("/v1/streams", content=b"x" * 5000, headers={"X-Request-Id": "big"})
    assert response.status_code == 413
    assert response.headers["x-request-id"] == "big"


@pytest.mark.parametrize("sent", [None, b"", b"a b", b"x" * 129, "id\u00e9".encode(), b"a\tb"])
def test_missing_or_odd_ids_are_replaced(client: httpx.Client, sent: bytes | None) -> None:
    headers = {} if sent is None else {"X-Request-Id": sent}
    response = client.get("/v2/health/live", headers=headers)
    assert HEX_ID.match(response.headers["x-request-id"])


def test_json_log_lines_carry_the_request_id() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    try:
        configure_logging("info", "json")
        root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
        logging.getLogger("service.access").info(
            "GET / 200", extra={"method": "GET", "status": 200, "color_message": "\x1b[36m"}
        )
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    line = json.loads(stream.getvalue())
    assert line["message"] == "GET / 200" and line["level"] == "INFO"
    assert line["logger"] == "service.access" and line["request_id"] == "-"
    assert (line["method"], line["status"]) == ("GET", 200)
    assert "color_message" not in line  # uvicorn's coloured copy of its messages
