"""The Open Inference Protocol (KServe v2) over REST, with the Triton extensions clients use.

Inference (``service.inference`` says how a request names its stream, Triton's sequence
semantics, and what runs without a stream): the input is one tensor ``input`` ``[N, 3, H, W]``,
``UINT8`` pixels (normalised by the server) or ``FP32`` already normalised, as JSON ``data`` or,
with the binary-data extension, as raw little-endian bytes after the JSON header
(``Inference-Header-Content-Length``), its size in ``parameters.binary_data_size``. Outputs:
``logits`` and ``probabilities`` (FP32 ``[N, C]``), ``class_index`` (INT64 ``[N]``) and ``label``
(BYTES ``[N]``), as JSON or binary data (``parameters.binary_data`` on an output, or
``binary_data_output`` on the request); ``parameters.classification: k`` on a score output gives
its k best classes (Triton's classification extension). Invalid requests answer 400.

Also: health (200, or 400 without a body), server and model metadata, model ``config`` and
``stats`` (Triton's statistics extension, from the metrics), and ``POST /v2/repository/index``
(the served models, read-only). Request bodies may be gzip or deflate compressed, responses are
gzip compressed when asked (middleware in ``service.main``).
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import pydantic
from fastapi import APIRouter, Header, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from adapters import InvalidStateError, UnknownAdapterError, stateless_adapters
from service.api.deps import AppState, AppStateDep, RegistryDep
from service.api.openapi import LOADED_STREAM_ERRORS, REGISTRY_ERRORS, ref, v2_errors
from service.auth import READ, WriterDep
from service.errors import (
    DeadlineExceededError,
    ForwardError,
    InvalidConfigError,
    InvalidInputError,
    InvalidTensorError,
    ModelNotServedError,
    PayloadTooLargeError,
    QueueFullError,
    StreamExistsError,
    UnsupportedMediaTypeError,
    describe_validation,
)
from service.imaging import ImageBatch
from service.inference import (
    DATATYPES,
    INPUT,
    PLATFORM,
    VERSION,
    InferParameters,
    Output,
    WantedOutput,
    all_outputs,
    input_batch,
    outputs_of,
    run_inference,
    target_of,
    tensors,
    wanted_output,
)
from service.metrics import Metrics
from service.runtime import ModelRuntime
from service.schemas import EXAMPLE_STREAM_ID

router = APIRouter(tags=["open inference protocol"])

HEADER_LENGTH = "inference-header-content-length"


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
    parameters: InferParameters = Field(default_factory=lambda: InferParameters())
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
    parameters: dict[str, Any] = Field(
        description="the stream and its adapted images, or the stateless request's adapter"
    )
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
    parameters: dict[str, Any] = Field(
        description="labels, input datatypes, mean and std, the stateless and sequence adapters"
    )


class ModelReadiness(BaseModel):
    """Whether a model is ready."""

    name: str
    ready: bool


class RepositoryModel(BaseModel):
    """A model of the repository index: every served model is loaded and ready."""

    name: str
    version: str
    state: str
    reason: str


StreamIdHeader = Annotated[
    str | None,
    Header(description="the stream, when the request's parameters name none"),
]
MODEL_ERRORS = (*REGISTRY_ERRORS, ModelNotServedError)
INFER_ERRORS = (
    *MODEL_ERRORS,
    *LOADED_STREAM_ERRORS,
    StreamExistsError,
    InvalidStateError,
    UnknownAdapterError,
    InvalidConfigError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
    InvalidInputError,
    InvalidTensorError,
    QueueFullError,
    DeadlineExceededError,
    ForwardError,
)
NOT_HEALTHY = {"description": "false: no body (the protocol's health answer)", "content": {}}
_INFER_DOC: dict[str, Any] = {
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "description": (
                "JSON, or with the binary tensor extension: the JSON header "
                "(Inference-Header-Content-Length bytes) followed by the raw input tensor. "
                "Content-Encoding gzip or deflate is accepted."
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
    return ServerMetadata(
        name="tta-serve",
        version="0.1.0",
        extensions=[
            "binary_tensor_data",
            "classification",
            "sequence",
            "statistics",
            "model_repository",
        ],
    )


@router.get("/v2/health/live", response_model=Liveness, responses={400: NOT_HEALTHY})
async def live(state: AppStateDep) -> Response:
    """200 while the process is up, also while it starts; 400 once its start-up has failed."""
    if state.start_error is not None:
        return Response(status_code=400)
    return Response(Liveness(live=True).model_dump_json(), media_type="application/json")


@router.get("/v2/health/ready", response_model=Readiness, responses={400: NOT_HEALTHY})
async def ready(state: AppStateDep) -> Response:
    """200 once every model is loaded and streams are restored, while the state store answers
    (a ping at most once a second); 400 before, while the store is unreachable, and at shutdown.
    """
    is_ready = state.serving
    if is_ready and state.store_health is not None:
        is_ready = await state.store_health.reachable()
    if not is_ready:
        return Response(status_code=400)
    return Response(Readiness(ready=True).model_dump_json(), media_type="application/json")


@router.post("/v2/repository/index", responses=v2_errors(*REGISTRY_ERRORS), dependencies=[READ])
async def repository_index(registry: RegistryDep) -> list[RepositoryModel]:
    """The served models (read-only: models are chosen by the settings, not loaded by request)."""
    return [
        RepositoryModel(name=name, version=VERSION, state="READY", reason="")
        for name in registry.runtimes
    ]


@router.get("/v2/models/stats", responses=v2_errors(*REGISTRY_ERRORS), dependencies=[READ])
async def all_model_stats(registry: RegistryDep, state: AppStateDep) -> dict[str, Any]:
    """Every served model's statistics (see ``/v2/models/{model}/stats``)."""
    return {"model_stats": [model_statistics(state.metrics, name) for name in registry.runtimes]}


