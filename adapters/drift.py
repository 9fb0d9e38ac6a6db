"""Drift signals from BatchNorm statistics (ALGORITHMS.md section 10).

Every stream keeps, whatever its adapter, an observer state: per BN layer a running Gaussian of
its input features (Chan-merged like AdaBN, capped at a window of images) and, at the head,
windowed sums of prediction entropy, confidence and predicted-class counts. The measures compare
the stream's Gaussian N(mu_t, v_t) with the source's N(mu_s, v_s) per channel, with the layer's
eps added to both variances (near-dead channels would otherwise dominate every ratio).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from adapters.base import NONNEGATIVE, Bounds, Moments, SourceStats, State, chan_merge, segment_sum

EARLY_LATE_FRACTION = 1 / 3  # the first and last third of the BN layers

OBSERVER_BOUNDS: Bounds = {"obs.n": NONNEGATIVE, "obs.m2": NONNEGATIVE}
HEAD_BOUNDS: Bounds = {
    "head.n": NONNEGATIVE,
    "head.entropy": NONNEGATIVE,
    "head.confidence": NONNEGATIVE,
    "head.classes": NONNEGATIVE,
}


def init_observer(source: SourceStats) -> State:
    """An empty running Gaussian for one layer."""
    zeros = torch.zeros_like(source.mean, dtype=torch.float64)
    return {"obs.n": zeros.new_zeros(()), "obs.mean": zeros, "obs.m2": zeros.clone()}


def observe(state: State, moments: Moments, window: Tensor) -> State:
    """Fold each stream's batch into its windowed running Gaussian."""
    n, mean, m2 = chan_merge(state["obs.n"], state["obs.mean"], state["obs.m2"], moments, window)
    return {"obs.n": n, "obs.mean": mean, "obs.m2": m2}


def init_head(num_classes: int, device: torch.device) -> State:
    """Empty windowed sums of the predictions."""
    zero = torch.zeros((), dtype=torch.float64, device=device)
    return {
        "head.n": zero,
        "head.entropy": zero.clone(),
        "head.confidence": zero.clone(),
        "head.classes": torch.zeros(num_classes, dtype=torch.float64, device=device),
    }


def observe_head(state: State, logits: Tensor, members: Tensor, window: Tensor) -> State:
    """Add each stream's predictions to its windowed sums, rescaled to the window."""
    probs = torch.softmax(logits.float(), dim=-1).double()
    entropy = -(probs * torch.log(probs.clamp(min=1e-30))).sum(-1)
    confidence, predicted = probs.max(-1)
    votes = torch.nn.functional.one_hot(predicted, probs.shape[-1]).double()
    new = {
        "head.n": state["head.n"] + members.sum(1),
        "head.entropy": state["head.entropy"] + segment_sum(members, entropy),
        "head.confidence": state["head.confidence"] + segment_sum(members, confidence),
        "head.classes": state["head.classes"] + segment_sum(members, votes),
    }
    shrink = (window / new["head.n"].clamp(min=1)).clamp(max=1.0)
    return {
        key: value * (shrink if value.ndim == 1 else shrink[:, None]) for key, value in new.items()
    }


def gaussian_distances(mu_t: Tensor, var_t: Tensor, source: SourceStats) -> dict[str, Tensor]:
    """Per-channel distances between the stream's and the source's Gaussians."""
    mu_s, v_s = source.mean.double(), source.var.double() + source.eps
    v_t = var_t + source.eps
    d = mu_t - mu_s
    kl = 0.5 * (v_t / v_s + d.square() / v_s - 1 + torch.log(v_s / v_t))
    jeffreys = 0.5 * (v_t / v_s + v_s / v_t - 2 + d.square() * (1 / v_s + 1 / v_t))
    w2 = d.square() + (v_t.sqrt() - v_s.sqrt()).square()
    bhattacharyya = d.square() / (4 * (v_s + v_t)) + 0.5 * torch.log(
        (v_s + v_t) / (2 * (v_s * v_t).sqrt())
    )
    return {
        "kl": kl,
        "jeffreys": jeffreys,
        "w2": w2,
        "w2n": w2 / v_s,
        "hellinger": 1 - torch.exp(-bhattacharyya),
        "z": d / v_s.sqrt(),
        "log_var_ratio": torch.log(v_t / v_s),
    }


