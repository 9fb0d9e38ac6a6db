"""Request and response bodies of the v1 API (``XCreate`` / ``XPublic`` / ``XsPublic``), and the
error bodies of both APIs.

The examples are those of the OpenAPI document; the stream id and image in them are real (a
stream ``cam-1`` and a 32x32 PNG), so a client can send them as they are.
"""

from __future__ import annotations

from typing import Any, Literal

import pydantic.dataclasses
from pydantic import BaseModel, ConfigDict, Field

from service.safety import AutoResetPolicy, resolve_policy
from service.stores import StreamInfo
from service.streams import STREAM_ID

# The longest TTL a stream may have: a year. Longer is as good as none (omit it).
MAX_TTL_S = 366 * 24 * 3600.0
EXAMPLE_STREAM_ID = "cam-1"
# A 32x32 PNG (one colour), base64-encoded: a valid image for the example requests.
EXAMPLE_PNG_BASE64 = (
    "iVBORw0KGgoAAAANSUhEUgAAACAAAAAgCAIAAAD8GO2jAAAAK0lEQVR42u3NQQEAQAQAMC61OOKIdSX4bQWW1ROX"
    "XhwTCAQCgUAgEAgEWz5JeAIgOfH9hQAAAABJRU5ErkJggg=="
)
STREAM_ID_DESCRIPTION = (
    f"stream id: 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit "
    f"({STREAM_ID.pattern})"
)


EXAMPLE_STREAM: dict[str, Any] = {
    "id": EXAMPLE_STREAM_ID,
    "model": "cifar10_resnet20",
    "adapter": "adabn",
    "config": {"prior_images": 64.0, "window": None},
    "seed": 790830303792131887,
    "created_at": 1796228572.14,
    "ttl_seconds": 3600.0,
    "auto_reset": None,
    "feedback": False,
    "snapshots": 0,
    "frozen": False,
    "samples": 0,
    "auto_resets": 0,
    "last_auto_reset": None,
    "accuracy": None,
}
EXAMPLE_ACCURACY: dict[str, Any] = {
    "labels": 640,
    "adapted": 0.62,
    "source": 0.41,
    "gain": 0.21,
    "labels_total": 2560,
}


class ErrorDetail(BaseModel):
    """What went wrong: a stable code for programs, a message for people."""

    model_config = ConfigDict(extra="forbid")

    code: str = Field(description="stable machine-readable code, e.g. stream_not_found")
    message: str = Field(description="what went wrong, in words")


class ErrorPublic(BaseModel):
    """The body of every error response of the v1 API."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail


class OipError(BaseModel):
    """The body of every error response of the Open Inference Protocol (``/v2``)."""

    model_config = ConfigDict(extra="forbid")

    error: str = Field(description="what went wrong, in words")


class StreamCreate(BaseModel):
    """A new stream: which model and adapter, the adapter's config, an optional id and TTL."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"id": EXAMPLE_STREAM_ID, "adapter": "adabn", "ttl_seconds": 3600},
                {"adapter": "alpha_bn", "config": {"alpha": 0.2}},
            ]
        },
    )

    # The pattern is documented here and checked by the registry (422 invalid_stream_id).
    id: str | None = Field(
        default=None,
        description=f"{STREAM_ID_DESCRIPTION}; generated when absent",
        json_schema_extra={"pattern": STREAM_ID.pattern},
    )
    model: str | None = Field(default=None, description="served model (default: the first served)")
    adapter: str | None = Field(
        default=None,
        description="adapter name (see GET /v1/adapters; default: the model's, GET /v1/models)",
    )
    preset: str | None = Field(
        default=None,
        description="a named config of the adapter (GET /v1/adapters; default: recommended)",
    )
    config: dict[str, Any] | None = Field(
        default=None,
        description="adapter config fields over the preset's (its JSON schema); without an "
        "adapter, the server's default",
    )
    # Strict: a JSON true is not 1 second, and Infinity or 1e309 is not a TTL.
    ttl_seconds: float | None = Field(
        default=None,
        gt=0,
        le=MAX_TTL_S,
        strict=True,
        allow_inf_nan=False,
        description="delete the stream after this long idle, in seconds (default: server's)",
    )
    # Stream safety (docs/safety.md).
    auto_reset: AutoResetPolicy | Literal["recommended"] | None = Field(
        default=None,
        description="auto-reset policy: a config, 'recommended' (the preset), or null (off)",
    )
    feedback: bool = Field(
        default=False, description="keep live accuracy from label feedback (POST .../feedback)"
    )
    snapshots: int = Field(
        default=0, ge=0, le=64, description="good states to keep for rollback (0: none)"
    )
    frozen: bool = Field(default=False, description="predict without updating the state")

    def safety_options(self) -> dict[str, Any]:
        """The safety fields of the stream's record (the policy resolved to its values)."""
        return safety_options(self, ("auto_reset", "feedback", "snapshots", "frozen"))


