"""Generate the metrics reference of ``docs/metrics.md`` from a running app's registry.

The app is the real one (memory store, CPU) with a stream fed over ``/v1`` and over ``/v2``, so
every family has a sample and shows its labels; the GPU families, absent on the CPU, come from
their declaration. Each family needs an entry in :data:`READING` (how to read it): a new metric
without one fails the generator, and ``tests/bench/test_metrics_doc.py`` fails while the
committed reference differs from the generator's output.

    python -m bench.metrics_doc            # rewrite the reference section of docs/metrics.md
    python -m bench.metrics_doc --check    # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.core import Metric

from bench.report import read_section, write_section
from service.main import create_app
from service.metrics import (
    DEPTHS,
    GPU_FAMILIES,
    STAGES,
    STORE_OPERATIONS,
    TROUBLE_REASONS,
    TroubleThresholds,
)
from service.safety import RESET_ACTIONS, RESET_REASONS
from service.settings import Settings

DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
SECTION = "reference"
# Labels whose values form a fixed set, listed in the reference.
FIXED_LABELS = {
    "stage": STAGES,
    "depth": DEPTHS,
    "reason": TROUBLE_REASONS,
    "signal": tuple(field.name for field in fields(TroubleThresholds)),
    "kind": ("allocated", "reserved"),
    "adapted": ("true", "false"),
    "operation": STORE_OPERATIONS,
    "cause": RESET_REASONS,
    "action": RESET_ACTIONS,
    "prediction": ("adapted", "source"),
}
# Suffixes of the sample names each type exposes (the family name is the prefix).
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "summary": ("_sum", "_count"),
}

# How to read each family (a PromQL hint where it helps). Process and Python families share one.
READING = {
    "tta_http_requests": "Request rate and error ratio by route: "
    '`sum by (route) (rate(tta_http_requests_total{status=~"5.."}[5m]))`; 429 = queue full.',
    "tta_http_request_duration_seconds": "Latency by route: "
    "`histogram_quantile(0.99, sum by (le, route) (rate(..._bucket[5m])))`.",
    "tta_http_requests_in_flight": "Requests being served now; grows with load and with a "
    "stuck forward. A scrape counts itself on `/metrics`.",
    "tta_stage_duration_seconds": "Where a prediction's time goes: waiting in the queue, "
    "decoding images, the engine forward, the state store.",
    "tta_batch_images": "Images per forward: small batches under load mean the batcher "
    "cannot coalesce (raise `max_delay_ms`).",
    "tta_batch_requests": "Requests per forward: how much the batcher coalesces.",
    "tta_queue_depth": "Requests waiting for a forward; saturation is "
    "`tta_queue_depth / tta_max_queue` (429 at 1).",
    "tta_max_queue": "The queue bound (`max_queue`), the denominator of saturation.",
    "tta_images": "Images predicted; `adapted=false` ones did not change their stream.",
    "tta_streams": "Streams registered (in slots or only in the store).",
    "tta_streams_active": "Streams holding a slot; at `max_streams` every new one evicts.",
    "tta_streams_evicted": "Evictions: a high rate means slots thrash (raise `max_streams`).",
    "tta_streams_expired": "Streams deleted after their TTL.",
    "tta_store_errors": "Failed store operations; any rate means states may not persist.",
    "tta_store_up": "0 after a failed store operation, back to 1 after a successful one.",
    "tta_forward_errors": "Failed forwards (their requests got 500, no state changed).",
    "tta_model_info": "Which models are served, on which device; always 1.",
    "tta_ready": "1 when `/v2/health/ready` answers 200; 0 while starting or draining.",
    "tta_trouble_threshold": "The thresholds of the trouble counts, for dashboards and alerts "
    "(settings `TTA_TROUBLE_*`; `entropy_low` is a lower bound).",
    "tta_fleet_stream_drift": "How many streams have each drift, over ALL streams with "
    "signals (no stream label): mass moving right is a fleet-wide shift; "
    "`_gsum / _gcount` is the mean drift.",
    "tta_fleet_stream_entropy": "Streams by normalised entropy: mass above the "
    "`entropy_high` threshold is streams the model is unsure about.",
    "tta_fleet_stream_confidence": "Streams by mean top-1 probability: the mirror of entropy.",
    "tta_streams_in_trouble": "How many streams are in trouble right now, by reason "
    '(`reason="any"`: at least one); share: divide by `tta_fleet_stream_entropy_gcount`.',
    "tta_streams_by_adapter": "Registered streams per model and adapter.",
    "tta_stream_severity": "The top-K order: 2 and above, predictions in trouble; 1 to 2, "
    "only drift; below 1, fine (see Severity above).",
    "tta_stream_drift": "The stream's drift by depth: early layers move with low-level "
    "changes (contrast, fog), late layers with what the model sees (noise).",
    "tta_stream_entropy": "Above `entropy_high`: the stream's predictions are unsure.",
    "tta_stream_confidence": "The stream's mean top-1 probability.",
    "tta_stream_dominant_class_share": "Above `dominant_share`: one class dominates "
    "(collapse, or a stream that really sees one class).",
    "tta_stream_samples": "Images the stream adapted to in its life (not only the window).",
    "tta_stream_last_update_timestamp_seconds": "When the stream last adapted: "
    "`time() - ...` is the age of its other values (restored streams keep theirs).",
    "tta_state_memory_bytes": "Memory of the stream states per adapter's pools; it grows as "
    "pools grow and is freed as they empty.",
    "tta_compiled_layouts": "With `engine_mode` compiled: each new layout costs a compilation "
    "(tens of seconds on a CPU) on the batch that first has it; a rising count after start-up "
    "means traffic the warm-up (`compile_warmup`) did not cover.",
    "tta_state_memory_limit_bytes": "The bound on a model's state memory (`max_state_bytes`; "
    "0: none): compare with `sum by (model) (tta_state_memory_bytes)`.",
    "tta_state_memory_refusals": "Streams refused a slot at the memory bound (507): raise "
    "`max_state_bytes` or delete idle streams.",
    "tta_gpu_memory_bytes": "GPU memory of this process (CUDA only).",
    "tta_gpu_utilization_ratio": "GPU busy share from NVML (CUDA only, and only with pynvml).",
    # Stream safety (docs/safety.md).
    "tta_auto_resets": "Auto-resets by cause and action (reset, rollback): a rising "
    "`drift_jump` rate is domain changes, a collapse reason is adaptation gone wrong.",
    "tta_idempotent_replays": "Predictions answered again for a retried Idempotency-Key "
    "(the stream did not adapt twice): client retries, e.g. after timeouts or a restart.",
    "tta_feedback_labels": "True labels received over `POST /v1/streams/{id}/feedback`.",
    "tta_feedback_correct": "Labelled images whose adapted / source prediction was right: "
    "fleet accuracy is `rate(tta_feedback_correct_total[1h]) / ignoring(prediction) "
    "group_left rate(tta_feedback_labels_total[1h])`.",
    "tta_stream_feedback_accuracy": "The stream's live accuracy, adapted vs source, over its "
    "last labelled images: adapted below source means adaptation hurts this stream.",
    "tta_stream_feedback_labels": "Labelled images behind the stream's live accuracy "
    "(few labels: a noisy accuracy).",
    "tta_stream_auto_resets": "Auto-resets of the stream since its creation.",
}
PROCESS_READING = "The client library's process and Python collectors (this process only)."
UNITS = {
    "process_start_time_seconds": "unix time (s)",
    "python_info": "1",
    "tta_ready": "0/1",
    "tta_store_up": "0/1",
    "tta_model_info": "1",
    "tta_trouble_threshold": "the signal's",
    "tta_stream_severity": "score (see Severity)",
    "tta_stream_drift": "nats (symmetric KL)",
    "tta_fleet_stream_drift": "nats (symmetric KL)",
    "tta_stream_entropy": "0-1 (entropy / ln C)",
    "tta_fleet_stream_entropy": "0-1 (entropy / ln C)",
    "tta_stream_confidence": "0-1",
    "tta_fleet_stream_confidence": "0-1",
    "tta_stream_dominant_class_share": "0-1",
    "tta_stream_feedback_accuracy": "0-1",
}
SUFFIX_UNITS = (
    ("_timestamp_seconds", "unix time (s)"),
    ("_seconds", "s"),
    ("_bytes", "bytes"),
    ("_ratio", "0-1"),
)


def unit(name: str) -> str:
    """The unit of a family: declared in :data:`UNITS`, else what its name's suffix says."""
    if name in UNITS:
        return UNITS[name]
    for suffix, unit_name in SUFFIX_UNITS:
        if name.endswith(suffix):
            return unit_name
    return "count"


