"""The engine: one loaded model serving many streams, each with its own adapter and state.

``Engine(model)`` copies the model once, replaces its BatchNorm2d layers by ``StreamNorm2d``,
and keeps one :class:`~adapters.pool.StatePool` per (adapter, state structure). A forward takes a
batch whose images are cut into stream segments; every norm layer computes per-image moments
once, and each group of streams (same pool, same ``adapt`` flag) turns them into normalisation
statistics with its adapter, vectorised over the group's streams. New states are staged and
committed only after the whole forward has succeeded, so a failed batch changes nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel
from torch import Tensor, nn

from adapters import get_adapter
from adapters.base import Adapter, Moments, State, StateMismatchError, segment_sum
from adapters.drift import drift_report, drift_summaries, observe, observe_head
from adapters.norm import ACTIVE_BATCH, StreamNorm2d, convert_batchnorm, instance_moments
from adapters.pool import StatePool
from adapters.state_io import check_metadata, check_state, export_state, read_state

PoolKey = tuple[str, tuple[tuple[str, object], ...]]


@dataclass(frozen=True, eq=False)
class StreamHandle:
    """A stream's place in the engine: its adapter, validated config, seed and slot."""

    adapter: str
    config: BaseModel
    seed: int
    pool: PoolKey
    slot: int


@dataclass(eq=False)
class _Group:
    """The contiguous rows of a batch that share a pool and an ``adapt`` flag."""

    adapter: Adapter
    pool: StatePool
    start: int
    stop: int
    adapt: bool
    slots: Tensor
    segment: Tensor  # [rows] stream index within the group
    images: Tensor  # [streams] float64
    members: Tensor = field(default_factory=lambda: torch.empty(0))  # [streams, rows] one-hot
    layers: list[State] = field(default_factory=list)
    head: State = field(default_factory=dict)
    hparams: dict[str, Tensor] = field(default_factory=dict)


class _Batch:
    """The forward in progress: answers the norm layers and stages the new states."""

    def __init__(self, groups: list[_Group], window: Tensor) -> None:
        self.groups = groups
        self.window = window

    def statistics(self, layer: StreamNorm2d, x: Tensor) -> tuple[Tensor, Tensor]:
        sample_mean, sample_var = instance_moments(x, layer.running_mean)
        source = layer.source
        pixels = x.shape[2] * x.shape[3]
        means, variances = [], []
        for group in self.groups:
            moments = _moments(
                sample_mean[group.start : group.stop],
                sample_var[group.start : group.stop],
                group.segment,
                group.images,
                pixels,
                group.members,
            )
            adapter, hp = group.adapter, group.hparams
            state = group.layers[layer.index]
            if group.adapt and adapter.update_first:
                state = {**state, **adapter.update(state, moments, source, hp)}
            mean, var = adapter.norm_stats(state, moments, source, hp)
            if group.adapt and not adapter.update_first:
                state = {**state, **adapter.update(state, moments, source, hp)}
            if group.adapt:
                group.layers[layer.index] = {**state, **observe(state, moments, self.window)}
            if not adapter.per_sample:
                mean, var = moments.per_image(mean), moments.per_image(var)
            means.append(mean)
            variances.append(var)
        if len(self.groups) == 1:
            return means[0], variances[0]
        return torch.cat([m.float() for m in means]), torch.cat([v.float() for v in variances])


def _moments(
    sample_mean: Tensor,
    sample_var: Tensor,
    segment: Tensor,
    images: Tensor,
    pixels: int,
    members: Tensor,
) -> Moments:
    """Pool per-image moments into per-stream segment moments (law of total variance, fp64)."""
    count = images[:, None]
    sample_mean64 = sample_mean.double()
    mean = segment_sum(members, sample_mean64) / count
    spread = (sample_mean64 - mean.index_select(0, segment)).square() + sample_var.double()
    var = segment_sum(members, spread) / count
    return Moments(sample_mean, sample_var, segment, images, pixels, mean, var, members)


