"""``/v1/models`` and ``/v1/adapters``: what this server serves, and how adapters are configured."""

from __future__ import annotations

import inspect

from fastapi import APIRouter

from adapters import ADAPTERS, Adapter
from adapters.presets import PRESETS
from service.api.deps import AppStateDep
from service.schemas import (
    AdapterPublic,
    AdaptersPublic,
    ModelPublic,
    ModelsPublic,
    PresetPublic,
)

models_router = APIRouter(tags=["models"])
adapters_router = APIRouter(tags=["adapters"])


@models_router.get("")
async def list_served_models(state: AppStateDep) -> ModelsPublic:
    """The models this server serves (loaded ones are ready)."""
    data = []
    for runtime in state.runtimes.values():  # registered models, then ONNX files that loaded
        spec = runtime.spec
        lows, highs = spec.input_range(state.settings.input_range_margin)
        adapter, config = runtime.stream_adapter(None)
        data.append(
            ModelPublic(
                name=spec.name,
                architecture=spec.architecture,
                input_size=spec.input_size,
                mean=spec.mean,
                std=spec.std,
                input_min=(lows[0], lows[1], lows[2]),
                input_max=(highs[0], highs[1], highs[2]),
                max_image_pixels=state.settings.pixel_limit(spec),
                labels=list(spec.labels),
                device=str(runtime.device),
                ready=state.ready,
                default_adapter=adapter,
                default_adapter_config=config,
            )
        )
    return ModelsPublic(data=data)


@adapters_router.get("")
async def list_adapters() -> AdaptersPublic:
    """The registered adapters: each config's JSON schema, and the presets (recommended first)."""
    return AdaptersPublic(
        data=[
            AdapterPublic(
                name=name,
                description=_summary(adapter),
                config_schema=adapter.config.model_json_schema(),
                presets=[
                    PresetPublic(
                        name=preset_name,
                        config=adapter.config.model_validate(preset.config).model_dump(mode="json"),
                        accuracy=preset.accuracy,
                        use_when=preset.use_when,
                    )
                    for preset_name, preset in PRESETS.get(name, {}).items()
                ],
            )
            for name, adapter in sorted(ADAPTERS.items())
        ]
    )


def _summary(adapter: Adapter) -> str:
    """The first line of the adapter module's docstring (the method and its paper)."""
    module = inspect.getmodule(adapter.norm_stats)
    doc = inspect.getdoc(module) if module is not None else None
    return doc.splitlines()[0] if doc else ""
