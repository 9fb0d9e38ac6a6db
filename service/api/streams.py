"""``/v1/streams``: create, list, read, delete, reset streams; their state, drift, predictions."""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import functools
import math
import secrets
import time
from typing import Annotated, Any

import pydantic
import torch
from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response, status
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from adapters import InvalidStateError, StateMismatchError, UnknownAdapterError
from adapters.pool import StateMemoryError
from adapters.presets import UnknownPresetError
from models import ModelSpec
from service.api.deps import AppStateDep, RegistryDep, SettingsDep
from service.api.openapi import (
    LOADED_STREAM_ERRORS,
    REGISTRY_ERRORS,
    RESIDENT_STREAM_ERRORS,
    STREAM_ERRORS,
    ref,
    v1_errors,
)
from service.auth import ReaderDep, WriterDep
from service.errors import (
    CapacityError,
    DeadlineExceededError,
    ForwardError,
    IdempotencyKeyReusedError,
    InvalidConfigError,
    InvalidImageError,
    InvalidInputError,
    InvalidRequestError,
    InvalidStreamIdError,
    InvalidTensorError,
    ModelNotServedError,
    PayloadTooLargeError,
    QueueFullError,
    QuotaExceededError,
    StoreUnavailableError,
    StreamExistsError,
    UnavailableError,
    UnsupportedMediaTypeError,
    describe_validation,
)
from service.feedback import Feedback
from service.idempotency import IDEMPOTENCY_KEY, fingerprint
from service.imaging import ImageBatch, decode_images, decode_tensor, parse_shape
from service.predictions import PredictRequest, PredictResult, TopK
from service.runtime import ModelRuntime
from service.schemas import (
    EXAMPLE_STREAM_ID,
    STREAM_ID_DESCRIPTION,
    AutoResetEvent,
    Base64Images,
    ClassScore,
    DriftSummary,
    ImagePrediction,
    LiveAccuracy,
    PredictResponse,
    StreamCreate,
    StreamPublic,
    StreamsPublic,
)
from service.settings import Settings
from service.stores import StoreConflictError, StoreError
from service.streams import STREAM_ID, StreamEntry, StreamRegistry, public_id, store_failure

router = APIRouter(tags=["streams"])

OCTET_STREAM = "application/octet-stream"
BINARY = {"type": "string", "format": "binary"}

# The pattern is documented here and checked by the registry (422 invalid_stream_id).
StreamIdPath = Annotated[
    str,
    Path(
        description=STREAM_ID_DESCRIPTION,
        examples=[EXAMPLE_STREAM_ID],
        json_schema_extra={"pattern": STREAM_ID.pattern},
    ),
]


async def read_key(stream_id: StreamIdPath, caller: ReaderDep) -> str:
    """The registry key of the caller's stream ``stream_id``, for a route that reads it."""
    return caller.key(stream_id)


async def write_key(stream_id: StreamIdPath, caller: WriterDep) -> str:
    """The registry key of the caller's stream ``stream_id``, for a route that changes it."""
    return caller.key(stream_id)


# Every route of one stream names it by one of these: the caller's own streams only (a
# stream of another tenant is not found), after the caller's role allows the route (403).
ReadKey = Annotated[str, Depends(read_key)]
WriteKey = Annotated[str, Depends(write_key)]

# A body that is read under the body limit (413) and must be of an accepted type (415).
BODY_ERRORS = (PayloadTooLargeError, UnsupportedMediaTypeError, InvalidInputError)
PREDICT_ERRORS = (
    *LOADED_STREAM_ERRORS,
    InvalidStateError,
    *BODY_ERRORS,
    InvalidRequestError,
    InvalidImageError,
    InvalidTensorError,
    QueueFullError,
    DeadlineExceededError,
    ForwardError,
    IdempotencyKeyReusedError,
)

