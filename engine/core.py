"""The engine: one loaded network serving many streams, each with its own adapter and state.

``Engine(network)`` serves a :class:`~engine.network.Network` (a PyTorch module is wrapped in a
:class:`~engine.torch_backend.TorchNetwork`; an ONNX file is an
:class:`~engine.onnx_backend.OnnxNetwork`) and keeps one :class:`~adapters.pool.StatePool` per
(adapter, state structure). A forward takes a batch whose images are cut into stream segments;
every norm layer asks the batch for its statistics, the batch computes per-image moments
once, and each group of streams (same pool, same ``adapt`` flag) turns them into normalisation
statistics with its adapter, vectorised over the group's streams. New states are staged and
committed only after the whole forward has succeeded, so a failed batch changes nothing; and a
stream whose new state would not be finite or would break its adapter's bounds (or whose logits
are not finite) is refused alone: its state stays as it was, the other streams commit.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, overload

import torch
from pydantic import BaseModel
from torch import Tensor, nn

from adapters import get_adapter
from adapters.base import (
    Adapter,
    HParams,
    Moments,
    SourceStats,
    State,
    StateMismatchError,
    segment_sum,
)
from adapters.drift import drift_report, drift_summaries, observe, observe_head
from adapters.pool import MemoryBudget, StateLayout, StatePool, state_layout
from adapters.state_io import check_state, export_state, read_state
from engine.compiled import DEFAULT_BUCKETS, CompiledStep
from engine.network import Network, NormLayer, instance_moments
from engine.torch_backend import TorchNetwork

MAX_SEED = 2**63 - 1

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
    slots: Tensor  # [streams] the streams' slots in the pool
    segment: Tensor  # [rows] stream index within the group
    images: Tensor = field(default_factory=lambda: torch.empty(0))  # [streams] float64
    members: Tensor = field(default_factory=lambda: torch.empty(0))  # [streams, rows] one-hot
    indices: list[int] = field(default_factory=list)  # the segments of its streams, in order
    layers: list[State] = field(default_factory=list)
    head: State = field(default_factory=dict)
    hparams: dict[str, Tensor] = field(default_factory=dict)
    first: Tensor = field(default_factory=lambda: torch.empty(0))  # [streams] first row
    broken: dict[int, Tensor] = field(default_factory=dict)  # layer -> [S] non-finite moments
    pending: dict[int, Moments] = field(default_factory=dict)  # layer -> moments to fold in
    staged: dict[torch.dtype, Tensor] = field(default_factory=dict)  # new rows, packed
    # Bucketed (compiled) batches only: rows and streams padded to a bucket's sizes.
    valid: Tensor | None = None  # [rows] int64: 0 for a padding row (in no stream)
    source: Tensor | None = None  # [streams] int64: the real stream each stream copies


@dataclass(frozen=True, eq=False)
class _Plan:
    """A batch's rows and streams as the forward sees them.

    ``gather`` picks the forward's rows from the caller's (grouped by pool, padded to a bucket:
    padding rows repeat a real image and belong to no stream); ``back`` picks the caller's
    rows from the forward's logits; ``streams`` picks the real streams' rows of the problems.
    Each is None where it would be the identity. Every index tensor of the plan and its groups
    is a view of ``packed`` (one copy to the device; a captured graph refreshes them at once).
    """

    groups: list[_Group]
    packed: Tensor
    gather: Tensor | None = None
    back: Tensor | None = None
    streams: Tensor | None = None
    bucket: tuple | None = None  # the compiled variant's layout (None: the eager forward)


@dataclass(frozen=True)
class ImportedState:
    """An exported state parsed and checked for one stream, ready to be written to its slot."""

    tensors: dict[str, Tensor]  # on the host
    seed: int


@dataclass(frozen=True)
class ForwardResult:
    """The logits of a forward and what, if anything, refused each segment's stream.

    ``problems[i, kind, part]`` is row i's (segment ``order[i]``'s) NaN/inf (kind 0) or
    out-of-bounds (kind 1) flag for each part: every BN layer's state, the prediction observer,
    the logits. Both stay on the device until :meth:`refusals` reads the flags back.
    """

    logits: Tensor  # [N, C] float32, on the device, in the batch's order
    problems: Tensor  # [segments, 2, parts] bool, on the device, in group order
    order: list[int]
    parts: list[str]
    source_logits: Tensor | None = None  # [rows of the ``source`` segments, C], in their order

    def refusals(self) -> list[str | None]:
        """Per segment, in the caller's order: None if it was committed, else why it was not.

        A host sync: call it after reading the logits back, which has already waited for the
        forward.
        """
        reasons: list[str | None] = [None] * len(self.order)
        if not bool(self.problems.any()):
            return reasons
        for row, segment in zip(self.problems.cpu(), self.order, strict=True):
            reasons[segment] = _reason(row, self.parts)
        return reasons


def _reason(row: Tensor, parts: list[str]) -> str | None:
    """The first problem of one stream's row of flags, in words (None if it has none)."""
    for index, part in enumerate(parts):
        if bool(row[0, index]):
            problem = "NaN or infinite values"
        elif bool(row[1, index]):
            problem = "values outside the adapter's bounds (a negative count, variance or weight)"
        else:
            continue
        return (
            f"refused, the stream's state is unchanged: {problem} in {part} after this batch "
            "(are the inputs within the model's range?)"
        )
    return None