@router.get(
    "/v2/models/{model}",
    response_model=ModelMetadata,
    responses=v2_errors(*MODEL_ERRORS),
    dependencies=[READ],
)
async def model_metadata(model: str, registry: RegistryDep, state: AppStateDep) -> dict[str, Any]:
    """The model's inputs and outputs, and what a request without a stream runs with."""
    runtime = registry.runtime(model)
    settings = state.settings
    return {
        "name": model,
        "versions": [VERSION],
        "platform": PLATFORM,
        **tensors(runtime),
        "parameters": {
            "labels": list(runtime.spec.labels),
            # FP32 inputs are accepted too: already normalised with the model's mean/std.
            "input_datatypes": list(DATATYPES),
            "mean": list(runtime.spec.mean),
            "std": list(runtime.spec.std),
            # A request that names no stream (sequence_id, stream_id) runs with this adapter,
            # or with parameters.adapter among stateless_adapters; nothing is kept.
            "stateless_adapter": settings.oip_stateless_adapter,
            "stateless_adapters": stateless_adapters(),
            # A sequence started with sequence_start gets this adapter (a new stream).
            "sequence_adapter": runtime.default_adapter[0],
            "sequence_end": settings.oip_sequence_end,
        },
    }


@router.get("/v2/models/{model}/ready", responses={400: NOT_HEALTHY}, dependencies=[READ])
async def model_ready(model: str, state: AppStateDep) -> Response:
    """200 when the model is served and the server is ready; 400 (no body) otherwise."""
    if not state.serving or model not in state.runtimes:
        return Response(status_code=400)
    body = ModelReadiness(name=model, ready=True).model_dump_json()
    return Response(body, media_type="application/json")


