"""/docs and /redoc render offline: their assets come from the app, loaded in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.helpers import Server, running_server, server_settings


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Server]:
    settings = server_settings(tmp_path_factory.mktemp("docs"), model_cache, store="memory")
    with running_server(settings) as running:
        yield running


def rendered(url: str) -> str:
    """The page's DOM after its scripts ran, from headless Chromium (Debian's `chromium`)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium not found: `apt-get install -y chromium` (scripts/test does)")
    # No network but the test server's: a CDN asset would fail to load and nothing would render.
    process = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=127.0.0.1",
         "--virtual-time-budget=20000", "--dump-dom", url],
        capture_output=True, text=True, timeout=180, check=True,
    )  # fmt: skip
    return process.stdout


def operations(server: Server) -> set[tuple[str, str]]:
    with server.client() as http:
        paths = http.get("/openapi.json").json()["paths"]
    return {(method, path) for path, item in paths.items() for method in item}


def test_assets_are_served_by_the_app(server: Server) -> None:
    with server.client() as http:
        for page in ("/docs", "/redoc"):
            html = http.get(page).text
            assets = re.findall(r'(?:src|href)="([^"]+)"', html)
            assert assets and all(a.startswith("/static-offline-docs/") for a in assets), assets
            for asset in assets:
                assert http.get(asset).status_code == 200


@pytest.mark.slow
def test_swagger_ui_renders_every_operation(server: Server) -> None:
    dom = rendered(f"{server.url}/docs")
    blocks = re.findall(r'class="opblock opblock-(\w+)[^"]*".*?data-path="([^"]+)"', dom)
    assert set(blocks) == operations(server)


@pytest.mark.slow
def test_redoc_renders_every_operation(server: Server) -> None:
    dom = rendered(f"{server.url}/redoc")
    with server.client() as http:
        paths = http.get("/openapi.json").json()["paths"]
    ids = {op["operationId"] for item in paths.values() for op in item.values()}
    assert set(re.findall(r'id="tag/[^/"]+/operation/([^"]+)"', dom)) == ids
