"""How an OIP request names its target (service.inference.target_of), and the OIP settings."""

from __future__ import annotations

import pydantic
import pytest

from service.errors import InvalidInputError
from service.inference import InferParameters, Target, target_of
from service.settings import Settings


def target(header: str | None = None, **parameters: object) -> Target:
    return target_of(InferParameters.model_validate(parameters), header, "source")


def test_a_request_without_a_stream_is_stateless() -> None:
    assert target() == Target(None, "source")
    assert target(adapter="alpha_bn") == Target(None, "alpha_bn")
    # Triton's "no sequence": 0 or an empty string
    assert target(sequence_id=0) == target(sequence_id="") == Target(None, "source")


def test_the_sequence_id_wins_then_the_parameter_then_the_header() -> None:
    assert target("header", sequence_id=7, sequence_start=True) == Target("7", "", start=True)
    assert target("header", stream_id="cam", sequence_end=True) == Target("cam", "", end=True)
    assert target("header", adapt=False) == Target("header", "", adapt=False)
    assert target("header", sequence_id="cam", stream_id="cam").stream_id == "cam"


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"sequence_id": 1, "stream_id": "2"}, "sequence_id '1' and stream_id '2' name different"),
        ({"sequence_start": True}, "sequence_start and sequence_end need a sequence_id"),
        ({"stream_id": "cam", "adapter": "tbn"}, "parameters.adapter is for requests without"),
        ({"adapter": "momentum"}, "adapter 'momentum' keeps a state, so it needs a stream"),
    ],
)
def test_contradictions_are_refused(parameters: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        target(**parameters)


def test_parameters_are_strictly_typed() -> None:
    with pytest.raises(pydantic.ValidationError):
        InferParameters.model_validate({"sequence_start": "yes"})
    with pytest.raises(pydantic.ValidationError):
        InferParameters.model_validate({"sequence_id": 1.5})
    # Parameters the server does not read (Triton's priority, timeout) pass.
    assert InferParameters.model_validate({"priority": 1}).stream_id is None


def test_the_stateless_adapter_setting_must_keep_no_state() -> None:
    assert Settings(oip_stateless_adapter="tbn").oip_stateless_adapter == "tbn"
    with pytest.raises(pydantic.ValidationError, match="oip_stateless_adapter 'adabn' keeps"):
        Settings(oip_stateless_adapter="adabn")
    with pytest.raises(pydantic.ValidationError):
        Settings(oip_sequence_end="forget")
