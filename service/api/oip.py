"""The Open Inference Protocol (KServe v2) subset: health, model metadata, inference.

A stream is named by ``parameters.stream_id`` in the request (or the ``X-Stream-Id`` header).
The input is one tensor ``[N, 3, H, W]``: ``UINT8`` pixels (normalised by the server) or ``FP32``
already normalised. Tensors come as JSON ``data`` or, with the binary-data extension, as raw
little-endian bytes after the JSON header (``Inference-Header-Content-Length``), each input
saying its size in ``parameters.binary_data_size``. Outputs: ``logits`` and ``probabilities``
(FP32 ``[N, C]``), ``class_index`` (INT64 ``[N]``) and ``label`` (BYTES ``[N]``), each returned
as JSON or, when asked (``parameters.binary_data`` on the output, or ``binary_data_output`` on
the request), as binary data.
"""

from __future__ import annotations

import json
import struct
import time
from typing import Annotated, Any

import pydantic
import torch
from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from adapters import InvalidStateError
from service.api.deps import AppStateDep, RegistryDep
from service.api.openapi import LOADED_STREAM_ERRORS, REGISTRY_ERRORS, ref, v2_errors
from service.api.streams import run_prediction
from service.auth import READ, WriterDep
from service.errors import (
    DeadlineExceededError,
    ForwardError,
    InvalidInputError,
    InvalidTensorError,
    ModelNotServedError,
    PayloadTooLargeError,
    QueueFullError,
    describe_validation,
)
from service.imaging import ImageBatch, decode_tensor, tensor_from_list
from service.runtime import ModelRuntime
from service.schemas import EXAMPLE_STREAM_ID
from service.settings import Settings

router = APIRouter(tags=["open inference protocol"])

HEADER_LENGTH = "inference-header-content-length"
DATATYPES = {"UINT8": "uint8", "FP32": "float32"}
OUTPUTS = ("logits", "probabilities", "class_index", "label")
VERSION = "1"


class InferTensor(BaseModel):
    """An input tensor of an inference request."""

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: list[Any] | None = None


class RequestedOutput(BaseModel):
    """An output the client asks for."""

    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferRequest(BaseModel):
    """An OIP v2 inference request."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {
                    "id": "42",
                    "parameters": {"stream_id": EXAMPLE_STREAM_ID},
                    "inputs": [
                        {
                            "name": "input",
                            "shape": [1, 3, 32, 32],
                            "datatype": "UINT8",
                            "data": [128] * (3 * 32 * 32),
                        }
                    ],
                    "outputs": [{"name": "label"}],
                }
            ]
        },
    )

    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[InferTensor]
    outputs: list[RequestedOutput] | None = None


class InferOutput(BaseModel):
    """An output tensor: its values as JSON ``data``, or its size in the binary part."""

    name: str
    datatype: str
    shape: list[int]
    data: list[Any] | None = None
    parameters: dict[str, Any] | None = None


class InferResponse(BaseModel):
    """An OIP v2 inference response (its JSON part, with binary outputs)."""

    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "id": "42",
                    "model_name": "cifar10_resnet20",
                    "model_version": VERSION,
                    "parameters": {"stream_id": EXAMPLE_STREAM_ID, "samples": 1},
                    "outputs": [
                        {"name": "label", "datatype": "BYTES", "shape": [1], "data": ["cat"]}
                    ],
                }
            ]
        },
    )

    id: str | None = None
    model_name: str
    model_version: str
    parameters: dict[str, Any] = Field(description="the stream and its adapted images")
    outputs: list[InferOutput]


class ServerMetadata(BaseModel):
    """The server's name, version and protocol extensions."""

    name: str
    version: str
    extensions: list[str]


class Liveness(BaseModel):
    """Whether the process is up."""

    live: bool


class Readiness(BaseModel):
    """Whether the server takes inference requests."""

    ready: bool