def exercised_registry(model_cache: Path) -> list[Metric]:
    """Every family of an app with one stream fed over /v1 and /v2, as its registry collects."""
    return asyncio.run(_exercise(model_cache))


async def _exercise(model_cache: Path) -> list[Metric]:
    with tempfile.TemporaryDirectory() as data:
        settings = Settings(
            store="memory",
            data_dir=Path(data),
            model_cache_dir=model_cache,
            log_level="warning",
            engine_mode="eager",  # the same families either way; no compilation meanwhile
        )
        app = create_app(settings)
        model = settings.models[0]
        pixels = np.random.default_rng(0).integers(0, 256, (8, 3, 32, 32), dtype=np.uint8)
        infer = {
            "parameters": {"stream_id": "doc"},
            "inputs": [
                {
                    "name": "input",
                    "shape": list(pixels.shape),
                    "datatype": "UINT8",
                    "data": pixels.flatten().tolist(),
                }
            ],
        }
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client,
        ):
            for response in (
                await client.post("/v1/streams", json={"id": "doc"}),
                await client.post(
                    "/v1/streams/doc/predict",
                    content=pixels.tobytes(),
                    params={"shape": "8,3,32,32"},
                    headers={"content-type": "application/octet-stream"},
                ),
                await client.post(f"/v2/models/{model}/infer", json=infer),
                *await _exercise_safety(client, pixels),
                await client.get("/metrics"),
            ):
                response.raise_for_status()
            return list(app.state.tta.metrics.registry.collect())


