"""Open Inference Protocol inference, whichever transport carries it (REST or gRPC).

A request names its stream in one of three ways, the first found wins: ``sequence_id`` (Triton's
sequence extension, a number or a string), ``stream_id`` (a parameter), or the ``X-Stream-Id``
header (gRPC: ``x-stream-id`` metadata). Triton's sequence semantics apply to it:

- ``sequence_start=true`` starts the sequence: the stream is created (this model, the server's
  default adapter) if it does not exist, and reset to its initial state if it does (Triton ends
  a sequence that is still in progress when its id starts again, and starts a fresh one);
- without ``sequence_start`` the stream must exist (404 otherwise);
- ``sequence_end=true`` ends it after this request: the stream is deleted, or kept with the
  setting ``oip_sequence_end=keep``.

A request that names no stream runs statelessly: normalised by ``parameters.adapter`` (one of
the stateless adapters: ``source``, ``tbn``, ``alpha_bn``) or else by the setting
``oip_stateless_adapter`` (``source``: the unadapted model); nothing is kept.

Every check comes before the stream is touched: a refused request creates, resets, adapts and
deletes nothing.
"""

from __future__ import annotations

import asyncio
import secrets
import struct
import time
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from adapters import get_adapter, stateless_adapters
from service.api.deps import AppState
from service.api.streams import require_finite, run_prediction
from service.auth import Caller
from service.errors import (
    InvalidInputError,
    StreamExistsError,
    StreamNotFoundError,
    UnavailableError,
)
from service.imaging import ImageBatch, decode_tensor, tensor_from_list
from service.predictions import PredictRequest
from service.runtime import ModelRuntime
from service.settings import Settings
from service.stores import StreamInfo
from service.streams import StreamEntry, StreamRegistry

Registry = StreamRegistry[ModelRuntime]

INPUT = "input"
DATATYPES = {"UINT8": "uint8", "FP32": "float32"}
OUTPUTS = ("logits", "probabilities", "class_index", "label")
# Outputs that score every class, so that the classification extension can rank them.
SCORES = ("logits", "probabilities")
VERSION = "1"
PLATFORM = "pytorch_tta"


def tensors(runtime: ModelRuntime) -> dict[str, list[dict[str, Any]]]:
    """The model's input and outputs as the metadata lists them (-1: any size)."""
    height, width = runtime.spec.input_size
    classes = runtime.spec.num_classes
    return {
        "inputs": [{"name": INPUT, "datatype": "UINT8", "shape": [-1, 3, height, width]}],
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [-1, classes]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]},
            {"name": "class_index", "datatype": "INT64", "shape": [-1]},
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
        ],
    }


class InferParameters(BaseModel):
    """The request parameters the server reads; others (Triton's priority, timeout) are ignored."""

    model_config = ConfigDict(extra="allow")

    stream_id: StrictStr | None = Field(default=None, description="the stream to predict and adapt")
    sequence_id: StrictInt | StrictStr | None = Field(
        default=None, description="Triton's sequence id: the stream (0 or empty: none)"
    )
    sequence_start: StrictBool = Field(
        default=False, description="create or reset the stream first"
    )
    sequence_end: StrictBool = Field(default=False, description="end the stream's sequence after")
    adapt: StrictBool = Field(default=True, description="update the stream's statistics")
    adapter: StrictStr | None = Field(
        default=None, description="a request without a stream: its stateless adapter"
    )
    binary_data_output: StrictBool = Field(default=False, description="every output as binary data")


@dataclass(frozen=True)
class Target:
    """What a request runs on: a stream (``stream_id``) or a stateless adapter."""

    stream_id: str | None
    adapter: str
    start: bool = False
    end: bool = False
    adapt: bool = True