class TensorMetadata(BaseModel):
    """A model input or output: name, datatype, shape (-1: any size)."""

    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    """A model's inputs, outputs and preprocessing."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] = Field(description="labels, input datatypes, mean and std")


class ModelReadiness(BaseModel):
    """Whether a model is ready."""

    name: str
    ready: bool


StreamIdHeader = Annotated[
    str | None,
    Header(description="the stream, when the request's parameters.stream_id does not name it"),
]
MODEL_ERRORS = (*REGISTRY_ERRORS, ModelNotServedError)
INFER_ERRORS = (
    *MODEL_ERRORS,
    *LOADED_STREAM_ERRORS,
    InvalidStateError,
    PayloadTooLargeError,
    InvalidInputError,
    InvalidTensorError,
    QueueFullError,
    DeadlineExceededError,
    ForwardError,
)
_INFER_DOC: dict[str, Any] = {
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "description": (
                "JSON, or with the binary tensor extension: the JSON header "
                "(Inference-Header-Content-Length bytes) followed by the raw input tensor."
            ),
            "content": {
                "application/json": {"schema": ref(InferRequest)},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    },
    "response_class": Response,
    "responses": {
        200: {
            "description": "JSON, or the JSON header followed by binary outputs",
            "content": {
                "application/json": {"schema": ref(InferResponse)},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        },
        **v2_errors(*INFER_ERRORS),
    },
}


@router.get("/v2")
async def server_metadata() -> ServerMetadata:
    """Server metadata: name, version and the protocol extensions supported."""
    return ServerMetadata(name="tta-serve", version="0.1.0", extensions=["binary_tensor_data"])


@router.get(
    "/v2/health/live",
    response_model=Liveness,
    responses={503: {"model": Liveness, "description": "the start-up failed; the process exits"}},
)
async def live(state: AppStateDep) -> JSONResponse:
    """200 while the process is up, also while it starts; 503 once its start-up has failed."""
    is_live = state.start_error is None
    return JSONResponse({"live": is_live}, status_code=200 if is_live else 503)


@router.get(
    "/v2/health/ready",
    response_model=Readiness,
    responses={
        503: {
            "model": Readiness,
            "description": "starting, waiting for the state store, or shutting down",
        }
    },
)
async def ready(state: AppStateDep) -> JSONResponse:
    """200 once every model is loaded and streams are restored, while the state store answers
    (a ping at most once a second); 503 before, while the store is unreachable, and at shutdown.
    """
    is_ready = state.serving
    if is_ready and state.store_health is not None:
        is_ready = await state.store_health.reachable()
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)


@router.get(
    "/v2/models/{model}",
    response_model=ModelMetadata,
    responses=v2_errors(*MODEL_ERRORS),
    dependencies=[READ],
)
async def model_metadata(model: str, registry: RegistryDep) -> dict[str, Any]:
    """The model's inputs and outputs."""
    runtime = registry.runtime(model)
    height, width = runtime.spec.input_size
    classes = runtime.spec.num_classes
    return {
        "name": model,
        "versions": [VERSION],
        "platform": "pytorch_tta",
        "inputs": [{"name": "input", "datatype": "UINT8", "shape": [-1, 3, height, width]}],
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [-1, classes]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]},
            {"name": "class_index", "datatype": "INT64", "shape": [-1]},
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
        ],
        "parameters": {
            "labels": list(runtime.spec.labels),
            # FP32 inputs are accepted too: already normalised with the model's mean/std.
            "input_datatypes": list(DATATYPES),
            "mean": list(runtime.spec.mean),
            "std": list(runtime.spec.std),
        },
    }


@router.get(
    "/v2/models/{model}/ready",
    response_model=ModelReadiness,
    responses=v2_errors(*MODEL_ERRORS),
    dependencies=[READ],
)
async def model_ready(model: str, registry: RegistryDep) -> dict[str, Any]:
    """Whether the model is ready (it is, once served and the server is ready)."""
    registry.runtime(model)
    return {"name": model, "ready": True}


