"""``/v1/streams/{id}/...``: label feedback, fork, freeze and thaw, snapshots and rollback.

docs/safety.md describes the features; the auto-reset policy and the Idempotency-Key live in
the stream's record and the predict route.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, status

from service.api.deps import RegistryDep, SettingsDep
from service.api.openapi import LOADED_STREAM_ERRORS, STREAM_ERRORS, v1_errors
from service.api.streams import ReadKey, WriteKey, live_accuracy, stream_public
from service.auth import WriterDep
from service.errors import (
    CapacityError,
    FeedbackOffError,
    InvalidConfigError,
    InvalidInputError,
    InvalidRequestError,
    InvalidStreamIdError,
    PayloadTooLargeError,
    PredictionNotFoundError,
    SnapshotNotFoundError,
    StreamExistsError,
)
from service.feedback import UnknownPredictionError
from service.schemas import (
    FeedbackCreate,
    FeedbackPublic,
    RollbackRequest,
    SnapshotPublic,
    SnapshotsPublic,
    StreamFork,
    StreamPublic,
)
from service.streams import public_id

router = APIRouter(tags=["stream safety"])

# A JSON body: read under the body limit (413), parsed (400), validated (422).
JSON_BODY_ERRORS = (PayloadTooLargeError, InvalidInputError, InvalidRequestError)


@router.post(
    "/{stream_id}/feedback",
    responses=v1_errors(
        *STREAM_ERRORS, *JSON_BODY_ERRORS, FeedbackOffError, PredictionNotFoundError
    ),
)
async def post_feedback(
    stream: WriteKey, body: FeedbackCreate, registry: RegistryDep
) -> FeedbackPublic:
    """True labels for earlier predictions (by request id and image index): live accuracy.

    Each labelled image is scored once against the adapted and the source prediction made for
    it; the stream's view then shows both accuracies over its last labelled images. All labels
    or none: an unknown request or image (404) or class (422) scores nothing.
    """
    entry = await registry.find(stream, touch=False)
    feedback = entry.feedback
    if feedback is None:
        raise FeedbackOffError(
            f"stream {public_id(stream)!r} does not keep feedback: create (or fork) it with "
            '"feedback": true'
        )
    names = registry.runtime(entry.info.model).spec.labels
    labels = []
    for label in body.labels:
        value = label.label
        if isinstance(value, str):
            if value not in names:
                raise InvalidRequestError(
                    f"unknown label {value[:80]!r}; valid: {', '.join(names)}"
                )
            value = names.index(value)
        if not 0 <= value < len(names):
            raise InvalidRequestError(f"class {value} is out of range 0-{len(names) - 1}")
        labels.append((label.request_id, label.index, value))
    try:
        scored = feedback.score(labels)
    except UnknownPredictionError as error:
        raise PredictionNotFoundError(str(error)) from None
    model, metrics = entry.info.model, registry.metrics
    metrics.feedback_labels.labels(model).inc(scored.scored)
    metrics.feedback_correct.labels(model, "adapted").inc(scored.adapted_right)
    metrics.feedback_correct.labels(model, "source").inc(scored.source_right)
    return FeedbackPublic(
        scored=scored.scored, duplicates=scored.duplicates, accuracy=live_accuracy(feedback)
    )


@router.post(
    "/{stream_id}/fork",
    status_code=status.HTTP_201_CREATED,
    responses=v1_errors(
        *LOADED_STREAM_ERRORS,
        *JSON_BODY_ERRORS,
        InvalidStreamIdError,
        StreamExistsError,
        InvalidConfigError,
        CapacityError,
    ),
)
async def fork_stream(
    stream: WriteKey,
    caller: WriterDep,
    registry: RegistryDep,
    settings: SettingsDep,
    body: Annotated[StreamFork, Body(default_factory=StreamFork)],
) -> StreamPublic:
    """A new stream with a copy of this one's state: A/B a configuration on the same traffic.

    Same model, adapter and config; ``ttl_seconds`` and the safety fields (``auto_reset``,
    ``feedback``, ``snapshots``, ``frozen``) can differ, and are the original's when absent.
    """
    quota = settings.tenant_quota(caller.tenant)
    fork = await registry.fork(
        stream,
        body.id,
        body.options(),
        caller.tenant,
        max_streams=quota.max_streams,
        max_state_bytes=quota.max_state_bytes,
    )
    return stream_public(fork)


@router.post("/{stream_id}/freeze", responses=v1_errors(*LOADED_STREAM_ERRORS))
async def freeze_stream(stream: WriteKey, registry: RegistryDep) -> StreamPublic:
    """Freeze the stream: it predicts with its state and never updates it, until thawed."""
    return stream_public(await registry.set_frozen(stream, True))


@router.post("/{stream_id}/thaw", responses=v1_errors(*LOADED_STREAM_ERRORS))
async def thaw_stream(stream: WriteKey, registry: RegistryDep) -> StreamPublic:
    """Thaw a frozen stream: its predictions adapt it again."""
    return stream_public(await registry.set_frozen(stream, False))


@router.get("/{stream_id}/snapshots", responses=v1_errors(*STREAM_ERRORS))
async def list_snapshots(stream: ReadKey, registry: RegistryDep) -> SnapshotsPublic:
    """The stream's kept good states, oldest first (in memory: a restart or eviction empties
    them)."""
    kept = await registry.list_snapshots(stream)
    return SnapshotsPublic(data=[SnapshotPublic(samples=n, taken_at=t) for n, t in kept])


@router.post(
    "/{stream_id}/rollback",
    responses=v1_errors(*LOADED_STREAM_ERRORS, *JSON_BODY_ERRORS, SnapshotNotFoundError),
)
async def roll_back(
    stream: WriteKey,
    registry: RegistryDep,
    body: Annotated[RollbackRequest, Body(default_factory=RollbackRequest)],
) -> StreamPublic:
    """Give the stream a kept snapshot's state: the one at ``samples`` images, or the last."""
    return stream_public(await registry.roll_back(stream, body.samples))