def target_of(parameters: InferParameters, header_stream_id: str | None, default: str) -> Target:
    """The request's target; InvalidInputError for contradictory parameters.

    Args:
        parameters: the request's parameters.
        header_stream_id: the stream named by a transport header (REST ``X-Stream-Id``).
        default: the stateless adapter of a request that names neither stream nor adapter.
    """
    sequence = parameters.sequence_id
    sequence_id = str(sequence) if sequence not in (None, 0, "") else None
    named = [i for i in (sequence_id, parameters.stream_id, header_stream_id) if i]
    if sequence_id and parameters.stream_id and sequence_id != parameters.stream_id:
        raise InvalidInputError(
            f"sequence_id {sequence_id!r} and stream_id {parameters.stream_id!r} name "
            "different streams; give one of them"
        )
    if not named:
        if parameters.sequence_start or parameters.sequence_end:
            raise InvalidInputError("sequence_start and sequence_end need a sequence_id")
        adapter = parameters.adapter or default
        get_adapter(adapter)  # an unknown name lists the valid ones
        if adapter not in stateless_adapters():
            raise InvalidInputError(
                f"adapter {adapter!r} keeps a state, so it needs a stream (sequence_id or "
                f"stream_id); without one: {', '.join(stateless_adapters())}"
            )
        return Target(None, adapter)
    if parameters.adapter is not None:
        raise InvalidInputError(
            "parameters.adapter is for requests without a stream; a stream keeps the adapter "
            "it was created with"
        )
    return Target(
        named[0],
        "",
        start=parameters.sequence_start,
        end=parameters.sequence_end,
        adapt=parameters.adapt,
    )


def input_batch(
    name: str,
    datatype: str,
    shape: list[int],
    runtime: ModelRuntime,
    state: AppState,
    *,
    raw: bytes | None = None,
    data: list[Any] | None = None,
) -> ImageBatch:
    """The model's batch from its one input tensor, given as ``raw`` bytes or a ``data`` list."""
    settings = state.settings
    if name != INPUT:
        raise InvalidInputError(f"unknown input {name!r}: the model's only input is {INPUT!r}")
    dtype = DATATYPES.get(datatype.upper())
    if dtype is None:
        raise InvalidInputError(
            f"unsupported datatype {datatype!r}: expected {' or '.join(DATATYPES)}"
        )
    max_images, margin = settings.max_images_per_request, settings.input_range_margin
    if raw is not None:
        return decode_tensor(raw, shape, dtype, runtime.spec, max_images=max_images, margin=margin)
    if data is None:
        raise InvalidInputError(f"input {name!r} has no data")
    return tensor_from_list(data, shape, dtype, runtime.spec, max_images=max_images, margin=margin)


@dataclass(frozen=True)
class Inference:
    """The logits of a request, and the parameters its response carries."""

    logits: torch.Tensor  # [N, C] float32, CPU
    parameters: dict[str, Any]


async def run_inference(
    state: AppState,
    registry: Registry,
    model: str,
    target: Target,
    images: ImageBatch,
    caller: Caller,
    request_id: str = "",
) -> Inference:
    """Run a checked request: the sequence's start, the prediction, the sequence's end.

    ``caller`` names the streams: a tenant's sequence ids are its own (service.auth). A stream
    with label feedback logs the predictions under ``request_id`` (the OIP request's ``id``),
    which its feedback names (docs/safety.md).
    """
    if target.stream_id is None:
        logits = await _stateless(registry.runtime(model), target.adapter, images, state)
        return Inference(logits, {"adapter": target.adapter, "stateless": True})
    stream_id = target.stream_id
    key = caller.key(stream_id)
    if target.start:
        entry = await _start(registry, state.settings, model, stream_id, caller)
    else:
        entry = await registry.find(key)
        _check_model(entry.info, model)
    result = await run_prediction(
        registry,
        entry,
        images,
        state.settings,
        adapt=target.adapt,
        top_k=1,
        drift=False,
        request_id=request_id,
    )
    if target.end and state.settings.oip_sequence_end == "delete":
        await registry.delete(key)
    return Inference(result.logits, {"stream_id": stream_id, "samples": result.samples})


async def _start(
    registry: Registry, settings: Settings, model: str, stream_id: str, caller: Caller
) -> StreamEntry:
    """The stream of a sequence that starts: created if absent, reset if present."""
    key = caller.key(stream_id)
    try:
        entry = await registry.find(key)
    except StreamNotFoundError:
        quota = settings.tenant_quota(caller.tenant)
        try:
            return await registry.create(
                stream_id,
                model,
                *registry.runtime(model).stream_adapter(None),
                None,
                caller.tenant,
                max_streams=quota.max_streams,
                max_state_bytes=quota.max_state_bytes,
            )
        except StreamExistsError:  # a concurrent start created it: start it afresh
            entry = await registry.find(key)
    _check_model(entry.info, model)
    return await registry.reset(key)


def _check_model(info: StreamInfo, model: str) -> None:
    if info.model != model:
        raise InvalidInputError(
            f"stream {info.id!r} belongs to model {info.model!r}, not {model!r}"
        )


