"""Grafana dashboards of tta-serve, as code: ``python -m deploy.grafana.generate`` writes the JSON.

The committed files under ``deploy/grafana/dashboards/`` are what Grafana provisions; a test
checks that they equal this script's output, and the end-to-end test evaluates every PromQL
expression here against a real Prometheus scraping a real server. Three dashboards:

- service overview: traffic, latency by stage, batches, queue, errors, process and GPU;
- fleet drift: how many streams are in trouble, drift/entropy distributions over all streams,
  the top-K streams by severity with their staleness;
- stream detail: one stream's signals over time (a ``stream`` variable over the top-K streams).

Every panel carries a description that says what to read from it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DASHBOARD_DIR = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "tta-prometheus"}  # fixed uid, see provisioning/
RATE = "$__rate_interval"
API = 'route!~"/metrics|/v2/health/.+"'  # API traffic: not the scrapes, not the health probes
PREDICT = 'route=~".+/(predict|infer)"'
WIDTH = 24  # Grafana's grid width

Panel = dict[str, Any]


# --- building blocks ------------------------------------------------------------------------


def target(expr: str, legend: str = "", **extra: Any) -> dict[str, Any]:
    """One PromQL query of a panel (its refId is set by the panel)."""
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, **extra}


def panel(
    kind: str,
    title: str,
    description: str,
    targets: list[dict[str, Any]],
    *,
    unit: str = "short",
    width: int = 12,
    height: int = 8,
    options: dict[str, Any] | None = None,
    custom: dict[str, Any] | None = None,
    thresholds: list[tuple[float, str]] | None = None,
    **extra: Any,
) -> Panel:
    """A panel of ``kind`` (timeseries, heatmap, table, stat); its position is set by the layout."""
    steps: list[dict[str, Any]] = [{"color": "green", "value": None}]
    steps += [{"color": color, "value": value} for value, color in thresholds or []]
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"w": width, "h": height},
        "targets": [
            {**query, "refId": chr(ord("A") + index)} for index, query in enumerate(targets)
        ],
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "custom": custom or {},
                "thresholds": {"mode": "absolute", "steps": steps},
            },
            "overrides": [],
        },
        "options": options or {},
        **extra,
    }


def timeseries(title: str, description: str, targets: list[dict[str, Any]], **kwargs: Any) -> Panel:
    """A time-series panel; thresholds, when given, are drawn as dashed lines."""
    custom = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 0, "showPoints": "never"}
    if kwargs.get("thresholds"):
        custom["thresholdsStyle"] = {"mode": "dashed"}
    options = {
        "legend": {"displayMode": "list", "placement": "bottom"},
        "tooltip": {"mode": "multi"},
    }
    return panel(
        "timeseries", title, description, targets, custom=custom, options=options, **kwargs
    )


def heatmap(title: str, description: str, expr: str, *, unit: str) -> Panel:
    """A heat map of a gauge histogram's cumulative ``_bucket`` series (one row per bucket)."""
    options = {
        "calculate": False,  # the buckets come from the server, Grafana only de-accumulates them
        "yAxis": {"unit": unit},
        "cellGap": 1,
        "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
        "rowsFrame": {"layout": "le"},
        "tooltip": {"mode": "single", "yHistogram": True},
    }
    return panel(
        "heatmap",
        title,
        description,
        [target(expr, "{{le}}", format="heatmap")],
        options=options,
    )


def stat(title: str, description: str, targets: list[dict[str, Any]], **kwargs: Any) -> Panel:
    """A single-value panel of the latest value of each query."""
    options = {
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "colorMode": "value",
        "graphMode": "area",
        "textMode": "value_and_name",
    }
    return panel("stat", title, description, targets, options=options, **kwargs)


def table(
    title: str, description: str, columns: dict[str, str], *, by: tuple[str, ...], **kwargs: Any
) -> Panel:
    """A table with one row per ``by`` label set and one column per instant query (name: expr)."""
    targets = [target(expr, format="table", instant=True) for expr in columns.values()]
    renames = {f"Value #{chr(ord('A') + i)}": name for i, name in enumerate(columns)}
    transformations = [
        {"id": "merge", "options": {}},
        {
            "id": "organize",
            "options": {
                "excludeByName": {"Time": True, "__name__": True, "job": True, "instance": True},
                "indexByName": {name: i for i, name in enumerate([*by, *renames])},
                "renameByName": renames,
            },
        },
    ]
    options = {"showHeader": True, "sortBy": [{"displayName": next(iter(columns)), "desc": True}]}
    return panel(
        "table",
        title,
        description,
        targets,
        options=options,
        transformations=transformations,
        **kwargs,
    )


