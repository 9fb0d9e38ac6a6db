"""What routes depend on: the app's state, its settings, the stream registry (Annotated aliases)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from service.auth import Authenticator
from service.errors import UnavailableError
from service.health import StoreHealth
from service.metrics import Metrics
from service.runtime import ModelRuntime
from service.settings import Settings
from service.stores import StateStore
from service.streams import StoreWriter, StreamRegistry


@dataclass(eq=False)
class AppState:
    """Everything one app instance owns; built by ``create_app``, filled by its lifespan."""

    settings: Settings
    metrics: Metrics
    auth: Authenticator
    runtimes: dict[str, ModelRuntime] = field(default_factory=dict)
    registry: StreamRegistry[ModelRuntime] | None = None
    store: StateStore | None = None
    writer: StoreWriter | None = None
    store_health: StoreHealth | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    ready: bool = False
    shutting_down: bool = False
    waiting_for_store: bool = False  # start-up found the store unreachable and retries it
    start_error: str | None = None  # why a start-up in the background failed
    grpc_port: int | None = None  # the port the gRPC service listens on, once started
    # Asks the server to exit (a background start-up failed); set by the entry point.
    request_exit: Callable[[], None] | None = None

    @property
    def serving(self) -> bool:
        """Started and not shutting down: readiness before the store's health is asked."""
        return self.ready and not self.shutting_down


def get_app_state(request: Request) -> AppState:
    """The app's state."""
    state: AppState = request.app.state.tta
    return state


def get_settings(request: Request) -> Settings:
    """The app's settings."""
    return get_app_state(request).settings


def get_registry(request: Request) -> StreamRegistry[ModelRuntime]:
    """The stream registry, once the models are loaded; 503 before and while shutting down."""
    return registry_of(get_app_state(request))


def registry_of(state: AppState) -> StreamRegistry[ModelRuntime]:
    """The app's stream registry; UnavailableError (503) before it is ready and at shutdown."""
    if state.shutting_down:
        raise UnavailableError("the server is shutting down")
    if state.start_error is not None:
        raise UnavailableError(f"the server failed to start: {state.start_error}")
    if state.waiting_for_store:
        raise UnavailableError("the server is starting: waiting for the state store to answer")
    if not state.ready or state.registry is None:
        raise UnavailableError("the server is starting: models are not loaded yet")
    return state.registry


AppStateDep = Annotated[AppState, Depends(get_app_state)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[StreamRegistry[ModelRuntime], Depends(get_registry)]