async def _stateless(
    runtime: ModelRuntime, adapter: str, images: ImageBatch, state: AppState
) -> torch.Tensor:
    """The logits of a request without a stream, batched with the model's other requests."""
    if runtime.batcher is None:  # set in the lifespan before the app is ready
        raise UnavailableError("the server is starting: the model's batcher is not running")
    info = StreamInfo(
        # "~" is outside the stream id pattern: never a real stream's id.
        id=f"~{secrets.token_hex(8)}",
        model=runtime.name,
        adapter=adapter,
        config={},
        seed=0,
        created_at=time.time(),
        ttl_seconds=None,
    )
    loop = asyncio.get_running_loop()
    request = PredictRequest(
        info=info,
        images=images,
        adapt=False,
        top_k=1,
        drift=False,
        stateless=True,
        deadline=loop.time() + state.settings.request_timeout_s,
    )
    result = await runtime.batcher.submit(request)
    require_finite(result, f"(none: stateless {adapter})")
    return result.logits


@dataclass(frozen=True)
class Output:
    """One output tensor: name, datatype, shape and values (a tensor, or strings for BYTES)."""

    name: str
    datatype: str
    shape: list[int]
    values: torch.Tensor | list[str]

    def flat(self) -> list[Any]:
        """The values as a flat list, row-major."""
        if isinstance(self.values, torch.Tensor):
            return list(self.values.flatten().tolist())
        return self.values

    def raw(self) -> bytes:
        """The values as raw little-endian bytes (BYTES: 4-byte length + UTF-8, per element)."""
        if isinstance(self.values, list):
            encoded = [s.encode() for s in self.values]
            return b"".join(struct.pack("<I", len(b)) + b for b in encoded)
        dtype = torch.float32 if self.datatype == "FP32" else torch.int64
        return self.values.to(dtype).contiguous().numpy().tobytes()


@dataclass(frozen=True)
class WantedOutput:
    """An output the request asks for, and its top-k if it asks for classification."""

    name: str
    classification: int = 0
    binary: bool = False


def wanted_output(name: str, parameters: dict[str, Any], binary_default: bool) -> WantedOutput:
    """A requested output, checked; InvalidInputError for unknown names or parameters."""
    if name not in OUTPUTS:
        raise InvalidInputError(f"unknown output {name!r}; valid: {', '.join(OUTPUTS)}")
    classification = parameters.get("classification", 0)
    if type(classification) is not int or classification < 0:
        raise InvalidInputError(
            f"output {name!r}: classification must be a whole number of classes, "
            f"got {classification!r}"
        )
    if classification and name not in SCORES:
        raise InvalidInputError(
            f"output {name!r} has no class scores to classify; use one of {', '.join(SCORES)}"
        )
    binary = parameters.get("binary_data", binary_default)
    if not isinstance(binary, bool):
        raise InvalidInputError(f"output {name!r}: binary_data must be true or false")
    return WantedOutput(name, classification, binary)


def outputs_of(
    logits: torch.Tensor, runtime: ModelRuntime, wanted: list[WantedOutput]
) -> list[Output]:
    """The requested outputs of a batch's logits, in the order asked.

    The classification extension (Triton's) turns a score output into BYTES ``[N, k]``: the k
    best classes of each image as ``"<score>:<index>:<label>"``, best first.
    """
    probabilities = logits.softmax(1)
    classes = probabilities.argmax(1)
    labels = runtime.spec.labels
    values: dict[str, tuple[str, torch.Tensor | list[str]]] = {
        "logits": ("FP32", logits),
        "probabilities": ("FP32", probabilities),
        "class_index": ("INT64", classes),
        "label": ("BYTES", [labels[i] for i in classes.tolist()]),
    }
    outputs = []
    for want in wanted:
        datatype, tensor = values[want.name]
        if want.classification and isinstance(tensor, torch.Tensor):
            k = min(want.classification, tensor.shape[1])
            scores, indices = tensor.topk(k, dim=1)
            ranked = [
                f"{score:f}:{index}:{labels[index]}"
                for row_scores, row_indices in zip(scores.tolist(), indices.tolist(), strict=True)
                for score, index in zip(row_scores, row_indices, strict=True)
            ]
            outputs.append(Output(want.name, "BYTES", [tensor.shape[0], k], ranked))
        elif isinstance(tensor, torch.Tensor):
            outputs.append(Output(want.name, datatype, list(tensor.shape), tensor))
        else:
            outputs.append(Output(want.name, datatype, [len(tensor)], tensor))
    return outputs


def all_outputs(binary: bool) -> list[WantedOutput]:
    """Every output, as a request that names none gets them."""
    return [WantedOutput(name, binary=binary) for name in OUTPUTS]
