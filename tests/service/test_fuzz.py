"""Property-based run of the whole API (schemathesis) against a real server, a few hundred cases.

Each operation gets generated requests, valid and invalid, mostly aimed at three real streams
(``bench.fuzz.Fuzzer.aimed``). Every response must be documented (status, content type, headers)
and match its schema, no request may get a 5xx, and a refused (4xx) request must leave every
stream's exported state as it was. ``python -m bench.fuzz`` runs the same harness for minutes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings

from bench.fuzz import STREAMS, Aim, Fuzzer, Tally, aimed_schema, prepared
from service.main import create_app
from tests.service.helpers import Server, running_server, server_settings, snapshot

EXAMPLES_PER_OPERATION = 8  # x 21 operations (valid and invalid), plus the documented examples


# The document is built as the server builds it (nothing is loaded); the test below checks that
# the server sends this one. (schemathesis's lazy fixture loader does not run on pytest 9.2.)
DOCUMENT = create_app(server_settings(Path("unused"), Path("unused"))).openapi()
# Hostile raw tensors (finite float32 values up to 1e37) are sent too: they must be refused
# with a 4xx and change nothing (issue 13, defect 1).
AIM = Aim(hostile=True)
TALLY = Tally()
# The coverage phase (hundreds of boundary cases) is left to ``python -m bench.fuzz``.
schema = aimed_schema(DOCUMENT, AIM, {"phases": {"coverage": {"enabled": False}}})


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Server]:
    """The server under test (local store, like a deployment)."""
    with running_server(server_settings(tmp_path_factory.mktemp("data"), model_cache)) as running:
        yield running


@pytest.fixture(scope="module")
def fuzzer(server: Server) -> Iterator[Fuzzer]:
    """The fuzz harness, its streams created, comparing states with the tests' ``snapshot``."""
    with prepared(server.url, AIM, snapshot=snapshot) as harness:
        yield harness


def test_the_server_sends_the_fuzzed_document(fuzzer: Fuzzer) -> None:
    assert fuzzer.client.get("/openapi.json").json() == DOCUMENT


def test_the_fuzz_streams_exist_and_are_adapted(fuzzer: Fuzzer) -> None:
    states = snapshot(fuzzer.client)
    assert set(states) == set(STREAMS)
    for stream_id in STREAMS:
        assert fuzzer.client.get(f"/v1/streams/{stream_id}").json()["samples"] >= 1


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    database=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_every_response_is_documented_and_refusals_change_nothing(
    case: Any, fuzzer: Fuzzer
) -> None:
    outcome = fuzzer.run(case)
    TALLY.add(outcome)
    assert outcome.problems == {}, f"{outcome.label} -> {outcome.status}: {outcome.request}"


def test_the_run_was_a_few_hundred_cases_that_reached_the_streams() -> None:
    # Runs after the generated cases (pytest keeps the file's order); aimed cases succeed.
    assert 120 <= TALLY.cases <= 600, TALLY
    assert TALLY.statuses[200] >= 50 and TALLY.statuses[201] >= 1 and TALLY.statuses[204] >= 1
    assert sum(n for status, n in TALLY.statuses.items() if 400 <= status < 500) >= 30
