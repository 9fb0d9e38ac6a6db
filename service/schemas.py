"""Request and response bodies of the v1 API (``XCreate`` / ``XPublic`` / ``XsPublic``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from service.streams import STREAM_ID


class StreamCreate(BaseModel):
    """A new stream: which model and adapter, the adapter's config, an optional id and TTL."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(
        default=None, description=f"stream id ({STREAM_ID.pattern}); generated when absent"
    )
    model: str | None = Field(default=None, description="served model (default: the first served)")
    adapter: str | None = Field(
        default=None, description="adapter name (see GET /v1/adapters; default: the server's)"
    )
    config: dict[str, Any] | None = Field(
        default=None,
        description="adapter config (its JSON schema); without an adapter, the server's default",
    )
    ttl_seconds: float | None = Field(
        default=None, gt=0, description="delete the stream after this long idle (default: server's)"
    )


class StreamPublic(BaseModel):
    """A stream as the API shows it."""

    id: str
    model: str
    adapter: str
    config: dict[str, Any]
    seed: int
    created_at: float = Field(description="Unix time of creation")
    ttl_seconds: float | None
    samples: int = Field(description="images the stream has adapted to since creation or reset")


class StreamsPublic(BaseModel):
    """A page of streams, sorted by id."""

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


class Base64Images(BaseModel):
    """Images in a JSON body, each a base64-encoded JPEG, PNG or WebP file."""

    model_config = ConfigDict(extra="forbid")

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


class ModelsPublic(BaseModel):
    """The served models."""

    data: list[ModelPublic]


class AdapterPublic(BaseModel):
    """A registered adapter and its config's JSON schema."""

    name: str
    description: str
    config_schema: dict[str, Any]


class AdaptersPublic(BaseModel):
    """The registered adapters."""

    data: list[AdapterPublic]
