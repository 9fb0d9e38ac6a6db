"""Prometheus metrics of one app: declared once, in a registry passed in (namespace ``tta``).

Labels come only from small fixed sets (route templates, methods, status codes, model and
adapter names, stages, signal names). Stream ids appear only on the per-stream gauges of the
top-K streams by severity, chosen when Prometheus scrapes, so they never become an unbounded
label set; every stream counts in the fleet-wide views (gauge histograms and trouble counts),
which are computed at scrape time from each stream's last signals (no engine call).

Severity (the top-K order; docs/metrics.md) is ``tier + r / (1 + r)``: tier 2 when the
stream's predictions are in trouble (high entropy or collapse), 1 when only its drift is, 0
otherwise; ``r`` is the largest of its signals divided by their thresholds. So a stream whose
predictions fail always ranks above streams that only drift, however far.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.feedback import Accuracy

NAMESPACE = "tta"
STAGES = ("queue", "decode", "forward", "store")
STORE_OPERATIONS = ("get", "put", "delete")
DEPTHS = ("early", "late")
TROUBLE_REASONS = ("drift_early", "drift_late", "high_entropy", "collapse", "any")
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
# Per-stream Jeffreys drift spans clean streams (~0.01-0.1) to severe shifts (~1-4).
_DRIFT_BUCKETS = (0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
_UNIT_BUCKETS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


@dataclass(frozen=True)
class StreamSignal:
    """A stream's latest drift signals, from the drift summary of its last forward.

    ``entropy`` is normalised (entropy / ln C); ``images`` counts the observer's window.
    ``updated_at`` is the unix time of the forward that adapted the stream last.
    """

    images: float
    drift_early: float
    drift_late: float
    entropy: float
    confidence: float
    dominant_share: float
    updated_at: float

    @classmethod
    def of(cls, summary: dict[str, Any], updated_at: float) -> StreamSignal | None:
        """The signal of a drift summary (``drift_summaries``); None before any image."""
        if not summary.get("images"):
            return None
        return cls(
            images=float(summary["images"]),
            drift_early=float(summary["early"]["jeffreys"]),
            drift_late=float(summary["late"]["jeffreys"]),
            entropy=float(summary["entropy_normalized"]),
            confidence=float(summary["confidence"]),
            dominant_share=float(summary["dominant_class_share"]),
            updated_at=updated_at,
        )

    def to_dict(self) -> dict[str, float]:
        """The signal as JSON-ready numbers (kept in the stored state's metadata)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: object) -> StreamSignal | None:
        """The signal stored by :meth:`to_dict`; None if ``values`` is not one."""
        if not isinstance(values, dict):
            return None
        try:
            return cls(**{name: float(values[name]) for name in cls.__dataclass_fields__})
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class ObservedStream:
    """What the metrics see of one registered stream."""

    id: str
    model: str
    adapter: str
    samples: int
    signal: StreamSignal | None
    auto_resets: int = 0
    accuracy: Accuracy | None = None  # live accuracy from label feedback (feedback on)


@dataclass(frozen=True)
class TroubleThresholds:
    """When a stream is "in trouble" (settings ``TTA_TROUBLE_*``, calibrated in docs/metrics.md).

    Every reason needs at least ``min_images`` images in the observer's window: over fewer, the
    statistics are too noisy to tell.
    """

    drift_early: float
    drift_late: float
    entropy_high: float
    entropy_low: float
    dominant_share: float
    min_images: float

    def reasons(self, signal: StreamSignal) -> list[str]:
        """The trouble reasons of a stream (without "any"); [] when it is fine."""
        if signal.images < self.min_images:
            return []
        reasons = []
        if signal.drift_early > self.drift_early:
            reasons.append("drift_early")
        if signal.drift_late > self.drift_late:
            reasons.append("drift_late")
        if signal.entropy > self.entropy_high:
            reasons.append("high_entropy")
        if signal.entropy < self.entropy_low or signal.dominant_share > self.dominant_share:
            reasons.append("collapse")
        return reasons

    def severity(self, signal: StreamSignal) -> float:
        """``tier + r / (1 + r)``: see the module docstring."""
        reasons = self.reasons(signal)
        if "high_entropy" in reasons or "collapse" in reasons:
            tier = 2
        elif reasons:
            tier = 1
        else:
            tier = 0
        ratios = [
            signal.drift_early / self.drift_early,
            signal.drift_late / self.drift_late,
            signal.entropy / self.entropy_high,
        ]
        if signal.images >= self.min_images:  # the collapse signals mean nothing over few images
            ratios += [
                self.entropy_low / max(signal.entropy, 1e-12),
                signal.dominant_share / self.dominant_share,
            ]
        r = max(ratios)
        return tier + r / (1 + r)


def _gauge_histogram(
    name: str, documentation: str, labels: list[str]
) -> GaugeHistogramMetricFamily:
    return GaugeHistogramMetricFamily(f"{NAMESPACE}_{name}", documentation, labels=labels)


def _buckets(values: list[float], bounds: tuple[float, ...]) -> list[tuple[str, float]]:
    """Cumulative bucket counts of ``values`` (the last bucket is +Inf)."""
    ordered = sorted(values)
    counts, index = [], 0
    for bound in bounds:
        while index < len(ordered) and ordered[index] <= bound:
            index += 1
        counts.append((str(bound), float(index)))
    counts.append(("+Inf", float(len(ordered))))
    return counts


class StreamsCollector(Collector):
    """Fleet-wide views of every stream, and per-stream gauges of the top-K by severity.

    Args:
        streams: every registered stream, read at each scrape.
        models: the served models (their trouble counts are exported even when 0).
        thresholds: when a stream is in trouble.
        k: streams with per-stream gauges.
    """

    def __init__(
        self,
        streams: Callable[[], Iterable[ObservedStream]],
        models: list[str],
        thresholds: TroubleThresholds,
        k: int,
    ) -> None:
        self._streams = streams
        self._models = models
        self._thresholds = thresholds
        self._k = k

    def collect(self) -> Iterator[Metric]:
        """Compute every family from the streams' last signals."""
        streams = list(self._streams())
        observed = [(s, s.signal) for s in streams if s.signal is not None]
        yield from self._fleet(observed)
        yield self._trouble(observed)
        by_adapter = GaugeMetricFamily(
            f"{NAMESPACE}_streams_by_adapter",
            "Registered streams by model and adapter",
            labels=["model", "adapter"],
        )
        counts: dict[tuple[str, str], int] = {}
        for stream in streams:
            counts[stream.model, stream.adapter] = counts.get((stream.model, stream.adapter), 0) + 1
        for (model, adapter), count in sorted(counts.items()):
            by_adapter.add_metric([model, adapter], count)
        yield by_adapter
        yield from self._top(observed)
        yield from self._safety(streams)

    def _safety(self, streams: list[ObservedStream]) -> Iterator[Metric]:
        """Per-stream live accuracy and auto-reset counts (docs/safety.md), top-K each.

        Accuracy: the streams with labels whose adaptation helps least (adapted minus source
        accuracy, lowest first); auto-resets: the streams reset most often.
        """
        labels = ["model", "stream"]
        accuracy = GaugeMetricFamily(
            f"{NAMESPACE}_stream_feedback_accuracy",
            "Accuracy of the stream's adapted and source predictions over its last labelled "
            "images (label feedback); top-K by lowest gain of adapted over source",
            labels=[*labels, "prediction"],
        )
        labelled = GaugeMetricFamily(
            f"{NAMESPACE}_stream_feedback_labels",
            "Labelled images in the stream's live accuracy window; top-K as the accuracy",
            labels=labels,
        )
        resets = GaugeMetricFamily(
            f"{NAMESPACE}_stream_auto_resets",
            "Auto-resets of the stream since creation; top-K by count",
            labels=labels,
        )
        scored = [
            (s, s.accuracy)
            for s in streams
            if s.accuracy is not None and s.accuracy.adapted is not None
        ]
        scored.sort(key=lambda item: ((item[1].adapted or 0) - (item[1].source or 0), item[0].id))
        for stream, window in scored[: self._k]:
            key = [stream.model, stream.id]
            accuracy.add_metric([*key, "adapted"], window.adapted or 0.0)
            accuracy.add_metric([*key, "source"], window.source or 0.0)
            labelled.add_metric(key, window.labels)
        # zeros included: "never reset" is what most streams should show
        reset = sorted(streams, key=lambda s: (-s.auto_resets, s.id))
        for stream in reset[: self._k]:
            resets.add_metric([stream.model, stream.id], stream.auto_resets)
        yield accuracy
        yield labelled
        yield resets

    def _fleet(self, observed: list[tuple[ObservedStream, StreamSignal]]) -> Iterator[Metric]:
        drift = _gauge_histogram(
            "fleet_stream_drift",
            "Streams by their drift (symmetric KL between the stream's and the source's BN "
            "statistics; early: first third of the BN layers, late: last third)",
            ["model", "depth"],
        )
        entropy = _gauge_histogram(
            "fleet_stream_entropy",
            "Streams by their mean prediction entropy, normalised to [0, 1] (entropy / ln C)",
            ["model"],
        )
        confidence = _gauge_histogram(
            "fleet_stream_confidence",
            "Streams by their mean top-1 probability",
            ["model"],
        )
        for model in self._models:
            signals = [signal for stream, signal in observed if stream.model == model]
            for depth in DEPTHS:
                values = [getattr(sig, f"drift_{depth}") for sig in signals]
                drift.add_metric([model, depth], _buckets(values, _DRIFT_BUCKETS), sum(values))
            values = [sig.entropy for sig in signals]
            entropy.add_metric([model], _buckets(values, _UNIT_BUCKETS), sum(values))
            values = [sig.confidence for sig in signals]
            confidence.add_metric([model], _buckets(values, _UNIT_BUCKETS), sum(values))
        yield drift
        yield entropy
        yield confidence

    def _trouble(self, observed: list[tuple[ObservedStream, StreamSignal]]) -> GaugeMetricFamily:
        trouble = GaugeMetricFamily(
            f"{NAMESPACE}_streams_in_trouble",
            "Streams whose last signals cross a trouble threshold, by reason "
            "(any: at least one reason; tta_trouble_threshold holds the thresholds)",
            labels=["model", "reason"],
        )
        counts = {(model, reason): 0 for model in self._models for reason in TROUBLE_REASONS}
        for stream, signal in observed:
            reasons = self._thresholds.reasons(signal)
            for reason in [*reasons, "any"] if reasons else []:
                counts[stream.model, reason] = counts.get((stream.model, reason), 0) + 1
        for (model, reason), count in counts.items():
            trouble.add_metric([model, reason], count)
        return trouble

    def _top(self, observed: list[tuple[ObservedStream, StreamSignal]]) -> Iterator[Metric]:
        labels = ["model", "stream"]
        families = {
            "severity": GaugeMetricFamily(
                f"{NAMESPACE}_stream_severity",
                "Severity of the stream's signals (2+: predictions in trouble, 1+: drift in "
                "trouble, below 1: fine); only the top-K streams by severity",
                labels=labels,
            ),
            "drift": GaugeMetricFamily(
                f"{NAMESPACE}_stream_drift",
                "Symmetric KL (Jeffreys) between the stream's and the source's BN statistics, "
                "averaged over the first (early) or last (late) third of the BN layers; top-K",
                labels=[*labels, "depth"],
            ),
            "entropy": GaugeMetricFamily(
                f"{NAMESPACE}_stream_entropy",
                "Mean prediction entropy of the stream, normalised to [0, 1]; top-K",
                labels=labels,
            ),
            "confidence": GaugeMetricFamily(
                f"{NAMESPACE}_stream_confidence",
                "Mean top-1 probability of the stream's predictions; top-K",
                labels=labels,
            ),
            "dominant_share": GaugeMetricFamily(
                f"{NAMESPACE}_stream_dominant_class_share",
                "Share of the most predicted class in the observer window; top-K",
                labels=labels,
            ),
            "samples": GaugeMetricFamily(
                f"{NAMESPACE}_stream_samples",
                "Images the stream has adapted to; top-K",
                labels=labels,
            ),
            "updated": GaugeMetricFamily(
                f"{NAMESPACE}_stream_last_update_timestamp_seconds",
                "Unix time of the stream's last adapted forward (its signals' age); top-K",
                labels=labels,
            ),
        }
        ranked = sorted(
            ((self._thresholds.severity(signal), stream, signal) for stream, signal in observed),
            key=lambda item: (-item[0], item[1].id),
        )
        for severity, stream, signal in ranked[: self._k]:
            key = [stream.model, stream.id]
            families["severity"].add_metric(key, severity)
            families["drift"].add_metric([*key, "early"], signal.drift_early)
            families["drift"].add_metric([*key, "late"], signal.drift_late)
            families["entropy"].add_metric(key, signal.entropy)
            families["confidence"].add_metric(key, signal.confidence)
            families["dominant_share"].add_metric(key, signal.dominant_share)
            families["samples"].add_metric(key, stream.samples)
            families["updated"].add_metric(key, signal.updated_at)
        yield from families.values()

    def describe(self) -> list[Metric]:
        """Nothing: the families are computed at scrape time."""
        return []


# The GPU families, exported only on CUDA: (name, help, labels).
GPU_FAMILIES = (
    (
        f"{NAMESPACE}_gpu_memory_bytes",
        "GPU memory held by this process's tensors (allocated) and by its caching allocator "
        "(reserved)",
        ["device", "kind"],
    ),
    (
        f"{NAMESPACE}_gpu_utilization_ratio",
        "Share of the last sample period in which a kernel ran on the GPU (NVML)",
        ["device"],
    ),
)


class GpuCollector(Collector):
    """Memory (through torch) and utilisation (through NVML, when torch can reach it) per GPU."""

    def __init__(self, devices: list[torch.device]) -> None:
        self._devices = devices

    def collect(self) -> Iterator[Metric]:
        """Read each device's counters now."""
        memory, utilization = (
            GaugeMetricFamily(name, documentation, labels=labels)
            for name, documentation, labels in GPU_FAMILIES
        )
        for device in self._devices:
            name = str(device)
            memory.add_metric([name, "allocated"], torch.cuda.memory_allocated(device))
            memory.add_metric([name, "reserved"], torch.cuda.memory_reserved(device))
            # torch reads utilisation through NVML (pynvml): without it, no utilisation.
            with contextlib.suppress(ModuleNotFoundError, RuntimeError):
                utilization.add_metric([name], torch.cuda.utilization(device) / 100)
        yield memory
        if utilization.samples:
            yield utilization

    def describe(self) -> list[Metric]:
        """Nothing: the families are read at scrape time."""
        return []


class Metrics:
    """Every metric of the server, registered in ``registry`` (a fresh one per app)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "http_requests",
            "HTTP requests by route template, method and status code",
            ["route", "method", "status"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.request_latency = Histogram(
            "http_request_duration_seconds",
            "HTTP request latency by route template and method",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS,
            namespace=NAMESPACE,
            registry=registry,
        )
        self.stage_latency = Histogram(
            "stage_duration_seconds",
            "Latency of one stage of a prediction: queue, decode, forward, store",
            ["model", "stage"],
            buckets=_LATENCY_BUCKETS,
            namespace=NAMESPACE,
            registry=registry,
        )
        self.batch_images = Histogram(
            "batch_images",
            "Images per engine forward",
            ["model"],
            buckets=_SIZE_BUCKETS,
            namespace=NAMESPACE,
            registry=registry,
        )
        self.batch_requests = Histogram(
            "batch_requests",
            "Requests coalesced into one engine forward",
            ["model"],
            buckets=_SIZE_BUCKETS,
            namespace=NAMESPACE,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "queue_depth",
            "Requests waiting for a forward",
            ["model"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.images = Counter(
            "images",
            "Images predicted, by model, adapter and whether the stream adapted to them",
            ["model", "adapter", "adapted"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.streams = Gauge(
            "streams", "Streams registered", ["model"], namespace=NAMESPACE, registry=registry
        )
        self.streams_active = Gauge(
            "streams_active",
            "Streams holding a slot in the model's state pools",
            ["model"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.streams_evicted = Counter(
            "streams_evicted",
            "Streams evicted from their slot (state written back to the store)",
            ["model"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.streams_expired = Counter(
            "streams_expired",
            "Streams deleted after their TTL",
            ["model"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.store_errors = Counter(
            "store_errors",
            "State store failures by operation",
            ["operation"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.forward_errors = Counter(
            "forward_errors",
            "Engine forwards that failed (no state changed)",
            ["model"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.state_memory = Gauge(
            "state_memory_bytes",
            "Memory held by the stream states of a model's state pools, by adapter",
            ["model", "adapter"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.compiled_layouts = Gauge(
            "compiled_layouts",
            "Batch layouts a model's compiled forward has compiled (engine_mode compiled)",
            ["model"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.state_memory_limit = Gauge(
            "state_memory_limit_bytes",
            "Bound on a model's stream state memory (max_state_bytes; 0: none)",
            ["model"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.state_memory_refusals = Counter(
            "state_memory_refusals",
            "Streams refused a slot because the model's state memory bound was reached",
            ["model"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.model_info = Gauge(
            "model_info",
            "Served models (value 1) and their properties",
            ["model", "architecture", "device", "num_classes", "input_size", "backend"],
            namespace=NAMESPACE,
            registry=registry,
        )

        self.http_in_flight = Gauge(
            "http_requests_in_flight",
            "HTTP requests being served, by route template",
            ["route"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.max_queue = Gauge(
            "max_queue",
            "The bound of the model's request queue (saturation: tta_queue_depth / this)",
            ["model"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.ready = Gauge(
            "ready",
            "1 when the server is ready (as /v2/health/ready answers), else 0",
            namespace=NAMESPACE,
            registry=registry,
        )
        self.store_up = Gauge(
            "store_up",
            "1 when the last state-store operation succeeded, 0 when it failed",
            namespace=NAMESPACE,
            registry=registry,
        )
        self.trouble_threshold = Gauge(
            "trouble_threshold",
            "The thresholds above (entropy_low: below) which a stream is in trouble, by signal",
            ["signal"],
            namespace=NAMESPACE,
            registry=registry,
        )
        # Stream safety (docs/safety.md).
        self.auto_resets = Counter(
            "auto_resets",
            "Streams reset (or rolled back to a snapshot) by their auto-reset policy",
            ["model", "cause", "action"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.idempotent_replays = Counter(
            "idempotent_replays",
            "Predictions answered from an earlier request with the same Idempotency-Key",
            ["model"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.feedback_labels = Counter(
            "feedback_labels",
            "True labels received for earlier predictions (label feedback)",
            ["model"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.feedback_correct = Counter(
            "feedback_correct",
            "Labelled images whose adapted or source prediction was right",
            ["model", "prediction"],
            namespace=NAMESPACE,
            registry=registry,
        )
        for operation in STORE_OPERATIONS:  # a zero series from the start: rate() works at once
            self.store_errors.labels(operation)
        # The client library's process_* and python_* metrics, in this app's own registry.
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)

    def add_model(self, model: str) -> None:
        """Start the per-model counters and histograms at zero (no gap before the first event)."""
        for metric in (
            self.forward_errors,
            self.streams_evicted,
            self.streams_expired,
            self.batch_images,
            self.batch_requests,
            self.state_memory_refusals,
            self.idempotent_replays,
            self.feedback_labels,
        ):
            metric.labels(model)
        for stage in STAGES:
            self.stage_latency.labels(model, stage)
        for prediction in ("adapted", "source"):
            self.feedback_correct.labels(model, prediction)

    def track_streams(
        self,
        streams: Callable[[], Iterable[ObservedStream]],
        models: list[str],
        thresholds: TroubleThresholds,
        k: int,
    ) -> None:
        """Expose the fleet views of ``streams()`` and per-stream gauges of the top ``k``."""
        for name, value in asdict(thresholds).items():
            self.trouble_threshold.labels(name).set(value)
        self.registry.register(StreamsCollector(streams, models, thresholds, k))

    def track_gpus(self, devices: list[torch.device]) -> None:
        """Expose GPU memory and utilisation of the CUDA ``devices`` (none: nothing)."""
        cuda = [d for d in devices if d.type == "cuda"]
        if cuda:
            self.registry.register(GpuCollector(cuda))
