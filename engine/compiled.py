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
``max_variants`` (a layout beyond that runs the eager step on the padded batch: same results).

Compiling a layout takes tens of seconds (a minute on a small CPU). With ``background`` a new
layout is compiled on a thread of its own, from a batch of zeros on scratch state pools (no
stream is touched), while the engine runs that layout eagerly; once compiled it is used. A
server so never stalls a request for a compilation.

The eager engine stays the reference: ``Engine(mode="eager")`` is the default, and every
compiled result equals the eager one to float tolerance (tests/engine/test_compiled.py).
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
import torch._dynamo
from torch import Tensor

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MAX_VARIANTS = 64
# Where bench.engine --mode compiled measured the compiled adapted forward faster than the eager
# one at every batch size (docs/performance.md): what ``engine_mode=auto`` compiles on.
# CPU: 0.22-0.60x the eager time at batch 1 and 256, every adapter (CPU, AMD EPYC, 2 cores);
# CUDA: not measured yet (no GPU lent).
FASTER_ON: dict[str, bool] = {"cpu": True, "cuda": False}

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
        scratch: with it, new layouts compile in the background: ``scratch(layout)`` gives
            the ``(x, groups, commit)`` of a batch of that layout that changes no stream.
    """

    def __init__(
        self,
        step: Callable[..., tuple[Tensor, Tensor]],
        row_buckets: Sequence[int] = DEFAULT_BUCKETS,
        stream_buckets: Sequence[int] = DEFAULT_BUCKETS,
        max_variants: int = MAX_VARIANTS,
        mode: str | None = None,
        scratch: Callable[[Layout], tuple[Tensor, list, Tensor]] | None = None,
    ) -> None:
        if not row_buckets or not stream_buckets or min(*row_buckets, *stream_buckets) < 1:
            raise ValueError("buckets must be positive sizes")
        self.rows = sorted(set(row_buckets))
        self.streams = sorted(set(stream_buckets))
        self.max_variants = max_variants
        self.step = step
        self._configured = threading.local()
        self.compiled = torch.compile(step, fullgraph=True, dynamic=False, mode=mode)
        self.variants: set[Layout] = set()  # every layout compiled or being compiled
        self.ready: set[Layout] = set()  # those that may run compiled
        self.failed: set[Layout] = set()  # those whose compilation failed: eager for good
        self.scratch = scratch
        self._compiler = ThreadPoolExecutor(1, "tta-compile") if scratch is not None else None
        self._pending: list[Future] = []
        self._lock = threading.Lock()

    def pad(
        self, shape: Sequence[int], groups: Sequence[tuple[object, bool, int, int]]
    ) -> list[tuple[int, int]] | None:
        """Each group's (rows, streams) padded to its buckets, from (pool key, adapt, rows,
        streams) and the image ``shape``; None (run eagerly, unpadded) if one does not fit, the
        layout would be one variant too many, or it is still compiling in the background."""
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
        with self._lock:
            if layout in self.ready:
                return padded
            if layout in self.variants or len(self.variants) >= self.max_variants:
                return None
            self.variants.add(layout)
            if self._compiler is None:  # compiled by this call
                log.info("compiling the adapted forward for layout %s", layout)
                self.ready.add(layout)
                return padded
            log.info("compiling the adapted forward for layout %s in the background", layout)
            self._pending.append(self._compiler.submit(self._compile, layout))
            return None

    def counts(self) -> dict[str, int]:
        """Layouts by state: ready, compiling (running eagerly meanwhile), failed."""
        with self._lock:
            ready, failed = len(self.ready), len(self.failed)
            return {
                "ready": ready,
                "compiling": len(self.variants) - ready - failed,
                "failed": failed,
            }

    def wait(self) -> None:
        """Block until every layout scheduled so far has compiled (or failed to)."""
        while True:
            with self._lock:
                pending, self._pending = self._pending, []
            if not pending:
                return
            for future in pending:
                future.exception()

    def _compile(self, layout: Layout) -> None:
        """Compile one layout on a scratch batch (the background thread)."""
        assert self.scratch is not None
        try:
            with torch.inference_mode():
                x, groups, commit = self.scratch(layout)
                if x.is_cuda:  # off the engine's stream (it may be capturing a CUDA graph)
                    side = torch.cuda.Stream(x.device)
                    with torch.cuda.stream(side):
                        self(x, groups, commit)
                    side.synchronize()
                else:
                    self(x, groups, commit)
        except Exception:  # the layout keeps running eagerly: same results, only slower
            log.exception("compiling layout %s failed; it runs eagerly", layout)
            with self._lock:
                self.failed.add(layout)
            return
        with self._lock:
            self.ready.add(layout)
        log.info("layout %s compiled", layout)

    def __call__(self, x: Tensor, groups: list, commit: Tensor) -> tuple[Tensor, Tensor]:
        """The compiled step on a batch padded by :meth:`pad`."""
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
        return self.compiled(x, groups, commit)


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
