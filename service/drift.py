"""Drift summaries of many streams at once, for predict responses.

``Engine.drift(stream)`` builds one stream's full report with a host sync per layer and measure,
which costs milliseconds per stream on a GPU; a response only needs the summary. This computes
the same summary (``overall`` measures averaged over BN layers, windowed image count, mean
entropy and confidence) for every stream of a forward with one transfer to the host per pool,
from the same observer state and the same distances (``adapters.drift.gaussian_distances``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from adapters.drift import SUMMARY_MEASURES, gaussian_distances
from adapters.engine import Engine, StreamHandle


def drift_summaries(engine: Engine, handles: Sequence[StreamHandle]) -> list[dict[str, Any]]:
    """The drift summary of each stream, in order (equal to the ``overall`` of its report)."""
    summaries: list[dict[str, Any] | None] = [None] * len(handles)
    groups: dict[Any, list[int]] = {}
    for index, handle in enumerate(handles):
        groups.setdefault(handle.pool, []).append(index)
    for key, members in groups.items():
        pool = engine.pools[key]
        slots = torch.tensor([handles[i].slot for i in members], device=engine.device)
        per_layer = []
        for state, source in zip(pool.layers, engine.sources, strict=True):
            n = state["obs.n"].index_select(0, slots)
            mean = state["obs.mean"].index_select(0, slots)
            var = state["obs.m2"].index_select(0, slots) / n.clamp(min=1)[:, None]
            distances = gaussian_distances(mean, var, source)
            measures = torch.stack([distances[name].mean(-1) for name in SUMMARY_MEASURES], -1)
            per_layer.append(torch.where((n > 0)[:, None], measures, torch.zeros_like(measures)))
        overall = torch.stack(per_layer, 1).mean(1)  # [streams, measures]
        head = torch.stack(
            [
                pool.head[k].index_select(0, slots)
                for k in ("head.n", "head.entropy", "head.confidence")
            ],
            -1,
        )
        rows = torch.cat([overall, head.to(overall.dtype)], -1).cpu().tolist()
        for index, row in zip(members, rows, strict=True):
            images, entropy, confidence = row[len(SUMMARY_MEASURES) :]
            summaries[index] = {
                "images": images,
                "overall": dict(zip(SUMMARY_MEASURES, row[: len(SUMMARY_MEASURES)], strict=True)),
                "entropy": entropy / images if images else None,
                "confidence": confidence / images if images else None,
            }
    return [s for s in summaries if s is not None]