class Engine:
    """A model converted for stream-aware adaptation, with the state pools of its streams.

    Args:
        model: an eval-mode classifier with BatchNorm2d layers (it is copied, never mutated).
        name: the model's name, recorded in exported states.
        num_classes: size of the logits, for the prediction observer.
        device: where the model and every stream state live.
        capacity: slots per pool (streams per adapter and state structure).
        observer_window: images the drift observer remembers per stream.
        autocast_dtype: run the convolutions under autocast (statistics stay fp32/fp64).
        cuda_graphs: on CUDA, replay each batch layout as a captured graph (LRU of
            ``max_graphs`` layouts). Off by default until its GPU test has run on a GPU
            (tests/adapters/test_gpu.py); the eager path is what docs/performance.md measured.

    Example:
        >>> engine = Engine(model, num_classes=10, device=torch.device("cpu"))
        >>> stream = engine.open_stream("adabn")
        >>> logits = engine.forward(images, [(stream, len(images))])
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str = "model",
        num_classes: int,
        device: torch.device | str = "cpu",
        capacity: int = 256,
        observer_window: int = 1000,
        autocast_dtype: torch.dtype | None = None,
        cuda_graphs: bool = False,
        max_graphs: int = 64,
    ) -> None:
        self.name = name
        self.device = torch.device(device)
        self.model = copy.deepcopy(model).eval()
        self.layers = convert_batchnorm(self.model)
        if not self.layers:
            raise ValueError("the model has no BatchNorm2d layer: nothing to adapt")
        self.model.to(self.device).requires_grad_(False)
        self.num_classes = num_classes
        self.capacity = capacity
        self.autocast_dtype = autocast_dtype
        self.window = torch.tensor(float(observer_window), dtype=torch.float64, device=self.device)
        self.pools: dict[PoolKey, StatePool] = {}
        self.cuda_graphs = cuda_graphs
        self.max_graphs = max_graphs
        self._graphs: dict[tuple, _CapturedForward] = {}

    @property
    def sources(self) -> list:
        """Every norm layer's source statistics, in forward order."""
        return [layer.source for layer in self.layers]

    # --- streams -------------------------------------------------------------------------------

    def open_stream(
        self, adapter: str, config: BaseModel | dict | None = None, seed: int | None = None
    ) -> StreamHandle:
        """Give a new stream a slot with a fresh state; ``config`` is validated by the adapter."""
        spec = get_adapter(adapter)
        config = _validate(spec, config)
        if seed is None:
            seed = getattr(config, "seed", None)
        if seed is None:
            seed = secrets.randbits(63)
        key = _pool_key(spec, config)
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = StatePool(
                spec, config, self.sources, self.num_classes, self.capacity
            )
            pool.key = key
        slot = pool.allocate(config, seed)
        return StreamHandle(spec.name, config, seed, key, slot)

    def pool_key(self, adapter: str, config: BaseModel | dict | None = None) -> PoolKey:
        """The pool a stream of this adapter and config lives in (its state's structure)."""
        spec = get_adapter(adapter)
        return _pool_key(spec, _validate(spec, config))

    def close_stream(self, stream: StreamHandle) -> None:
        """Free the stream's slot."""
        self.pools[stream.pool].release(stream.slot)

    def reset_stream(self, stream: StreamHandle) -> None:
        """Restore the stream's fresh state (its seed included): source statistics, step 0."""
        self.pools[stream.pool].initialize(stream.slot, stream.config, stream.seed)

    def pool_of(self, stream: StreamHandle) -> StatePool:
        """The pool that holds the stream."""
        return self.pools[stream.pool]

    def drift(self, stream: StreamHandle) -> dict:
        """The stream's full drift report (ALGORITHMS.md section 10)."""
        layers, head, _ = self._rows([stream])
        return drift_report(layers, head, self.sources)

    def drift_summaries(self, streams: Sequence[StreamHandle]) -> list[dict]:
        """Short drift summaries of several streams, in order, with one transfer per pool."""
        summaries: dict[int, dict] = {}
        by_pool: dict[PoolKey, list[int]] = {}
        for index, stream in enumerate(streams):
            by_pool.setdefault(stream.pool, []).append(index)
        for members in by_pool.values():
            layers, head, _ = self._rows([streams[i] for i in members])
            rows = drift_summaries(layers, head, self.sources)
            summaries.update(zip(members, rows, strict=True))
        return [summaries[i] for i in range(len(streams))]

    def _rows(self, streams: Sequence[StreamHandle]):
        """Copies of the state rows of streams that share one pool."""
        pool = self.pools[streams[0].pool]
        return pool.gather(self._to_device([s.slot for s in streams], torch.int64))

    def export_stream(self, stream: StreamHandle) -> bytes:
        """The stream's whole state as safetensors bytes with JSON metadata."""
        return export_state(self.pools[stream.pool], stream.slot, self._identity(stream))

    def import_stream(self, stream: StreamHandle, data: bytes) -> StreamHandle:
        """Replace the stream's state by an exported one; StateMismatchError changes nothing.

        The state must come from the same model and adapter with the same config. Returns the
        stream's handle with the exporter's seed, so a later reset re-creates its initial state.
        """
        tensors, metadata = read_state(data)
        pool = self.pools[stream.pool]
        identity = self._identity(stream)
        check_metadata(metadata, {k: v for k, v in identity.items() if k != "seed"})
        check_state(pool, tensors, identity)
        seed = metadata.get("seed")
        if not isinstance(seed, int) or seed < 0:
            raise StateMismatchError("state metadata has no valid seed")
        pool.write(stream.slot, {k: v.to(self.device) for k, v in tensors.items()})
        return dataclasses.replace(stream, seed=seed)

    def _identity(self, stream: StreamHandle) -> dict:
        return {
            "model": self.name,
            "layers": [layer.running_mean.numel() for layer in self.layers],
            "adapter": stream.adapter,
            "config": stream.config.model_dump(mode="json"),
            "seed": stream.seed,
        }

    # --- forward -------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(
        self,
        images: Tensor,
        segments: Sequence[tuple[StreamHandle, int]],
        adapt: bool | Sequence[bool] = True,
    ) -> Tensor:
        """Logits for a batch cut into stream segments ``(stream, number of images)``, in order.

        Each stream may appear once per call. With ``adapt`` False for a segment its stream is
        normalised with its current state and left unchanged.
        """
        flags = [adapt] * len(segments) if isinstance(adapt, bool) else list(adapt)
        if sum(count for _, count in segments) != images.shape[0]:
            raise ValueError("segment sizes do not add up to the batch size")
        if len({(s.pool, s.slot) for s, _ in segments}) != len(segments):
            raise ValueError("a stream may appear only once per forward")
        order, groups = self._plan(segments, flags)
        x = images.to(self.device, non_blocking=True)
        if self.cuda_graphs and self.device.type == "cuda":
            return self._replay(x, order, groups)
        return self._run(x, order, groups, commit=True)

    def _run(self, x: Tensor, order: Tensor | None, groups: list[_Group], commit: bool) -> Tensor:
        """The adapted forward of a planned batch; stream states change only if ``commit``."""
        if order is not None:
            x = x.index_select(0, order)
        batch = _Batch(groups, self.window)
        for group in groups:
            group.layers, group.head, group.hparams = group.pool.gather(group.slots)
            streams = torch.arange(group.images.shape[0], device=group.segment.device)
            group.members = (streams[:, None] == group.segment[None, :]).double()
        token = ACTIVE_BATCH.set(batch)
        try:
            with self._autocast():
                logits = self.model(x).float()
        finally:
            ACTIVE_BATCH.reset(token)
        for group in groups:
            if group.adapt:
                rows = logits[group.start : group.stop]
                group.head = observe_head(group.head, rows, group.members, self.window)
        # Only now, with the whole batch computed, do the streams' states change.
        if commit:
            for group in groups:
                if group.adapt:
                    group.pool.commit(group.slots, group.layers, group.head)
        if order is not None:
            logits = torch.empty_like(logits).index_copy_(0, order, logits)
        return logits

    def _replay(self, x: Tensor, order: Tensor | None, groups: list[_Group]) -> Tensor:
        """The forward as one CUDA graph replay, captured once per batch layout.

        Eagerly, the statistics cost hundreds of tiny kernel launches per forward, which
        dominate on a GPU; a replay launches them all at once. A layout is the batch shape
        and, per group, its pool, ``adapt`` flag, rows and number of streams; the slots,
        segments and images are copied into the graph's static inputs. The whole forward,
        the commit of the new states included, is one replay: it cannot fail half-way.
        """
        key = (
            tuple(x.shape),
            x.dtype,
            order is None,
            tuple((g.pool.key, g.adapt, g.start, g.stop, g.images.shape[0]) for g in groups),
        )
        graph = self._graphs.pop(key, None)
        if graph is None:
            graph = _CapturedForward(self, x, order, groups)
            while len(self._graphs) >= self.max_graphs:
                self._graphs.pop(next(iter(self._graphs)))
        self._graphs[key] = graph  # most recently used last
        return graph.replay(x, order, groups)

    @torch.inference_mode()
    def forward_source(self, images: Tensor) -> Tensor:
        """Logits of the unadapted source model."""
        x = images.to(self.device, non_blocking=True)
        with self._autocast():
            return self.model(x).float()

    def _autocast(self) -> torch.autocast:
        # No weight-cast cache: it would hold tensors across CUDA graph captures.
        return torch.autocast(
            self.device.type,
            self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
            cache_enabled=False,
        )

    def _plan(
        self, segments: Sequence[tuple[StreamHandle, int]], flags: list[bool]
    ) -> tuple[Tensor | None, list[_Group]]:
        """Group segments by (pool, adapt) into contiguous rows; the row order if it changed."""
        grouped: dict[tuple[PoolKey, bool], list[tuple[int, StreamHandle, int]]] = {}
        start = 0
        for (stream, count), flag in zip(segments, flags, strict=True):
            if count < 1:
                raise ValueError("every segment needs at least one image")
            grouped.setdefault((stream.pool, flag), []).append((start, stream, count))
            start += count
        rows: list[int] = []
        groups = []
        for (key, flag), members in grouped.items():
            first = len(rows)
            segment: list[int] = []
            for index, (offset, _, count) in enumerate(members):
                rows.extend(range(offset, offset + count))
                segment.extend([index] * count)
            pool = self.pools[key]
            groups.append(
                _Group(
                    adapter=pool.adapter,
                    pool=pool,
                    start=first,
                    stop=len(rows),
                    adapt=flag,
                    slots=self._to_device([s.slot for _, s, _ in members], torch.int64),
                    segment=self._to_device(segment, torch.int64),
                    images=self._to_device([c for _, _, c in members], torch.float64),
                )
            )
        contiguous = rows == list(range(len(rows)))
        order = None if contiguous else self._to_device(rows, torch.int64)
        return order, groups

    def _to_device(self, values: list, dtype: torch.dtype) -> Tensor:
        """A small host list as a device tensor, without a blocking copy on CUDA."""
        tensor = torch.tensor(values, dtype=dtype)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)


