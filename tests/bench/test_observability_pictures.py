"""The pictures script draws panels that exist in the committed dashboards."""

from __future__ import annotations

import pytest

from bench import observability_pictures as pictures


@pytest.mark.parametrize(("dashboard", "title", "filename"), pictures.PANELS)
def test_every_picture_is_a_committed_panel(dashboard: str, title: str, filename: str) -> None:
    panel = pictures.find_panel(dashboard, title)
    assert panel["targets"]
    assert (pictures.local.ROOT / "docs" / "img" / filename).is_file()


def test_legend_uses_grafana_label_templates() -> None:
    labels = {"route": "/v2/models/{model}/infer", "status": "200"}
    assert pictures.legend("{{route}} {{ status }}", labels) == "/v2/models/{model}/infer 200"
    assert pictures.legend("p99 {{missing}}", labels) == "p99"