@pydantic.dataclasses.dataclass(
    frozen=True, kw_only=True, config=ConfigDict(json_schema_extra={"examples": [EXAMPLE_STREAM]})
)
class StreamPublic(StreamInfo):
    """A stream as the API shows it: its record's info (``StreamInfo``) and its sample count."""

    samples: int = Field(description="images the stream has adapted to since creation or reset")
    auto_resets: int = Field(default=0, description="auto-resets since creation")
    last_auto_reset: AutoResetEvent | None = Field(
        default=None, description="the last auto-reset since this server started"
    )
    accuracy: LiveAccuracy | None = Field(
        default=None, description="live accuracy from label feedback (feedback on)"
    )


def safety_options(body: BaseModel, names: tuple[str, ...]) -> dict[str, Any]:
    """The safety fields set in ``body`` (all of ``names`` given), as the record holds them."""
    options = {name: getattr(body, name) for name in names if name in body.model_fields_set}
    if "auto_reset" in options:
        policy = resolve_policy(options["auto_reset"])
        options["auto_reset"] = policy.model_dump() if policy is not None else None
    return options


class StreamFork(BaseModel):
    """A copy of a stream: its id and what differs from the original (absent: the same)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"id": "cam-1-b", "feedback": True, "snapshots": 4}]},
    )

    id: str | None = Field(
        default=None,
        description=f"{STREAM_ID_DESCRIPTION}; generated when absent",
        json_schema_extra={"pattern": STREAM_ID.pattern},
    )
    ttl_seconds: float | None = Field(
        default=None, gt=0, le=MAX_TTL_S, strict=True, allow_inf_nan=False
    )
    auto_reset: AutoResetPolicy | Literal["recommended"] | None = None
    feedback: bool | None = None
    snapshots: int | None = Field(default=None, ge=0, le=64)
    frozen: bool | None = None

    def options(self) -> dict[str, Any]:
        """The record fields to change in the copy."""
        names = ("ttl_seconds", "auto_reset", "feedback", "snapshots", "frozen")
        options = safety_options(self, names)
        return {k: v for k, v in options.items() if v is not None or k == "auto_reset"}


class AutoResetEvent(BaseModel):
    """An auto-reset: why and when."""

    reason: str = Field(
        description="entropy_collapse, dominant_class, confidence_collapse, drift_jump"
    )
    at: float = Field(description="Unix time")


class LiveAccuracy(BaseModel):
    """Accuracy of the stream's adapted and source predictions over its last labelled images."""

    labels: int = Field(description="labelled images in the window")
    adapted: float | None = Field(description="accuracy of the adapted predictions")
    source: float | None = Field(description="accuracy of the source model's predictions")
    gain: float | None = Field(description="adapted minus source: what adaptation brings")
    labels_total: int = Field(description="labels received since the server started")


class Label(BaseModel):
    """The true class of one image of an earlier prediction."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=255, description="the prediction's request_id")
    index: int = Field(ge=0, description="the image's position in that request")
    label: int | str = Field(description="the true class: its index or its label name")


class FeedbackCreate(BaseModel):
    """True labels for earlier predictions of the stream."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"labels": [{"request_id": "r-1f2e3d4c5b6a7980", "index": 0, "label": 3}]}]
        },
    )

    labels: list[Label] = Field(min_length=1, max_length=10_000)


class FeedbackPublic(BaseModel):
    """What the labels did: how many were scored, and the stream's live accuracy now."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"scored": 64, "duplicates": 0, "accuracy": EXAMPLE_ACCURACY}]
        }
    )

    scored: int
    duplicates: int = Field(description="images labelled before: not counted again")
    accuracy: LiveAccuracy


class SnapshotPublic(BaseModel):
    """A kept good state of a stream."""

    samples: int = Field(description="the stream's sample count when it was taken")
    taken_at: float = Field(description="Unix time")


class SnapshotsPublic(BaseModel):
    """A stream's kept snapshots, oldest first (kept in memory: a restart empties them)."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"data": [{"samples": 512, "taken_at": 1796228590.5}]}]}
    )

    data: list[SnapshotPublic]


class RollbackRequest(BaseModel):
    """Which snapshot to roll back to: the one at ``samples`` images, or the last one."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"samples": 512}]})

    samples: int | None = None


class StreamsPublic(BaseModel):
    """A page of streams, sorted by id."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"data": [EXAMPLE_STREAM], "count": 1, "offset": 0, "limit": 100}]
        }
    )

    data: list[StreamPublic]
    count: int = Field(description="all streams, not only this page")
    offset: int
    limit: int


class ClassScore(BaseModel):
    """One class and its probability."""

    label: str
    index: int
    # NaN/inf fail loudly here: pydantic would otherwise write them as JSON null.
    probability: float = Field(allow_inf_nan=False)