def _validate(adapter: Adapter, config: BaseModel | dict | None) -> BaseModel:
    if isinstance(config, adapter.config):
        return config
    if isinstance(config, BaseModel):
        config = config.model_dump()
    return adapter.config.model_validate(config or {})


def _pool_key(adapter: Adapter, config: BaseModel) -> PoolKey:
    return adapter.name, tuple((name, getattr(config, name)) for name in adapter.structural)


class _CapturedForward:
    """One batch layout's forward captured as a CUDA graph, with its static inputs."""

    def __init__(
        self, engine: Engine, x: Tensor, order: Tensor | None, groups: list[_Group]
    ) -> None:
        self.x = x.clone()
        self.order = None if order is None else order.clone()
        self.groups = [
            dataclasses.replace(
                g, slots=g.slots.clone(), segment=g.segment.clone(), images=g.images.clone()
            )
            for g in groups
        ]
        # Warm up on a side stream (cuDNN picks its kernels, workspaces are allocated)
        # without committing: a warm-up must not change any stream.
        side = torch.cuda.Stream(engine.device)
        side.wait_stream(torch.cuda.current_stream(engine.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                engine._run(self.x, self.order, self.groups, commit=False)
        torch.cuda.current_stream(engine.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = engine._run(self.x, self.order, self.groups, commit=True)

    def replay(self, x: Tensor, order: Tensor | None, groups: list[_Group]) -> Tensor:
        """Copy this batch into the static inputs, replay, and return a copy of the logits."""
        self.x.copy_(x, non_blocking=True)
        if order is not None and self.order is not None:
            self.order.copy_(order, non_blocking=True)
        for static, group in zip(self.groups, groups, strict=True):
            static.slots.copy_(group.slots, non_blocking=True)
            static.segment.copy_(group.segment, non_blocking=True)
            static.images.copy_(group.images, non_blocking=True)
        self.graph.replay()
        return self.logits.clone()