@router.get("/v2/models/{model}/config", responses=v2_errors(*MODEL_ERRORS), dependencies=[READ])
async def model_config(model: str, registry: RegistryDep, state: AppStateDep) -> dict[str, Any]:
    """The model's configuration in Triton's model-config shape (read-only)."""
    runtime = registry.runtime(model)
    height, width = runtime.spec.input_size
    classes = runtime.spec.num_classes
    settings = state.settings
    scalar = {"dims": [1], "reshape": {"shape": []}}
    return {
        "name": model,
        "platform": PLATFORM,
        "backend": "tta-serve",
        "max_batch_size": settings.max_images_per_request,
        "input": [
            {"name": INPUT, "data_type": "TYPE_UINT8", "format": "FORMAT_NCHW",
             "dims": [3, height, width]}
        ],
        "output": [
            {"name": "logits", "data_type": "TYPE_FP32", "dims": [classes]},
            {"name": "probabilities", "data_type": "TYPE_FP32", "dims": [classes]},
            {"name": "class_index", "data_type": "TYPE_INT64", **scalar},
            {"name": "label", "data_type": "TYPE_STRING", **scalar},
        ],
        "dynamic_batching": {"max_queue_delay_microseconds": int(settings.max_delay_ms * 1000)},
        "parameters": {
            "stateless_adapter": {"string_value": settings.oip_stateless_adapter},
            "sequence_adapter": {"string_value": runtime.default_adapter[0]},
            "sequence_end": {"string_value": settings.oip_sequence_end},
        },
    }  # fmt: skip


@router.get("/v2/models/{model}/stats", responses=v2_errors(*MODEL_ERRORS), dependencies=[READ])
async def model_stats(model: str, registry: RegistryDep, state: AppStateDep) -> dict[str, Any]:
    """The model's inference statistics (Triton's statistics extension), read from the metrics.

    Counts are requests unless named otherwise: ``inference_count`` counts images and
    ``execution_count`` engine forwards; ``queue``, ``compute_input`` (decoding) and
    ``compute_infer`` (the forward, per forward) sum their stage's time; ``success`` counts the
    requests that ran with their queue, decode and forward time, ``fail`` the failed forwards.
    Every protocol's requests count, v1 included.
    """
    registry.runtime(model)
    return {"model_stats": [model_statistics(state.metrics, model)]}


@router.post("/v2/models/{model}/infer", **_INFER_DOC)
async def infer(
    model: str,
    request: Request,
    caller: WriterDep,
    registry: RegistryDep,
    state: AppStateDep,
    x_stream_id: StreamIdHeader = None,
) -> Response:
    """Predict a batch: statelessly, or with a stream (adapting it); an OIP v2 request body."""
    runtime = registry.runtime(model)
    started = time.perf_counter()
    body = await request.body()
    infer_request, binary = _parse(body, request.headers.get(HEADER_LENGTH))
    parameters = infer_request.parameters
    target = target_of(parameters, x_stream_id, state.settings.oip_stateless_adapter)
    # Every check comes before the inference: a refused request must not touch the stream.
    wanted = [
        wanted_output(o.name, o.parameters, parameters.binary_data_output)
        for o in infer_request.outputs or []
    ] or all_outputs(parameters.binary_data_output)
    images = _input_batch(infer_request, binary, runtime, state)
    state.metrics.stage_latency.labels(model, "decode").observe(time.perf_counter() - started)
    result = await run_inference(
        state, registry, model, target, images, caller, infer_request.id or ""
    )
    outputs = outputs_of(result.logits, runtime, wanted)
    return _respond(infer_request.id, model, result.parameters, wanted, outputs)


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
    request: InferRequest, binary: bytes, runtime: ModelRuntime, state: AppState
) -> ImageBatch:
    """The single input tensor as the model's batch, from JSON data or the binary part."""
    if len(request.inputs) != 1:
        raise InvalidInputError(
            f"expected exactly one input tensor {INPUT!r} [N, 3, H, W], got {len(request.inputs)}"
        )
    tensor = request.inputs[0]
    size = tensor.parameters.get("binary_data_size")
    if size is None:
        if binary:
            raise InvalidInputError("binary data follows the JSON header but no input claims it")
        return input_batch(
            tensor.name, tensor.datatype, tensor.shape, runtime, state, data=tensor.data
        )
    if tensor.data is not None:
        raise InvalidInputError("an input has both data and binary_data_size")
    if type(size) is not int or size != len(binary):
        raise InvalidInputError(
            f"binary_data_size {size!r} does not match the {len(binary)} bytes of binary data"
        )
    return input_batch(tensor.name, tensor.datatype, tensor.shape, runtime, state, raw=binary)