SUMMARY_MEASURES = ("jeffreys", "w2n", "hellinger")


def layer_measures(layers: Sequence[State], sources: Sequence[SourceStats]) -> Tensor:
    """Channel means of the summary measures: [streams, layers, measures], 0 before any image.

    ``layers`` hold the observer rows of the streams (a leading stream dimension).
    """
    per_layer = []
    for state, source in zip(layers, sources, strict=True):
        n = state["obs.n"]
        var = state["obs.m2"] / n.clamp(min=1)[:, None]
        distances = gaussian_distances(state["obs.mean"], var, source)
        measures = torch.stack([distances[name].mean(-1) for name in SUMMARY_MEASURES], -1)
        per_layer.append(torch.where((n > 0)[:, None], measures, torch.zeros_like(measures)))
    return torch.stack(per_layer, 1)


def drift_summaries(
    layers: Sequence[State], head: State, sources: Sequence[SourceStats]
) -> list[dict]:
    """Short drift summaries of several streams at once (one transfer to the host).

    ``overall``, ``early`` and ``late``: the measures averaged over all, the first third and the
    last third of the BN layers; ``images``: the window's image count; ``entropy`` (nats),
    ``entropy_normalized`` (entropy / ln C, in [0, 1]), ``confidence`` and
    ``dominant_class_share`` (the most predicted class's share of the window): None before any
    image.
    """
    per_layer = layer_measures(layers, sources)
    count = _depth_count(len(sources))
    depths = [per_layer.mean(1), per_layer[:, :count].mean(1), per_layer[:, -count:].mean(1)]
    keys = ("head.n", "head.entropy", "head.confidence")
    sums = torch.stack([head[k] for k in keys] + [head["head.classes"].amax(-1)], -1)
    rows = torch.cat([*depths, sums.to(per_layer.dtype)], -1).cpu().tolist()
    log_classes = math.log(head["head.classes"].shape[-1])
    width = len(SUMMARY_MEASURES)
    summaries = []
    for row in rows:
        overall, early, late = (
            dict(zip(SUMMARY_MEASURES, row[i * width : (i + 1) * width], strict=True))
            for i in range(3)
        )
        images, entropy, confidence, dominant = row[3 * width :]
        summaries.append(
            {
                "images": images,
                "overall": overall,
                "early": early,
                "late": late,
                "entropy": entropy / images if images else None,
                "entropy_normalized": entropy / images / log_classes if images else None,
                "confidence": confidence / images if images else None,
                "dominant_class_share": dominant / images if images else None,
            }
        )
    return summaries


def drift_report(layers: Sequence[State], head: State, sources: Sequence[SourceStats]) -> dict:
    """One stream's full drift report: per-layer channel means, early/late/overall, predictions.

    ``layers`` and ``head`` hold one stream's observer rows (a stream dimension of 1).
    """
    measures = layer_measures(layers, sources)[0].T.tolist()  # [measures][layers]
    per_layer = dict(zip(SUMMARY_MEASURES, measures, strict=True))
    images = float(head["head.n"][0])
    count = _depth_count(len(sources))
    return {
        "images": images,
        "layers": per_layer,
        "early": {name: _mean(values[:count]) for name, values in per_layer.items()},
        "late": {name: _mean(values[-count:]) for name, values in per_layer.items()},
        "overall": {name: _mean(values) for name, values in per_layer.items()},
        "entropy": float(head["head.entropy"][0]) / images if images else None,
        "confidence": float(head["head.confidence"][0]) / images if images else None,
        "class_frequencies": (head["head.classes"][0] / images).tolist() if images else None,
    }


def _depth_count(layers: int) -> int:
    """How many BN layers the early and late measures average over."""
    return max(1, round(layers * EARLY_LATE_FRACTION))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