@router.post("/v2/models/{model}/infer", **_INFER_DOC)
async def infer(
    model: str,
    request: Request,
    caller: WriterDep,
    registry: RegistryDep,
    state: AppStateDep,
    x_stream_id: StreamIdHeader = None,
) -> Response:
    """Predict (and adapt) a stream's batch; the body is an OIP v2 inference request."""
    runtime = registry.runtime(model)
    started = time.perf_counter()
    body = await request.body()
    infer_request, binary = _parse(body, request.headers.get(HEADER_LENGTH))
    stream_id = infer_request.parameters.get("stream_id") or x_stream_id
    if not isinstance(stream_id, str) or not stream_id:
        raise InvalidInputError(
            "no stream id: set parameters.stream_id in the request or the X-Stream-Id header"
        )
    entry = await registry.find(caller.key(stream_id))  # the caller's own streams only
    if entry.info.model != model:
        raise InvalidInputError(
            f"stream {stream_id!r} belongs to model {entry.info.model!r}, not {model!r}"
        )
    adapt = infer_request.parameters.get("adapt", True)
    if not isinstance(adapt, bool):
        raise InvalidInputError("parameters.adapt must be true or false")
    # Every check comes before the prediction: a refused request must not adapt the stream.
    wanted = _wanted_outputs(infer_request)
    images = _input_batch(infer_request, binary, runtime, state.settings)
    state.metrics.stage_latency.labels(model, "decode").observe(time.perf_counter() - started)
    result = await run_prediction(
        registry, entry, images, state.settings, adapt=adapt, top_k=1, drift=False
    )
    outputs = _outputs(result.logits, runtime)
    return _respond(infer_request, wanted, model, stream_id, result.samples, outputs)


def _wanted_outputs(request: InferRequest) -> list[RequestedOutput]:
    """The outputs the request asks for (all by default); InvalidInputError for unknown ones."""
    wanted = request.outputs or [RequestedOutput(name=name) for name in OUTPUTS]
    for output in wanted:
        if output.name not in OUTPUTS:
            raise InvalidInputError(f"unknown output {output.name!r}; valid: {', '.join(OUTPUTS)}")
    return wanted


def _parse(body: bytes, header_length: str | None) -> tuple[InferRequest, bytes]:
    """The JSON part of the body and the binary part that follows it (if any)."""
    binary = b""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise InvalidInputError(
                f"Inference-Header-Content-Length {header_length!r} does not fit a body of "
                f"{len(body)} bytes"
            )
        size = int(header_length)
        body, binary = body[:size], body[size:]
    try:
        return InferRequest.model_validate_json(body), binary
    except pydantic.ValidationError as error:
        raise InvalidInputError(
            f"invalid inference request: {describe_validation(error.errors())}"
        ) from None


def _input_batch(
    request: InferRequest, binary: bytes, runtime: ModelRuntime, settings: Settings
) -> ImageBatch:
    """The single input tensor as the model's batch."""
    max_images, margin = settings.max_images_per_request, settings.input_range_margin
    if len(request.inputs) != 1:
        raise InvalidInputError(
            f"expected exactly one input tensor [N, 3, H, W], got {len(request.inputs)}"
        )
    tensor = request.inputs[0]
    dtype = DATATYPES.get(tensor.datatype.upper())
    if dtype is None:
        raise InvalidTensorError(
            f"unsupported datatype {tensor.datatype!r}: expected {' or '.join(DATATYPES)}"
        )
    size = tensor.parameters.get("binary_data_size")
    if size is not None:
        if tensor.data is not None:
            raise InvalidInputError("an input has both data and binary_data_size")
        if not isinstance(size, int) or size < 0 or size != len(binary):
            raise InvalidInputError(
                f"binary_data_size {size!r} does not match the {len(binary)} bytes of binary data"
            )
        return decode_tensor(
            binary, tensor.shape, dtype, runtime.spec, max_images=max_images, margin=margin
        )
    if binary:
        raise InvalidInputError("binary data follows the JSON header but no input claims it")
    if tensor.data is None:
        raise InvalidInputError(f"input {tensor.name!r} has neither data nor binary_data_size")
    return tensor_from_list(
        tensor.data, tensor.shape, dtype, runtime.spec, max_images=max_images, margin=margin
    )


