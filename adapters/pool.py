"""The state pool: every stream's state of one (adapter, structure), one slot per stream.

Per BN layer and state name, one tensor with a leading slot dimension (``[capacity, C]``,
``[capacity, K, C]``) on the model's device; per-stream hyperparameters are ``[capacity]`` tensors.
A stream is a slot index, so a batch that mixes streams gathers its rows with one
``index_select`` per tensor, computes new rows, and commits them with one ``index_copy_``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel
from torch import Tensor

from adapters.base import Adapter, SourceStats, State
from adapters.drift import init_head, init_observer


class PoolFullError(RuntimeError):
    """No free slot is left in a pool."""


class StatePool:
    """Slots of per-layer state tensors for the streams of one adapter and state structure."""

    def __init__(
        self,
        adapter: Adapter,
        template: BaseModel,
        sources: Sequence[SourceStats],
        num_classes: int,
        capacity: int,
    ) -> None:
        self.adapter = adapter
        self.key: object = adapter.name  # the engine's pool key, set by the engine
        self.sources = list(sources)
        self.capacity = capacity
        self.num_classes = num_classes
        device = sources[0].mean.device
        fresh = self._fresh(template, torch.Generator().manual_seed(0))
        self.layers: list[State] = [_slotted(state, capacity) for state in fresh[0]]
        self.head: State = _slotted(fresh[1], capacity)
        self.hparams: dict[str, Tensor] = {
            key: torch.zeros(capacity, dtype=torch.float64, device=device)
            for key in adapter.hparams(template)
        }
        self._free = list(range(capacity - 1, -1, -1))

    @property
    def free(self) -> int:
        """Number of free slots."""
        return len(self._free)

    def allocate(self, config: BaseModel, seed: int) -> int:
        """Take a free slot and give it a fresh state for ``config``."""
        if not self._free:
            raise PoolFullError(
                f"all {self.capacity} slots of the {self.adapter.name} pool are in use"
            )
        slot = self._free.pop()
        self.initialize(slot, config, seed)
        return slot

    def release(self, slot: int) -> None:
        """Give a slot back."""
        self._free.append(slot)

    def initialize(self, slot: int, config: BaseModel, seed: int) -> None:
        """Write a fresh state (and the config's hyperparameters) into a slot."""
        layers, head = self._fresh(config, torch.Generator().manual_seed(seed))
        self.write(slot, _flatten(layers, head))
        for key, value in self.adapter.hparams(config).items():
            self.hparams[key][slot] = value

    def gather(self, slots: Tensor) -> tuple[list[State], State, dict[str, Tensor]]:
        """Copies of the rows of ``slots``: the staging state of a batch."""
        layers = [{k: v.index_select(0, slots) for k, v in state.items()} for state in self.layers]
        head = {k: v.index_select(0, slots) for k, v in self.head.items()}
        hparams = {k: v.index_select(0, slots) for k, v in self.hparams.items()}
        return layers, head, hparams

    def commit(self, slots: Tensor, layers: Sequence[State], head: State) -> None:
        """Write a batch's new rows back; called only once the whole batch has succeeded."""
        for pooled, new in zip(self.layers, layers, strict=True):
            for key, value in new.items():
                pooled[key].index_copy_(0, slots, value)
        for key, value in head.items():
            self.head[key].index_copy_(0, slots, value)

    def read(self, slot: int) -> dict[str, Tensor]:
        """One stream's whole state as flat named tensors (copies), for export and persistence."""
        return _flatten(
            [{k: v[slot].clone() for k, v in state.items()} for state in self.layers],
            {k: v[slot].clone() for k, v in self.head.items()},
        )

    def layout(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of one stream's flat state."""
        flat = _flatten(
            [{k: v[0] for k, v in state.items()} for state in self.layers],
            {k: v[0] for k, v in self.head.items()},
        )
        return {key: (tuple(value.shape), value.dtype) for key, value in flat.items()}

    def write(self, slot: int, flat: dict[str, Tensor]) -> None:
        """Overwrite one stream's state from flat named tensors (names checked by the caller)."""
        for index, state in enumerate(self.layers):
            for key, pooled in state.items():
                pooled[slot] = flat[f"layer{index}.{key}"]
        for key, pooled in self.head.items():
            pooled[slot] = flat[key]

    def _fresh(self, config: BaseModel, generator: torch.Generator) -> tuple[list[State], State]:
        layers = [
            {**self.adapter.init_state(source, config, generator), **init_observer(source)}
            for source in self.sources
        ]
        return layers, init_head(self.num_classes, self.sources[0].mean.device)


def _slotted(state: State, capacity: int) -> State:
    return {
        k: v.unsqueeze(0).repeat(capacity, *([1] * v.ndim)).contiguous() for k, v in state.items()
    }


def _flatten(layers: Sequence[State], head: State) -> dict[str, Tensor]:
    flat = {f"layer{index}.{k}": v for index, state in enumerate(layers) for k, v in state.items()}
    flat.update(head)
    return flat
