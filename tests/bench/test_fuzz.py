"""bench/fuzz.py's own parts: the stream-state invariant and the report."""

from __future__ import annotations

import torch
from safetensors.torch import save

from bench.fuzz import CHANGED, INVALID, Outcome, Tally, report, state_problem


def test_a_valid_state_has_no_problem() -> None:
    state = save({"layer1.mean": torch.tensor([0.5, -2.0]), "layer1.m2": torch.tensor([0.0, 1.0])})
    assert state_problem(state) is None


def test_non_finite_negative_and_unreadable_states_are_problems() -> None:
    assert state_problem(save({"layer1.mean": torch.tensor([float("nan")])})) == (
        "layer1.mean is not finite"
    )
    assert state_problem(save({"layer3.obs.n": torch.tensor([-1.0])})) == (
        "layer3.obs.n is negative"
    )
    assert (state_problem(b"not a state") or "").startswith("unreadable")


def test_the_report_counts_every_problem_and_names_its_operations() -> None:
    tally = Tally()
    tally.add(Outcome("GET /v1/streams", 200))
    tally.add(Outcome("POST /x", 422, {CHANGED: "streams cam-1"}, request="curl x"))
    tally.add(Outcome("POST /x", 200, {INVALID: "cam-1: n is negative"}))
    text = report(tally, 10, "a machine")
    assert "| cases | 3 |" in text and "| 5xx | 0 |" in text
    assert f"| {CHANGED} | 1 |" in text and f"| {INVALID} | 1 |" in text
    assert "Statuses: 200: 2, 422: 1." in text
    assert f"- {CHANGED}: POST /x 1; first: `POST /x -> 422: streams cam-1 (curl x)`" in text
