"""The app factory and the ``tta-serve`` entry point.

``create_app(settings)`` builds a FastAPI app whose lifespan loads the models, opens the state
store, restores the stored streams, and starts one batcher per model plus the periodic flush
(``durability=interval``) and TTL expiry; at shutdown it refuses new requests, drains every
queue, and flushes every changed stream to the store. A state store that does not answer at
start-up is retried in the background for ``store_connect_timeout_s`` while the server answers
``/v2/health/live`` 200 and ``/v2/health/ready`` 503; readiness also follows the store later on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import uvicorn
from fastapi import FastAPI

from models import ModelError
from service.api import catalog, oip, streams
from service.api import metrics as metrics_api
from service.api.deps import AppState
from service.api.openapi import install_openapi
from service.errors import install_error_handlers
from service.health import StoreHealth
from service.metrics import Metrics, TroubleThresholds
from service.middleware import BodyLimitMiddleware, MetricsMiddleware, ServedByMiddleware
from service.runtime import CompileOptions, load_runtime, resolve_device
from service.scheduler import Batcher
from service.schemas import Base64Images
from service.settings import OnnxModel, Settings
from service.stores import StateStore, StoreError, create_store
from service.streams import StoreWriter, StreamRegistry

logger = logging.getLogger(__name__)

EXPIRY_PERIOD_S = 1.0
FIRST_RETRY_S = 0.1  # backoff of the store connection at start-up: 0.1 s, doubling, to 5 s
MAX_RETRY_S = 5.0


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
    state.metrics.ready.set_function(lambda: float(is_ready(state)))
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
    app.add_middleware(ServedByMiddleware, replica_id=settings.replica_id)
    app.include_router(streams.router, prefix="/v1/streams")
    app.include_router(catalog.models_router, prefix="/v1/models")
    app.include_router(catalog.adapters_router, prefix="/v1/adapters")
    app.include_router(oip.router)
    app.include_router(metrics_api.router)
    install_openapi(app, [Base64Images, oip.InferRequest, oip.InferResponse])
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the app before serving; stop it after.

    A state store that does not answer at start-up (Redis still starting) does not fail the
    start-up at once: the server starts listening, answers live but not ready, and connects
    with exponential backoff for ``store_connect_timeout_s`` in the background, then loads the
    models; past that time it gives up and asks the process to exit.
    """
    state: AppState = app.state.tta
    waiting: asyncio.Task[None] | None = None
    try:
        store = await asyncio.to_thread(_open_store, state.settings)
    except StoreError as error:
        if state.settings.store_connect_timeout_s <= 0:
            raise
        logger.warning(
            "the state store does not answer (%s): not ready; retrying for %g s",
            error,
            state.settings.store_connect_timeout_s,
        )
        state.waiting_for_store = True
        waiting = asyncio.create_task(_start_when_store_answers(state), name="start")
    else:
        try:
            await _start(state, store)
        except BaseException:
            await _stop(state)
            raise
    try:
        yield
    finally:
        state.shutting_down = True
        if waiting is not None:
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
        await _stop(state)


def _open_store(settings: Settings) -> StateStore:
    return create_store(
        settings.store,
        directory=settings.data_dir.expanduser() / "streams",
        redis_url=settings.redis_url,
        replica_id=settings.replica_id,
        lease_ttl_s=settings.lease_ttl_s,
    )


async def _start_when_store_answers(state: AppState) -> None:
    """Connect to the store with exponential backoff until the deadline, then start."""
    loop = asyncio.get_running_loop()
    timeout = state.settings.store_connect_timeout_s
    deadline = loop.time() + timeout
    delay = FIRST_RETRY_S
    while True:
        await asyncio.sleep(max(0.0, min(delay, deadline - loop.time())))
        try:
            store = await asyncio.to_thread(_open_store, state.settings)
            break
        except StoreError as error:
            if loop.time() >= deadline:
                _fail(state, f"the state store did not answer within {timeout:g} s: {error}")
                return
            delay = min(2 * delay, MAX_RETRY_S)
    state.waiting_for_store = False
    logger.info("the state store answers: starting")
    try:
        await _start(state, store)
    except Exception as error:  # any start-up failure: the same exit as at the start
        logger.exception("start-up failed")
        _fail(state, f"{type(error).__name__}: {error}")


def _fail(state: AppState, reason: str) -> None:
    """Record why a background start-up failed, and ask the process to exit."""
    logger.error("start-up failed: %s", reason)
    state.waiting_for_store = False
    state.start_error = reason
    if state.request_exit is not None:
        state.request_exit()


async def _start(state: AppState, store: StateStore) -> None:
    """Load the models, restore the stored streams, start the batchers and periodic jobs."""
    settings, metrics = state.settings, state.metrics
    state.store = store
    metrics.store_up.set(1)  # it answered (each store operation updates it from now on)
    state.writer = writer = StoreWriter(store, metrics)
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
                compile=CompileOptions(
                    settings.engine_mode,
                    settings.compile_row_buckets,
                    settings.compile_stream_buckets,
                    settings.compile_warmup,
                    settings.default_adapter,
                    settings.default_adapter_config,
                ),
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
    metrics.track_streams(
        registry.observed, settings.models, trouble_thresholds(settings), settings.metrics_top_k
    )
    metrics.track_gpus([device])
    state.tasks = [
        asyncio.create_task(_every(settings.flush_interval_s, registry.flush), name="flush"),
        asyncio.create_task(_every(EXPIRY_PERIOD_S, registry.expire), name="expire"),
    ]
    state.registry = registry
    state.store_health = StoreHealth(store)
    state.ready = True
    logger.info("ready: serving %s on %s", ", ".join(state.runtimes), device)


async def _stop(state: AppState) -> None:
    """Drain every queue and flush every changed stream; stop whatever the start-up started."""
    state.shutting_down = True
    for task in state.tasks:
        task.cancel()
    await asyncio.gather(*state.tasks, return_exceptions=True)
    for runtime in state.runtimes.values():
        if runtime.batcher is not None:
            await runtime.batcher.stop()  # drains the queue
    if state.registry is not None:
        await state.registry.flush()
    if state.writer is not None:
        state.writer.close()
        # every write is done: other replicas may take the streams over now, not at lease expiry
        for runtime in state.runtimes.values():
            await runtime.call(runtime.slots.release_all)
    for runtime in state.runtimes.values():
        runtime.close()
    if state.store is not None:
        state.store.close()
    logger.info("stopped: every changed stream was flushed")


def is_ready(state: AppState) -> bool:
    """Readiness as ``/v2/health/ready`` last found it (the store's last ping, not a new one)."""
    store_answers = state.store_health is None or state.store_health.answered
    return state.serving and store_answers


def trouble_thresholds(settings: Settings) -> TroubleThresholds:
    """The settings' thresholds of a stream "in trouble"."""
    return TroubleThresholds(
        drift_early=settings.trouble_drift_early,
        drift_late=settings.trouble_drift_late,
        entropy_high=settings.trouble_entropy_high,
        entropy_low=settings.trouble_entropy_low,
        dominant_share=settings.trouble_dominant_share,
        min_images=settings.trouble_min_images,
    )


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

    Exits with status 1 when the start-up fails, also one that failed in the background (a
    state store that never answered).

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
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,
        log_level=settings.log_level,
        log_config=None,
    )
    server = uvicorn.Server(config)
    state: AppState = app.state.tta
    state.request_exit = functools.partial(setattr, server, "should_exit", True)
    server.run()
    if not server.started or state.start_error is not None:
        sys.exit(1)


if __name__ == "__main__":
    main()
