"""The entry point and the app's start-up: one uvicorn worker, clear failures, readiness."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from models import UnknownModelError
from service import main
from service.main import create_app
from tests.service.helpers import server_settings


def test_main_runs_one_uvicorn_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []

    def run(server: Any) -> None:
        calls.append(server.config)
        server.started = True

    monkeypatch.setattr(main.uvicorn.Server, "run", run)
    monkeypatch.setattr(main.logging, "basicConfig", lambda **kwargs: None)
    monkeypatch.setenv("TTA_PORT", "9123")
    monkeypatch.setenv("TTA_HOST", "0.0.0.0")
    monkeypatch.setenv("TTA_ALLOW_UNAUTHENTICATED", "true")
    main.main()
    (config,) = calls
    assert config.workers == 1 and config.port == 9123 and config.host == "0.0.0.0"
    assert config.app.title == "tta-serve"


def test_unknown_model_fails_start_up(tmp_path: Path, model_cache: Path) -> None:
    app = create_app(server_settings(tmp_path, model_cache, models=["resnet2000"]))

    async def start() -> None:
        async with app.router.lifespan_context(app):
            pass

    with pytest.raises(UnknownModelError, match="Unknown model 'resnet2000'"):
        asyncio.run(start())


def test_in_process_app_is_ready_and_serves(tmp_path: Path, model_cache: Path) -> None:
    """The app also works in-process (ASGI transport): lifespan, readiness, a prediction."""
    app = create_app(server_settings(tmp_path, model_cache, store="memory"))

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://app") as client,
        ):
            assert (await client.get("/v2/health/ready")).json() == {"ready": True}
            await client.post("/v1/streams", json={"id": "inproc", "adapter": "tbn"})
            response = await client.post(
                "/v1/streams/inproc/predict",
                content=bytes(2 * 3 * 32 * 32),
                params={"shape": "2,3,32,32"},
                headers={"content-type": "application/octet-stream"},
            )
            assert response.status_code == 200
            assert len(response.json()["predictions"]) == 2
        # Shut down: the lifespan drained the queue and marked the app as stopping.
        assert app.state.tta.shutting_down is True
        response = await httpx.AsyncClient(transport=transport, base_url="http://app").get(
            "/v1/streams"
        )
        assert response.status_code == 503
        assert response.json()["error"]["message"] == "the server is shutting down"
        assert response.headers["retry-after"] == "1"

    asyncio.run(scenario())
