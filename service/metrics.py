"""Prometheus metrics of one app: declared once, in a registry passed in (namespace ``tta``).

Labels come only from small fixed sets (route templates, methods, status codes, model and
adapter names, stages). Per-stream drift and entropy gauges exist only for the top-K streams by
drift, chosen when Prometheus scrapes, so stream ids never become an unbounded label set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

NAMESPACE = "tta"
STAGES = ("queue", "decode", "forward", "store")
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


@dataclass(frozen=True)
class StreamSignal:
    """The latest drift summary of one stream, kept for the top-K gauges."""

    model: str
    drift: float
    entropy: float | None


class TopStreamsCollector(Collector):
    """Per-stream drift/entropy gauges for the ``k`` streams with the highest drift."""

    def __init__(self, signals: Callable[[], dict[str, StreamSignal]], k: int) -> None:
        self._signals = signals
        self._k = k

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Yield the gauges of the current top-K streams (sorted at scrape time)."""
        drift = GaugeMetricFamily(
            f"{NAMESPACE}_stream_drift",
            "Symmetric KL (Jeffreys) between the stream's and the source's BN statistics, "
            "averaged over layers; only the top-K streams by drift",
            labels=["model", "stream"],
        )
        entropy = GaugeMetricFamily(
            f"{NAMESPACE}_stream_entropy",
            "Mean prediction entropy of the stream (nats); only the top-K streams by drift",
            labels=["model", "stream"],
        )
        if self._k > 0:
            signals = self._signals()
            top = sorted(signals.items(), key=lambda item: item[1].drift, reverse=True)[: self._k]
            for stream_id, signal in top:
                drift.add_metric([signal.model, stream_id], signal.drift)
                if signal.entropy is not None:
                    entropy.add_metric([signal.model, stream_id], signal.entropy)
        yield drift
        yield entropy

    def describe(self) -> list[GaugeMetricFamily]:
        """Describe the families without computing them."""
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

    def track_top_streams(self, signals: Callable[[], dict[str, StreamSignal]], k: int) -> None:
        """Expose drift/entropy gauges for the top-``k`` streams of ``signals()``."""
        self.registry.register(TopStreamsCollector(signals, k))
