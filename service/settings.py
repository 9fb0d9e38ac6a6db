"""The server's settings: one pydantic-settings model, from the environment and a config file.

Every field can be set as an environment variable with the ``TTA_`` prefix (``TTA_PORT=9000``,
``TTA_MODELS='["cifar10_resnet20","cifar10_resnet32"]'``) or in a TOML or JSON file named by
``TTA_CONFIG_FILE``; the environment wins over the file, and arguments given to ``Settings(...)``
win over both. Nothing reads settings globally: ``create_app(settings)`` passes them down.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import socket
from collections.abc import Mapping
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

from adapters import get_adapter, stateless_adapters
from adapters.presets import preset_config
from models import ModelSpec
from models.spec import IMAGENET_MEAN, IMAGENET_STD
from service.auth import ApiKey

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


class UserModel(BaseModel):
    """A user's own PyTorch classifier to serve (README, Your own model).

    Built by ``factory`` (``"package.module:function"``, called without arguments) or as the
    torchvision ``architecture`` with ``len(labels)`` outputs; then ``weights`` are loaded
    strictly (every tensor, no extra one). A factory's weights must be safetensors: a user's
    pickle could run code.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$", description="the model's served name")
    factory: str | None = Field(
        default=None, description="'package.module:function' that builds the network"
    )
    architecture: str | None = Field(
        default=None, description="a torchvision classifier name (resnet50, ...) instead"
    )
    weights: Path = Field(description="state-dict file: .safetensors (or .pth for torchvision)")
    labels: list[str] = Field(min_length=1, description="class names in output order")
    input_size: tuple[int, int] = Field(description="(height, width) of the network input")
    mean: tuple[float, float, float] = Field(default=IMAGENET_MEAN, description="RGB mean, [0, 1]")
    std: tuple[float, float, float] = Field(default=IMAGENET_STD, description="RGB std, [0, 1]")
    resize: int | None = Field(default=None, description="shorter side resized to before the crop")

    @model_validator(mode="after")
    def _one_builder(self) -> UserModel:
        if (self.factory is None) == (self.architecture is None):
            raise ValueError(f"user model {self.name}: set exactly one of factory, architecture")
        return self


