"""Adapter presets over HTTP: naming an adapter gives its recommended config; GET /v1/adapters."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from adapters import ADAPTERS
from tests.service.helpers import running_server, server_settings


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[httpx.Client]:
    settings = server_settings(tmp_path_factory.mktemp("presets"), model_cache, store="memory")
    with running_server(settings) as server, server.client() as http:
        yield http


def created_config(client: httpx.Client, body: dict) -> dict:
    response = client.post("/v1/streams", json=body)
    assert response.status_code == 201, response.text
    config: dict = response.json()["config"]
    return config


def test_naming_adabn_gives_the_recommended_config(client: httpx.Client) -> None:
    named = created_config(client, {"id": "named", "adapter": "adabn"})
    assert named == {"prior_images": 64.0, "window": None}


def test_the_readme_request_gets_the_server_default(client: httpx.Client) -> None:
    """The README's request gets what a stream created without an adapter gets (issue 18)."""
    readme = created_config(client, {"id": "readme", "adapter": "balanced", "preset": "gated"})
    omitted = created_config(client, {"id": "omitted"})
    assert readme == omitted
    assert (omitted["window"], omitted["window_min"], omitted["d0"]) == (1000.0, 100.0, 0.02)


def test_paper_preset_and_overrides(client: httpx.Client) -> None:
    paper = created_config(client, {"adapter": "adabn", "preset": "paper"})
    assert paper == {"prior_images": 0.0, "window": None}
    windowed = created_config(client, {"adapter": "adabn", "config": {"window": 512}})
    assert windowed == {"prior_images": 64.0, "window": 512}
    mixed = created_config(client, {"adapter": "unmix_tns", "preset": "paper_mixed"})
    assert mixed["components"] == 128


def test_unknown_preset_is_refused(client: httpx.Client) -> None:
    response = client.post("/v1/streams", json={"adapter": "tbn", "preset": "fast"})
    assert response.status_code == 422
    assert response.json() == {
        "error": {
            "code": "unknown_preset",
            "message": "adapter 'tbn' has no preset 'fast'; valid: paper, recommended",
        }
    }


def test_adapters_list_their_presets(client: httpx.Client) -> None:
    adapters = {a["name"]: a for a in client.get("/v1/adapters").json()["data"]}
    assert adapters.keys() == ADAPTERS.keys()
    adabn = {p["name"]: p for p in adapters["adabn"]["presets"]}
    assert adapters["adabn"]["presets"][0]["name"] == "recommended"
    assert adabn["recommended"]["config"] == {"prior_images": 64.0, "window": None}
    assert adabn["paper"]["config"] == {"prior_images": 0.0, "window": None}
    assert "Dirichlet(0.1) 49.7" in adabn["recommended"]["accuracy"]
    assert adabn["recommended"]["use_when"]
