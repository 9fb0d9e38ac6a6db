"""The app factory and the ``tta-serve`` entry point.

``create_app(settings)`` builds a FastAPI app whose lifespan loads the models, opens the state
store, restores the stored streams, and starts one batcher per model plus the periodic flush
(``durability=interval``) and TTL expiry; at shutdown it refuses new requests, drains every
queue, and flushes every changed stream to the store. A state store that does not answer at
start-up is retried in the background for ``store_connect_timeout_s`` while the server answers
``/v2/health/live`` 200 and ``/v2/health/ready`` 400; readiness also follows the store later on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import uvicorn
from asgi_correlation_id import CorrelationIdMiddleware
from fastapi import FastAPI
from starlette.middleware.gzip import GZipMiddleware

from models import ModelError
from service.api import catalog, oip, safety, streams
from service.api import metrics as metrics_api
from service.api.deps import AppState
from service.api.openapi import DOCS_ASSETS_URL, docs_assets, docs_router, install_openapi
from service.auth import AUTHENTICATED, READ, Authenticator
from service.errors import install_error_handlers
from service.grpc_server import start_grpc
from service.health import StoreHealth
from service.logs import REQUEST_ID, configure_logging, is_plain_id
from service.metrics import Metrics, TroubleThresholds
from service.middleware import (
    BodyLimitMiddleware,
    DecompressMiddleware,
    MetricsMiddleware,
    ServedByMiddleware,
)
from service.runtime import CompileOptions, load_runtime, resolve_device
from service.safety import SafetyLimits
from service.scheduler import Batcher
from service.schemas import Base64Images
from service.settings import OnnxModel, Settings, UserModel, unknown_variables
from service.stores import StateStore, StoreError, create_store
from service.streams import StoreWriter, StreamRegistry

logger = logging.getLogger(__name__)

EXPIRY_PERIOD_S = 1.0
FIRST_RETRY_S = 0.1  # backoff of the store connection at start-up: 0.1 s, doubling, to 5 s
MAX_RETRY_S = 5.0
GRPC_STOP_GRACE_S = 5.0
GZIP_MIN_BYTES = 1024  # smaller responses are sent as they are (Accept-Encoding: gzip or not)


def create_app(settings: Settings, metrics: Metrics | None = None) -> FastAPI:
    """Build the app for ``settings`` (nothing is loaded until its lifespan starts).

    Args:
        settings: the server's settings.
        metrics: the metrics to record into (default: a fresh registry for this app).

    Example:
        >>> app = create_app(Settings(store="memory"))
        >>> # uvicorn.run(app, host="127.0.0.1", port=8000)
    """
    auth = Authenticator(settings.api_keys, settings.api_keys_file)
    state = AppState(settings=settings, metrics=metrics or Metrics(), auth=auth)
    state.metrics.ready.set_function(lambda: float(is_ready(state)))
    app = FastAPI(
        title="tta-serve",
        summary="Test-time adaptation of BatchNorm statistics, per client stream",
        version="0.1.0",
        lifespan=_lifespan,
        # served by openapi.docs_router instead, behind a key when authentication is on
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.tta = state
    install_error_handlers(app)
    # The last added runs first: a compressed body is bounded as sent, then once inflated.
    app.add_middleware(DecompressMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    app.add_middleware(ServedByMiddleware, replica_id=settings.replica_id)
    app.add_middleware(GZipMiddleware, minimum_size=GZIP_MIN_BYTES)
    # outermost: every answer carries the request id, the 413 of the body limit too
    app.add_middleware(CorrelationIdMiddleware, header_name=REQUEST_ID, validator=is_plain_id)
    # every stream route needs a key (when authentication is on), a route added later included;
    # each route then names its stream through streams.ReadKey or streams.WriteKey (its role)
    app.include_router(streams.router, prefix="/v1/streams", dependencies=[AUTHENTICATED])
    app.include_router(safety.router, prefix="/v1/streams", dependencies=[AUTHENTICATED])
    app.include_router(catalog.models_router, prefix="/v1/models", dependencies=[READ])
    app.include_router(catalog.adapters_router, prefix="/v1/adapters", dependencies=[READ])
    app.include_router(oip.router)
    app.include_router(metrics_api.router)
    install_openapi(app, [Base64Images, oip.InferRequest, oip.InferResponse])
    app.include_router(docs_router)
    app.mount(DOCS_ASSETS_URL, docs_assets(), name="docs-assets")
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
        except BaseException as error:
            await _stop(state)
            if isinstance(error, ModelError):  # the reason is in the message: no traceback
                state.start_error = str(error)
                logger.error("cannot start: %s", error)
            raise
    grpc_server = None
    if state.settings.grpc_port is not None:
        grpc_server = start_grpc(state, asyncio.get_running_loop())
    try:
        yield
    finally:
        state.shutting_down = True
        if grpc_server is not None:  # its calls in flight finish on this loop meanwhile
            await asyncio.to_thread(grpc_server.stop(GRPC_STOP_GRACE_S).wait)
        if waiting is not None:
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
        await _stop(state)


def _open_store(settings: Settings) -> StateStore:
    return create_store(
        settings.store,
        directory=settings.data_dir.expanduser() / "streams",
        redis_url=settings.redis_url,
        redis_cluster=settings.redis_cluster,
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
    served: list[str | OnnxModel | UserModel] = [
        *settings.models,
        *settings.onnx_models,
        *settings.user_models,
    ]
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
                ),
                default_adapters=settings.default_adapters(),
                default_state_bytes=settings.default_state_bytes,
                max_state_bytes=settings.max_state_bytes,
                max_state_header_bytes=settings.max_state_header_bytes,
                writer=writer,
                max_streams=settings.max_streams,
                metrics=metrics,
            )
        except ModelError as error:
            if isinstance(name, str):
                raise  # a registered model that does not load is a broken installation
            # A user's ONNX file or model: refused with its reason, the other models are served.
            logger.error("model %s refused: %s", name.name, error)
            continue
        state.runtimes[runtime.name] = runtime
    registry = StreamRegistry(
        state.runtimes,
        writer,
        sync=settings.durability == "sync",
        default_ttl_s=settings.stream_ttl_s,
        metrics=metrics,
        limits=SafetyLimits(
            idempotency_max_keys=settings.idempotency_max_keys,
            idempotency_window_s=settings.idempotency_window_s,
            feedback_window=settings.feedback_window,
            feedback_max_requests=settings.feedback_max_requests,
            max_snapshots=settings.max_snapshots,
            snapshot_interval_images=settings.snapshot_interval_images,
        ),
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


def serve(settings: Settings) -> None:
    """Serve ``create_app(settings)`` with uvicorn, one worker (``tta-serve serve``).

    Warns about ``TTA_`` variables that no setting reads (a typo leaves a default in force).
    Exits non-zero when the start-up fails: 3 (uvicorn's) when the lifespan fails, 1 when it
    failed in the background (a state store that never answered). A model that cannot be loaded
    (weights neither cached nor downloadable) is one line in the log, not a traceback.
    """
    configure_logging(settings.log_level, settings.log_format)
    for name, nearest in unknown_variables(os.environ):
        hint = f"; did you mean {nearest}?" if nearest else ""
        logger.warning("%s is not a setting and is ignored%s", name, hint)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,
        log_level=settings.log_level,
        log_config=None,
        access_log=False,  # service.middleware.MetricsMiddleware writes it, with the request id
    )
    server = uvicorn.Server(config)
    state: AppState = app.state.tta
    state.request_exit = functools.partial(setattr, server, "should_exit", True)
    logging.getLogger("uvicorn.error").addFilter(_KnownStartupError(state))
    server.run()
    if not server.started or state.start_error is not None:
        sys.exit(1)


class _KnownStartupError(logging.Filter):
    """Drop uvicorn's traceback of a start-up failure the lifespan already logged in one line."""

    def __init__(self, state: AppState) -> None:
        super().__init__()
        self.state = state

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep every record but the traceback text of a known start-up error."""
        known = self.state.start_error is not None
        return not (known and str(record.msg).startswith("Traceback (most recent call last)"))


def main() -> None:
    """Serve with the settings of the environment (``tta-serve`` without flags does this)."""
    serve(Settings())


if __name__ == "__main__":
    main()