def _respond(
    request_id: str | None,
    model: str,
    parameters: dict[str, Any],
    wanted: list[WantedOutput],
    outputs: list[Output],
) -> Response:
    """The OIP response, JSON or JSON + binary outputs."""
    body: dict[str, Any] = {
        "model_name": model,
        "model_version": VERSION,
        "parameters": parameters,
        "outputs": [],
    }
    if request_id is not None:
        body["id"] = request_id
    chunks: list[bytes] = []
    for want, output in zip(wanted, outputs, strict=True):
        entry: dict[str, Any] = {
            "name": output.name,
            "datatype": output.datatype,
            "shape": output.shape,
        }
        if want.binary:
            data = output.raw()
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = output.flat()
        body["outputs"].append(entry)
    header = json.dumps(body).encode()
    if not chunks:
        return Response(header, media_type="application/json")
    return Response(
        header + b"".join(chunks),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )


def model_statistics(metrics: Metrics, model: str) -> dict[str, Any]:
    """A model's statistics in Triton's shape, from the app's metrics (see ``model_stats``)."""

    def total(name: str, **labels: str) -> float:
        return sum(
            sample.value
            for family in metrics.registry.collect()
            for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        )

    def stage(name: str) -> dict[str, int]:
        labels = {"model": model, "stage": name}
        count = total("tta_stage_duration_seconds_count", **labels)
        seconds = total("tta_stage_duration_seconds_sum", **labels)
        return {"count": int(count), "ns": int(seconds * 1e9)}

    queue, decode, forward = stage("queue"), stage("decode"), stage("forward")
    return {
        "name": model,
        "version": VERSION,
        "last_inference": 0,
        "inference_count": int(total("tta_images_total", model=model)),
        "execution_count": forward["count"],
        "inference_stats": {
            "success": {
                "count": queue["count"],
                "ns": queue["ns"] + decode["ns"] + forward["ns"],
            },
            "fail": {"count": int(total("tta_forward_errors_total", model=model)), "ns": 0},
            "queue": queue,
            "compute_input": decode,
            "compute_infer": forward,
            "compute_output": {"count": 0, "ns": 0},
        },
        "batch_stats": [],
    }


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
async def model_version_metadata(
    model: str, version: str, registry: RegistryDep, state: AppStateDep
) -> dict[str, Any]:
    """The model's metadata, for its version."""
    _check_version(version)
    return await model_metadata(model, registry, state)


@router.get(
    "/v2/models/{model}/versions/{version}/ready", responses={400: NOT_HEALTHY}, dependencies=[READ]
)
async def model_version_ready(model: str, version: str, state: AppStateDep) -> Response:
    """Whether the model version is ready (200), or not or unknown (400, no body)."""
    if version != VERSION:
        return Response(status_code=400)
    return await model_ready(model, state)


@router.get(
    "/v2/models/{model}/versions/{version}/config",
    responses=v2_errors(*MODEL_ERRORS),
    dependencies=[READ],
)
async def model_version_config(
    model: str, version: str, registry: RegistryDep, state: AppStateDep
) -> dict[str, Any]:
    """The model's configuration, for its version."""
    _check_version(version)
    return await model_config(model, registry, state)


@router.get(
    "/v2/models/{model}/versions/{version}/stats",
    responses=v2_errors(*MODEL_ERRORS),
    dependencies=[READ],
)
async def model_version_stats(
    model: str, version: str, registry: RegistryDep, state: AppStateDep
) -> dict[str, Any]:
    """The model's statistics, for its version."""
    _check_version(version)
    return await model_stats(model, registry, state)


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
