"""One served model at run time: its engine, its engine thread, its stream slots and batcher.

The engine is not thread-safe, so every call into it (forwards, opening, closing, resetting,
exporting, importing streams, drift reports) runs on the model's single engine thread, in the
order it was submitted: a stream's state changes only in that order.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from adapters import get_adapter
from adapters.presets import preset_config
from engine.compiled import DEFAULT_BUCKETS, compiled_is_faster
from engine.core import Engine
from engine.network import Network
from models import (
    IncompatibleModelError,
    ModelSpec,
    Normalizer,
    create_model,
    load_torchvision_model,
    load_user_model,
)
from service.metrics import Metrics
from service.predictions import PredictRequest, PredictResult
from service.settings import OnnxModel, UserModel
from service.streams import StoreWriter, StreamSlots

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class CompileOptions:
    """How a PyTorch model's engine runs its forward (settings ``engine_mode``, ``compile_*``)."""

    mode: str = "eager"  # auto | eager | compiled
    row_buckets: Sequence[int] = DEFAULT_BUCKETS
    stream_buckets: Sequence[int] = DEFAULT_BUCKETS
    warmup: Sequence[tuple[int, int]] = ()  # compiled for the model's default adapter

    def compiled(self, device: torch.device) -> bool:
        """Whether to compile on ``device``."""
        return self.mode == "compiled" or (self.mode == "auto" and compiled_is_faster(device.type))


class RequestQueue(Protocol):
    """Where a model's prediction requests go (``service.scheduler.Batcher``, which needs the
    runtime: a protocol here keeps the dependency one-way)."""

    async def submit(self, request: PredictRequest) -> PredictResult:
        """Queue a request and wait for its result."""
        ...

    async def stop(self) -> None:
        """Refuse new requests and finish the queued ones."""
        ...


class ModelRuntime:
    """A loaded model with its engine thread, stream slots, input normaliser and batcher."""

    def __init__(
        self,
        engine: Engine,
        spec: ModelSpec,
        writer: StoreWriter,
        max_streams: int,
        metrics: Metrics,
        default_adapter: tuple[str, dict[str, Any]] = ("adabn", {}),
    ) -> None:
        self.engine = engine
        self.spec = spec
        self.name = spec.name
        self.default_adapter = default_adapter  # of a stream created without one, with config
        self.slots = StreamSlots(engine, writer, max_streams, metrics)
        self.normalizer = Normalizer(spec)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"tta-engine-{spec.name}")
        self.batcher: RequestQueue | None = None
        self._pinned: torch.Tensor | None = None

    def stream_adapter(
        self, adapter: str | None, preset: str | None = None, config: dict[str, Any] | None = None
    ) -> tuple[str, dict[str, Any]]:
        """The adapter and config of a new stream of this model.

        No ``adapter``: the model's default, with its config unless ``config`` is given. The
        config goes over the adapter's ``preset`` (default: recommended); UnknownAdapterError,
        UnknownPresetError otherwise.
        """
        if adapter is None:
            adapter, default = self.default_adapter
            config = default if config is None else config
        return adapter, preset_config(get_adapter(adapter).name, preset, config)

    @property
    def device(self) -> torch.device:
        """Where the model and its streams' states live."""
        return self.engine.device

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the engine thread, after everything submitted before it."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args))

    def to_device(self, batch: torch.Tensor) -> torch.Tensor:
        """Copy a host batch to the model's device (through a reused pinned buffer on CUDA).

        Called on the engine thread only; the previous forward has finished (its logits were
        read back), so its copy out of the buffer is complete when the buffer is reused.
        """
        if self.device.type != "cuda":
            return batch.to(self.device)
        size = batch.numel() * batch.element_size()
        if self._pinned is None or self._pinned.numel() < size:
            self._pinned = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        staging = self._pinned[:size].view(batch.dtype).view(batch.shape)
        staging.copy_(batch)
        return staging.to(self.device, non_blocking=True)

    def close(self) -> None:
        """Stop the engine thread after the work already submitted."""
        self.executor.shutdown(wait=True)