# A drift report (shortened to two BN layers; a real one has one value per layer).
DRIFT_EXAMPLE = {
    "images": 1.0,
    "layers": {"jeffreys": [173.4, 1.5], "w2n": [1.66, 0.23], "hellinger": [0.52, 0.09]},
    "early": {"jeffreys": 29.6, "w2n": 0.42, "hellinger": 0.14},
    "late": {"jeffreys": 0.34, "w2n": 0.1, "hellinger": 0.03},
    "overall": {"jeffreys": 9.58, "w2n": 0.21, "hellinger": 0.07},
    "entropy": 1.97,
    "confidence": 0.33,
    "class_frequencies": [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
}

_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "description": (
            "One of three formats: image files (multipart, field `images`, repeated), JSON with "
            "base64-encoded image files, or a raw tensor [N, 3, H, W] of uint8 pixels or "
            "normalised float32 values (`application/octet-stream`, little-endian, with the "
            "`shape` and `dtype` query parameters or the `X-Tensor-Shape` / `X-Tensor-Dtype` "
            "headers)."
        ),
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"images": {"type": "array", "items": BINARY}},
                    "required": ["images"],
                },
            },
            "application/json": {"schema": ref(Base64Images)},
            OCTET_STREAM: {"schema": BINARY},
        },
    }
}


def stream_public(entry: StreamEntry) -> StreamPublic:
    """The API view of a registered stream."""
    return StreamPublic(
        **{**entry.info.fields(), "id": public_id(entry.info.id)},
        samples=entry.samples,
        **safety_view(entry),
    )


def safety_view(entry: StreamEntry) -> dict[str, Any]:
    """The stream's auto-resets and live accuracy, as its view shows them."""
    last = entry.last_auto_reset
    return {
        "auto_resets": entry.auto_resets,
        "last_auto_reset": AutoResetEvent(reason=last[0], at=last[1]) if last else None,
        "accuracy": live_accuracy(entry.feedback) if entry.feedback is not None else None,
    }


def live_accuracy(feedback: Feedback) -> LiveAccuracy:
    """A stream's live accuracy window as the API shows it."""
    window = feedback.window.accuracy()
    gain = None
    if window.adapted is not None and window.source is not None:
        gain = window.adapted - window.source
    return LiveAccuracy(
        labels=window.labels,
        adapted=window.adapted,
        source=window.source,
        gain=gain,
        labels_total=window.labels_total,
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses=v1_errors(
        *REGISTRY_ERRORS,
        PayloadTooLargeError,
        InvalidInputError,
        InvalidRequestError,
        InvalidStreamIdError,
        StreamExistsError,
        ModelNotServedError,
        UnknownAdapterError,
        UnknownPresetError,
        InvalidConfigError,
        CapacityError,
        StateMemoryError,
        QuotaExceededError,
        StoreUnavailableError,
    ),
)
async def create_stream(
    body: StreamCreate, caller: WriterDep, registry: RegistryDep, settings: SettingsDep
) -> StreamPublic:
    """Create a stream of the caller's tenant with a fresh state (persisted before the response).

    Refused with 403 ``quota_exceeded`` beyond the tenant's quota of streams or state memory.
    """
    model = body.model or next(iter(registry.runtimes))  # the first model served
    runtime = registry.runtime(model)
    adapter, config = runtime.stream_adapter(body.adapter, body.preset, body.config)
    quota = settings.tenant_quota(caller.tenant)
    entry = await registry.create(
        body.id,
        model,
        adapter,
        config,
        body.ttl_seconds,
        caller.tenant,
        max_streams=quota.max_streams,
        max_state_bytes=quota.max_state_bytes,
        options=body.safety_options(),
    )
    return stream_public(entry)


