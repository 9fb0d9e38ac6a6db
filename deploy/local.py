"""The observability stack as local processes: tta-serve, a real Prometheus, the demo traffic.

Used by the end-to-end test (tests/deploy/test_e2e.py) and by the pictures of
docs/observability.md (``python -m bench.observability_pictures``): Prometheus runs with the rules
of deploy/prometheus on a short scrape interval against a tta-serve on loopback, and every PromQL
expression of the dashboards and rules can be listed and evaluated through its HTTP API.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD_DIR = ROOT / "deploy" / "grafana" / "dashboards"
START_TIMEOUT_S = 120.0
# "signal OP number" at the end of an alert expression (see deploy/prometheus/rules/alerts.yml)
_CONDITION = re.compile(
    r"^(?P<signal>.+?)\s*(?P<op>==|!=|>=|<=|>|<)\s*(?P<threshold>[-+]?\d+(\.\d+)?)\s*$", re.DOTALL
)
_LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\)$")


class StackError(RuntimeError):
    """A process of the local stack did not start, or Prometheus refused a query."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_ready(process: subprocess.Popen[bytes], url: str, what: str) -> None:
    """Poll ``url`` until it answers 200; StackError if the process exits or time runs out."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StackError(f"{what} exited with status {process.returncode} during start-up")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise StackError(f"{what} was not ready within {START_TIMEOUT_S} s")


@contextlib.contextmanager
def _running(command: list[str], env: dict[str, str], ready_url: str, what: str) -> Iterator[None]:
    """Run ``command`` until the block ends (SIGTERM, then SIGKILL after 30 s)."""
    process = subprocess.Popen(command, env=env, cwd=ROOT)
    try:
        _wait_ready(process, ready_url, what)
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def tta_server(workdir: Path, **settings: str) -> Iterator[str]:
    """``tta-serve`` (``python -m service.main``) on a free loopback port; yields its URL.

    Args:
        workdir: the local state store's directory.
        settings: extra ``TTA_`` settings by field name (``metrics_top_k="10"``).
    """
    port = free_port()
    env = {
        **os.environ,
        "TTA_HOST": "127.0.0.1",
        "TTA_PORT": str(port),
        "TTA_STORE": "local",
        "TTA_DATA_DIR": str(workdir),
        "TTA_LOG_LEVEL": "warning",
        **{f"TTA_{name.upper()}": value for name, value in settings.items()},
    }
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "service.main"]
    with _running(command, env, f"{url}/v2/health/ready", "tta-serve"):
        yield url


@contextlib.contextmanager
def prometheus(target: str, workdir: Path, interval: str = "1s") -> Iterator[str]:
    """A real Prometheus scraping ``target`` (host:port) with the rules of deploy/prometheus.

    The config is deploy/prometheus/prometheus.yml with the target, the intervals and the rule
    paths replaced. Yields Prometheus's URL.
    """
    binary = shutil.which("prometheus")
    if binary is None:
        raise StackError("prometheus not found: `apt-get install -y prometheus` (Debian)")
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": interval, "evaluation_interval": interval}
    config["rule_files"] = [str(PROMETHEUS_DIR / path) for path in config["rule_files"]]
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "tta-serve"]
    job["static_configs"] = [{"targets": [target]}]
    config["scrape_configs"] = [job]
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    command = [
        binary,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    url = f"http://127.0.0.1:{port}"
    with _running(command, dict(os.environ), f"{url}/-/ready", "prometheus"):
        yield url


def run_traffic(url: str, duration_s: float, *extra: str) -> str:
    """Run ``python -m bench.traffic`` against ``url`` for ``duration_s``; its report."""
    command = [sys.executable, "-m", "bench.traffic", "--url", url, "--duration", str(duration_s)]
    result = subprocess.run(
        [*command, *extra], cwd=ROOT, capture_output=True, text=True, timeout=duration_s + 300
    )
    if result.returncode != 0:
        raise StackError(f"bench.traffic failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def query(prometheus_url: str, expr: str, at: float | None = None) -> list[dict[str, Any]]:
    """The instant vector of ``expr`` (at unix time ``at``, default now)."""
    params: dict[str, Any] = {"query": expr}
    if at is not None:
        params["time"] = at
    return _api(prometheus_url, "query", params)


def query_range(
    prometheus_url: str, expr: str, start: float, end: float, step: float
) -> list[dict[str, Any]]:
    """The range matrix of ``expr`` between ``start`` and ``end`` (unix times)."""
    params = {"query": expr, "start": start, "end": end, "step": step}
    return _api(prometheus_url, "query_range", params)


def _api(prometheus_url: str, endpoint: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    response = httpx.get(f"{prometheus_url}/api/v1/{endpoint}", params=params, timeout=30)
    body = response.json()
    if body.get("status") != "success":
        raise StackError(f"{params['query']}: {body.get('error', response.text)}")
    result = body["data"]["result"]
    if body["data"]["resultType"] == "scalar":
        return [{"metric": {}, "value": result}]
    return list(result)


# --- every expression of the dashboards and the rules --------------------------------------


@dataclass(frozen=True)
class Expression:
    """One PromQL expression and where it comes from (a panel, a variable, a rule)."""

    source: str  # "service-overview.json / Queue depth and bound", "alert TTAStoreDown", ...
    expr: str


def dashboard_expressions() -> list[Expression]:
    """Every query of every panel, and every template variable's selector."""
    found = []
    for path in sorted(DASHBOARD_DIR.glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                found.append(Expression(f"{path.name} / {panel['title']}", target["expr"]))
        for variable in board["templating"]["list"]:
            match = _LABEL_VALUES.match(variable["definition"])
            if match is None:
                raise ValueError(f"{path.name}: unsupported variable {variable['definition']}")
            found.append(Expression(f"{path.name} / ${variable['name']}", match["selector"]))
    return found


def rule_expressions() -> list[Expression]:
    """Every recording rule's expression, and every alert's condition in ``bool`` form.

    An alert ``signal > 0.8`` becomes ``signal > bool 0.8``: it has data (0 or 1 per series)
    whether or not the alert fires, so an empty result means a missing metric.
    """
    found = []
    for path in sorted((PROMETHEUS_DIR / "rules").glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "record" in rule:
                    found.append(Expression(f"record {rule['record']}", rule["expr"]))
                else:
                    found.append(Expression(f"alert {rule['alert']}", bool_condition(rule["expr"])))
    return found


def bool_condition(expr: str) -> str:
    """``signal OP number`` as ``(signal) OP bool number``; ValueError for another shape."""
    match = _CONDITION.match(expr.strip())
    if match is None:
        raise ValueError(f"not 'signal OP number': {expr}")
    return f"({match['signal']}) {match['op']} bool {match['threshold']}"


def substitute(expr: str, variables: dict[str, str], rate_interval: str = "1m") -> str:
    """``expr`` with Grafana's ``$__rate_interval`` and the template variables replaced."""
    expr = expr.replace("$__rate_interval", rate_interval)
    for name in sorted(variables, key=len, reverse=True):  # $stream before $s...
        expr = expr.replace(f"${name}", variables[name])
    return expr
