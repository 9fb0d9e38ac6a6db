"""Pictures of the Grafana panels for docs/observability.md, from a real Prometheus.

    uv run python -m bench.observability_pictures            # ~2 minutes, writes docs/img/*.png

No Grafana server runs here, so the panels are drawn with matplotlib from the same PromQL as the
committed dashboards (deploy/grafana/dashboards/*.json, looked up by panel title): tta-serve and
Prometheus start on loopback (deploy/local.py, 1 s scrapes), ``bench.traffic`` feeds two clean
and three corrupted streams, then each panel's queries are read back over the traffic's window
through Prometheus's range API, with ``$__rate_interval`` = 15 s.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display on the benchmark machines
import matplotlib.pyplot as plt
import numpy as np

from deploy import local

log = logging.getLogger(__name__)

STREAM = "traffic-shot_noise-5-v2"  # the stream of the stream-detail pictures (fed over /v2)
VARIABLES = {"model": "cifar10_resnet20", "stream": STREAM}
RATE_INTERVAL = "15s"
STEP_S = 2.0
UNITS = {"s": "seconds", "reqps": "requests / s", "percentunit": "ratio", "bytes": "bytes"}
# (dashboard file, panel title, picture file)
PANELS = (
    ("fleet-drift.json", "Streams in trouble by reason", "fleet-trouble.png"),
    ("fleet-drift.json", "Early-layer drift distribution", "fleet-drift-early-heatmap.png"),
    ("fleet-drift.json", "Prediction entropy distribution", "fleet-entropy-heatmap.png"),
    ("fleet-drift.json", "Top-K streams: drift by depth", "fleet-topk-drift.png"),
    ("fleet-drift.json", "Top-K streams", "fleet-topk-table.png"),
    ("stream-detail.json", "Entropy and confidence", "stream-entropy.png"),
    ("service-overview.json", "Requests by route and status", "service-requests.png"),
    ("service-overview.json", "Latency by stage (p99)", "service-stage-latency.png"),
)


def find_panel(dashboard: str, title: str) -> dict[str, Any]:
    """The panel titled ``title`` of a committed dashboard."""
    board = json.loads((local.DASHBOARD_DIR / dashboard).read_text())
    (panel,) = [p for p in board["panels"] if p["title"] == title]
    return panel


def legend(template: str, labels: dict[str, str]) -> str:
    """Grafana's ``{{label}}`` legend format applied to a series' labels."""
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m[1], ""), template).strip()


def draw_timeseries(
    ax: Any, panel: dict[str, Any], prometheus: str, window: tuple[float, float]
) -> None:
    """Each query's series as lines, time in seconds from the start of the traffic."""
    start, end = window
    for target in panel["targets"]:
        expr = local.substitute(target["expr"], VARIABLES, RATE_INTERVAL)
        for series in local.query_range(prometheus, expr, start, end, STEP_S):
            times = np.array([float(t) for t, _ in series["values"]]) - start
            values = np.array([float(v) for _, v in series["values"]])
            ax.plot(times, values, label=legend(target["legendFormat"], series["metric"]))
    ax.set_xlabel("seconds since the traffic started")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)


def draw_heatmap(
    ax: Any, panel: dict[str, Any], prometheus: str, window: tuple[float, float]
) -> None:
    """The cumulative ``le`` buckets over time, de-accumulated: streams per bucket."""
    start, end = window
    (target,) = panel["targets"]
    expr = local.substitute(target["expr"], VARIABLES, RATE_INTERVAL)
    buckets = {
        s["metric"]["le"]: s["values"]
        for s in local.query_range(prometheus, expr, start, end, STEP_S)
    }
    bounds = sorted(buckets, key=float)
    times = np.array([float(t) for t, _ in buckets[bounds[0]]]) - start
    cumulative = np.array([[float(v) for _, v in buckets[le]] for le in bounds])
    counts = np.diff(cumulative, axis=0, prepend=0)
    image = ax.imshow(
        counts, aspect="auto", origin="lower", cmap="Oranges", interpolation="nearest",
        extent=(times[0], times[-1], 0, len(bounds)),
    )  # fmt: skip
    ax.set_yticks(np.arange(len(bounds)) + 0.5, [f"≤ {le}" for le in bounds], fontsize=7)
    ax.set_xlabel("seconds since the traffic started")
    plt.colorbar(image, ax=ax, label="streams")


def draw_table(ax: Any, panel: dict[str, Any], prometheus: str, at: float) -> None:
    """The instant queries merged by (model, stream), as the table panel shows them."""
    renames = panel["transformations"][1]["options"]["renameByName"]
    columns = list(renames.values())
    rows: dict[str, dict[str, float]] = {}
    for target, column in zip(panel["targets"], columns, strict=True):
        expr = local.substitute(target["expr"], VARIABLES, RATE_INTERVAL)
        for sample in local.query(prometheus, expr, at):
            rows.setdefault(sample["metric"]["stream"], {})[column] = float(sample["value"][1])
    ordered = sorted(rows.items(), key=lambda item: -item[1].get(columns[0], 0))
    cells = [
        [stream] + [f"{values.get(c, float('nan')):.4g}" for c in columns]
        for stream, values in ordered
    ]
    ax.axis("off")
    widths = [0.2] + [0.8 / len(columns)] * len(columns)
    table = ax.table(cellText=cells, colLabels=["stream", *columns], colWidths=widths, loc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    table.scale(1, 1.4)


def draw(panel: dict[str, Any], prometheus: str, window: tuple[float, float], path: Path) -> None:
    """One panel as a PNG, titled like the panel."""
    figure, ax = plt.subplots(figsize=(9, 3.6) if panel["type"] != "table" else (10, 2.6))
    if panel["type"] == "heatmap":
        draw_heatmap(ax, panel, prometheus, window)
    elif panel["type"] == "table":
        draw_table(ax, panel, prometheus, window[1])
    else:
        draw_timeseries(ax, panel, prometheus, window)
    ax.set_title(panel["title"], fontsize=10)
    unit = panel["fieldConfig"]["defaults"]["unit"]
    if panel["type"] == "timeseries" and unit in UNITS:
        ax.set_ylabel(UNITS[unit])
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    """Start the stack, run the traffic, draw every panel of PANELS into ``--out``."""
    parser = argparse.ArgumentParser(
        description="Draw the dashboard panels from a real Prometheus."
    )
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    parser.add_argument("--duration", type=float, default=90.0, help="seconds of traffic")
    parser.add_argument("--model-cache-dir", default=".cache/models")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        server_dir, prometheus_dir = Path(workdir, "server"), Path(workdir, "prometheus")
        server_dir.mkdir()
        prometheus_dir.mkdir()
        with (
            local.tta_server(
                server_dir, model_cache_dir=str(Path(args.model_cache_dir).resolve())
            ) as server,
            local.prometheus(server.removeprefix("http://"), prometheus_dir) as prometheus,
        ):
            start = time.time()
            log.info("traffic for %.0f s", args.duration)
            local.run_traffic(server, args.duration)
            time.sleep(3)  # the last scrape and rule evaluation
            window = (start, time.time())
            for dashboard, title, filename in PANELS:
                draw(find_panel(dashboard, title), prometheus, window, args.out / filename)
                log.info("wrote %s", args.out / filename)


if __name__ == "__main__":
    main()
