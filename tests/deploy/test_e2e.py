"""End to end: a real Prometheus scrapes a real tta-serve fed by the demo traffic generator.

bench.traffic sends clean and corrupted CIFAR-10 images into five streams (one of them only over
/v2); then every PromQL expression of every dashboard panel and variable and of every rule is
evaluated through Prometheus's HTTP API and must return data, and the corrupted streams must show
as in trouble while the clean ones do not.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploy import local
from tests.service.redis_server import running_redis

MODEL = "cifar10_resnet20"
CLEAN = {"traffic-clean-0", "traffic-clean-1"}
CORRUPTED = {"traffic-gaussian_noise-5", "traffic-contrast-5", "traffic-shot_noise-5-v2"}
V2_ONLY = "traffic-shot_noise-5-v2"
TRAFFIC_S = 25
# Metrics that exist only on CUDA: on a CPU server their panels must be empty.
CUDA_ONLY = ("tta_gpu_memory_bytes", "tta_gpu_utilization_ratio")


@dataclass
class Stack:
    """The running stack after the traffic."""

    server: str
    prometheus: str


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Stack]:
    """tta-serve (Redis store) and Prometheus (1 s scrapes and rules) after 25 s of traffic."""
    workdir = tmp_path_factory.mktemp("e2e")
    (workdir / "server").mkdir()
    (workdir / "prometheus").mkdir()
    with (
        running_redis() as redis_url,
        local.tta_server(
            workdir / "server",
            model_cache_dir=str(model_cache),
            metrics_top_k="10",
            store="redis",  # as in docker-compose.yml
            redis_url=redis_url,
        ) as server,
        local.prometheus(server.removeprefix("http://"), workdir / "prometheus") as prometheus,
    ):
        report = local.run_traffic(server, TRAFFIC_S)
        assert all(f"{stream} 200" in report for stream in CLEAN | CORRUPTED), report
        # the last requests' effects scraped, and the rules evaluated on them
        time.sleep(3)
        yield Stack(server, prometheus)


def values(stack: Stack, expr: str) -> dict[str, float]:
    """The instant vector of ``expr``, by its ``stream`` label (or its label set)."""
    return {
        sample["metric"].get("stream", str(sample["metric"])): float(sample["value"][1])
        for sample in local.query(stack.prometheus, expr)
    }


@pytest.mark.slow
def test_every_dashboard_and_rule_expression_returns_data(stack: Stack) -> None:
    variables = {"model": MODEL, "stream": V2_ONLY}
    expressions = local.dashboard_expressions() + local.rule_expressions()
    assert len(expressions) > 60
    empty, cuda_only = [], []
    for expression in expressions:
        expr = local.substitute(expression.expr, variables)
        result = local.query(stack.prometheus, expr)
        if any(name in expr for name in CUDA_ONLY):
            cuda_only.append((expression.source, result))
        elif not result:
            empty.append(f"{expression.source}: {expr}")
    assert empty == []
    # on this CPU server the GPU panels exist and are empty (no GPU metric is faked)
    assert len(cuda_only) == len(CUDA_ONLY)
    assert all(result == [] for _, result in cuda_only)


@pytest.mark.slow
def test_template_variables_list_every_stream_including_the_v2_one(stack: Stack) -> None:
    sources = {e.source: e.expr for e in local.dashboard_expressions()}
    selector = sources["stream-detail.json / $stream"].replace("$model", MODEL)
    streams = {sample["metric"]["stream"] for sample in local.query(stack.prometheus, selector)}
    assert streams == CLEAN | CORRUPTED


@pytest.mark.slow
def test_corrupted_streams_are_in_trouble_and_clean_ones_are_not(stack: Stack) -> None:
    severity = values(stack, f'tta_stream_severity{{model="{MODEL}"}}')
    assert set(severity) == CLEAN | CORRUPTED
    # severity >= 1: some signal of the stream crossed its trouble threshold
    assert {stream for stream, value in severity.items() if value >= 1} == CORRUPTED
    # the fleet count (over all streams, not only the top-K) agrees
    (in_trouble,) = values(
        stack, f'tta_streams_in_trouble{{model="{MODEL}", reason="any"}}'
    ).values()
    assert in_trouble == len(CORRUPTED)
    (share,) = values(stack, f'tta:streams_in_trouble:ratio{{model="{MODEL}"}}').values()
    assert share == pytest.approx(len(CORRUPTED) / len(CLEAN | CORRUPTED))
    # staleness: every stream was updated during the traffic, none in the future
    stale = values(stack, "time() - tta_stream_last_update_timestamp_seconds")
    assert all(0 <= age < TRAFFIC_S + 60 for age in stale.values()), stale


@pytest.mark.slow
def test_alert_conditions_on_a_healthy_server_with_drifting_streams(stack: Stack) -> None:
    conditions = {
        expression.source.removeprefix("alert "): values(stack, expression.expr)
        for expression in local.rule_expressions()
        if expression.source.startswith("alert ")
    }
    for alert in ("TTAInstanceDown", "TTANotReady", "TTAStoreDown", "TTAHigh5xxRate"):
        assert set(conditions[alert].values()) == {0.0}, alert
    # the contrast stream drifts in its early layers; 3 of 5 streams are in trouble (> 25 %)
    assert set(conditions["TTAStreamDriftEarly"].values()) == {1.0}
    assert set(conditions["TTAStreamsInTrouble"].values()) == {1.0}
