"""deploy/k8s validated offline against the Kubernetes OpenAPI schemas (kubernetes-validate,
which ships them: no cluster, no network). The ServiceMonitor is a Prometheus Operator CRD,
absent from those schemas: its shape is checked here by hand."""

from __future__ import annotations

from pathlib import Path
from string import Template
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30"
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
GATEWAY_VALUES = {
    "TTA_GATEWAY_LISTEN": "8080",
    "TTA_GATEWAY_PREFIX": "/tmp/nginx",
    "TTA_UPSTREAM_SERVERS": (
        "zone tta_replicas 1m;\n"
        "        resolver kube-dns.kube-system.svc.cluster.local valid=5s;\n"
        "        server tta-serve-pods.default.svc.cluster.local:8000 resolve max_fails=1"
        " fail_timeout=10s;"
    ),
}


def documents() -> list[dict[str, Any]]:
    """Every manifest in deploy/k8s."""
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def find(kind: str, name: str) -> dict[str, Any]:
    """The manifest of ``kind`` named ``name``."""
    for doc in documents():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind} {name} in deploy/k8s")


def test_every_required_kind_is_there() -> None:
    kinds = {doc["kind"] for doc in documents()}
    assert kinds >= {
        "Deployment",
        "Service",
        "StatefulSet",
        "ConfigMap",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "HorizontalPodAutoscaler",
    }


@pytest.mark.parametrize(
    "doc",
    [d for d in documents() if (d["apiVersion"], d["kind"]) not in CRDS],
    ids=lambda d: f"{d['kind']}/{d['metadata']['name']}",
)
def test_manifest_matches_the_kubernetes_schema(doc: dict[str, Any]) -> None:
    # strict: a misspelt or misplaced field is an error, not ignored
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_validator_catches_a_bad_manifest() -> None:
    bad = find("Deployment", "tta-serve")
    bad = {**bad, "spec": {**bad["spec"], "replica": 3}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


def test_service_monitor_scrapes_the_service_port() -> None:
    monitor = find("ServiceMonitor", "tta-serve")
    service = find("Service", "tta-serve")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["http"]
    assert ports == {"http"}
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_settings_are_valid_and_the_grace_period_covers_the_drain() -> None:
    config = find("ConfigMap", "tta-serve")["data"]
    settings = Settings(**{k.removeprefix("TTA_").lower(): v for k, v in config.items()})
    pod = find("Deployment", "tta-serve")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > settings.request_timeout_s


def test_gateway_config_is_the_rendered_template() -> None:
    template = (ROOT / "deploy" / "nginx" / "tta-gateway.conf.template").read_text()
    rendered = Template(template).safe_substitute(GATEWAY_VALUES)
    assert find("ConfigMap", "tta-gateway")["data"]["nginx.conf"] == rendered
