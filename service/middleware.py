"""ASGI middleware: the request-body limit, compressed request bodies, request metrics by route
template, the access log."""

from __future__ import annotations

import logging
import re
import time
import zlib
from typing import ClassVar

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_response, for_route
from service.metrics import Metrics

# uvicorn's own access log is off (service.main.serve): this one carries the request id.
access_logger = logging.getLogger("service.access")


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413, before or while they are read.

    A declared ``Content-Length`` over the limit is answered at once, without reading the body;
    a body that grows past the limit while being read raises an HTTPException(413) in the
    reader, which the error handlers turn into the usual error body.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return f"request body is larger than the limit of {self.max_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the declared length, then count the bytes as they arrive."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = error_response(413, "payload_too_large", self._message())
            await for_route(Request(scope), response)(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited, send)


class DecompressMiddleware:
    """Inflate request bodies sent with ``Content-Encoding: gzip`` or ``deflate`` (zlib).

    The body is inflated when the route reads it, so that its errors get the route's error
    shape: over ``max_bytes`` once inflated (a few kilobytes of gzip can inflate to gigabytes,
    so inflating stops there) 413, not valid gzip/zlib data 400, another encoding 415. The route
    sees the inflated body, without the Content-Encoding and Content-Length headers.
    """

    ENCODINGS: ClassVar[dict[str, int]] = {
        "gzip": 16 + zlib.MAX_WBITS,
        "x-gzip": 16 + zlib.MAX_WBITS,
        "deflate": zlib.MAX_WBITS,
    }

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass plain requests on; give the others a receive that inflates their body."""
        encoding = ""
        if scope["type"] == "http":
            encoding = Headers(scope=scope).get("content-encoding", "").strip().lower()
        if encoding in ("", "identity"):
            await self.app(scope, receive, send)
            return
        dropped = (b"content-encoding", b"content-length")
        scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k not in dropped]}
        body_read = False

        async def inflated() -> Message:
            nonlocal body_read
            if body_read:
                return await receive()  # after the body: a disconnect
            chunks = []
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return message
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
            body_read = True
            return {"type": "http.request", "body": self._inflate(encoding, b"".join(chunks))}

        await self.app(scope, inflated, send)

    def _inflate(self, encoding: str, data: bytes) -> bytes:
        wbits = self.ENCODINGS.get(encoding)
        if wbits is None:
            raise HTTPException(
                415, f"content encoding {encoding!r} is not supported; use gzip or deflate"
            )
        inflater = zlib.decompressobj(wbits)
        try:
            body = inflater.decompress(data, self.max_bytes + 1)
        except zlib.error as error:
            raise HTTPException(400, f"the {encoding} request body is corrupt: {error}") from None
        if len(body) > self.max_bytes:
            raise HTTPException(
                413, f"the request body inflates to more than the limit of {self.max_bytes} bytes"
            )
        if not inflater.eof:
            raise HTTPException(400, f"the {encoding} request body is truncated")
        return body


class MetricsMiddleware:
    """Count requests and time them by route template (never by raw path), method and status;
    write the access log, one INFO line per request with its request id (``service.logs``).

    Requests in flight are counted by the template of the route that will serve them, matched
    before the app runs against the app's OpenAPI paths (the router sets the scope's route only
    as it dispatches, too late to count the request from its start).
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self._templates: list[tuple[re.Pattern[str], str]] | None = None

    def matched_template(self, scope: Scope) -> str:
        """The path template of the route the request is for, or "unmatched"."""
        if self._templates is None:
            paths = scope["app"].openapi().get("paths", {})
            self._templates = [(compile_path(path)[0], path) for path in paths]
        path = scope.get("path", "")
        return next((t for regex, t in self._templates if regex.match(path)), "unmatched")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Record the request once its response has started."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        in_flight = self.metrics.http_in_flight.labels(self.matched_template(scope))
        in_flight.inc()

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            in_flight.dec()
            template = route_template(scope)
            method, path = scope.get("method", ""), scope.get("path", "")
            duration = time.perf_counter() - started
            self.metrics.requests.labels(template, method, str(status)).inc()
            self.metrics.request_latency.labels(template, method).observe(duration)
            access_logger.info(
                "%s %s %d %.1f ms",
                method,
                path,
                status,
                duration * 1000,
                extra={"method": method, "path": path, "status": status, "duration_s": duration},
            )


def route_template(scope: Scope) -> str:
    """The matched route's full path template (``/v1/streams/{stream_id}``), or "unmatched".

    The route in the scope knows its path relative to its router's prefix; the prefix is the
    part of the request path before the route's own (static: routers have no prefix parameters).
    """
    route = scope.get("route")
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    if not isinstance(template, str):
        return "unmatched"
    params = {key: str(value) for key, value in scope.get("path_params", {}).items()}
    try:
        concrete = template.format(**params)
    except (KeyError, IndexError, ValueError):
        return template
    path: str = scope.get("path", "")
    if concrete and not path.endswith(concrete):
        return template
    return path[: len(path) - len(concrete)] + template


class ServedByMiddleware:
    """Adds ``X-Served-By: <replica id>`` to every response: which replica a gateway chose."""

    def __init__(self, app: ASGIApp, replica_id: str) -> None:
        self.app = app
        self.header = (b"x-served-by", replica_id.encode("latin-1"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on; add the header to the response's start message."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, with_header)