def resolve_device(device: str) -> torch.device:
    """``auto``: cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda, but CUDA is not available")
    return torch.device(device)


def load_runtime(
    name: str | OnnxModel | UserModel,
    *,
    cache_dir: Path,
    device: torch.device,
    capacity: int,
    observer_window: int,
    amp: bool,
    cuda_graphs: bool = False,
    compile: CompileOptions | None = None,
    default_adapters: Sequence[tuple[str, dict[str, Any]]] = (("adabn", {}),),
    default_state_bytes: int = 0,
    max_state_bytes: int = 0,
    max_state_header_bytes: int = 0,
    writer: StoreWriter,
    max_streams: int,
    metrics: Metrics,
) -> ModelRuntime:
    """Build a model and its engine (blocking: call it in a thread).

    ``name``: a registered model, or an ONNX file's or a user model's entry of the settings.
    The model's default adapter is the first of ``default_adapters`` whose state of one stream
    fits ``default_state_bytes`` (0: any), else the last.
    """
    network: Network | torch.nn.Module
    if isinstance(name, OnnxModel):
        network, spec = load_onnx_model(name, device)
    elif isinstance(name, UserModel):
        network, spec = load_own_model(name)
    else:
        network, spec = create_model(name, cache_dir=cache_dir.expanduser())
    autocast = None
    if amp and device.type == "cuda":
        autocast = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    compile = compile or CompileOptions()
    compiled = spec.backend == "torch" and compile.compiled(device)
    engine = Engine(
        network,
        name=spec.name,
        num_classes=spec.num_classes,
        device=device if spec.backend == "torch" else None,
        capacity=capacity,
        observer_window=observer_window,
        autocast_dtype=autocast,
        cuda_graphs=cuda_graphs,
        max_state_bytes=max_state_bytes,
        max_state_header_bytes=max_state_header_bytes,
        mode="compiled" if compiled else "eager",
        row_buckets=compile.row_buckets,
        stream_buckets=compile.stream_buckets,
    )
    layouts = metrics.compiled_layouts.labels(spec.name)  # 0 for an eager engine
    if engine.compiled is not None:
        layouts.set_function(functools.partial(len, engine.compiled.variants))
    metrics.state_memory_limit.labels(spec.name).set(max_state_bytes)
    metrics.model_info.labels(
        spec.name,
        spec.architecture,
        str(device),
        str(spec.num_classes),
        "x".join(str(s) for s in spec.input_size),
        spec.backend,
    ).set(1)
    metrics.add_model(spec.name)
    default = choose_default(engine, default_adapters, default_state_bytes)
    runtime = ModelRuntime(engine, spec, writer, max_streams, metrics, default)
    if compiled and compile.warmup:
        logger.info("compiling %s for layouts %s", spec.name, list(compile.warmup))
        engine.warm_up(*runtime.stream_adapter(None), compile.warmup, (3, *spec.input_size))
    logger.info("loaded model %s on %s (%s)", spec.name, device, spec.backend)
    return runtime


def choose_default(
    engine: Engine, choices: Sequence[tuple[str, dict[str, Any]]], max_bytes: int
) -> tuple[str, dict[str, Any]]:
    """The first ``(adapter, config)`` whose state of one stream fits ``max_bytes`` (0: any),
    else the last; a config goes over the adapter's recommended preset, as a request's does."""
    for adapter, config in choices:  # the last one is kept whatever its size
        size = engine.slot_bytes(adapter, preset_config(adapter, None, config))
        if not max_bytes or size <= max_bytes:
            break
    logger.info(
        "model %s: streams created without an adapter get %s %s (%d bytes of state each)",
        engine.name,
        adapter,
        config,
        size,
    )
    return adapter, config


def load_own_model(entry: UserModel) -> tuple[torch.nn.Module, ModelSpec]:
    """A user's PyTorch classifier of the settings and its spec; ModelError with the reason."""
    try:
        spec = ModelSpec(
            name=entry.name,
            architecture=entry.architecture or entry.factory or "",
            input_size=entry.input_size,
            mean=entry.mean,
            std=entry.std,
            labels=tuple(entry.labels),
            resize=entry.resize,
        )
    except ValueError as error:
        raise IncompatibleModelError(str(error)) from None
    weights = entry.weights.expanduser()
    if entry.factory is not None:
        return load_user_model(entry.factory, weights, spec), spec
    # the settings require one of factory and architecture
    return load_torchvision_model(entry.architecture or "", weights, spec), spec


def load_onnx_model(entry: OnnxModel, device: torch.device) -> tuple[Network, ModelSpec]:
    """An ONNX classifier of the settings and its spec; IncompatibleModelError with the reason.

    The input and the number of classes come from the file where it fixes them.
    """
    from engine.onnx_backend import load_onnx  # onnxruntime loads only when a file is served

    network = load_onnx(entry.file.expanduser(), device, entry.name, design=entry.design)
    height, width = network.input_size
    if not (height and width) and entry.input_size is None:
        raise IncompatibleModelError(
            f"model {entry.name}: the file leaves the input size dynamic; set its input_size"
        )
    classes = network.num_classes or (len(entry.labels) if entry.labels else 0)
    if not classes or (entry.labels and len(entry.labels) != classes):
        raise IncompatibleModelError(
            f"model {entry.name}: {classes or 'an unknown number of'} classes in the file, "
            f"{len(entry.labels) if entry.labels else 'no'} labels in the settings"
        )
    if height and width and entry.input_size not in (None, (height, width)):
        raise IncompatibleModelError(
            f"model {entry.name}: the file's input is {height}x{width}, the settings say "
            f"{entry.input_size}"
        )
    try:
        spec = ModelSpec(
            name=entry.name,
            architecture="onnx",
            input_size=entry.input_size or (height, width),
            mean=entry.mean,
            std=entry.std,
            labels=tuple(entry.labels or (str(i) for i in range(classes))),
            resize=entry.resize,
            backend="onnx",
        )
    except ValueError as error:
        raise IncompatibleModelError(str(error)) from None
    return network, spec
