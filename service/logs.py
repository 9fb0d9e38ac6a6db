"""Logging of the entry point (text or JSON lines), request ids, and the access log.

Every request gets an id: the client's ``X-Request-Id`` when it is a plausible id, a new one
otherwise (asgi-correlation-id). It is echoed in the response's ``X-Request-Id``, and every log
record written while the request is served carries it (``request_id``), the access-log line
included, so one request's lines can be found in the logs of a busy server.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Literal

from asgi_correlation_id import CorrelationIdFilter
from pythonjsonlogger.json import JsonFormatter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID = "X-Request-Id"
# A client's id is kept if it is short and plain (a UUID, a trace id, "job-7/step-3"); anything
# else (a 10 kB header, control characters for the logs) is replaced by a fresh id.
_PLAIN_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
NO_REQUEST = "-"  # the request id of records written outside a request (start-up, flushes)

access_logger = logging.getLogger("service.access")


def is_plain_id(value: str) -> bool:
    """Whether a client's request id is kept as it is."""
    return _PLAIN_ID.fullmatch(value) is not None


def configure_logging(level: str, log_format: Literal["text", "json"]) -> None:
    """Configure the root logger once, at the entry point: text lines or JSON objects.

    JSON: one object per line with ``time``, ``level``, ``logger``, ``message``, ``request_id``
    and any ``extra`` fields (the access log's method, path, status, duration_ms).
    """
    handler = logging.StreamHandler()
    handler.addFilter(CorrelationIdFilter(default_value=NO_REQUEST))
    if log_format == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s %(correlation_id)s",
                rename_fields={
                    "asctime": "time",
                    "levelname": "level",
                    "name": "logger",
                    "correlation_id": "request_id",
                },
            )
        )
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(correlation_id)s] %(message)s")
        )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


class AccessLogMiddleware:
    """One INFO line per request (method, path, status, duration), with its request id.

    Replaces uvicorn's access log (the entry point turns it off), so that every request's line
    carries its id and, in JSON, its fields.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve the request; log it once it is done (500 if it raised)."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            duration_ms = (time.perf_counter() - started) * 1000
            method, path = scope.get("method", ""), scope.get("path", "")
            access_logger.info(
                "%s %s %d %.1f ms",
                method,
                path,
                status,
                duration_ms,
                extra={
                    "method": method,
                    "path": path,
                    "status": status,
                    "duration_ms": round(duration_ms, 2),
                },
            )
