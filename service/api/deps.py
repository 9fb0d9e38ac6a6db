"""What routes depend on: the app's state, its settings, the stream registry (Annotated aliases)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from service.errors import UnavailableError
from service.metrics import Metrics
from service.runtime import ModelRuntime
from service.settings import Settings
from service.streams import StreamRegistry


@dataclass(eq=False)
class AppState:
    """Everything one app instance owns; built by ``create_app``, filled by its lifespan."""

    settings: Settings
    metrics: Metrics
    runtimes: dict[str, ModelRuntime] = field(default_factory=dict)
    registry: StreamRegistry[ModelRuntime] | None = None
    ready: bool = False
    shutting_down: bool = False


def get_app_state(request: Request) -> AppState:
    """The app's state."""
    state: AppState = request.app.state.tta
    return state


def get_settings(request: Request) -> Settings:
    """The app's settings."""
    return get_app_state(request).settings


def get_registry(request: Request) -> StreamRegistry[ModelRuntime]:
    """The stream registry, once the models are loaded; 503 before and while shutting down."""
    state = get_app_state(request)
    if state.shutting_down:
        raise UnavailableError("the server is shutting down")
    if not state.ready or state.registry is None:
        raise UnavailableError("the server is starting: models are not loaded yet")
    return state.registry


AppStateDep = Annotated[AppState, Depends(get_app_state)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[StreamRegistry[ModelRuntime], Depends(get_registry)]