@router.get("", responses=v1_errors(*REGISTRY_ERRORS, InvalidRequestError))
async def list_streams(
    caller: ReaderDep,
    registry: RegistryDep,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> StreamsPublic:
    """A page of the caller's tenant's streams, sorted by id."""
    entries, count = registry.page(offset, limit, caller.tenant)
    return StreamsPublic(
        data=[stream_public(e) for e in entries], count=count, offset=offset, limit=limit
    )


@router.get("/{stream_id}", responses=v1_errors(*STREAM_ERRORS))
async def read_stream(stream: ReadKey, registry: RegistryDep) -> StreamPublic:
    """One stream (reading it does not count as use for its TTL)."""
    return stream_public(await registry.find(stream, touch=False))


@router.delete(
    "/{stream_id}", status_code=status.HTTP_204_NO_CONTENT, responses=v1_errors(*STREAM_ERRORS)
)
async def delete_stream(stream: WriteKey, registry: RegistryDep) -> Response:
    """Delete a stream and its stored state: both, or neither.

    Done once the store confirms it; if the store is down the answer is 503
    ``store_unavailable`` and the stream is left exactly as it was (retry later).
    """
    await registry.delete(stream)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{stream_id}/reset", responses=v1_errors(*RESIDENT_STREAM_ERRORS))
async def reset_stream(stream: WriteKey, registry: RegistryDep) -> StreamPublic:
    """Give the stream back its initial state (its stored state is not loaded for it).

    With ``durability=sync`` the reset stands only once stored: a store failure answers 503
    ``store_unavailable`` and leaves the stream as it was. With ``interval`` it is stored at the
    next flush, like any change.
    """
    return stream_public(await registry.reset(stream))


@router.get(
    "/{stream_id}/state",
    response_class=Response,
    responses={
        200: {"content": {OCTET_STREAM: {"schema": BINARY}}, "description": "safetensors state"},
        **v1_errors(*LOADED_STREAM_ERRORS),
    },
)
async def export_state(stream: ReadKey, registry: RegistryDep) -> Response:
    """The stream's state: safetensors with JSON metadata (model, adapter, config, seed)."""
    data = await registry.export_state(stream)
    stream_id = public_id(stream)
    return Response(
        data,
        media_type=OCTET_STREAM,
        headers={"Content-Disposition": f'attachment; filename="{stream_id}.safetensors"'},
    )


@router.put(
    "/{stream_id}/state",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {OCTET_STREAM: {"schema": BINARY}},
        }
    },
    responses=v1_errors(
        *RESIDENT_STREAM_ERRORS, *BODY_ERRORS, StateMismatchError, InvalidStateError
    ),
)
async def import_state(stream: WriteKey, request: Request, registry: RegistryDep) -> StreamPublic:
    """Replace the stream's state by an exported one of the same model, adapter and config.

    Refused with 422 (``state_mismatch``, or ``invalid_state`` for values that are not finite or
    break the adapter's bounds, such as a negative variance) before anything changes. Store
    failures as for reset.
    """
    await registry.find(stream)
    _require_media_type(request, (OCTET_STREAM,))
    data = await request.body()
    if not data:
        raise InvalidInputError("the state body is empty: send the bytes of an exported state")
    return stream_public(await registry.import_state(stream, data))


@router.get(
    "/{stream_id}/drift",
    responses={
        200: {"content": {"application/json": {"example": DRIFT_EXAMPLE}}},
        **v1_errors(*LOADED_STREAM_ERRORS),
    },
)
async def read_drift(stream: ReadKey, registry: RegistryDep) -> dict[str, Any]:
    """The stream's full drift report: per-layer divergences, summaries, prediction stats."""
    return await registry.drift(stream)