def row(title: str) -> Panel:
    """A row header (full width)."""
    return {"type": "row", "title": title, "collapsed": False, "gridPos": {"w": WIDTH, "h": 1}}


def query_variable(name: str, label: str, query: str, *, include_all: bool) -> dict[str, Any]:
    """A template variable over the values of a label (``label_values(selector, label)``)."""
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": query,
        "definition": query,
        "refresh": 2,  # on time-range change: new streams enter the top-K
        "includeAll": include_all,
        "allValue": ".+" if include_all else None,
        "multi": False,
        "sort": 1,
        "current": {},
        "options": [],
    }


def dashboard(
    uid: str,
    title: str,
    description: str,
    panels: list[Panel],
    variables: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A dashboard whose panels flow left to right, top to bottom, with ids in order."""
    x = y = line_height = 0
    laid_out = []
    for panel_id, item in enumerate(panels, start=1):
        width, height = item["gridPos"]["w"], item["gridPos"]["h"]
        if x + width > WIDTH:
            x, y, line_height = 0, y + line_height, 0
        laid_out.append(
            {"id": panel_id, **item, "gridPos": {"x": x, "y": y, "w": width, "h": height}}
        )
        x, line_height = x + width, max(line_height, height)
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["tta-serve"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": variables or []},
        "annotations": {"list": []},
        "links": [
            {"type": "dashboards", "tags": ["tta-serve"], "title": "tta-serve", "asDropdown": True}
        ],
        "panels": laid_out,
    }


def quantile(q: float, metric: str, by: str, selector: str = "") -> str:
    """The ``q`` quantile of a histogram's rate, by the ``by`` labels."""
    matchers = f"{{{selector}}}" if selector else ""
    return f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{matchers}[{RATE}])))"


def mean(metric: str, by: str) -> str:
    """The mean observation of a histogram over the rate interval, by the ``by`` labels."""
    return (
        f"sum by ({by}) (rate({metric}_sum[{RATE}])) / sum by ({by}) (rate({metric}_count[{RATE}]))"
    )


def top(metric: str, selector: str) -> str:
    """A per-stream gauge of the top-K streams, one series per (model, stream) for a table."""
    return f"max by (model, stream) ({metric}{{{selector}}})"


# --- dashboards -----------------------------------------------------------------------------