class TenantQuota(BaseModel):
    """What one tenant may hold (0: no limit)."""

    model_config = ConfigDict(extra="forbid")

    max_streams: int = Field(default=0, ge=0, description="streams of the tenant")
    max_state_bytes: int = Field(
        default=0, ge=0, description="bytes of its streams' states, as stored"
    )


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``): unreachable from elsewhere."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


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
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="text lines, or one JSON object per line (with request_id) for log shippers",
    )

    # --- models ---
    models: list[str] = Field(
        default_factory=lambda: ["cifar10_resnet20"], description="registered models served"
    )
    onnx_models: list[OnnxModel] = Field(
        default_factory=list,
        description="ONNX classifiers served beside `models` (CUDA execution provider on cuda)",
    )
    user_models: list[UserModel] = Field(
        default_factory=list,
        description="your own PyTorch classifiers (factory or torchvision architecture + weights)",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="cpu", description="where models and states live; auto: cuda if available"
    )
    amp: bool = Field(default=False, description="autocast the forward to bf16/fp16 on CUDA")
    cuda_graphs: bool = Field(
        default=False,
        description="replay each batch layout as a CUDA graph (not yet validated on a GPU)",
    )
    engine_mode: Literal["auto", "eager", "compiled"] = Field(
        default="auto",
        description=(
            "eager: the reference forward; compiled: torch.compile (inductor) per bucket layout "
            "(PyTorch models; engine/compiled.py); auto: compiled where bench.engine measured it "
            "faster on this device kind (docs/performance.md)"
        ),
    )
    compile_row_buckets: list[PositiveInt] = Field(
        default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128, 256],
        min_length=1,
        description="compiled: images per group (one pool's streams) are padded to these sizes",
    )
    compile_stream_buckets: list[PositiveInt] = Field(
        default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128, 256],
        min_length=1,
        description="compiled: streams per group are padded to these sizes",
    )
    compile_warmup: list[tuple[PositiveInt, PositiveInt]] = Field(
        default_factory=lambda: [(1, 1)],
        description=(
            "compiled: (images, streams) layouts of the default adapter compiled at start-up "
            "(each takes seconds to minutes on a CPU); other layouts compile on first use"
        ),
    )
    model_cache_dir: Path = Field(
        default=Path("~/.cache/tta-serve/models"), description="weights cache (seed it offline)"
    )
    observer_window: int = Field(
        default=1000, ge=1, description="images the drift observer remembers"
    )

    # --- state ---
    # balanced's 'gated' preset: within 2 points of the best adapter in every protocol of
    # docs/accuracy.md at full size (i.i.d., Dirichlet, N=1, continual, mixed; ResNet-20 and -32).
    # It keeps statistics per class (2 x classes x channels per layer), so a model where that
    # exceeds default_state_bytes per stream (a 1000-class ResNet-50: 425 MB) gets the fallback:
    # AdaBN with a 64-image source prior, never worse than source in any protocol measured.
    default_adapter: str = Field(
        default="balanced",
        description="adapter of a stream created without one (docs/accuracy.md), where its "
        "state fits default_state_bytes",
    )
    default_adapter_config: dict[str, Any] = Field(
        default_factory=lambda: preset_config("balanced", "gated"),
        description="config of the default adapter when none is given (over its recommended "
        "preset)",
    )
    default_state_bytes: int = Field(
        default=4 << 20,
        ge=0,
        description="largest state of one stream of the default adapter, in bytes (0: no bound); "
        "a model where it is larger gets fallback_adapter as its default",
    )
    fallback_adapter: str = Field(
        default="adabn",
        description="default adapter of a model where default_adapter's state is too large",
    )
    fallback_adapter_config: dict[str, Any] = Field(
        default_factory=lambda: {"prior_images": 64},
        description="config of the fallback adapter",
    )
    data_dir: Path = Field(default=Path("./data"), description="root of the local state store")
    store: Literal["local", "redis", "memory"] = Field(
        default="local", description="state store kind"
    )
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", description="Redis store URL")
    redis_cluster: bool = Field(
        default=False,
        description="the Redis store is a Redis Cluster (redis_url: any of its nodes); streams "
        "spread over its shards by id (docs/scaling.md)",
    )
    store_connect_timeout_s: float = Field(
        default=30.0,
        ge=0,
        allow_inf_nan=False,
        description=(
            "at start-up, how long to retry a state store that does not answer (exponential "
            "backoff, 0.1 s to 5 s) while /v2/health/live is 200 and /v2/health/ready 400; "
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

    # --- Open Inference Protocol (README, "Protocols") ---
    oip_stateless_adapter: str = Field(
        default="source",
        description="adapter of an OIP request that names no stream (a stateless adapter: "
        "source, tbn or alpha_bn); a request may name another with parameters.adapter",
    )
    oip_sequence_end: Literal["delete", "keep"] = Field(
        default="delete",
        description="what sequence_end=true does to its stream after the request: delete it "
        "(Triton: the sequence is over) or keep it for a later sequence or the v1 API",
    )
    grpc_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="serve the KServe v2 gRPC service on this port too, on `host` (None: off)",
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

    def file_model_names(self) -> list[str]:
        """The names of the ONNX and user models, in the order they are served."""
        return [m.name for m in self.onnx_models] + [m.name for m in self.user_models]

    # --- access control (docs/security.md) ---
    api_keys: list[ApiKey] = Field(
        default_factory=list,
        description="API keys: {id, hash, tenant, role}, made by `python -m service.auth new`; "
        "with none (and no keys file), authentication is off",
    )
    api_keys_file: Path | None = Field(
        default=None,
        description="TOML or JSON file of more API keys (keys = [...]), read again when it changes",
    )
    allow_unauthenticated: bool = Field(
        default=False,
        description="serve without API keys on a host that is not a loopback address "
        "(refused by default: anyone who reaches the port could use every stream)",
    )
    public_metrics: bool = Field(
        default=False,
        description="with authentication on, /metrics needs no key (else: admin or metrics role)",
    )
    public_docs: bool = Field(
        default=False,
        description="with authentication on, /docs, /redoc and /openapi.json "
        "need no key (else: any role but metrics)",
    )
    tenant_max_streams: int = Field(
        default=0, ge=0, description="streams one tenant may hold (0: no limit)"
    )
    tenant_max_state_bytes: int = Field(
        default=0,
        ge=0,
        description="bytes of stream state one tenant may hold, as stored (0: no limit)",
    )
    tenant_quotas: dict[str, TenantQuota] = Field(
        default_factory=dict, description="per tenant, its own quota instead of the two above"
    )

    def tenant_quota(self, tenant: str) -> TenantQuota:
        """The quota of ``tenant``: its own, or the default one."""
        default = TenantQuota(
            max_streams=self.tenant_max_streams, max_state_bytes=self.tenant_max_state_bytes
        )
        return self.tenant_quotas.get(tenant, default)

    @property
    def auth_enabled(self) -> bool:
        """Whether requests need an API key (some key or a keys file is configured)."""
        return bool(self.api_keys) or self.api_keys_file is not None

    @model_validator(mode="after")
    def _bind_is_safe(self) -> Settings:
        """A host reachable from elsewhere needs API keys, unless explicitly allowed without."""
        if not is_loopback(self.host) and not self.auth_enabled and not self.allow_unauthenticated:
            raise ValueError(
                f"host {self.host!r} is not a loopback address and no API key is configured: "
                "set api_keys or api_keys_file (docs/security.md), or allow_unauthenticated=true "
                "to let anyone who reaches the port use every stream"
            )
        return self

    # --- stream safety (docs/safety.md) ---
    idempotency_max_keys: int = Field(
        default=32, ge=1, le=4096, description="Idempotency-Keys remembered per stream"
    )
    idempotency_window_s: float = Field(
        default=3600.0, gt=0, description="how long an Idempotency-Key is remembered, in seconds"
    )
    feedback_window: int = Field(
        default=1000, ge=1, description="labelled images in a stream's live accuracy window"
    )
    feedback_max_requests: int = Field(
        default=1000, ge=1, description="requests per stream whose predictions can get labels"
    )
    max_snapshots: int = Field(
        default=16, ge=0, description="most good states a stream may keep for rollback"
    )
    snapshot_interval_images: int = Field(
        default=512, ge=1, description="adapted images between two snapshots of a stream"
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
        names = [*self.models, *self.file_model_names()]
        if not names:
            raise ValueError("no model to serve: set models, onnx_models or user_models")
        if len(set(names)) != len(names):
            raise ValueError("model names (models, onnx_models, user_models) must not repeat")
        return self

    @model_validator(mode="after")
    def _default_adapters_are_valid(self) -> Settings:
        """An unknown default or fallback adapter, or an invalid config, fails at start-up."""
        for name, config in self.default_adapters():
            get_adapter(name).config.model_validate(config)
        return self

    def default_adapters(self) -> list[tuple[str, dict[str, Any]]]:
        """The default adapter with its config, then the fallback with its config."""
        return [
            (self.default_adapter, self.default_adapter_config),
            (self.fallback_adapter, self.fallback_adapter_config),
        ]

    @model_validator(mode="after")
    def _stateless_adapter_is_stateless(self) -> Settings:
        """The OIP stateless adapter must keep no state between requests."""
        get_adapter(self.oip_stateless_adapter)
        if self.oip_stateless_adapter not in stateless_adapters():
            raise ValueError(
                f"oip_stateless_adapter {self.oip_stateless_adapter!r} keeps a state; "
                f"stateless adapters: {', '.join(stateless_adapters())}"
            )
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


# TTA_ variables that are not settings but are read by the project's scripts and deploy files.
OTHER_VARIABLES = frozenset(
    {
        CONFIG_FILE_ENV,
        "TTA_SHARED_DIR",  # scripts/env.sh: where the offline weights are seeded from
        "TTA_CIFAR10_DIR",  # bench: the CIFAR-10 test set
        "TTA_GATEWAY_LISTEN",  # deploy/nginx: the gateway's template
        "TTA_GATEWAY_PREFIX",
        "TTA_UPSTREAM_SERVERS",
    }
)


def known_variables() -> list[str]:
    """Every ``TTA_`` variable the project reads: one per setting, and ``OTHER_VARIABLES``."""
    return sorted({f"TTA_{name.upper()}" for name in Settings.model_fields} | OTHER_VARIABLES)


def unknown_variables(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """The ``TTA_`` variables of ``environ`` that nothing reads, each with the nearest known name.

    pydantic-settings ignores them, so a typo (``TTA_MAX_BATCHSIZE``) would silently leave the
    default in force; the entry point warns about each, and ``tta-serve check-config`` fails.

    Example:
        >>> unknown_variables({"TTA_MAX_BATCHSIZE": "64", "TTA_PORT": "1"})
        [('TTA_MAX_BATCHSIZE', 'TTA_MAX_BATCH_SIZE')]
    """
    known = known_variables()
    unknown = sorted(name for name in environ if name.upper().startswith("TTA_"))
    return [
        (name, next(iter(difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.6)), None))
        for name in unknown
        if name.upper() not in known
    ]
