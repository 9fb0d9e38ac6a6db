"""The adapted forward compiled by ``torch.compile`` (inductor), one variant per bucket layout.

Eagerly, every BN layer of an adapted forward runs dozens of tiny ops (instance moments, segment
sums, fp64 merges, the adapter's arithmetic, the drift observer); the plain forward runs one.
Compiled, inductor fuses each layer's statistics, adapter and observer arithmetic into a few
kernels, and the state gather and commit into the same graph.

A compiled graph has static shapes, so the sizes that vary from batch to batch are padded: each
group of a batch (streams of one pool) to a bucket of rows (images) and of streams. A padding row
repeats a real image of the group and belongs to no stream (its column of the one-hot
membership matrix is zero, so no sum sees it); a padding stream copies the group's last real
stream (slot, state, images = 1), and its new state is replaced by that stream's before the
commit, so duplicate writes to the slot agree. The pools' slot dimension is marked dynamic, so
a growing pool does not recompile. So the variants are the bucket layouts that occur, at most
``max_variants`` (a layout beyond that runs the eager step, unpadded: same results).

Compiling a layout takes tens of seconds (a minute on a small CPU), on the batch that first has
it: warm the expected layouts at start-up. (Compiling on another thread while the engine thread
runs eagerly is not safe: inductor's FX tracer patches ``nn.Module.__call__`` process-wide while
it traces, and an eager forward on another thread then fails.)

The eager engine stays the reference: ``Engine(mode="eager")`` is the default, and every
compiled result equals the eager one to float tolerance (tests/engine/test_compiled.py).
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch._dynamo
from torch import Tensor

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MAX_VARIANTS = 64
# Where bench.engine --mode compiled measured the compiled adapted forward faster than the eager
# one at every batch size (docs/performance.md): what ``engine_mode=auto`` compiles on.
# CPU: 0.21-0.53x the eager time at batch 1 and 256, every adapter (CPU, AMD EPYC, 2 cores), but
# each new layout compiles for 30-100 s on the batch that first has it: not a default for a
# server whose layouts vary (docs/performance.md). CUDA: not measured yet (no GPU lent).
FASTER_ON: dict[str, bool] = {"cpu": False, "cuda": False}

Layout = tuple  # (image shape, per group: (pool key, adapt, rows, streams))


class CompiledStep:
    """The engine's step compiled once per bucket layout.

    Args:
        step: the eager step ``(x, groups, commit) -> (logits, problems)``.
        row_buckets: the sizes a group's images are padded to (ascending).
        stream_buckets: the sizes a group's streams are padded to.
        max_variants: the most layouts compiled; later new ones run ``step`` eagerly.
        mode: inductor's mode (None: the default; on CUDA the engine captures the graphs
            itself, see ``Engine(cuda_graphs=True)``).
    """

    def __init__(
        self,
        step: Callable[..., tuple[Tensor, Tensor]],
        row_buckets: Sequence[int] = DEFAULT_BUCKETS,
        stream_buckets: Sequence[int] = DEFAULT_BUCKETS,
        max_variants: int = MAX_VARIANTS,
        mode: str | None = None,
    ) -> None:
        if not row_buckets or not stream_buckets or min(*row_buckets, *stream_buckets) < 1:
            raise ValueError("buckets must be positive sizes")
        self.rows = sorted(set(row_buckets))
        self.streams = sorted(set(stream_buckets))
        self.max_variants = max_variants
        self.step = step
        self.compiled = torch.compile(step, fullgraph=True, dynamic=False, mode=mode)
        self.variants: set[Layout] = set()  # every layout compiled (or compiling)
        self.ready: set[tuple] = set()  # (layout, dtype, device) that ran compiled once
        self._configured = threading.local()

    def pad(
        self, shape: Sequence[int], groups: Sequence[tuple[object, bool, int, int]]
    ) -> list[tuple[int, int]] | None:
        """Each group's (rows, streams) padded to its buckets, from (pool key, adapt, rows,
        streams) and the image ``shape``; None (run eagerly, unpadded) if one does not fit or
        the layout would be one variant too many."""
        padded = []
        for _, _, rows, streams in groups:
            row_bucket = _bucket(self.rows, rows)
            stream_bucket = _bucket(self.streams, streams)
            if row_bucket is None or stream_bucket is None:
                return None
            padded.append((row_bucket, min(stream_bucket, row_bucket)))
        layout = (
            tuple(shape),
            tuple((g[0], g[1], *size) for g, size in zip(groups, padded, strict=True)),
        )
        if layout not in self.variants:
            if len(self.variants) >= self.max_variants:
                return None
            log.info("compiling the adapted forward for layout %s", layout)
            self.variants.add(layout)
        return padded

    def __call__(
        self, x: Tensor, groups: list, commit: Tensor, layout: Layout
    ) -> tuple[Tensor, Tensor]:
        """The compiled step on a batch padded by :meth:`pad` to ``layout``.

        A layout that ran before, on pools that have not changed since (:meth:`forget`),
        evaluates only the guards that tell the compiled variants apart
        (``skip_guard_eval_unsafe``): at batch 1 the full set (every weight, source statistic,
        pool buffer and hparam tensor: ~1,000 checks) cost 0.2 ms of a 2.4 ms forward on the CPU.
        A new layout, dtype, device or pool runs every guard (dynamo compiles what it must); so
        does a call that dynamo finds would need a recompile despite that.
        """
        if not getattr(self._configured, "done", False):
            # One code object compiled per layout: dynamo's default limit (8) would fall back.
            # Dynamo's config is per thread: set it in each thread that calls.
            config: Any = torch._dynamo.config
            config.recompile_limit = max(config.recompile_limit, self.max_variants)
            config.accumulated_recompile_limit = max(
                config.accumulated_recompile_limit, 4 * self.max_variants
            )
            self._configured.done = True
        for group in groups:
            mark_pool(group.pool)
        key = (layout, x.dtype, x.device)
        if key in self.ready:
            try:
                with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                    return self.compiled(x, groups, commit)
            except RuntimeError as error:  # raised before anything ran
                if "skip_guard_eval_unsafe" not in str(error):
                    raise
                log.info("layout %s needs its guards checked again", layout)
        result = self.compiled(x, groups, commit)
        self.ready.add(key)
        return result

    def forget(self, pool_key: object) -> None:
        """A pool was replaced or reallocated: check every guard of its layouts again once."""
        self.ready = {key for key in self.ready if all(g[0] != pool_key for g in key[0][1])}


def compiled_is_faster(device_type: str) -> bool:
    """Whether the benchmark showed the compiled forward faster on this kind of device."""
    return FASTER_ON.get(device_type, False)


def mark_pool(pool: Any) -> None:
    """Mark the slot dimension of a pool's tensors dynamic (once per tensor): a growing pool
    reallocates them, which would otherwise recompile every variant."""
    for tensor in [*pool.buffers.values(), *pool.hparams.values()]:
        torch._dynamo.maybe_mark_dynamic(tensor, 0)


def _bucket(buckets: list[int], size: int) -> int | None:
    """The smallest bucket that holds ``size`` (None if none does)."""
    index = bisect.bisect_left(buckets, size)
    return buckets[index] if index < len(buckets) else None