def service_overview() -> dict[str, Any]:
    """Traffic, latency, batching, saturation, errors, process and GPU of every tta-serve."""
    panels = [
        row("Traffic"),
        timeseries(
            "Requests by route and status",
            "API requests per second (scrapes and health probes left out). A growing 4xx/5xx "
            "line next to a flat 200 line means clients are refused or failing, not idle.",
            [
                target(
                    f"sum by (route, status) (rate(tta_http_requests_total{{{API}}}[{RATE}]))",
                    "{{route}} {{status}}",
                )
            ],
            unit="reqps",
            width=8,
        ),
        timeseries(
            "Images by model and adapter",
            "Images predicted per second; adapted=false counts predictions made with adapt=false "
            "(the stream's statistics did not move). The load the GPU actually sees.",
            [
                target(
                    f"sum by (model, adapter, adapted) (rate(tta_images_total[{RATE}]))",
                    "{{model}} {{adapter}} adapted={{adapted}}",
                )
            ],
            unit="short",
            width=8,
        ),
        timeseries(
            "Requests in flight",
            "Requests being served right now, by route. Rising with flat throughput means requests "
            "wait: check the queue panels.",
            [target("sum by (route) (tta_http_requests_in_flight)", "{{route}}")],
            width=8,
        ),
        row("Latency and batching"),
        timeseries(
            "Prediction latency p50 / p99",
            "End-to-end latency of the predict and infer routes as the server measures it. The "
            "gap between p50 and p99 is the batching delay plus queueing under bursts; alert "
            "TTAPredictLatencyHigh fires at p99 > 0.5 s for 10 minutes.",
            [
                target(
                    quantile(0.5, "tta_http_request_duration_seconds", "route", PREDICT),
                    "p50 {{route}}",
                ),
                target(
                    quantile(0.99, "tta_http_request_duration_seconds", "route", PREDICT),
                    "p99 {{route}}",
                ),
            ],
            unit="s",
            thresholds=[(0.5, "red")],
            width=8,
        ),
        timeseries(
            "Latency by stage (p99)",
            "Where a prediction spends its time: queue (waiting for a batch), decode (images to "
            "tensors), forward (the adapted model) and store (persisting the state, sync "
            "durability only). The stage that grows is the bottleneck.",
            [
                target(
                    quantile(0.99, "tta_stage_duration_seconds", "model, stage"),
                    "{{model}} {{stage}}",
                )
            ],
            unit="s",
            width=8,
        ),
        timeseries(
            "Batch sizes (mean)",
            "Images and requests per engine forward. Requests per batch near 1 under load means "
            "the batcher has nothing to coalesce (raise TTA_MAX_DELAY_MS); images per batch at "
            "TTA_MAX_BATCH_SIZE means the forward is the limit.",
            [
                target(mean("tta_batch_images", "model"), "images {{model}}"),
                target(mean("tta_batch_requests", "model"), "requests {{model}}"),
            ],
            width=8,
        ),
        row("Saturation"),
        timeseries(
            "Queue depth and bound",
            "Requests waiting for a forward, and the bound (TTA_MAX_QUEUE) at which new requests "
            "get 429.",
            [
                target("tta_queue_depth", "depth {{model}}"),
                target("tta_max_queue", "bound {{model}}"),
            ],
            width=8,
        ),
        timeseries(
            "Queue saturation",
            "Queue depth over its bound. Alert TTAQueueSaturated fires above 0.8 for 5 minutes; "
            "at 1.0 requests are refused with 429.",
            [target("tta:queue_saturation:ratio", "{{model}}")],
            unit="percentunit",
            thresholds=[(0.8, "red")],
            width=8,
        ),
        timeseries(
            "Streams",
            "Registered streams, streams holding a slot in the state pools (the rest are in the "
            "store and reload on their next request), and streams per adapter.",
            [
                target("tta_streams", "registered {{model}}"),
                target("tta_streams_active", "in slots {{model}}"),
                target("tta_streams_by_adapter", "{{model}} {{adapter}}"),
            ],
            width=8,
        ),
        timeseries(
            "State memory",
            "Bytes of the state pools per model and adapter, and the limit TTA_MAX_STATE_BYTES "
            "(0 = unlimited). New streams are refused with 507 at the limit.",
            [
                target("tta_state_memory_bytes", "{{model}} {{adapter}}"),
                target("tta_state_memory_limit_bytes", "limit {{model}}"),
            ],
            unit="bytes",
            width=8,
        ),
        timeseries(
            "Evictions, expiries, refusals",
            "Streams evicted from their slot (LRU, state written back to the store), deleted "
            "after their TTL, and refused by the state-memory limit, per second. Steady "
            "evictions mean more live streams than TTA_MAX_STREAMS.",
            [
                target(
                    f"sum by (model) (rate(tta_streams_evicted_total[{RATE}]))", "evicted {{model}}"
                ),
                target(
                    f"sum by (model) (rate(tta_streams_expired_total[{RATE}]))", "expired {{model}}"
                ),
                target(
                    f"sum by (model) (rate(tta_state_memory_refusals_total[{RATE}]))",
                    "refused {{model}}",
                ),
            ],
            width=8,
        ),
        table(
            "Served models",
            "The models this fleet serves, their architecture, device, classes and input size.",
            {"served": "tta_model_info"},
            by=("model", "architecture", "device", "num_classes", "input_size"),
            width=8,
        ),
        row("Errors and health"),
        timeseries(
            "5xx and 429 share",
            "Share of API requests answered 5xx (server failures: alert above 1 %) and 429 "
            "(the queue was full: alert above 5 %), over 5 minutes.",
            [
                target("tta:http_5xx:ratio_rate5m", "5xx {{instance}}"),
                target("tta:http_429:ratio_rate5m", "429 {{instance}}"),
            ],
            unit="percentunit",
            thresholds=[(0.01, "red")],
            width=8,
        ),
        timeseries(
            "Forward and store errors",
            "Failed engine forwards (no stream state changed) and failed state-store operations "
            "per second. Any non-zero line is worth a look at the server's log.",
            [
                target(
                    f"sum by (model) (rate(tta_forward_errors_total[{RATE}]))", "forward {{model}}"
                ),
                target(
                    f"sum by (operation) (rate(tta_store_errors_total[{RATE}]))",
                    "store {{operation}}",
                ),
            ],
            width=8,
        ),
        stat(
            "Up, ready, store",
            "1 = good. up: Prometheus reaches the server; ready: /v2/health/ready answers 200; "
            "store: the last state-store operation succeeded.",
            [
                target('up{job="tta-serve"}', "up {{instance}}"),
                target("tta_ready", "ready {{instance}}"),
                target("tta_store_up", "store {{instance}}"),
            ],
            thresholds=[(0, "red"), (1, "green")],
            width=8,
        ),
        row("Process and GPU"),
        timeseries(
            "CPU",
            "CPU seconds per second of the server process (1.0 = one core busy). On a CPU "
            "deployment, the forward's share of the cores.",
            [target(f'rate(process_cpu_seconds_total{{job="tta-serve"}}[{RATE}])', "{{instance}}")],
            unit="percentunit",
            width=6,
        ),
        timeseries(
            "Memory",
            "Resident memory of the server process. Grows with the state pools and the models; "
            "a steady climb at constant streams is a leak.",
            [target('process_resident_memory_bytes{job="tta-serve"}', "{{instance}}")],
            unit="bytes",
            width=6,
        ),
        timeseries(
            "GPU memory",
            "CUDA memory allocated by tensors and reserved by PyTorch's caching allocator, per "
            "device (no data on a CPU deployment).",
            [target("tta_gpu_memory_bytes", "{{device}} {{kind}}")],
            unit="bytes",
            width=6,
        ),
        timeseries(
            "GPU utilisation",
            "Share of time the GPU ran a kernel (NVML), per device (no data on a CPU "
            "deployment). Low utilisation under load: the batches are small or the CPU "
            "(decode) is the limit.",
            [target("tta_gpu_utilization_ratio", "{{device}}")],
            unit="percentunit",
            width=6,
        ),
    ]
    return dashboard(
        "tta-service-overview",
        "tta-serve / Service overview",
        "Traffic, latency by stage, batching, saturation, errors, process and GPU.",
        panels,
    )