async def _exercise_safety(client: httpx.AsyncClient, pixels: np.ndarray) -> list[httpx.Response]:
    """A stream with feedback, and an auto-reset policy that fires: the safety families."""
    policy = {"entropy_low": 1.0, "min_images": 1}
    created = await client.post(
        "/v1/streams", json={"id": "doc-safety", "feedback": True, "auto_reset": policy}
    )
    predicted = await client.post(
        "/v1/streams/doc-safety/predict",
        content=pixels.tobytes(),
        params={"shape": "8,3,32,32"},
        headers={"content-type": "application/octet-stream", "Idempotency-Key": "doc"},
    )
    replayed = await client.post(
        "/v1/streams/doc-safety/predict",
        content=pixels.tobytes(),
        params={"shape": "8,3,32,32"},
        headers={"content-type": "application/octet-stream", "Idempotency-Key": "doc"},
    )
    label = {"request_id": "doc", "index": 0, "label": 0}
    feedback = await client.post("/v1/streams/doc-safety/feedback", json={"labels": [label]})
    return [created, predicted, replayed, feedback]


def family_rows(families: list[Metric]) -> list[tuple[str, str, str, str, str, str]]:
    """(name, type, labels, unit, description, how to read) of every family, by name."""
    rows = []
    seen = set()
    for family in families:
        labels = {name for sample in family.samples for name in sample.labels} - {"le"}
        rows.append(_row(family.name, family.type, family.documentation, labels))
        seen.add(family.name)
    for name, documentation, label_names in GPU_FAMILIES:
        if name not in seen:
            rows.append(_row(name, "gauge", documentation, set(label_names)))
    return sorted(rows)


def _row(
    name: str, kind: str, documentation: str, labels: set[str]
) -> tuple[str, str, str, str, str, str]:
    if name.startswith(("process_", "python_")):
        reading = PROCESS_READING
    elif name in READING:
        reading = READING[name]
    else:
        raise KeyError(f"{name} has no entry in READING: say how to read it")
    shown = [
        f"{label} ({' / '.join(FIXED_LABELS[label])})" if label in FIXED_LABELS else label
        for label in sorted(labels)
    ]
    series = ", ".join(f"`{name}{suffix}`" for suffix in SUFFIXES.get(kind, ("",)))
    return (series, kind, ", ".join(shown) or "-", unit(name), documentation, reading)


def reference(model_cache: Path) -> str:
    """The reference section: one table row per family."""
    lines = [
        "Generated by `python -m bench.metrics_doc` from the registry of an app with one stream "
        "(CPU; the GPU families from their declaration, they exist only on CUDA).",
        "",
        "| series | type | labels | unit | description | how to read it |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in family_rows(exercised_registry(model_cache)):
        lines.append("| " + " | ".join(cell.replace("\n", " ") for cell in row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Rewrite (or with --check, compare) the reference section of docs/metrics.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the doc is out of date")
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("TTA_MODEL_CACHE_DIR", ".cache/models")),
        help="model weights cache",
    )
    args = parser.parse_args(argv)
    body = reference(args.cache_dir)
    if args.check:
        if read_section(args.doc, SECTION) != body:
            sys.exit(f"{args.doc} is out of date: run python -m bench.metrics_doc")
        return
    write_section(args.doc, SECTION, body, title="Metrics")


if __name__ == "__main__":
    main()
