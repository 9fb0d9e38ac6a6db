"""Typed errors of the service, and the one place where every error becomes an HTTP response.

Every error response has the body ``{"error": {"code": ..., "message": ...}}``. Errors raised by
the service are :class:`ServiceError` subclasses that carry their status and code; errors of the
core packages (unknown model or adapter, invalid adapter config, mismatching state, full pool,
store failure) are mapped in :data:`DOMAIN_ERRORS`; FastAPI's own errors (validation, a body
that is not JSON, 404 of an unknown route, 405 with its ``Allow`` header) are reshaped to the same
body. ``/v2`` routes answer ``{"error": "<message>"}`` instead (see :func:`for_route`). The
OpenAPI document lists each route's errors from here (:mod:`service.api.openapi`): a new error is
a class (or a :data:`DOMAIN_ERRORS` row) plus its name on the routes that raise it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from typing import Any, cast

import pydantic
from asgi_correlation_id import correlation_id
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from adapters import InvalidStateError, StateMismatchError, UnknownAdapterError
from adapters.pool import PoolFullError, StateMemoryError
from adapters.presets import UnknownPresetError
from models import ModelError, UnknownModelError
from service.stores import StoreConflictError, StoreError

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1


class ServiceError(Exception):
    """An error with its HTTP status, a stable machine-readable code and a clear message."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})


class InvalidInputError(ServiceError):
    """A request whose content is malformed (images, tensors, bodies)."""

    status, code = 400, "invalid_input"


class InvalidImageError(InvalidInputError):
    """An image that cannot be decoded safely: undecodable, truncated, or of an unusable mode."""

    code = "invalid_image"


class InvalidTensorError(ServiceError):
    """A raw tensor with the wrong shape, dtype, size, or non-finite values."""

    status, code = 422, "invalid_tensor"


class PayloadTooLargeError(ServiceError):
    """A body, an image (bytes or pixels) or a batch over its configured limit."""

    status, code = 413, "payload_too_large"


class UnsupportedMediaTypeError(ServiceError):
    """A request body of a content type the route does not accept."""

    status, code = 415, "unsupported_media_type"


class InvalidRequestError(ServiceError):
    """A request whose parameters or JSON body do not match the operation's schema."""

    status, code = 422, "invalid_request"


class InvalidConfigError(ServiceError):
    """An adapter config that the adapter's config schema refuses."""

    status, code = 422, "invalid_config"


class InvalidStreamIdError(ServiceError):
    """A stream id that does not match ``^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$``."""

    status, code = 422, "invalid_stream_id"


class StreamNotFoundError(ServiceError):
    """No stream with this id."""

    status, code = 404, "stream_not_found"


class UnauthorizedError(ServiceError):
    """The request has no API key, or one that is not valid (authentication is on)."""

    status, code = 401, "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="tta-serve"'})


class ForbiddenError(ServiceError):
    """The API key's role does not allow this operation."""

    status, code = 403, "forbidden"


class QuotaExceededError(ServiceError):
    """The tenant is at its quota of streams or of state memory."""

    status, code = 403, "quota_exceeded"


class StreamExistsError(ServiceError):
    """A stream with this id exists already."""

    status, code = 409, "stream_exists"


class ModelNotServedError(ServiceError):
    """A registered model that this server does not serve (not in ``settings.models``)."""

    status, code = 404, "model_not_found"


class CapacityError(ServiceError):
    """Every stream slot is in use by requests in flight: try again shortly."""

    status, code = 503, "capacity_exhausted"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": str(RETRY_AFTER_S)})


class QueueFullError(ServiceError):
    """The model's request queue is full."""

    status, code = 429, "queue_full"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": str(RETRY_AFTER_S)})


class UnavailableError(ServiceError):
    """The server is not ready yet or is shutting down."""

    status, code = 503, "unavailable"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": str(RETRY_AFTER_S)})


class DeadlineExceededError(ServiceError):
    """A request that waited in the queue longer than ``request_timeout_s``."""

    status, code = 504, "deadline_exceeded"


class ForwardError(ServiceError):
    """The forward of a batch failed; no stream state changed."""

    status, code = 500, "forward_failed"


class UnusableStateError(ServiceError):
    """A stream whose stored state cannot be loaded (corrupted, or invalid): reset or import it."""

    status, code = 409, "state_unusable"


class StoreUnavailableError(ServiceError):
    """The state store failed to read or write a stream's state."""

    status, code = 503, "store_unavailable"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": str(RETRY_AFTER_S)})


class StreamConflictError(ServiceError):
    """Another replica serves the stream, or moved its stored state on: retry (here or there).

    The request was not applied; this replica dropped its copy and reloads it on the next one.
    """

    status, code = 409, "stream_conflict"

    def __init__(self, message: str, retry_after_s: float = RETRY_AFTER_S) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))})


# --- stream safety (docs/safety.md) ---


class SnapshotNotFoundError(ServiceError):
    """The stream keeps no snapshot to roll back to (or none at the given sample count)."""

    status, code = 404, "snapshot_not_found"


class IdempotencyKeyReusedError(ServiceError):
    """An Idempotency-Key sent again with a different request (body or parameters)."""

    status, code = 422, "idempotency_key_reused"


class FeedbackOffError(ServiceError):
    """Labels sent to a stream that does not keep feedback (create it with feedback on)."""

    status, code = 409, "feedback_off"


class PredictionNotFoundError(ServiceError):
    """A label for a request (or image) the stream does not remember."""

    status, code = 404, "prediction_not_found"


