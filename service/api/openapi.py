"""The OpenAPI document as the server behaves: every status an operation can answer, real bodies.

Routes list the typed errors they can raise (``responses=v1_errors(StreamNotFoundError, ...)``);
the status, code and description of each come from :mod:`service.errors`, so a new error is one
edit there plus its name on the routes that raise it. :func:`install_openapi` adds the request
bodies that routes parse by hand (predict, OIP infer) as components, and removes FastAPI's
default 422 ``{"detail": ...}`` schema, which this server never sends.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from adapters.pool import StateMemoryError
from service.auth import DOCS
from service.errors import (
    CapacityError,
    ForbiddenError,
    InvalidStreamIdError,
    StoreUnavailableError,
    StreamConflictError,
    StreamNotFoundError,
    UnauthorizedError,
    UnavailableError,
    UnusableStateError,
    classify,
    oip_status,
)
from service.schemas import ErrorPublic, OipError

COMPONENTS = "#/components/schemas/"
RETRY_AFTER_HEADER = {
    "Retry-After": {
        "description": "seconds to wait before trying again",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
}

# Errors shared by families of routes: the registry is not ready (every route that needs it),
# a stream id that is malformed, unknown or cannot be looked up, a stream that needs a slot (and
# state memory), and a stream whose stored state is loaded (it may be unusable).
# Every route behind an API key (when authentication is on) may answer 401 and 403.
AUTH_ERRORS: tuple[type[Exception], ...] = (UnauthorizedError, ForbiddenError)
REGISTRY_ERRORS: tuple[type[Exception], ...] = (*AUTH_ERRORS, UnavailableError)
STREAM_ERRORS = (
    *REGISTRY_ERRORS,
    InvalidStreamIdError,
    StreamNotFoundError,
    StoreUnavailableError,
    StreamConflictError,
)
RESIDENT_STREAM_ERRORS = (*STREAM_ERRORS, CapacityError, StateMemoryError)
LOADED_STREAM_ERRORS = (*RESIDENT_STREAM_ERRORS, UnusableStateError)


def _summary(kind: type[Exception]) -> str:
    doc = inspect.getdoc(kind) or kind.__name__
    return doc.splitlines()[0].rstrip(".")


def error_responses(
    errors: Sequence[type[Exception]], body: type[BaseModel]
) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` entries of the errors a route can raise, grouped by status.

    Each status documents its codes with their descriptions and gets an example body; 429 and
    503 answers carry ``Retry-After``.
    """
    codes: dict[int, dict[str, str]] = {}
    for kind in errors:
        status, code = classify(kind)
        if body is OipError:
            status = oip_status(status)
        codes.setdefault(status, {}).setdefault(code, _summary(kind))
    responses: dict[int | str, dict[str, Any]] = {}
    for status, described in sorted(codes.items()):
        code, summary = next(iter(described.items()))
        example = (
            {"error": {"code": code, "message": summary}}
            if body is ErrorPublic
            else {"error": summary}
        )
        entry: dict[str, Any] = {
            "model": body,
            "description": "; ".join(f"`{c}`: {text}" for c, text in described.items()),
            "content": {"application/json": {"example": example}},
        }
        if status in (429, 503):
            entry["headers"] = RETRY_AFTER_HEADER
        responses[status] = entry
    return responses


def v1_errors(*errors: type[Exception]) -> dict[int | str, dict[str, Any]]:
    """Error responses of a v1 route: ``{"error": {"code", "message"}}``."""
    return error_responses(errors, ErrorPublic)


def v2_errors(*errors: type[Exception]) -> dict[int | str, dict[str, Any]]:
    """Error responses of an Open Inference Protocol route: ``{"error": "message"}``."""
    return error_responses(errors, OipError)


def ref(model: type[BaseModel]) -> dict[str, str]:
    """A reference to a model that :func:`install_openapi` adds to the components."""
    return {"$ref": COMPONENTS + model.__name__}


def install_openapi(app: FastAPI, body_models: Sequence[type[BaseModel]]) -> None:
    """Build the app's OpenAPI document with ``body_models`` as components, without FastAPI's 422.

    ``body_models`` are the bodies that routes parse themselves (so FastAPI does not see them)
    and reference with :func:`ref`.
    """

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = get_openapi(
            title=app.title,
            version=app.version,
            summary=app.summary,
            description=app.description,
            routes=app.routes,
        )
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        _, definitions = models_json_schema(
            [(model, "validation") for model in body_models], ref_template=COMPONENTS + "{model}"
        )
        schemas.update(definitions.get("$defs", {}))
        _drop_default_validation_error(document)
        app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def _drop_default_validation_error(document: dict[str, Any]) -> None:
    """Remove FastAPI's ``HTTPValidationError`` 422 (added where a route declares no 422).

    Routes whose parameters can fail validation declare ``InvalidRequestError``, so what is
    left is a default on routes whose parameters cannot fail (plain strings).
    """
    default = COMPONENTS + "HTTPValidationError"
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            content = responses.get("422", {}).get("content", {})
            schema = content.get("application/json", {}).get("schema", {})
            if schema.get("$ref") == default:
                del responses["422"]
    schemas = document.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)


# The documentation, as FastAPI serves it, but behind the "docs" permission (see service.auth),
# and with Swagger UI's and ReDoc's scripts from the fastapi-offline package instead of a CDN, so
# that /docs works without internet (the assets themselves are public: they are the UIs' code).
docs_router = APIRouter(include_in_schema=False, dependencies=[DOCS])
DOCS_ASSETS_URL = "/static-offline-docs"


def docs_assets() -> StaticFiles:
    """Swagger UI's and ReDoc's scripts, styles and icon, as fastapi-offline ships them."""
    return StaticFiles(directory=Path(fastapi_offline.__file__).parent / "static")


@docs_router.get("/openapi.json")
async def openapi_document(request: Request) -> JSONResponse:
    """The OpenAPI document."""
    return JSONResponse(request.app.openapi())


@docs_router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    """Swagger UI of the OpenAPI document."""
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title=f"{request.app.title} - docs",
        swagger_js_url=f"{DOCS_ASSETS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{DOCS_ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=f"{DOCS_ASSETS_URL}/favicon.png",
    )


@docs_router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    """ReDoc of the OpenAPI document."""
    return get_redoc_html(
        openapi_url="/openapi.json",
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{DOCS_ASSETS_URL}/redoc.standalone.js",
        redoc_favicon_url=f"{DOCS_ASSETS_URL}/favicon.png",
        with_google_fonts=False,
    )