def fleet_drift() -> dict[str, Any]:
    """How many streams are in trouble, the distributions of drift and entropy, the top-K."""
    model = 'model=~"$model"'
    panels = [
        row("Streams in trouble"),
        stat(
            "In trouble now",
            "Streams in trouble for any reason right now, and streams with a drift summary. "
            "Counted by the server over ALL streams, not only the top-K.",
            [
                target(f'sum(tta_streams_in_trouble{{{model}, reason="any"}})', "in trouble"),
                target(f'sum(tta_fleet_stream_drift_gcount{{{model}, depth="late"}})', "observed"),
            ],
            width=6,
            thresholds=[(1, "orange")],
        ),
        timeseries(
            "Streams in trouble by reason",
            "drift_early: the input changed (noise, blur, a new sensor); drift_late: the "
            "content changed or adaptation went wrong; high_entropy: the model is unsure; "
            "collapse: predictions stuck on one class. A stream can have several reasons; "
            "'any' counts it once.",
            [target(f"sum by (reason) (tta_streams_in_trouble{{{model}}})", "{{reason}}")],
            width=10,
        ),
        timeseries(
            "Share of streams in trouble",
            "Streams in trouble over streams with a drift summary. Alert TTAStreamsInTrouble "
            "fires above 25 % for 15 minutes: a fleet-wide shift, not one bad camera.",
            [target(f"tta:streams_in_trouble:ratio{{{model}}}", "{{model}}")],
            unit="percentunit",
            thresholds=[(0.25, "red")],
            width=8,
        ),
        row("Distributions over all streams"),
        heatmap(
            "Early-layer drift distribution",
            "How many streams have each early-layer drift (symmetric KL between the stream's and "
            "the source's BN statistics, first third of the layers). Mass moving up = inputs "
            "shifting; the trouble threshold is TTA_TROUBLE_DRIFT_EARLY.",
            f'sum by (le) (tta_fleet_stream_drift_bucket{{{model}, depth="early"}})',
            unit="short",
        ),
        heatmap(
            "Late-layer drift distribution",
            "The same for the last third of the BN layers. Late drift without early drift is a "
            "change of content (other classes, other scenes) rather than of pixels; the trouble "
            "threshold is TTA_TROUBLE_DRIFT_LATE.",
            f'sum by (le) (tta_fleet_stream_drift_bucket{{{model}, depth="late"}})',
            unit="short",
        ),
        heatmap(
            "Prediction entropy distribution",
            "Normalised prediction entropy per stream (0 = always certain, 1 = uniform). A band "
            "near 1 is a confused model; a band near 0 with low accuracy is a collapse.",
            f"sum by (le) (tta_fleet_stream_entropy_bucket{{{model}}})",
            unit="percentunit",
        ),
        heatmap(
            "Confidence distribution",
            "Mean max-probability per stream. Confidence falls with the shift on a source "
            "model; a healthy adapted stream keeps it high.",
            f"sum by (le) (tta_fleet_stream_confidence_bucket{{{model}}})",
            unit="percentunit",
        ),
        timeseries(
            "Mean drift by depth",
            "Fleet mean of the per-stream drift, early and late BN layers. A step up on all "
            "streams at once is a change upstream (a preprocessing or model rollout).",
            [
                target(
                    f"sum by (depth) (tta_fleet_stream_drift_gsum{{{model}}}) "
                    f"/ sum by (depth) (tta_fleet_stream_drift_gcount{{{model}}})",
                    "{{depth}}",
                )
            ],
            width=12,
        ),
        timeseries(
            "Top-K streams: drift by depth",
            "Drift of the top-K streams by severity, early and late layers. Only K streams "
            "(TTA_METRICS_TOP_K) have per-stream series; the counts above cover all of them.",
            [target(f"tta_stream_drift{{{model}}}", "{{stream}} {{depth}}")],
            width=12,
        ),
        row("Top-K streams by severity"),
        table(
            "Top-K streams",
            "The K streams with the highest severity: 2 and above = predictions in trouble "
            "(high entropy or collapse), 1 to 2 = only drift in trouble, below 1 = fine "
            "(docs/metrics.md). 'stale s' is the time since the stream's last adapted forward: a "
            "large value means the numbers are old, not current.",
            {
                "severity": top("tta_stream_severity", model),
                "drift early": top("tta_stream_drift", f'{model}, depth="early"'),
                "drift late": top("tta_stream_drift", f'{model}, depth="late"'),
                "entropy": top("tta_stream_entropy", model),
                "confidence": top("tta_stream_confidence", model),
                "top class share": top("tta_stream_dominant_class_share", model),
                "samples": top("tta_stream_samples", model),
                "stale s": "time() - " + top("tta_stream_last_update_timestamp_seconds", model),
            },
            by=("model", "stream"),
            width=WIDTH,
            height=10,
        ),
    ]
    return dashboard(
        "tta-fleet-drift",
        "tta-serve / Fleet drift",
        "How many streams are in trouble, drift and entropy over all streams, the top-K.",
        panels,
        [query_variable("model", "model", "label_values(tta_model_info, model)", include_all=True)],
    )