class _Batch:
    """The forward in progress: answers the norm layers and stages the new states.

    The last ``source_rows`` rows of the batch are copies of images to be normalised with the
    source statistics: their source predictions come out of the same forward.
    """

    def __init__(
        self,
        layers: Sequence[NormLayer],
        groups: list[_Group],
        window: Tensor,
        source_rows: int = 0,
    ) -> None:
        self.layers = layers
        self.groups = groups
        self.window = window
        self.source_rows = source_rows

    def statistics(self, index: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-image (mean, var) for input ``x`` of BN layer ``index``; stages the new states."""
        # the source rows (if any) are normalised with the source statistics: no moments needed
        adapted = x[: x.shape[0] - self.source_rows]
        sample_mean, sample_var = instance_moments(adapted, self.layers[index].source.mean)
        return self.from_moments(index, sample_mean, sample_var, x.shape[2] * x.shape[3])

    def from_moments(
        self, index: int, sample_mean: Tensor, sample_var: Tensor, pixels: int
    ) -> tuple[Tensor, Tensor]:
        """As :meth:`statistics`, from the input's per-image moments ``[N, C]`` over ``pixels``."""
        source = self.layers[index].source
        means, variances = [], []
        for group in self.groups:
            moments, broken = _moments(
                sample_mean[group.start : group.stop],
                sample_var[group.start : group.stop],
                group.segment,
                group.images,
                pixels,
                group.members,
                group.first,
            )
            mean, var, state = adapted_statistics(
                group.adapter, group.layers[index], moments, source, group.hparams, group.adapt
            )
            if not group.adapt:  # (an adapted group's new state is NaN: refused with it)
                group.broken[index] = broken
            if group.adapt and group.adapter.pseudo_labels:
                group.pending[index] = moments  # folded in once the forward has predicted
            if group.adapt:
                group.layers[index] = {**state, **observe(state, moments, self.window)}
            means.append(mean)
            variances.append(var)
        if self.source_rows:
            means.append(source.mean.float().expand(self.source_rows, -1))
            variances.append(source.var.float().expand(self.source_rows, -1))
        if len(means) == 1:
            return means[0], variances[0]
        return torch.cat([m.float() for m in means]), torch.cat([v.float() for v in variances])


def adapted_statistics(
    adapter: Adapter,
    state: State,
    moments: Moments,
    source: SourceStats,
    hp: HParams,
    adapt: bool,
) -> tuple[Tensor, Tensor, State]:
    """Per-image (mean, var) of one group at one layer, and its new state if ``adapt``.

    The adapter's order: "update, then normalise" or the reverse (``update_first``); a
    ``pseudo_labels`` adapter is updated after the forward (``Engine._fold_pending``).
    """
    if adapt and adapter.update_first:
        state = {**state, **adapter.update(state, moments, source, hp)}
    mean, var = adapter.norm_stats(state, moments, source, hp)
    if adapt and not adapter.update_first and not adapter.pseudo_labels:
        state = {**state, **adapter.update(state, moments, source, hp)}
    if not adapter.per_sample:
        mean, var = moments.per_image(mean), moments.per_image(var)
    return mean, var, state


def _moments(
    sample_mean: Tensor,
    sample_var: Tensor,
    segment: Tensor,
    images: Tensor,
    pixels: int,
    members: Tensor,
    first: Tensor | None = None,
) -> tuple[Moments, Tensor]:
    """Pool per-image moments into per-stream segment moments (law of total variance, fp64).

    One pass: each stream's sums of its images' means and second moments about its first image's
    mean ``first`` [S] (a row index; default: found from ``members``), so the pooled variance
    does not cancel however far the stream is from zero (within a batch, images are a few
    standard deviations apart) and a compiled forward pools with one reduction.

    Non-finite per-image moments are zeroed (elementwise, before the pooling), because the
    one-hot products that pool them would spread NaN to every stream of the group (0 * inf is
    NaN); their streams' pooled means are NaN instead, so that the new state is refused (at
    no extra pass), and which streams had any ``[S]`` is returned too.
    """
    finite = torch.isfinite(sample_mean) & torch.isfinite(sample_var)
    sample_mean = torch.where(finite, sample_mean, 0.0)
    sample_var = torch.where(finite, sample_var, 0.0)
    if first is None:
        first = members.argmax(1)
    shift = sample_mean.index_select(0, first).double()  # [S, C]
    centered = sample_mean.double() - shift.index_select(0, segment)
    second = torch.where(finite, sample_var.double() + centered.square(), 0.0)
    sums = segment_sum(members, torch.stack([centered, second, (~finite).double()], 1))
    count = images[:, None]
    offset = sums[:, 0] / count
    mean = torch.where(sums[:, 2] > 0, math.nan, shift + offset)
    var = (sums[:, 1] / count - offset.square()).clamp(min=0)
    moments = Moments(sample_mean, sample_var, segment, images, pixels, mean, var, members)
    return moments, (sums[:, 2] > 0).any(1)


class Engine:
    """A network served for stream-aware adaptation, with the state pools of its streams.

    Args:
        network: a :class:`~engine.network.Network`, or an eval-mode ``nn.Module`` with
            BatchNorm2d layers (copied into a TorchNetwork on ``device``, never mutated).
        name: the model's name, recorded in exported states (the same for every backend of a
            model, so that states move between them).
        num_classes: size of the logits, for the prediction observer.
        device: where an ``nn.Module`` runs (default cpu); a Network's own device otherwise.
            Every stream state lives there.
        capacity: the most slots of a pool (streams per adapter and state structure); a pool
            starts with 4 and doubles on demand.
        observer_window: images the drift observer remembers per stream.
        autocast_dtype: run the convolutions under autocast (statistics stay fp32/fp64).
        max_state_bytes: bound on the memory of every stream state together (0: none); a
            stream that does not fit is refused with StateMemoryError.
        max_state_header_bytes: largest safetensors header an import may have (0: derived from
            the state layout, see :meth:`header_limit`).
        cuda_graphs: on CUDA, replay each batch layout as a captured graph (LRU of
            ``max_graphs`` layouts). Off by default until its GPU test has run on a GPU
            (tests/adapters/test_gpu.py); the eager path is what docs/performance.md measured.
            Only for a capturable network (PyTorch). With ``mode="compiled"`` it captures
            the compiled step.
        mode: ``eager`` (the reference) or ``compiled``: the adapted forward compiled by
            ``torch.compile`` (inductor), one variant per bucket layout (engine/compiled.py);
            PyTorch networks only. A batch outside the buckets runs eagerly.
        row_buckets, stream_buckets: the sizes a compiled batch's groups are padded to
            (images, streams per group).

    Example:
        >>> engine = Engine(model, num_classes=10, device=torch.device("cpu"))
        >>> stream = engine.open_stream("adabn")
        >>> logits = engine.forward(images, [(stream, len(images))]).logits
    """

    def __init__(
        self,
        network: Network | nn.Module,
        *,
        name: str = "model",
        num_classes: int,
        device: torch.device | str | None = None,
        capacity: int = 256,
        observer_window: int = 1000,
        autocast_dtype: torch.dtype | None = None,
        cuda_graphs: bool = False,
        max_graphs: int = 64,
        max_state_bytes: int = 0,
        max_state_header_bytes: int = 0,
        mode: Literal["eager", "compiled"] = "eager",
        row_buckets: Sequence[int] = DEFAULT_BUCKETS,
        stream_buckets: Sequence[int] = DEFAULT_BUCKETS,
    ) -> None:
        self.name = name
        if isinstance(network, nn.Module):
            network = TorchNetwork(network, torch.device(device or "cpu"))
        elif device is not None and torch.device(device) != network.device:
            raise ValueError(f"the network runs on {network.device}, not on {device}")
        self.network: Network = network
        self.device = network.device
        self.layers = list(network.layers)
        count = len(self.layers)
        self.parts = [
            f"the statistics of BN layer {index} of {count} ({layer.name})"
            for index, layer in enumerate(self.layers)
        ] + ["the prediction observer", "the logits"]
        self.num_classes = num_classes
        self.capacity = capacity
        self.autocast_dtype = autocast_dtype
        self.window = torch.tensor(float(observer_window), dtype=torch.float64, device=self.device)
        self.pools: dict[PoolKey, StatePool] = {}
        self.memory = MemoryBudget(max_state_bytes)
        self.max_state_header_bytes = max_state_header_bytes
        self._layouts: dict[PoolKey, StateLayout] = {}
        self.cuda_graphs = cuda_graphs and network.capturable
        self.max_graphs = max_graphs
        self._graphs: dict[tuple, _CapturedForward] = {}
        self.compiled: CompiledStep | None = None
        if mode == "compiled":
            if not isinstance(network, TorchNetwork):
                raise ValueError("the compiled forward needs a PyTorch network")
            self.compiled = CompiledStep(self._step, row_buckets, stream_buckets)
        on, off = (torch.tensor(v, device=self.device) for v in (True, False))
        self._commit_flags = {True: on, False: off}

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
        config = self.validate_config(spec, config)
        if seed is None:
            seed = getattr(config, "seed", None)
        if seed is None:
            seed = secrets.randbits(63)
        key = _pool_key(spec, config)
        pool = self.pools.get(key)
        if pool is None:
            pool = StatePool(
                spec, config, self.sources, self.num_classes, self.capacity, self.memory
            )
            pool.key = key
            self.pools[key] = pool
        capacity = pool.capacity
        try:
            slot = pool.allocate(config, seed)
        finally:
            if pool.capacity != capacity:
                self._pool_changed(key)
            if pool.empty:
                self._drop_pool(key)
        return StreamHandle(spec.name, config, seed, key, slot)

    def validate_config(self, adapter: Adapter, config: BaseModel | dict | None) -> BaseModel:
        """``config`` checked by the adapter's model, against this model where it depends on it.

        The validation context carries ``num_classes``: a field that must match the model's
        logits (balanced statistics' ``classes``) defaults to it and is refused otherwise.
        Raises pydantic's ValidationError (the service answers 422).
        """
        if isinstance(config, BaseModel):
            config = config.model_dump()
        context = {"num_classes": self.num_classes}
        return adapter.config.model_validate(config or {}, context=context)

    def pool_key(self, adapter: str, config: BaseModel | dict | None = None) -> PoolKey:
        """The pool a stream of this adapter and config lives in (its state's structure)."""
        spec = get_adapter(adapter)
        return _pool_key(spec, self.validate_config(spec, config))

    def close_stream(self, stream: StreamHandle) -> None:
        """Free the stream's slot, and its pool's memory once the pool is empty."""
        pool = self.pools[stream.pool]
        pool.release(stream.slot)
        if pool.empty:
            self._drop_pool(stream.pool)

    def _drop_pool(self, key: PoolKey) -> None:
        self.memory.release(self.pools.pop(key).nbytes)
        self._pool_changed(key)

    def _pool_changed(self, key: PoolKey) -> None:
        """A pool was reallocated or dropped: captured graphs hold its old tensors, and the
        compiled step checks its layouts' guards again."""
        if self.compiled is not None:
            self.compiled.forget(key)
        stale = [layout for layout in self._graphs if any(g[0] == key for g in layout[3])]
        for layout in stale:
            del self._graphs[layout]

    def state_bytes(self) -> dict[str, int]:
        """Bytes of state memory held by each adapter's pools."""
        held: dict[str, int] = {}
        for pool in self.pools.values():
            held[pool.adapter.name] = held.get(pool.adapter.name, 0) + pool.nbytes
        return held

    def slot_bytes(self, adapter: str, config: BaseModel | dict | None = None) -> int:
        """Bytes of the state of one stream of ``adapter`` with ``config`` on this model."""
        spec = get_adapter(adapter)
        return self._layout(spec, self.validate_config(spec, config)).slot_bytes

    def _layout(self, adapter: Adapter, config: BaseModel) -> StateLayout:
        """The layout of a state of this adapter and config (cached; safe from any thread)."""
        key = _pool_key(adapter, config)
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._layouts[key] = state_layout(
                adapter, config, self.sources, self.num_classes
            )
        return layout

    def header_limit(self, layout: StateLayout) -> int:
        """Largest safetensors header accepted for a state of ``layout``.

        Derived unless set: a header entry is under 128 bytes per tensor, plus 64 KiB for the
        metadata (the config, the service's record).
        """
        return self.max_state_header_bytes or 128 * len(layout.shapes) + 65536

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
        identity = self._identity(stream.adapter, stream.config, stream.seed)
        return export_state(self.pools[stream.pool], stream.slot, identity)

    def import_stream(self, stream: StreamHandle, data: bytes) -> StreamHandle:
        """Replace the stream's state by an exported one; StateMismatchError changes nothing.

        The state must come from the same model and adapter with the same config, and hold
        valid values (InvalidStateError otherwise). Returns the stream's handle with the
        exporter's seed, so a later reset re-creates its initial state.
        """
        return self.load_stream(stream, self.parse_state(stream.adapter, stream.config, data))

    def parse_state(
        self, adapter: str, config: BaseModel | dict | None, data: bytes
    ) -> ImportedState:
        """Parse and check exported bytes for a stream of this adapter and config; no pool used.

        Safe to call from any thread (the service parses off the engine thread). The header is
        bounded before it is decoded: at most :meth:`header_limit` bytes and exactly as many
        tensors as the stream's state has.
        """
        spec = get_adapter(adapter)
        config = self.validate_config(spec, config)
        layout = self._layout(spec, config)
        identity = self._identity(spec.name, config)
        tensors, metadata = read_state(
            data,
            expected=identity,
            max_tensors=len(layout.shapes),
            max_header_bytes=self.header_limit(layout),
        )
        check_state(layout, tensors)
        seed = metadata.get("seed")
        if type(seed) is not int or not 0 <= seed <= MAX_SEED:
            raise StateMismatchError(f"state metadata has no valid seed (0 to {MAX_SEED})")
        return ImportedState(tensors, seed)

    def load_stream(self, stream: StreamHandle, state: ImportedState) -> StreamHandle:
        """Write a parsed state into the stream's slot; its handle with the exporter's seed."""
        tensors = {k: v.to(self.device) for k, v in state.tensors.items()}
        self.pools[stream.pool].write(stream.slot, tensors)
        return dataclasses.replace(stream, seed=state.seed)

    def _identity(self, adapter: str, config: BaseModel, seed: int | None = None) -> dict:
        identity = {
            "model": self.name,
            "layers": [layer.source.mean.numel() for layer in self.layers],
            "adapter": adapter,
            "config": config.model_dump(mode="json"),
        }
        return identity if seed is None else {**identity, "seed": seed}

    # --- forward -------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(
        self,
        images: Tensor,
        segments: Sequence[tuple[StreamHandle, int]],
        adapt: bool | Sequence[bool] = True,
        source: Sequence[bool] = (),
    ) -> ForwardResult:
        """Logits for a batch cut into stream segments ``(stream, number of images)``, in order.

        Each stream may appear once per call. With ``adapt`` False for a segment its stream is
        normalised with its current state and left unchanged. A segment whose new state would
        not be finite or valid, or whose logits are not finite, is refused: its stream keeps
        its state, and ``result.refusals()`` says why. The segments flagged in ``source`` also
        get the unadapted model's logits (``result.source_logits``) from the same forward: their
        images run a second time in the batch, normalised with the source statistics.
        """
        flags = [adapt] * len(segments) if isinstance(adapt, bool) else list(adapt)
        if sum(count for _, count in segments) != images.shape[0]:
            raise ValueError("segment sizes do not add up to the batch size")
        if len({(s.pool, s.slot) for s, _ in segments}) != len(segments):
            raise ValueError("a stream may appear only once per forward")
        plan = self._plan(segments, flags, images.shape[1:])
        x = images.to(self.device, non_blocking=True)
        source_rows = self._source_rows(segments, source)
        source_logits = None
        if self.cuda_graphs and self.device.type == "cuda" and source_rows is None:
            logits, problems = self._replay(x, plan)
        else:
            logits, problems, source_logits = self._run(x, plan, True, source_rows)
        indices = [index for group in plan.groups for index in group.indices]
        return ForwardResult(logits, problems, indices, self.parts, source_logits)

    def _source_rows(
        self, segments: Sequence[tuple[StreamHandle, int]], source: Sequence[bool]
    ) -> Tensor | None:
        """The batch rows of the segments flagged in ``source``, in order (None: no flag)."""
        rows: list[int] = []
        start = 0
        for (_, count), flag in zip(segments, source, strict=False):
            if flag:
                rows.extend(range(start, start + count))
            start += count
        return self._to_device(rows, torch.int64) if rows else None

    def warm_up(
        self,
        adapter: str,
        config: BaseModel | dict | None,
        layouts: Sequence[tuple[int, int]],
        shape: Sequence[int],
    ) -> None:
        """Compile the forward of one group of ``(images, streams)`` per layout, at start-up.

        Runs a forward of zeros on temporary streams of ``adapter`` (closed afterwards, so no
        stream changes); ``shape`` is one image's. Nothing to do for an eager engine.
        """
        if self.compiled is None:
            return
        for images, count in layouts:
            if not 1 <= count <= images:
                raise ValueError(f"a layout of {images} images cannot hold {count} streams")
            streams = [self.open_stream(adapter, config, seed=0) for _ in range(count)]
            try:
                sizes = [images // count + (i < images % count) for i in range(count)]
                x = torch.zeros((images, *shape), device=self.device)
                self.forward(x, list(zip(streams, sizes, strict=True)))
            finally:
                for stream in streams:
                    self.close_stream(stream)

    def _run(
        self,
        x: Tensor,
        plan: _Plan,
        commit: bool | Tensor,
        source_rows: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The adapted forward of a planned batch: its logits, its streams' problems, and the
        source logits of ``source_rows`` (copies of those rows appended to the batch).

        Stream states change only if ``commit``, and then only the rows without a problem.
        A bucketed plan runs the compiled step, any other (or one with source rows: a layout
        of its own) the eager one.
        """
        extra = None if source_rows is None else x.index_select(0, source_rows)
        if plan.gather is not None:
            x = x.index_select(0, plan.gather)
        source_logits = None
        if extra is not None:
            count = extra.shape[0]
            logits, problems = self._step(torch.cat([x, extra]), plan.groups, commit, count)
            logits, source_logits = logits[:-count], logits[-count:]
        elif plan.bucket is not None and self.compiled is not None:
            layout = (tuple(x.shape[1:]), plan.bucket)
            flag = self._commit_flags[bool(commit)]
            logits, problems = self.compiled(x, plan.groups, flag, layout)
        else:
            logits, problems = self._step(x, plan.groups, commit)
        if plan.back is not None:
            logits = logits.index_select(0, plan.back)
        if plan.streams is not None:
            problems = problems.index_select(0, plan.streams)
        return logits, problems, source_logits

    def _step(
        self, x: Tensor, groups: list[_Group], commit: bool | Tensor, source_rows: int = 0
    ) -> tuple[Tensor, Tensor]:
        """Gather, forward, check and commit the groups' streams (what the compiled step traces).

        ``x`` holds the groups' rows in order. ``commit`` may be a bool tensor, so that
        committing and not committing are one compiled variant.
        """
        batch = _Batch(self.layers, groups, self.window, source_rows)
        for group in groups:
            group.layers, group.head, group.hparams = group.pool.gather(group.slots)
            group.broken, group.pending = {}, {}
            streams = torch.arange(group.slots.shape[0], device=group.segment.device)
            members = streams[:, None] == group.segment[None, :]
            if group.valid is not None:
                members = members & (group.valid[None, :] > 0)
            group.members = members.double()
            group.images = group.members.sum(1).clamp(min=1)  # a padding stream counts one
            group.first = group.members.argmax(1)  # each stream's first row
        with self._autocast():
            logits = self.network.forward(x, batch).float()
        for group in groups:
            self._fold_pending(group, logits[group.start : group.stop])
        problems = [self._problems(group, logits[group.start : group.stop]) for group in groups]
        # Only now, with the whole batch computed, do the streams' states change.
        if commit is not False:
            for group, flags in zip(groups, problems, strict=True):
                if group.adapt:
                    _commit(group, ~flags.flatten(1).any(1) & commit)
        return logits, torch.cat(problems)

    def _fold_pending(self, group: _Group, logits: Tensor) -> None:
        """Stage the update of a pseudo-label adapter: each layer's moments with the predictions.

        Its layers normalised with the state from before this batch; only now, with the logits,
        is each image's predicted class known (the current forward's, not a previous one's).
        """
        if not group.pending:
            return
        labels = logits.argmax(1)
        for index, moments in group.pending.items():
            state = group.layers[index]
            labelled = dataclasses.replace(moments, labels=labels)
            new = group.adapter.update(state, labelled, self.layers[index].source, group.hparams)
            group.layers[index] = {**state, **new}

    def _problems(self, group: _Group, logits: Tensor) -> Tensor:
        """The group's streams' problems ``[S, 2, parts]``: staged states, then logits.

        A layer's statistics count as not finite for a stream whose images had non-finite
        moments there: an adapted stream's new state is NaN there (see ``_moments``), and a
        stream that does not adapt is flagged from the moments.
        """
        finite = torch.isfinite(logits).all(1)
        bad_logits = segment_sum(group.members, (~finite).double()) > 0  # [S]
        streams = bad_logits.shape[0]
        if group.adapt:
            # Zeroed like the moments, so that one stream's NaN logits stay its own.
            rows = torch.where(finite[:, None], logits, 0.0)
            group.head = observe_head(group.head, rows, group.members, self.window)
            group.staged = group.pool.pack(group.layers, group.head)
            state = group.pool.problems(group.staged)
        else:
            state = bad_logits.new_zeros((streams, 2, len(self.layers) + 1))
            broken = torch.stack([group.broken[index] for index in range(len(self.layers))], 1)
            state[:, 0, : len(self.layers)] |= broken
        logit_flags = torch.stack([bad_logits, torch.zeros_like(bad_logits)], 1)
        return torch.cat([state, logit_flags[:, :, None]], 2)

    def _replay(self, x: Tensor, plan: _Plan) -> tuple[Tensor, Tensor]:
        """The forward as one CUDA graph replay, captured once per batch layout.

        Eagerly, the statistics cost hundreds of tiny kernel launches per forward, which
        dominate on a GPU; a replay launches them all at once. A layout is the batch shape
        and, per group, its pool, ``adapt`` flag, rows and number of streams; the slots,
        segments and images are copied into the graph's static inputs. The whole forward,
        the commit of the new states included, is one replay: it cannot fail half-way. A
        bucketed plan captures the compiled step (the engine's own capture: inductor's
        ``reduce-overhead`` would not capture a step that writes the state pools).
        """
        key = (
            tuple(x.shape),
            x.dtype,
            plan.bucket,
            tuple(None if t is None else t.shape for t in (plan.gather, plan.back, plan.streams)),
            tuple((g.pool.key, g.adapt, g.start, g.stop, g.slots.shape[0]) for g in plan.groups),
        )
        graph = self._graphs.pop(key, None)
        if graph is None:
            graph = _CapturedForward(self, x, plan)
            while len(self._graphs) >= self.max_graphs:
                self._graphs.pop(next(iter(self._graphs)))
        self._graphs[key] = graph  # most recently used last
        return graph.replay(x, plan)

    @torch.inference_mode()
    def forward_source(self, images: Tensor) -> Tensor:
        """Logits of the unadapted source model."""
        x = images.to(self.device, non_blocking=True)
        with self._autocast():
            return self.network.forward(x, None).float()

    def _autocast(self) -> torch.autocast:
        # No weight-cast cache: it would hold tensors across CUDA graph captures.
        return torch.autocast(
            self.device.type,
            self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
            cache_enabled=False,
        )

    def _plan(
        self,
        segments: Sequence[tuple[StreamHandle, int]],
        flags: list[bool],
        shape: Sequence[int] = (),
    ) -> _Plan:
        """Group segments by (pool, adapt) into contiguous rows, padded to buckets if compiled.

        A batch that fits the buckets (every group's rows and streams) is bucketed; any other
        runs eagerly, at its own sizes. The plan's index tensors are views of one tensor, built
        on the host and copied to the device at once.
        """
        grouped: dict[tuple[PoolKey, bool], list[tuple[int, StreamHandle, int, int]]] = {}
        start = 0
        for index, ((stream, count), flag) in enumerate(zip(segments, flags, strict=True)):
            if count < 1:
                raise ValueError("every segment needs at least one image")
            grouped.setdefault((stream.pool, flag), []).append((start, stream, count, index))
            start += count
        padded = None
        if self.compiled is not None:
            padded = self.compiled.pad(
                shape,
                [
                    (key, flag, sum(count for _, _, count, _ in members), len(members))
                    for (key, flag), members in grouped.items()
                ],
            )
        rows: list[int] = []  # the caller's row of each forward row
        back = [0] * start  # the forward's row of each caller's row
        streams: list[int] = []  # the forward's stream of each real stream
        spans: list[tuple[int, int]] = []  # each group's rows
        lists: list[list[int]] = []  # each group's slots, segment (and valid, source: padded)
        padded_streams = 0
        for number, members in enumerate(grouped.values()):
            first = len(rows)
            segment: list[int] = []
            for position, (offset, _, count, _) in enumerate(members):
                back[offset : offset + count] = range(len(rows), len(rows) + count)
                rows.extend(range(offset, offset + count))
                segment.extend([position] * count)
            slots = [s.slot for _, s, _, _ in members]
            if padded is None:
                lists += [slots, segment]
            else:
                group_rows, group_streams = padded[number]
                extra_rows, extra = group_rows - len(segment), group_streams - len(slots)
                rows.extend([rows[first]] * extra_rows)  # a real image, in no stream
                streams.extend(range(padded_streams, padded_streams + len(slots)))
                padded_streams += group_streams
                # Padding streams copy the last real stream: same slot, same state, same
                # committed values, so the duplicate writes agree.
                lists += [
                    slots + [slots[-1]] * extra,
                    segment + [0] * extra_rows,
                    [1] * len(segment) + [0] * extra_rows,  # valid: 0 for a padding row
                    [*range(len(slots)), *[len(slots) - 1] * extra],  # source: the copied stream
                ]
            spans.append((first, len(rows)))
        if padded is None and rows == list(range(len(rows))):
            plan_lists = []  # gather and back are the identity
        else:
            plan_lists = [rows, back] + ([] if padded is None else [streams])
        packed, views = self._pack(lists + plan_lists)
        per_group = len(lists) // len(spans)
        groups = []
        for number, ((key, flag), members) in enumerate(grouped.items()):
            pool = self.pools[key]
            own = views[number * per_group : (number + 1) * per_group]
            valid, source = (None, None) if padded is None else own[2:]
            groups.append(
                _Group(
                    adapter=pool.adapter,
                    pool=pool,
                    start=spans[number][0],
                    stop=spans[number][1],
                    adapt=flag,
                    slots=own[0],
                    segment=own[1],
                    valid=valid,
                    source=source,
                    indices=[i for _, _, _, i in members],
                )
            )
        plan = _Plan(groups, packed)
        if plan_lists:
            gather, back_rows = views[len(lists) : len(lists) + 2]
            plan = dataclasses.replace(plan, gather=gather, back=back_rows)
        if padded is not None:
            layout = [(g.pool.key, g.adapt, g.stop - g.start, g.slots.shape[0]) for g in groups]
            plan = dataclasses.replace(plan, streams=views[-1], bucket=tuple(layout))
        return plan

    def _pack(self, lists: list[list[int]]) -> tuple[Tensor, list[Tensor]]:
        """Host index lists as views of one int64 device tensor (one copy to the device)."""
        packed = self._to_device([value for values in lists for value in values], torch.int64)
        return packed, list(packed.split([len(values) for values in lists]))

    def _to_device(self, values: list, dtype: torch.dtype) -> Tensor:
        """A small host list as a device tensor, without a blocking copy on CUDA."""
        tensor = torch.tensor(values, dtype=dtype)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)


def _pool_key(adapter: Adapter, config: BaseModel) -> PoolKey:
    return adapter.name, tuple((name, getattr(config, name)) for name in adapter.structural)


def _commit(group: _Group, keep: Tensor) -> None:
    """Write the group's staged states where ``keep`` [S]; padding streams write their copies."""
    staged = group.staged
    if group.source is not None:
        # A padding stream has its source stream's slot: give it the same values and flag.
        keep = keep.index_select(0, group.source)
        staged = {dtype: rows.index_select(0, group.source) for dtype, rows in staged.items()}
    group.pool.commit(group.slots, staged, keep)


class _CapturedForward:
    """One batch layout's forward captured as a CUDA graph, with its static inputs."""

    def __init__(self, engine: Engine, x: Tensor, plan: _Plan) -> None:
        self.x = x.clone()
        self.plan = _static_copy(plan)
        # Warm up on a side stream (cuDNN picks its kernels, workspaces are allocated)
        # without committing: a warm-up must not change any stream.
        side = torch.cuda.Stream(engine.device)
        side.wait_stream(torch.cuda.current_stream(engine.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                engine._run(self.x, self.plan, commit=False)  # warm-up
        torch.cuda.current_stream(engine.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits, self.problems, _ = engine._run(self.x, self.plan, commit=True)

    def replay(self, x: Tensor, plan: _Plan) -> tuple[Tensor, Tensor]:
        """Copy this batch into the static inputs, replay, and return copies of the outputs."""
        self.x.copy_(x, non_blocking=True)
        self.plan.packed.copy_(plan.packed, non_blocking=True)
        self.graph.replay()
        return self.logits.clone(), self.problems.clone()


def _static_copy(plan: _Plan) -> _Plan:
    """The plan with its own copy of its index tensors (a captured graph's inputs)."""
    packed = plan.packed.clone()
    groups = [
        dataclasses.replace(
            g,
            slots=_view_of(packed, g.slots),
            segment=_view_of(packed, g.segment),
            valid=_view_of(packed, g.valid),
            source=_view_of(packed, g.source),
        )
        for g in plan.groups
    ]
    return dataclasses.replace(
        plan,
        groups=groups,
        packed=packed,
        gather=_view_of(packed, plan.gather),
        back=_view_of(packed, plan.back),
        streams=_view_of(packed, plan.streams),
    )


@overload
def _view_of(packed: Tensor, view: Tensor) -> Tensor: ...
@overload
def _view_of(packed: Tensor, view: None) -> None: ...
def _view_of(packed: Tensor, view: Tensor | None) -> Tensor | None:
    """The view of ``packed`` that ``view`` is of the tensor ``packed`` copies."""
    if view is None:
        return None
    return packed.as_strided(view.shape, view.stride(), view.storage_offset())