# Errors of the core packages: exception type -> (status, code). The first match wins, so a
# subclass must come before its base.
DOMAIN_ERRORS: list[tuple[type[Exception], int, str]] = [
    (UnknownModelError, 404, "model_not_found"),
    (UnknownAdapterError, 422, "unknown_adapter"),
    (UnknownPresetError, 422, "unknown_preset"),
    (InvalidStateError, 422, "invalid_state"),
    (StateMismatchError, 422, "state_mismatch"),
    (StateMemoryError, 507, "state_memory_exhausted"),
    (PoolFullError, 503, "capacity_exhausted"),
    (StoreConflictError, 409, "stream_conflict"),
    (StoreError, 503, "store_unavailable"),
    (ModelError, 500, "model_error"),
]


def classify(kind: type[Exception]) -> tuple[int, str]:
    """The status and code that an error type is answered with (500 for unknown types)."""
    if issubclass(kind, ServiceError):
        return kind.status, kind.code
    for base, status, code in DOMAIN_ERRORS:
        if issubclass(kind, base):
            return status, code
    return 500, "internal_error"


def error_body(code: str, message: str) -> dict[str, Any]:
    """The JSON body of every error response."""
    return {"error": {"code": code, "message": message}}


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """An error as a JSON response."""
    return JSONResponse(error_body(code, message), status_code=status, headers=dict(headers or {}))


def describe_validation(errors: list[Any], prefix: str = "") -> str:
    """Pydantic errors as one readable line: ``field: message; field: message``."""
    parts = []
    for error in errors:
        location = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        where = f"{prefix}{location}" if location else prefix.rstrip(".") or "body"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts)


def to_response(error: Exception) -> JSONResponse:
    """Map any exception to its error response (unknown ones to a logged 500)."""
    if isinstance(error, ServiceError):
        return error_response(error.status, error.code, error.message, error.headers)
    if isinstance(error, pydantic.ValidationError):
        message = f"invalid {error.title} config: {describe_validation(error.errors())}"
        return to_response(InvalidConfigError(message))
    status, code = classify(type(error))
    if code == "internal_error":
        logger.error("unhandled error", exc_info=error)
        return error_response(status, code, f"internal error: {type(error).__name__}")
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None
    return error_response(status, code, str(error), headers)


# Codes of the HTTP errors raised by FastAPI and Starlette (a body that is not JSON is a 400).
_HTTP_CODES = {
    400: InvalidInputError.code,
    404: "not_found",
    405: "method_not_allowed",
    413: PayloadTooLargeError.code,
    415: UnsupportedMediaTypeError.code,
}


OIP_PREFIX = "/v2"
HTTP_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
# Headers of an error that the OIP reshaping keeps (the others describe the v1 body).
_KEPT_HEADERS = ("retry-after", "allow", "www-authenticate")


def oip_status(status: int) -> int:
    """The status of an error on an Open Inference Protocol route.

    KServe and Triton answer 400 to every request they cannot use (a wrong shape, datatype,
    value range, parameter or adapter config) where the v1 API says 422.
    """
    return 400 if status == 422 else status


def for_route(request: Request, response: JSONResponse) -> JSONResponse:
    """The error shape the route's protocol expects.

    The Open Inference Protocol's error body is ``{"error": "<message>"}`` (a string, as KServe
    and Triton clients parse it), with :func:`oip_status`; the v1 API keeps
    ``{"error": {"code", "message"}}``.
    """
    if not request.url.path.startswith(OIP_PREFIX):
        return response
    message = json.loads(bytes(response.body))["error"]["message"]
    headers = {k: v for k, v in response.headers.items() if k.lower() in _KEPT_HEADERS}
    status = oip_status(response.status_code)
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def allowed_methods(request: Request) -> str:
    """The ``Allow`` header of a 405: every method that some route serves at this path.

    Starlette's own 405 names only the first matching route's methods, but one path is often
    served by several routes (GET and DELETE ``/v1/streams/{stream_id}``), so each method is
    tried against every route.
    """
    allowed = [
        method
        for method in HTTP_METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL
            for route in request.app.router.routes
        )
    ]
    return ", ".join(allowed)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that give every error its protocol's shape (see ``for_route``)."""

    async def on_service_error(request: Request, error: Exception) -> JSONResponse:
        return for_route(request, to_response(error))

    async def on_validation(request: Request, error: Exception) -> JSONResponse:
        errors = cast(RequestValidationError, error).errors()
        message = describe_validation(list(errors))
        return for_route(request, to_response(InvalidRequestError(message)))

    async def on_http(request: Request, error: Exception) -> JSONResponse:
        http = cast(StarletteHTTPException, error)
        code = _HTTP_CODES.get(http.status_code, "http_error")
        headers = dict(http.headers or {})
        if http.status_code == 405:
            headers["Allow"] = allowed_methods(request)
        response = error_response(http.status_code, code, str(http.detail), headers)
        return for_route(request, response)

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    for kind in (ServiceError, pydantic.ValidationError, *(k for k, _, _ in DOMAIN_ERRORS)):
        app.add_exception_handler(kind, on_service_error)

    async def on_unexpected(request: Request, error: Exception) -> JSONResponse:
        # Starlette answers these outside every middleware: echo the request id here.
        response = for_route(request, to_response(error))
        request_id = correlation_id.get()
        if request_id is not None:
            response.headers["X-Request-Id"] = request_id
        return response

    app.add_exception_handler(Exception, on_unexpected)
