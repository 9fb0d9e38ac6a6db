"""The Open Inference Protocol over gRPC (KServe v2 ``inference.GRPCInferenceService``).

Served in the server's process on ``settings.grpc_port`` beside the HTTP API, with the same
inference (``service.inference``: stateless requests, Triton sequences through the
``sequence_id``, ``sequence_start`` and ``sequence_end`` parameters, or ``stream_id``, or the
``x-stream-id`` metadata) and the same errors, as gRPC status codes. gRPC's own threads receive
the calls; each call runs on the app's event loop, where the batchers and the stream registry
live, and its thread waits for it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
import pydantic

from adapters import stateless_adapters
from service.api.deps import AppState, registry_of
from service.auth import Caller, Permission, require
from service.errors import InvalidInputError, ModelNotServedError, describe_validation, to_response
from service.inference import (
    INPUT,
    PLATFORM,
    VERSION,
    InferParameters,
    all_outputs,
    input_batch,
    outputs_of,
    run_inference,
    target_of,
    tensors,
    wanted_output,
)
from service.protocol import grpc_predict_v2_pb2 as pb
from service.protocol import grpc_predict_v2_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

T = TypeVar("T")
WORKERS = 16  # calls served at once (each thread waits for its call on the event loop)
# HTTP statuses of the service's errors as gRPC codes.
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
    507: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
DATA_FIELDS = {"UINT8": "uint_contents", "FP32": "fp32_contents"}


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """The gRPC service of one app: every call runs on the app's event loop."""

    def __init__(self, state: AppState, loop: asyncio.AbstractEventLoop) -> None:
        self.state = state
        self.loop = loop

    def _run(self, context: grpc.ServicerContext, call: Callable[[], Awaitable[T]]) -> T:
        """Run ``call`` on the event loop and wait; its error becomes the call's status."""
        try:
            return asyncio.run_coroutine_threadsafe(_awaited(call), self.loop).result()
        except Exception as error:  # every error is answered, as the HTTP handlers do
            response = to_response(error)
            message = json.loads(bytes(response.body))["error"]["message"]
            code = CODES.get(response.status_code, grpc.StatusCode.INTERNAL)
            context.abort(code, message)
            raise  # abort raises; this line is for the type checker

    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Live unless the start-up failed."""
        return pb.ServerLiveResponse(live=self.state.start_error is None)

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Ready as ``/v2/health/ready`` says."""

        async def ready() -> bool:
            if not self.state.serving:
                return False
            health = self.state.store_health
            return health is None or await health.reachable()

        return pb.ServerReadyResponse(ready=self._run(context, ready))

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Ready when the model (version 1) is served and the server is ready."""

        async def ready() -> bool:
            await self._allow(context, "read")
            served = request.name in self.state.runtimes and request.version in ("", VERSION)
            return self.state.serving and served

        return pb.ModelReadyResponse(ready=self._run(context, ready))

    async def _allow(self, context: grpc.ServicerContext, permission: Permission) -> Caller:
        """The call's caller, from its metadata as from HTTP headers (service.auth); 401/403."""
        metadata = {k.lower(): v for k, v in context.invocation_metadata() or ()}
        return require(await self.state.auth.authenticate_headers(metadata), permission)

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Name, version and the extensions supported over gRPC."""
        extensions = ["binary_tensor_data", "classification", "sequence"]
        return pb.ServerMetadataResponse(name="tta-serve", version="0.1.0", extensions=extensions)

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        """The model's input and outputs (its parameters are in the REST metadata)."""

        async def metadata() -> Any:
            await self._allow(context, "read")
            _check_version(request.version)
            runtime = registry_of(self.state).runtime(request.name)
            listed = tensors(runtime)
            tensor = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=request.name,
                versions=[VERSION],
                platform=PLATFORM,
                inputs=[tensor(**t) for t in listed["inputs"]],
                outputs=[tensor(**t) for t in listed["outputs"]],
            )

        return self._run(context, metadata)

    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Inference, as ``POST /v2/models/{model}/infer``; outputs as raw contents.

        With authentication on, the call's metadata carries the key as over HTTP
        (``authorization: Bearer <key>`` or ``x-api-key``), and ``x-tenant`` likewise.
        """
        metadata = dict(context.invocation_metadata() or ())
        return self._run(
            context, lambda: self._infer(request, context, metadata.get("x-stream-id"))
        )

    async def _infer(
        self, request: Any, context: grpc.ServicerContext, header_stream_id: str | None
    ) -> Any:
        caller = await self._allow(context, "write")
        state, model = self.state, request.model_name
        _check_version(request.model_version)
        registry = registry_of(state)
        runtime = registry.runtime(model)
        started = time.perf_counter()
        try:
            parameters = InferParameters.model_validate(_values(request.parameters))
        except pydantic.ValidationError as error:
            raise InvalidInputError(
                f"invalid inference request: {describe_validation(error.errors(), 'parameters.')}"
            ) from None
        target = target_of(parameters, header_stream_id, state.settings.oip_stateless_adapter)
        wanted = [
            wanted_output(o.name, _values(o.parameters), True) for o in request.outputs
        ] or all_outputs(True)
        if len(request.inputs) != 1:
            raise InvalidInputError(
                f"expected exactly one input tensor {INPUT!r} [N, 3, H, W], "
                f"got {len(request.inputs)}"
            )
        tensor = request.inputs[0]
        if request.raw_input_contents:
            raw, data = request.raw_input_contents[0], None
        else:
            field = DATA_FIELDS.get(tensor.datatype.upper())
            raw, data = None, list(getattr(tensor.contents, field)) if field else []
        images = input_batch(
            tensor.name, tensor.datatype, list(tensor.shape), runtime, state, raw=raw, data=data
        )
        state.metrics.stage_latency.labels(model, "decode").observe(time.perf_counter() - started)
        result = await run_inference(state, registry, model, target, images, caller, request.id)
        outputs = outputs_of(result.logits, runtime, wanted)
        return pb.ModelInferResponse(
            model_name=model,
            model_version=VERSION,
            id=request.id,
            parameters={k: _parameter(v) for k, v in result.parameters.items()},
            outputs=[
                pb.ModelInferResponse.InferOutputTensor(
                    name=o.name, datatype=o.datatype, shape=o.shape
                )
                for o in outputs
            ],
            raw_output_contents=[o.raw() for o in outputs],
        )


async def _awaited(call: Callable[[], Awaitable[T]]) -> T:
    return await call()


def _check_version(version: str) -> None:
    if version not in ("", VERSION):
        raise ModelNotServedError(f"model version {version!r} does not exist; versions: {VERSION}")


def _values(parameters: Any) -> dict[str, Any]:
    """A protobuf parameter map as plain values (unset ones left out)."""
    values = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        if choice is not None:
            values[key] = getattr(parameter, choice)
    return values


def _parameter(value: Any) -> Any:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    return pb.InferParameter(string_param=str(value))


def start_grpc(state: AppState, loop: asyncio.AbstractEventLoop) -> grpc.Server:
    """Serve the gRPC service on ``settings.grpc_port`` (0: a free one, in ``state.grpc_port``)."""
    settings = state.settings
    limit = settings.max_body_bytes
    server = grpc.server(
        ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="grpc"),
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ],
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(state, loop), server)
    port = server.add_insecure_port(f"{settings.host}:{settings.grpc_port}")
    server.start()
    state.grpc_port = port
    logger.info(
        "gRPC (KServe v2) on %s:%d; stateless adapters: %s",
        settings.host,
        port,
        ", ".join(stateless_adapters()),
    )
    return server
