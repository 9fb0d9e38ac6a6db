"""The state pool: every stream's state of one (adapter, structure), one slot per stream.

A slot is one row of a flat buffer per dtype (``[capacity, F]``, every layer's and the head's
state tensors side by side, on the model's device); ``layers`` and ``head`` are named views into
it (``[capacity, C]``, ``[capacity, K, C]``), and per-stream hyperparameters are ``[capacity]``
tensors. A stream is a slot index, so a batch that mixes streams gathers its rows with one
``index_select`` per buffer, computes new rows, checks them and commits them with one
``index_copy_`` per buffer, whatever the number of layers: a few kernels, not a few per layer.

A pool starts small and doubles its capacity on demand, up to ``max_capacity`` slots, within the
engine's :class:`MemoryBudget`: a configuration nobody uses costs nothing, and one that is used
costs about what its streams need.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from pydantic import BaseModel
from torch import Tensor

from adapters.base import Adapter, Bounds, InvalidStateError, SourceStats, State
from adapters.drift import HEAD_BOUNDS, OBSERVER_BOUNDS, init_head, init_observer

INITIAL_SLOTS = 4
UNBOUNDED = (-math.inf, math.inf)


class PoolFullError(RuntimeError):
    """No free slot is left in a pool."""


class StateMemoryError(PoolFullError):
    """The engine's state memory limit leaves no room for another slot."""


class MemoryBudget:
    """The bytes of state memory an engine's pools hold, bounded by ``limit`` (0: unlimited)."""

    def __init__(self, limit: int = 0) -> None:
        self.limit = limit
        self.used = 0

    def available(self) -> float:
        """Bytes that may still be reserved."""
        return math.inf if not self.limit else self.limit - self.used

    def reserve(self, nbytes: int, what: str) -> None:
        """Count ``nbytes`` more as used; StateMemoryError (nothing counted) beyond the limit."""
        if nbytes > self.available():
            raise StateMemoryError(
                f"{what} needs {nbytes} bytes of state memory, but {self.used} of the "
                f"{self.limit} bytes allowed (max_state_bytes) are in use"
            )
        self.used += nbytes

    def release(self, nbytes: int) -> None:
        """Give ``nbytes`` back."""
        self.used -= nbytes


@dataclass(frozen=True)
class StateLayout:
    """One stream's flat state: each tensor's shape and dtype, and each name's valid interval."""

    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]
    bounds: Bounds  # by state name (``m2``), shared by every layer
    hparams: tuple[str, ...]

    @property
    def slot_bytes(self) -> int:
        """Bytes of one slot: its state tensors and its hyperparameters (float64)."""
        state = sum(math.prod(shape) * dtype.itemsize for shape, dtype in self.shapes.values())
        return state + 8 * len(self.hparams)

    def check(self, tensors: Mapping[str, Tensor]) -> None:
        """Raise InvalidStateError unless every tensor is finite and within its bounds.

        Names and shapes are checked first (StateMismatchError from ``state_io``): this is
        about the values, for imports and for anything loaded from a store.
        """
        for name, tensor in tensors.items():
            if not bool(torch.isfinite(tensor).all()):
                raise InvalidStateError(f"state tensor {name} holds NaN or infinite values")
            key = name if name.startswith("head.") else name.partition(".")[2]
            low, high = self.bounds.get(key, UNBOUNDED)
            if bool((tensor < low).any()) or bool((tensor > high).any()):
                raise InvalidStateError(
                    f"state tensor {name} holds values outside [{low}, {high}] "
                    "(a negative count, variance or weight)"
                )


def fresh_state(
    adapter: Adapter,
    config: BaseModel,
    sources: Sequence[SourceStats],
    num_classes: int,
    generator: torch.Generator,
) -> tuple[list[State], State]:
    """One stream's fresh state: the adapter's and the drift observer's per layer, and the head."""
    layers = [
        {**adapter.init_state(source, config, generator), **init_observer(source)}
        for source in sources
    ]
    return layers, init_head(num_classes, sources[0].mean.device)


def state_layout(
    adapter: Adapter, config: BaseModel, sources: Sequence[SourceStats], num_classes: int
) -> StateLayout:
    """The layout of the state of a stream with this adapter and config."""
    layers, head = fresh_state(adapter, config, sources, num_classes, torch.Generator())
    flat = flatten(layers, head)
    return StateLayout(
        shapes={key: (tuple(value.shape), value.dtype) for key, value in flat.items()},
        bounds={**adapter.bounds, **OBSERVER_BOUNDS, **HEAD_BOUNDS},
        hparams=tuple(adapter.hparams(config)),
    )


