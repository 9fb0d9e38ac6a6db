"""The server's settings: one pydantic-settings model, from the environment and a config file.

Every field can be set as an environment variable with the ``TTA_`` prefix (``TTA_PORT=9000``,
``TTA_MODELS='["cifar10_resnet20","cifar10_resnet32"]'``) or in a TOML or JSON file named by
``TTA_CONFIG_FILE``; the environment wins over the file, and arguments given to ``Settings(...)``
win over both. Nothing reads settings globally: ``create_app(settings)`` passes them down.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from adapters import get_adapter
from models import ModelSpec
from models.spec import IMAGENET_MEAN, IMAGENET_STD

CONFIG_FILE_ENV = "TTA_CONFIG_FILE"


class OnnxModel(BaseModel):
    """An ONNX classifier to serve: a file named here, never by a request (README, ONNX models)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$", description="the model's served name")
    file: Path = Field(description="the .onnx file, BatchNormalization nodes kept")
    labels: list[str] | None = Field(
        default=None, min_length=1, description="class names in output order (default: 0..C-1)"
    )
    input_size: tuple[int, int] | None = Field(
        default=None, description="(height, width) when the file leaves them dynamic"
    )
    mean: tuple[float, float, float] = Field(default=IMAGENET_MEAN, description="RGB mean, [0, 1]")
    std: tuple[float, float, float] = Field(default=IMAGENET_STD, description="RGB std, [0, 1]")
    resize: int | None = Field(default=None, description="shorter side resized to before the crop")
    design: Literal["fused", "segments"] = Field(
        default="fused",
        description="fused: a batch of one adapter runs as one graph with the adapter inside "
        "(faster); segments: every batch runs the graph cut at its BN nodes",
    )


