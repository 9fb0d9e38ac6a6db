"""The app factory and the ``tta-serve`` entry point.

``create_app(settings)`` builds a FastAPI app whose lifespan loads the models, opens the state
store, restores the stored streams, and starts one batcher per model plus the periodic flush
(``durability=interval``) and TTL expiry; at shutdown it refuses new requests, drains every
queue, and flushes every changed stream to the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import uvicorn
from fastapi import FastAPI

from models import ModelError
from service.api import catalog, oip, streams
from service.api import metrics as metrics_api
from service.api.deps import AppState
from service.errors import install_error_handlers
from service.metrics import Metrics
from service.middleware import BodyLimitMiddleware, MetricsMiddleware
from service.runtime import load_runtime, resolve_device
from service.scheduler import Batcher
from service.settings import OnnxModel, Settings
from service.stores import create_store
from service.streams import StoreWriter, StreamRegistry

logger = logging.getLogger(__name__)

EXPIRY_PERIOD_S = 1.0


def create_app(settings: Settings, metrics: Metrics | None = None) -> FastAPI:
    """Build the app for ``settings`` (nothing is loaded until its lifespan starts).

    Args:
        settings: the server's settings.
        metrics: the metrics to record into (default: a fresh registry for this app).

    Example:
        >>> app = create_app(Settings(store="memory"))
        >>> # uvicorn.run(app, host="127.0.0.1", port=8000)
    """
    state = AppState(settings=settings, metrics=metrics or Metrics())
    app = FastAPI(
        title="tta-serve",
        summary="Test-time adaptation of BatchNorm statistics, per client stream",
        version="0.1.0",
        lifespan=_lifespan,
    )
    app.state.tta = state
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    app.include_router(streams.router, prefix="/v1/streams")
    app.include_router(catalog.models_router, prefix="/v1/models")
    app.include_router(catalog.adapters_router, prefix="/v1/adapters")
    app.include_router(oip.router)
    app.include_router(metrics_api.router)
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: AppState = app.state.tta
    settings, metrics = state.settings, state.metrics
    store = await asyncio.to_thread(
        create_store,
        settings.store,
        directory=settings.data_dir.expanduser() / "streams",
        redis_url=settings.redis_url,
    )
    writer = StoreWriter(store, metrics)
    device = resolve_device(settings.device)
    served: list[str | OnnxModel] = [*settings.models, *settings.onnx_models]
    for name in served:
        try:
            runtime = await asyncio.to_thread(
                load_runtime,
                name,
                cache_dir=settings.model_cache_dir,
                device=device,
                capacity=settings.slots_per_pool,
                observer_window=settings.observer_window,
                amp=settings.amp,
                cuda_graphs=settings.cuda_graphs,
                max_state_bytes=settings.max_state_bytes,
                max_state_header_bytes=settings.max_state_header_bytes,
                writer=writer,
                max_streams=settings.max_streams,
                metrics=metrics,
            )
        except ModelError as error:
            if isinstance(name, str):
                raise  # a registered model that does not load is a broken installation
            # A user's ONNX file: refused with its reason, the other models are served.
            logger.error("model %s refused: %s", name.name, error)
            continue
        state.runtimes[runtime.name] = runtime
    registry = StreamRegistry(
        state.runtimes,
        writer,
        sync=settings.durability == "sync",
        default_ttl_s=settings.stream_ttl_s,
        metrics=metrics,
    )
    restored = await asyncio.to_thread(registry.restore)
    logger.info("restored %d streams from the %s store", restored, settings.store)
    for runtime in state.runtimes.values():
        batcher = Batcher(
            runtime,
            max_batch_size=settings.max_batch_size,
            max_delay_s=settings.max_delay_ms / 1000,
            max_queue=settings.max_queue,
            sync=settings.durability == "sync",
            metrics=metrics,
        )
        batcher.start()
        runtime.batcher = batcher
    metrics.track_top_streams(registry.signals, settings.metrics_top_k)
    tasks = [
        asyncio.create_task(_every(settings.flush_interval_s, registry.flush), name="flush"),
        asyncio.create_task(_every(EXPIRY_PERIOD_S, registry.expire), name="expire"),
    ]
    state.registry = registry
    state.ready = True
    logger.info("ready: serving %s on %s", ", ".join(state.runtimes), device)
    try:
        yield
    finally:
        state.shutting_down = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for runtime in state.runtimes.values():
            if runtime.batcher is not None:
                await runtime.batcher.stop()  # drains the queue
        await registry.flush()
        writer.close()
        for runtime in state.runtimes.values():
            runtime.close()
        store.close()
        logger.info("stopped: every changed stream was flushed")


async def _every(period_s: float, job: Callable[[], Awaitable[object]]) -> None:
    """Run ``job`` every ``period_s`` seconds until cancelled; log its failures."""
    while True:
        await asyncio.sleep(period_s)
        try:
            await job()
        except Exception:  # a periodic job must survive one bad round
            logger.exception("periodic %s failed", getattr(job, "__name__", job))


def main() -> None:
    """``tta-serve``: serve ``create_app(Settings())`` with uvicorn, one worker.

    ``tta-serve export-onnx MODEL FILE`` writes a registered model to ONNX instead.
    """
    if sys.argv[1:2] == ["export-onnx"]:
        from models.export_onnx import main as export_onnx  # torch.onnx only when asked

        export_onnx(sys.argv[2:])
        return
    settings = Settings()
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        workers=1,
        log_level=settings.log_level,
        log_config=None,
    )


if __name__ == "__main__":
    main()
