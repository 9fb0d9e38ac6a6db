"""Every typed error maps to one status and code, with the {"error": {code, message}} body."""

from __future__ import annotations

import json

import pydantic
import pytest

from adapters import ADAPTERS, InvalidStateError, StateMismatchError, UnknownAdapterError
from adapters.pool import PoolFullError, StateMemoryError
from adapters.presets import UnknownPresetError
from models import ModelError, UnknownModelError
from service import errors
from service.stores import StoreError

CASES = [
    (errors.InvalidInputError("bad"), 400, "invalid_input"),
    (errors.InvalidImageError("bad"), 400, "invalid_image"),
    (errors.InvalidTensorError("bad"), 422, "invalid_tensor"),
    (errors.PayloadTooLargeError("bad"), 413, "payload_too_large"),
    (errors.UnsupportedMediaTypeError("bad"), 415, "unsupported_media_type"),
    (errors.InvalidStreamIdError("bad"), 422, "invalid_stream_id"),
    (errors.StreamNotFoundError("bad"), 404, "stream_not_found"),
    (errors.StreamExistsError("bad"), 409, "stream_exists"),
    (errors.ModelNotServedError("bad"), 404, "model_not_found"),
    (errors.CapacityError("bad"), 503, "capacity_exhausted"),
    (errors.QueueFullError("bad"), 429, "queue_full"),
    (errors.UnavailableError("bad"), 503, "unavailable"),
    (errors.DeadlineExceededError("bad"), 504, "deadline_exceeded"),
    (errors.ForwardError("bad"), 500, "forward_failed"),
    (errors.StoreUnavailableError("bad"), 503, "store_unavailable"),
    (errors.UnusableStateError("bad"), 409, "state_unusable"),
    (UnknownModelError("x", ["a"]), 404, "model_not_found"),
    (UnknownAdapterError("x", ["a"]), 422, "unknown_adapter"),
    (UnknownPresetError("adabn", "x", ["paper"]), 422, "unknown_preset"),
    (InvalidStateError("bad"), 422, "invalid_state"),
    (StateMismatchError("bad"), 422, "state_mismatch"),
    (StateMemoryError("bad"), 507, "state_memory_exhausted"),
    (PoolFullError("bad"), 503, "capacity_exhausted"),
    (StoreError("bad"), 503, "store_unavailable"),
    (ModelError("bad"), 500, "model_error"),
    (RuntimeError("secret detail"), 500, "internal_error"),
]


@pytest.mark.parametrize("error, status, code", CASES, ids=[type(c[0]).__name__ for c in CASES])
def test_mapping(error: Exception, status: int, code: str) -> None:
    response = errors.to_response(error)
    assert response.status_code == status
    body = json.loads(bytes(response.body))
    assert body["error"]["code"] == code
    if status in (429, 503):
        assert response.headers["retry-after"] == "1"


def test_unknown_errors_hide_their_detail() -> None:
    body = json.loads(bytes(errors.to_response(RuntimeError("secret detail")).body))
    assert body == {"error": {"code": "internal_error", "message": "internal error: RuntimeError"}}


def test_config_validation_message() -> None:
    with pytest.raises(pydantic.ValidationError) as raised:
        ADAPTERS["alpha_bn"].config.model_validate({"alpha": -1})
    body = json.loads(bytes(errors.to_response(raised.value).body))
    assert body["error"] == {
        "code": "invalid_config",
        "message": (
            "invalid AlphaBNConfig config: alpha: Input should be greater than or equal to 0"
        ),
    }