Outputs = dict[str, tuple[str, torch.Tensor | list[str]]]


def _outputs(logits: torch.Tensor, runtime: ModelRuntime) -> Outputs:
    """Every output by name: (datatype, values)."""
    probabilities = logits.softmax(1)
    classes = probabilities.argmax(1)
    labels = [runtime.spec.labels[i] for i in classes.tolist()]
    return {
        "logits": ("FP32", logits),
        "probabilities": ("FP32", probabilities),
        "class_index": ("INT64", classes),
        "label": ("BYTES", labels),
    }


def _respond(
    request: InferRequest,
    wanted: list[RequestedOutput],
    model: str,
    stream_id: str,
    samples: int,
    outputs: Outputs,
) -> Response:
    """The OIP response, JSON or JSON + binary outputs."""
    binary_default = bool(request.parameters.get("binary_data_output", False))
    body: dict[str, Any] = {
        "model_name": model,
        "model_version": VERSION,
        "parameters": {"stream_id": stream_id, "samples": samples},
        "outputs": [],
    }
    if request.id is not None:
        body["id"] = request.id
    chunks: list[bytes] = []
    for output in wanted:
        datatype, values = outputs[output.name]
        shape = list(values.shape) if isinstance(values, torch.Tensor) else [len(values)]
        entry: dict[str, Any] = {"name": output.name, "datatype": datatype, "shape": shape}
        if output.parameters.get("binary_data", binary_default):
            data = _binary(datatype, values)
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = (
                values.flatten().tolist() if isinstance(values, torch.Tensor) else values
            )
        body["outputs"].append(entry)
    header = json.dumps(body).encode()
    if not chunks:
        return Response(header, media_type="application/json")
    return Response(
        header + b"".join(chunks),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )


def _binary(datatype: str, values: torch.Tensor | list[str]) -> bytes:
    """An output's raw little-endian bytes (BYTES: 4-byte length + UTF-8, per element)."""
    if isinstance(values, list):
        return b"".join(struct.pack("<I", len(s.encode())) + s.encode() for s in values)
    dtype = torch.float32 if datatype == "FP32" else torch.int64
    return values.to(dtype).contiguous().numpy().tobytes()


# The same endpoints under the model version ("1", the only one), as versioned clients call them.


def _check_version(version: str) -> None:
    if version != VERSION:
        raise ModelNotServedError(f"model version {version!r} does not exist; versions: {VERSION}")


@router.get(
    "/v2/models/{model}/versions/{version}",
    response_model=ModelMetadata,
    responses=v2_errors(*MODEL_ERRORS),
    dependencies=[READ],
)
async def model_version_metadata(model: str, version: str, registry: RegistryDep) -> dict[str, Any]:
    """The model's metadata, for its version."""
    _check_version(version)
    return await model_metadata(model, registry)


@router.get(
    "/v2/models/{model}/versions/{version}/ready",
    response_model=ModelReadiness,
    responses=v2_errors(*MODEL_ERRORS),
    dependencies=[READ],
)
async def model_version_ready(model: str, version: str, registry: RegistryDep) -> dict[str, Any]:
    """Whether the model version is ready."""
    _check_version(version)
    return await model_ready(model, registry)


@router.post("/v2/models/{model}/versions/{version}/infer", **_INFER_DOC)
async def infer_version(
    model: str,
    version: str,
    request: Request,
    caller: WriterDep,
    registry: RegistryDep,
    state: AppStateDep,
    x_stream_id: StreamIdHeader = None,
) -> Response:
    """Inference on the model version (see ``/v2/models/{model}/infer``)."""
    _check_version(version)
    return await infer(model, request, caller, registry, state, x_stream_id)