class ImagePrediction(BaseModel):
    """The prediction for one image: its top class and the top-k classes."""

    label: str
    index: int
    probability: float = Field(allow_inf_nan=False)
    top_k: list[ClassScore]


class DriftSummary(BaseModel):
    """A stream's drift in short: BN-statistics divergences from the source, prediction stats."""

    images: float = Field(description="images in the drift observer's window")
    overall: dict[str, float] = Field(description="divergences averaged over BN layers")
    entropy: float | None = Field(description="mean prediction entropy (nats)")
    confidence: float | None = Field(description="mean top-1 probability")


class PredictResponse(BaseModel):
    """Predictions for a request's images, in order, and the stream's state after it."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "stream_id": EXAMPLE_STREAM_ID,
                    "model": "cifar10_resnet20",
                    "adapter": "adabn",
                    "adapted": True,
                    "samples": 1,
                    "predictions": [
                        {
                            "label": "cat",
                            "index": 3,
                            "probability": 0.326,
                            "top_k": [
                                {"label": "cat", "index": 3, "probability": 0.326},
                                {"label": "bird", "index": 2, "probability": 0.182},
                            ],
                        }
                    ],
                    "source_predictions": None,
                    "drift": {
                        "images": 1.0,
                        "overall": {"jeffreys": 9.58, "w2n": 0.206, "hellinger": 0.066},
                        "entropy": 1.97,
                        "confidence": 0.326,
                    },
                }
            ]
        }
    )

    stream_id: str
    model: str
    adapter: str
    adapted: bool = Field(description="whether the stream's statistics were updated")
    samples: int = Field(description="images the stream has adapted to, this request included")
    predictions: list[ImagePrediction]
    source_predictions: list[ImagePrediction] | None = Field(
        default=None, description="the unadapted (source) model's predictions, with source=true"
    )
    drift: DriftSummary | None = Field(None, description="absent with drift=false")
    request_id: str = Field(
        default="",
        description="names this request in label feedback: the Idempotency-Key, the "
        "X-Request-ID header, or generated",
    )
    auto_reset: str | None = Field(
        default=None, description="why the stream was auto-reset after this request, if it was"
    )


class Base64Images(BaseModel):
    """Images in a JSON body, each a base64-encoded JPEG, PNG or WebP file."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"images": [EXAMPLE_PNG_BASE64]}]}
    )

    images: list[str] = Field(min_length=1, description="base64-encoded image files")


class ModelPublic(BaseModel):
    """A served model."""

    name: str
    architecture: str
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_min: tuple[float, float, float] = Field(
        description="per channel, the smallest float32 input value accepted (input_range_margin)"
    )
    input_max: tuple[float, float, float] = Field(
        description="per channel, the largest float32 input value accepted"
    )
    max_image_pixels: int = Field(
        description="largest encoded image (width x height) accepted, checked before decoding"
    )
    labels: list[str]
    device: str
    ready: bool
    default_adapter: str = Field(
        description="adapter of a stream created without one (default_adapter, or "
        "fallback_adapter where its state exceeds default_state_bytes)"
    )
    default_adapter_config: dict[str, Any] = Field(description="its config, as a stream gets it")


class ModelsPublic(BaseModel):
    """The served models."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "data": [
                        {
                            "name": "cifar10_resnet20",
                            "architecture": "cifar_resnet20",
                            "input_size": [32, 32],
                            "mean": [0.485, 0.456, 0.406],
                            "std": [0.229, 0.224, 0.225],
                            "labels": [
                                *("airplane", "automobile", "bird", "cat", "deer"),
                                *("dog", "frog", "horse", "ship", "truck"),
                            ],
                            "device": "cpu",
                            "ready": True,
                            "default_adapter": "balanced",
                            "default_adapter_config": {
                                "window": 1000.0,
                                "window_min": 100.0,
                                "d0": 0.02,
                            },
                        }
                    ]
                }
            ]
        }
    )

    data: list[ModelPublic]


class PresetPublic(BaseModel):
    """A named config of an adapter, with its measured error and when to use it."""

    name: str
    config: dict[str, Any] = Field(description="the full config the preset gives")
    accuracy: str = Field(
        description="mean error % on CIFAR-10-C severity 5, ResNet-20 (docs/accuracy.md)"
    )
    use_when: str


class AdapterPublic(BaseModel):
    """A registered adapter, its config's JSON schema and its presets (the first recommended)."""

    name: str
    description: str
    config_schema: dict[str, Any]
    presets: list[PresetPublic] = Field(default_factory=list)


class AdaptersPublic(BaseModel):
    """The registered adapters."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "data": [
                        {
                            "name": "alpha_bn",
                            "description": "alpha-BN: a convex mix of source and batch statistics",
                            "config_schema": {
                                "properties": {
                                    "alpha": {"type": "number", "minimum": 0, "maximum": 1}
                                },
                                "type": "object",
                            },
                        }
                    ]
                }
            ]
        }
    )

    data: list[AdapterPublic]