@router.post(
    "/{stream_id}/predict", openapi_extra=_PREDICT_BODY, responses=v1_errors(*PREDICT_ERRORS)
)
async def predict(
    stream: WriteKey,
    request: Request,
    response: Response,
    registry: RegistryDep,
    state: AppStateDep,
    top_k: Annotated[int, Query(ge=1, le=1000, description="classes per image")] = 5,
    adapt: Annotated[bool, Query(description="update the stream's statistics")] = True,
    source: Annotated[bool, Query(description="also return the unadapted prediction")] = False,
    drift: Annotated[bool, Query(description="include the stream's drift summary")] = True,
    idempotency: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="a retry with the same key gets the first response and adapts once "
            "(docs/safety.md)",
        ),
    ] = None,
    shape: Annotated[
        str | None,
        Query(description="raw tensor shape N,3,H,W (octet-stream bodies)", examples=["1,3,32,32"]),
    ] = None,
    dtype: Annotated[
        str | None,
        Query(description="raw tensor dtype: uint8 (default) or float32 (octet-stream bodies)"),
    ] = None,
) -> PredictResponse:
    """Predict a batch of images with the stream's adapted statistics, adapting it to them.

    The body is multipart image files (JPEG/PNG/WebP), JSON ``{"images": [base64, ...]}``, or a
    raw tensor (``application/octet-stream``, shape and dtype as query parameters or as the
    ``X-Tensor-Shape`` / ``X-Tensor-Dtype`` headers): uint8 pixels or normalised float32.
    """
    entry = await registry.find(stream)
    runtime = registry.runtime(entry.info.model)
    settings = state.settings
    started = time.perf_counter()
    images = await read_images(request, runtime.spec, settings, shape, dtype)
    state.metrics.stage_latency.labels(runtime.name, "decode").observe(
        time.perf_counter() - started
    )
    key = idempotency_key(idempotency)
    parameters = f"{top_k}|{adapt}|{source}|{drift}|{shape}|{dtype}|{_media_type(request)}"
    result = await run_prediction(
        registry,
        entry,
        images,
        settings,
        adapt=adapt,
        source=source,
        top_k=top_k,
        drift=drift,
        request_id=key or request_id(request),
        idempotency_key=key,
        fingerprint=fingerprint(await request.body(), parameters) if key else "",
    )
    if result.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    labels = runtime.spec.labels
    return PredictResponse(
        stream_id=public_id(entry.info.id),
        model=entry.info.model,
        adapter=entry.info.adapter,
        adapted=result.adapted,
        samples=result.samples,
        predictions=[image_prediction(p, labels) for p in result.predictions],
        source_predictions=(
            [image_prediction(p, labels) for p in result.source_predictions]
            if result.source_predictions is not None
            else None
        ),
        drift=DriftSummary(**result.drift) if result.drift is not None else None,
        request_id=result.request_id,
        auto_reset=result.safety.auto_reset if result.safety is not None else None,
    )


def idempotency_key(key: str | None) -> str | None:
    """The request's ``Idempotency-Key`` header (InvalidRequestError if it is malformed)."""
    if key is not None and not IDEMPOTENCY_KEY.fullmatch(key):
        raise InvalidRequestError(
            "the Idempotency-Key header must be 1-255 printable ASCII characters without spaces"
        )
    return key


def request_id(request: Request) -> str:
    """The id that names a prediction in label feedback: X-Request-ID if valid, else new."""
    given = request.headers.get("x-request-id")
    if given is not None and IDEMPOTENCY_KEY.fullmatch(given):
        return given
    return "r-" + secrets.token_hex(8)


async def run_prediction(
    registry: StreamRegistry[ModelRuntime],
    entry: StreamEntry,
    images: ImageBatch,
    settings: Settings,
    *,
    adapt: bool = True,
    source: bool = False,
    top_k: int = 5,
    drift: bool = True,
    request_id: str = "",
    idempotency_key: str | None = None,
    fingerprint: str = "",
) -> PredictResult:
    """Queue a request for the stream's batcher, wait for it (and its sync write), record it.

    A frozen stream predicts without adapting. With feedback on, the request's adapted and
    source classes are logged under ``request_id`` for later labels.
    """
    runtime = registry.runtime(entry.info.model)
    if runtime.batcher is None:  # set in the lifespan before the app is ready
        raise UnavailableError("the server is starting: the model's batcher is not running")
    loop = asyncio.get_running_loop()
    request = PredictRequest(
        info=entry.info,
        images=images,
        adapt=adapt and not entry.info.frozen,
        source=source,
        top_k=top_k,
        drift=drift,
        deadline=loop.time() + settings.request_timeout_s,
        idempotency_key=idempotency_key,
        fingerprint=fingerprint,
    )
    result = await runtime.batcher.submit(request)
    require_finite(result, entry.info.id)
    result = dataclasses.replace(result, request_id=request_id)
    if result.replayed:
        return result

    def note() -> None:
        registry.record(entry, result.samples, result.signal, result.safety)
        if entry.feedback is not None and result.source_classes is not None:
            adapted = [p.classes[0] for p in result.predictions]
            entry.feedback.log.add(request_id, adapted, result.source_classes)

    if result.stored is not None:
        try:
            await asyncio.wrap_future(result.stored)
        except StoreConflictError as error:
            # the update is lost (another replica moved the stream on): list what the store holds
            await registry.refresh(entry)
            raise store_failure(error, "save the stream's new state") from None
        except StoreError as error:
            # the update stands: it stays pending in this replica and is written when Redis is back
            note()
            raise StoreUnavailableError(
                f"the prediction was made but the stream's new state was not saved: {error}"
            ) from None
    note()
    return result