def stream_detail() -> dict[str, Any]:
    """One stream's signals over time, chosen among the top-K streams."""
    one = 'model="$model", stream="$stream"'
    panels = [
        stat(
            "Severity and staleness",
            "The stream's severity (2+: predictions in trouble, 1-2: drift only, below 1: "
            "fine), the seconds since its last adapted forward (a stale stream shows old "
            "numbers) and the images it adapted to.",
            [
                target(f"tta_stream_severity{{{one}}}", "severity"),
                target(f"time() - tta_stream_last_update_timestamp_seconds{{{one}}}", "stale s"),
                target(f"tta_stream_samples{{{one}}}", "samples"),
            ],
            width=WIDTH,
            height=4,
        ),
        timeseries(
            "Drift by depth",
            "Symmetric KL between the stream's and the source's BN statistics, early and late "
            "layers, against the trouble threshold. Early up = the pixels changed; late up "
            "alone = the content changed.",
            [
                target(f"tta_stream_drift{{{one}}}", "{{depth}}"),
                target('tta_trouble_threshold{signal="drift_early"}', "early threshold"),
                target('tta_trouble_threshold{signal="drift_late"}', "late threshold"),
            ],
            width=12,
        ),
        timeseries(
            "Entropy and confidence",
            "Normalised prediction entropy (0..1) and mean max-probability. High entropy: the "
            "model is unsure on this stream; entropy near 0 with one dominant class: collapse.",
            [
                target(f"tta_stream_entropy{{{one}}}", "entropy"),
                target(f"tta_stream_confidence{{{one}}}", "confidence"),
                target('tta_trouble_threshold{signal="entropy_high"}', "entropy threshold"),
            ],
            unit="percentunit",
            width=12,
        ),
        timeseries(
            "Dominant class share",
            "Share of the stream's recent predictions that went to its most frequent class. "
            "Near 1 with enough samples means the adaptation collapsed onto one class (unless "
            "the stream really shows one class).",
            [
                target(f"tta_stream_dominant_class_share{{{one}}}", "top class share"),
                target('tta_trouble_threshold{signal="dominant_share"}', "threshold"),
            ],
            unit="percentunit",
            width=12,
        ),
        timeseries(
            "Samples and severity",
            "Images the stream adapted to in total, and its severity over time. No stream is in "
            "trouble before its observer holds TTA_TROUBLE_MIN_IMAGES images.",
            [
                target(f"tta_stream_samples{{{one}}}", "samples"),
                target(f"tta_stream_severity{{{one}}}", "severity"),
            ],
            width=12,
        ),
        timeseries(
            "Live accuracy (label feedback)",
            "Accuracy of the stream's adapted and source predictions over its last labelled "
            "images (POST /v1/streams/{id}/feedback; streams created with feedback on). Adapted "
            "below source: adaptation hurts this stream (docs/safety.md).",
            [
                target(f'tta_stream_feedback_accuracy{{{one}, prediction="adapted"}}', "adapted"),
                target(f'tta_stream_feedback_accuracy{{{one}, prediction="source"}}', "source"),
            ],
            unit="percentunit",
            width=12,
        ),
        timeseries(
            "Labels and auto-resets",
            "Labelled images behind the live accuracy (few: noisy), and the stream's auto-resets "
            "since creation (a step is one reset; the model's causes are in the service "
            "overview's tta_auto_resets_total).",
            [
                target(f"tta_stream_feedback_labels{{{one}}}", "labels"),
                target(f"tta_stream_auto_resets{{{one}}}", "auto-resets"),
            ],
            width=12,
        ),
    ]
    return dashboard(
        "tta-stream-detail",
        "tta-serve / Stream detail",
        "One stream's drift, entropy, confidence and class share over time (top-K streams).",
        panels,
        [
            query_variable(
                "model", "model", "label_values(tta_stream_severity, model)", include_all=False
            ),
            query_variable(
                "stream",
                "stream",
                # the top-K by severity, and the streams with label feedback
                'label_values({__name__=~"tta_stream_severity|tta_stream_feedback_accuracy", '
                'model="$model"}, stream)',
                include_all=False,
            ),
        ],
    )


DASHBOARDS = {
    "service-overview.json": service_overview,
    "fleet-drift.json": fleet_drift,
    "stream-detail.json": stream_detail,
}


def render(name: str) -> str:
    """The JSON text of one dashboard file, as committed."""
    return json.dumps(DASHBOARDS[name](), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write (default) or check (``--check``) the dashboard files."""
    parser = argparse.ArgumentParser(description="Write the Grafana dashboards of tta-serve.")
    parser.add_argument("--check", action="store_true", help="fail if a file is out of date")
    args = parser.parse_args(argv)
    stale = []
    for name in DASHBOARDS:
        path = DASHBOARD_DIR / name
        text = render(name)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            DASHBOARD_DIR.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        sys.stderr.write(
            f"out of date: {', '.join(stale)}; run python -m deploy.grafana.generate\n"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