class Settings(BaseSettings):
    """Everything the server can be configured with (env prefix ``TTA_``).

    Durability: with ``durability="interval"`` (the default) a stream's new state is written
    to the store every ``flush_interval_s`` seconds and at a clean shutdown, so a crash (kill -9,
    OOM kill, power loss) loses the updates acknowledged since the last flush: up to one flush
    interval of adapted images per stream (docs/reliability.md measures it). The predictions
    already sent stay valid; the stream resumes from its last flushed state. With
    ``durability="sync"`` every predict response waits until its new state is stored, so no
    acknowledged update is lost, at the cost of one store write per request.
    """

    model_config = SettingsConfigDict(env_prefix="TTA_", extra="forbid")

    # --- network ---
    host: str = Field(default="127.0.0.1", description="address uvicorn binds to")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port uvicorn listens on")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="log level of the tta-serve entry point"
    )

    # --- models ---
    models: list[str] = Field(
        default_factory=lambda: ["cifar10_resnet20"], description="registered models served"
    )
    onnx_models: list[OnnxModel] = Field(
        default_factory=list,
        description="ONNX classifiers served beside `models` (CUDA execution provider on cuda)",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="cpu", description="where models and states live; auto: cuda if available"
    )
    amp: bool = Field(default=False, description="autocast the forward to bf16/fp16 on CUDA")
    cuda_graphs: bool = Field(
        default=False,
        description="replay each batch layout as a CUDA graph (not yet validated on a GPU)",
    )
    model_cache_dir: Path = Field(
        default=Path("~/.cache/tta-serve/models"), description="weights cache (seed it offline)"
    )
    observer_window: int = Field(
        default=1000, ge=1, description="images the drift observer remembers"
    )

    # --- state ---
    # AdaBN with a 64-image source prior, statistics over the stream's whole history: better than
    # source in every protocol of docs/accuracy.md (full-size label-correlated streams too, where
    # a 512-image window is 14 points worse than source) with almost all of the i.i.d. gain.
    default_adapter: str = Field(
        default="adabn", description="adapter of a stream created without one (docs/accuracy.md)"
    )
    default_adapter_config: dict[str, Any] = Field(
        default_factory=lambda: {"prior_images": 64},
        description="config of the default adapter when none is given",
    )
    data_dir: Path = Field(default=Path("./data"), description="root of the local state store")
    store: Literal["local", "redis", "memory"] = Field(
        default="local", description="state store kind"
    )
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", description="Redis store URL")
    store_connect_timeout_s: float = Field(
        default=30.0,
        ge=0,
        allow_inf_nan=False,
        description=(
            "at start-up, how long to retry a state store that does not answer (exponential "
            "backoff, 0.1 s to 5 s) while /v2/health/live is 200 and /v2/health/ready 503; "
            "then the server exits with status 1 (0: exit at once)"
        ),
    )
    durability: Literal["sync", "interval"] = Field(
        default="interval",
        description=(
            "sync: persist before each predict response (a crash loses no acknowledged "
            "update); interval: every flush_interval_s and at shutdown (a crash loses the "
            "updates acknowledged since the last flush, up to one interval of them)"
        ),
    )
    flush_interval_s: float = Field(default=5.0, gt=0, description="period of the interval flush")
    replica_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$",
        description="this replica's name: in the X-Served-By response header and in the Redis "
        "store's stream leases (unique per process; default hostname-pid)",
    )
    lease_ttl_s: float = Field(
        default=10.0,
        gt=0,
        description="Redis store: how long a replica's lease on a stream lasts unrenewed; a "
        "stream whose replica died moves to another after at most this long (docs/scaling.md)",
    )
    slots_per_pool: int = Field(
        default=256,
        ge=1,
        description="most stream slots of one (model, adapter, state structure) pool; a pool "
        "starts with 4 and doubles on demand",
    )
    max_state_bytes: int = Field(
        default=2 << 30,
        ge=0,
        description="bound on the memory of a model's stream states, in bytes (0: none); "
        "beyond, new streams are refused with 507 (docs/performance.md: bytes per stream)",
    )
    max_state_header_bytes: int = Field(
        default=0,
        ge=0,
        description="largest header of an imported state, in bytes (0: derived from the "
        "model's state layout)",
    )
    max_streams: int = Field(
        default=1024, ge=1, description="streams in slots per model; beyond, LRU ones are evicted"
    )
    stream_ttl_s: float | None = Field(
        default=None, gt=0, description="default time-to-live of an idle stream (None: forever)"
    )

    # --- batching ---
    max_batch_size: int = Field(default=256, ge=1, description="images per forward")
    max_delay_ms: float = Field(
        default=2.0, ge=0, description="how long a batch waits for more requests"
    )
    max_queue: int = Field(default=1024, ge=1, description="requests queued per model before 429")
    request_timeout_s: float = Field(
        default=30.0, gt=0, description="deadline of a queued request (504 after)"
    )

    # --- input limits ---
    max_body_bytes: int = Field(default=64 << 20, ge=1024, description="largest request body")
    max_image_bytes: int = Field(default=8 << 20, ge=64, description="largest encoded image")
    max_image_pixels: int = Field(
        default=16_000_000,
        ge=1,
        description=(
            "largest image (width x height) for any model, checked on the header before "
            "decoding; each model also has its own limit (ModelSpec.pixel_limit: 256 x the area "
            "it resizes to, at least 2048 x 2048), and the smaller of the two applies"
        ),
    )
    model_max_image_pixels: dict[str, PositiveInt] = Field(
        default_factory=dict,
        description=(
            "per model name, its own pixel limit instead of ModelSpec.pixel_limit "
            "(max_image_pixels still caps it)"
        ),
    )
    max_images_per_request: int = Field(default=256, ge=1, description="images in one request")
    input_range_margin: float = Field(
        default=4.0,
        ge=1.0,
        allow_inf_nan=False,
        description=(
            "float32 inputs must lie in the model's normalised pixel range [0, 1] widened this "
            "many times about its centre (4: pixels in [-1.5, 2.5]); beyond it, 422"
        ),
    )

    # --- metrics ---
    metrics_top_k: int = Field(
        default=10, ge=0, description="streams with per-stream gauges (top-K by severity)"
    )
    # When a stream is "in trouble": calibrated on CIFAR-10 with `python -m bench.signals`
    # (docs/metrics.md): clean streams stay below, severe corruptions go above, with margin.
    trouble_drift_early: float = Field(
        default=0.15, gt=0, description="early-layer drift (Jeffreys) above which a stream drifts"
    )
    trouble_drift_late: float = Field(
        default=0.04, gt=0, description="late-layer drift (Jeffreys) above which a stream drifts"
    )
    trouble_entropy_high: float = Field(
        default=0.15, gt=0, le=1, description="normalised prediction entropy that is too high"
    )
    trouble_entropy_low: float = Field(
        default=0.03, ge=0, le=1, description="normalised entropy below which predictions collapsed"
    )
    trouble_dominant_share: float = Field(
        default=0.5, gt=0, le=1, description="share of one class above which predictions collapsed"
    )
    trouble_min_images: int = Field(
        default=64,
        ge=1,
        description="images in the observer window before a stream can be in trouble",
    )

    def pixel_limit(self, spec: ModelSpec) -> int:
        """The largest image (width x height) accepted for the model of ``spec``."""
        own = self.model_max_image_pixels.get(spec.name, spec.pixel_limit)
        return min(self.max_image_pixels, own)

    @field_validator("models")
    @classmethod
    def _unique(cls, models: list[str]) -> list[str]:
        if len(set(models)) != len(models):
            raise ValueError("models must not repeat")
        return models

    @model_validator(mode="after")
    def _names_are_unique(self) -> Settings:
        names = self.models + [model.name for model in self.onnx_models]
        if not names:
            raise ValueError("no model to serve: set models or onnx_models")
        if len(set(names)) != len(names):
            raise ValueError("model names (models and onnx_models) must not repeat")
        return self

    @model_validator(mode="after")
    def _default_adapter_is_valid(self) -> Settings:
        """An unknown default adapter or an invalid default config fails at start-up."""
        adapter = get_adapter(self.default_adapter)
        adapter.config.model_validate(self.default_adapter_config)
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments, then the environment, then the ``TTA_CONFIG_FILE`` file (TOML or JSON)."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_FILE_ENV)
        if config_file:
            path = Path(config_file)
            if not path.is_file():
                raise FileNotFoundError(f"{CONFIG_FILE_ENV}={config_file}: no such file")
            if path.suffix == ".toml":
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
            elif path.suffix == ".json":
                sources.append(JsonConfigSettingsSource(settings_cls, json_file=path))
            else:
                raise ValueError(f"{CONFIG_FILE_ENV} must name a .toml or .json file: {path}")
        return tuple(sources)