def require_finite(result: PredictResult, stream_id: str) -> None:
    """Raise ForwardError if the outputs hold NaN or inf, which JSON would show as ``null``.

    The inputs are bounded and the engine refuses non-finite states, so this should never
    fire; it makes sure that a response never carries ``null`` (or ``NaN``) probabilities.
    """
    drift = result.drift or {}
    overall = drift.get("overall") or {}
    summary = [*overall.values(), drift.get("entropy"), drift.get("confidence")]
    finite = bool(torch.isfinite(result.logits).all()) and all(
        math.isfinite(value) for value in summary if isinstance(value, float)
    )
    if not finite:
        raise ForwardError(
            f"the model produced non-finite outputs for stream {stream_id!r}; "
            "no prediction is returned (reset the stream if this persists)"
        )


def image_prediction(top: TopK, labels: tuple[str, ...]) -> ImagePrediction:
    """One image's top-k as the API shows it."""
    scores = [
        ClassScore(label=labels[i], index=i, probability=p)
        for i, p in zip(top.classes, top.probabilities, strict=True)
    ]
    best = scores[0]
    return ImagePrediction(
        label=best.label, index=best.index, probability=best.probability, top_k=scores
    )


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _require_media_type(request: Request, accepted: tuple[str, ...]) -> str:
    media_type = _media_type(request)
    if media_type not in accepted:
        raise UnsupportedMediaTypeError(
            f"content type {media_type or '(none)'!r} is not accepted here; "
            f"use {', '.join(accepted)}"
        )
    return media_type


async def read_images(
    request: Request, spec: ModelSpec, settings: Settings, shape: str | None, dtype: str | None
) -> ImageBatch:
    """The request's images as a batch, whichever of the three body formats it uses."""
    media_type = _require_media_type(
        request, ("multipart/form-data", "application/json", OCTET_STREAM)
    )
    limit = settings.max_images_per_request
    if media_type == OCTET_STREAM:
        shape = shape or request.headers.get("x-tensor-shape")
        dtype = dtype or request.headers.get("x-tensor-dtype") or "uint8"
        if not shape:
            raise InvalidInputError(
                "a raw tensor needs its shape: the shape query parameter or the X-Tensor-Shape "
                "header, e.g. 1,3,32,32"
            )
        dims = parse_shape(shape)
        data = await request.body()
        return await asyncio.to_thread(
            functools.partial(decode_tensor, max_images=limit, margin=settings.input_range_margin),
            data,
            dims,
            dtype,
            spec,
        )
    if media_type == "application/json":
        raw = await request.body()
        try:
            body = Base64Images.model_validate_json(raw)
        except pydantic.ValidationError as error:
            raise InvalidInputError(
                f"invalid JSON images body: {describe_validation(error.errors())}"
            ) from None
        files = _from_base64(body.images, settings)
    else:
        await request.body()  # read under the body limit before parsing
        try:
            form = await request.form(max_files=limit + 1, max_fields=limit + 1)
        except HTTPException as error:
            if "Too many files" in str(error.detail):
                raise PayloadTooLargeError(
                    f"more than {limit} images in one request; the limit is {limit}"
                ) from None
            raise InvalidInputError(f"invalid multipart body: {error.detail}") from None
        uploads = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        files = [await upload.read() for upload in uploads]
        await form.close()
    if not files:
        raise InvalidInputError("the request has no images")
    if len(files) > limit:
        raise PayloadTooLargeError(f"{len(files)} images in one request; the limit is {limit}")
    return await asyncio.to_thread(
        decode_images,
        files,
        spec,
        max_bytes=settings.max_image_bytes,
        max_pixels=settings.pixel_limit(spec),
    )


def _from_base64(images: list[str], settings: Settings) -> list[bytes]:
    files = []
    for index, text in enumerate(images):
        if len(text) * 3 // 4 > settings.max_image_bytes + 3:
            raise PayloadTooLargeError(
                f"image {index}: image is over the limit of {settings.max_image_bytes} bytes"
            )
        try:
            files.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise InvalidImageError(f"image {index}: not valid base64") from None
    return files