class StatePool:
    """Slots of per-layer state tensors for the streams of one adapter and state structure.

    Args:
        adapter: the adapter of every stream in the pool.
        template: a config of the pool's structure (e.g. UnMix-TNS's K).
        sources: the model's BN layers' source statistics.
        num_classes: size of the logits (the prediction observer's class counts).
        capacity: the most slots the pool may grow to.
        budget: the engine's state memory, reserved as the pool grows.
    """

    def __init__(
        self,
        adapter: Adapter,
        template: BaseModel,
        sources: Sequence[SourceStats],
        num_classes: int,
        capacity: int,
        budget: MemoryBudget | None = None,
    ) -> None:
        self.adapter = adapter
        self.key: object = adapter.name  # the engine's pool key, set by the engine
        self.sources = list(sources)
        self.max_capacity = capacity
        self.num_classes = num_classes
        self.budget = budget if budget is not None else MemoryBudget()
        self.layout = state_layout(adapter, template, self.sources, num_classes)
        initial = max(1, self._affordable(min(INITIAL_SLOTS, capacity), 0))
        self.budget.reserve(initial * self.layout.slot_bytes, f"a new {adapter.name} pool")
        self.capacity = initial
        fresh = fresh_state(adapter, template, self.sources, num_classes, torch.Generator())
        self.columns = _Columns(fresh[0], fresh[1], self.layout.bounds)
        one = self.columns.pack(
            [_one_slot(state) for state in fresh[0]], _one_slot(fresh[1])
        )  # [1, F] per dtype
        self.buffers: dict[torch.dtype, Tensor] = {
            dtype: row.repeat(initial, 1) for dtype, row in one.items()
        }
        self.layers: list[State] = []
        self.head: State = {}
        self._view()
        device = self.sources[0].mean.device
        self.hparams: dict[str, Tensor] = {
            key: torch.zeros(initial, dtype=torch.float64, device=device)
            for key in self.layout.hparams
        }
        self._free = list(range(initial - 1, -1, -1))

    @property
    def free(self) -> int:
        """Number of free slots (at the current capacity)."""
        return len(self._free)

    @property
    def empty(self) -> bool:
        """True when no slot is in use."""
        return len(self._free) == self.capacity

    @property
    def nbytes(self) -> int:
        """Bytes held by the pool's tensors."""
        return self.capacity * self.layout.slot_bytes

    def allocate(self, config: BaseModel, seed: int) -> int:
        """Take a free slot (the pool grows if it must) and give it a fresh state for ``config``."""
        if not self._free:
            self._grow()
        slot = self._free.pop()
        self.initialize(slot, config, seed)
        return slot

    def release(self, slot: int) -> None:
        """Give a slot back."""
        self._free.append(slot)

    def initialize(self, slot: int, config: BaseModel, seed: int) -> None:
        """Write a fresh state (and the config's hyperparameters) into a slot."""
        generator = torch.Generator().manual_seed(seed)
        layers, head = fresh_state(self.adapter, config, self.sources, self.num_classes, generator)
        self.write(slot, flatten(layers, head))
        for key, value in self.adapter.hparams(config).items():
            self.hparams[key][slot] = value

    def gather(self, slots: Tensor) -> tuple[list[State], State, dict[str, Tensor]]:
        """Copies of the rows of ``slots``: the staging state of a batch (named views of one
        gathered copy per buffer)."""
        rows = {dtype: buffer.index_select(0, slots) for dtype, buffer in self.buffers.items()}
        layers, head = self.columns.unpack(rows)
        hparams = {k: v.index_select(0, slots) for k, v in self.hparams.items()}
        return layers, head, hparams

    def pack(self, layers: Sequence[State], head: State) -> dict[torch.dtype, Tensor]:
        """Staged states as rows of the buffers: ``{dtype: [S, F]}``."""
        return self.columns.pack(layers, head)

    def problems(self, rows: dict[torch.dtype, Tensor]) -> Tensor:
        """What is wrong with each packed row: ``[S, 2, layers + 1]`` bool, on the device.

        ``[s, 0, p]``: row s holds a NaN or infinite value in part p (each BN layer, then the
        head); ``[s, 1, p]``: a value outside the adapter's bounds there. Per buffer one
        elementwise check and one product with the columns' part membership, no host sync: the
        forward reads it back with the logits.
        """
        counts = []
        for dtype, row in rows.items():
            low, high, parts = self.columns.checks[dtype]
            flags = torch.stack([~torch.isfinite(row), (row < low) | (row > high)], 1)
            counts.append(flags.float() @ parts)  # [S, 2, parts]: flagged columns per part
        return sum(counts[1:], counts[0]) > 0

    def commit(self, slots: Tensor, rows: dict[torch.dtype, Tensor], keep: Tensor) -> None:
        """Write a batch's packed new rows back where ``keep`` [S] is True (the others stay).

        Called only once the whole batch has succeeded. A masked write rather than a selection
        of the kept slots: the shapes stay static, so it also runs inside a CUDA graph.
        """
        for dtype, buffer in self.buffers.items():
            old = buffer.index_select(0, slots)
            buffer.index_copy_(0, slots, torch.where(keep[:, None], rows[dtype], old))

    def read(self, slot: int) -> dict[str, Tensor]:
        """One stream's whole state as flat named tensors (copies), for export and persistence."""
        return flatten(
            [{k: v[slot].clone() for k, v in state.items()} for state in self.layers],
            {k: v[slot].clone() for k, v in self.head.items()},
        )

    def write(self, slot: int, flat: Mapping[str, Tensor]) -> None:
        """Overwrite one stream's state from flat named tensors (names checked by the caller)."""
        for index, state in enumerate(self.layers):
            for key, pooled in state.items():
                pooled[slot] = flat[f"layer{index}.{key}"]
        for key, pooled in self.head.items():
            pooled[slot] = flat[key]

    def _affordable(self, wanted: int, current: int) -> int:
        """The largest capacity up to ``wanted`` whose growth from ``current`` fits the budget."""
        available = self.budget.available()
        if available == math.inf:
            return wanted
        return int(min(wanted, current + available // self.layout.slot_bytes))

    def _grow(self) -> None:
        """Double the capacity (up to the maximum, within the memory budget)."""
        if self.capacity >= self.max_capacity:
            raise PoolFullError(
                f"all {self.max_capacity} slots of the {self.adapter.name} pool are in use"
            )
        old = self.capacity
        new = self._affordable(min(2 * old, self.max_capacity), old)
        if new <= old:
            new = old + 1  # the reservation below fails with the budget's message
        self.budget.reserve((new - old) * self.layout.slot_bytes, f"a {self.adapter.name} slot")
        self.buffers = {dtype: _extend(v, new) for dtype, v in self.buffers.items()}
        self._view()
        self.hparams = {k: _extend(v, new) for k, v in self.hparams.items()}
        self.capacity = new
        self._free = list(range(new - 1, old - 1, -1))

    def _view(self) -> None:
        """Point ``layers`` and ``head`` at the (new) buffers."""
        self.layers, self.head = self.columns.unpack(self.buffers)


class _Columns:
    """Where each state tensor of a slot lives in the flat buffers: per dtype, each tensor's
    columns in order (every layer's, then the head's), and per column its bounds and part."""

    def __init__(self, layers: Sequence[State], head: State, bounds: Bounds) -> None:
        self.places: list[list[tuple[str, torch.dtype, int, tuple[int, ...]]]] = []
        widths: dict[torch.dtype, int] = {}
        columns: dict[torch.dtype, list[tuple[float, float, int]]] = {}
        for part, state in enumerate([*layers, head]):
            places = []
            for key, value in state.items():
                dtype, size = value.dtype, value.numel()
                places.append((key, dtype, widths.get(dtype, 0), tuple(value.shape)))
                widths[dtype] = widths.get(dtype, 0) + size
                low, high = bounds.get(key, UNBOUNDED)
                columns.setdefault(dtype, []).extend([(low, high, part)] * size)
            self.places.append(places)
        device = head[next(iter(head))].device
        self.checks: dict[torch.dtype, tuple[Tensor, Tensor, Tensor]] = {}
        for dtype, column in columns.items():
            low, high, part = torch.tensor(column, dtype=torch.float64, device=device).T
            membership = torch.nn.functional.one_hot(part.long(), len(self.places)).float()
            self.checks[dtype] = (low.to(dtype), high.to(dtype), membership)

    def pack(self, layers: Sequence[State], head: State) -> dict[torch.dtype, Tensor]:
        """States ``[S, ...]`` per part and name as ``{dtype: [S, F]}`` (one concatenation)."""
        pieces: dict[torch.dtype, list[Tensor]] = {}
        for places, state in zip(self.places, [*layers, head], strict=True):
            for key, dtype, _, _ in places:
                value = state[key]
                pieces.setdefault(dtype, []).append(value.reshape(value.shape[0], -1))
        return {dtype: torch.cat(values, 1) for dtype, values in pieces.items()}

    def unpack(self, rows: dict[torch.dtype, Tensor]) -> tuple[list[State], State]:
        """Named views ``[S, ...]`` of the rows ``{dtype: [S, F]}``: per layer, and the head."""
        parts = [
            {
                key: rows[dtype][:, start : start + math.prod(shape)].view(-1, *shape)
                for key, dtype, start, shape in places
            }
            for places in self.places
        ]
        return parts[:-1], parts[-1]


def _one_slot(state: State) -> State:
    return {k: v.unsqueeze(0) for k, v in state.items()}


def _extend(tensor: Tensor, capacity: int) -> Tensor:
    """``tensor`` with zero rows appended up to ``capacity`` (a new allocation)."""
    grown = tensor.new_zeros((capacity, *tensor.shape[1:]))
    grown[: tensor.shape[0]] = tensor
    return grown


def flatten(layers: Sequence[State], head: State) -> dict[str, Tensor]:
    """A stream's per-layer and head states as flat named tensors (``layer3.m2``, ``head.n``)."""
    flat = {f"layer{index}.{k}": v for index, state in enumerate(layers) for k, v in state.items()}
    flat.update(head)
    return flat
