"""Property-based fuzzing of the HTTP API (schemathesis) against a real server.

    uv run python -m bench.fuzz                    # starts its own server, fuzzes for 300 s
    uv run python -m bench.fuzz --seconds 600 --url http://127.0.0.1:8000

Requests are generated from the server's own OpenAPI document, valid ones and ones that break it
(``positive`` and ``negative`` modes), and aimed at a few real streams (``cam-1``...) so that they
reach past the 404. Every response is checked: no 5xx, a documented status, a documented content
type, a body that matches its schema, documented headers. Before each request every stream's
state is exported, and after a 4xx it is exported again: a refused request must change nothing.
Between requests the streams are put back (extra ones deleted, deleted ones created again).
The table goes to ``docs/reliability.md``, section "Fuzzing". Loopback only; stops by itself.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import numpy as np
import requests
import schemathesis
import torch
from hypothesis import HealthCheck, Phase
from hypothesis import strategies as st
from safetensors.torch import load as load_tensors
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from bench.report import command_line, machine, table, write_section
from service.schemas import EXAMPLE_PNG_BASE64

log = logging.getLogger(__name__)

MODEL = "cifar10_resnet20"
# The streams that generated requests are aimed at: one per kind of adapter state.
STREAMS: dict[str, dict[str, Any]] = {
    "cam-1": {"adapter": "adabn"},
    "cam-2": {"adapter": "unmix_tns", "config": {"components": 4}},
    "cam-3": {"adapter": "momentum"},
}
ADAPTERS = ("adabn", "alpha_bn", "momentum", "source", "tbn", "unmix_tns")
# Each check and the column it counts in.
CHECKS: dict[str, Callable[..., Any]] = {
    "5xx": not_a_server_error,
    "undocumented status": status_code_conformance,
    "schema violation": response_schema_conformance,
    "undocumented content type": content_type_conformance,
    "undocumented headers": response_headers_conformance,
}
CHANGED = "stream changed by a refused request"
INVALID = "invalid stream state"
# State tensors that are counts, sums of non-negative terms or variances (by their last name).
NON_NEGATIVE = {"n", "m2", "vars", "step", "classes", "confidence", "entropy"}
AIM_CHOICES = 4  # of these, all but the last aim a field at a real stream, model or image


def snapshot(client: httpx.Client) -> dict[str, bytes]:
    """Every stream's exported state, by id."""
    ids = []
    offset = 0
    while True:
        page = client.get("/v1/streams", params={"offset": offset, "limit": 1000}).json()
        ids += [stream["id"] for stream in page["data"]]
        offset += len(page["data"])
        if offset >= page["count"] or not page["data"]:
            break
    return {sid: client.get(f"/v1/streams/{sid}/state").content for sid in ids}


def state_problem(state: bytes) -> str | None:
    """Why an exported stream state is invalid (None when it is valid)."""
    try:
        tensors = load_tensors(state)
    except Exception as error:  # any parse failure is the finding itself
        return f"unreadable: {error}"
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            return f"{name} is not finite"
        if name.rsplit(".", 1)[-1] in NON_NEGATIVE and (tensor < 0).any():
            return f"{name} is negative"
    return None


@dataclass
class Outcome:
    """What one generated request got, and what was wrong with it (empty: nothing)."""

    label: str
    status: int
    problems: dict[str, str] = field(default_factory=dict)
    request: str = ""  # the case as a curl command, to reproduce a problem


@dataclass
class Tally:
    """Counts over a fuzz run."""

    cases: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    problems: Counter[str] = field(default_factory=Counter)
    where: Counter[tuple[str, str]] = field(default_factory=Counter)  # (problem, operation)
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, outcome: Outcome) -> None:
        """Count one case; keep the first example of each kind of problem."""
        self.cases += 1
        self.statuses[outcome.status] += 1
        for kind, detail in outcome.problems.items():
            self.problems[kind] += 1
            self.where[kind, outcome.label] += 1
            self.examples.setdefault(
                kind, f"{outcome.label} -> {outcome.status}: {detail} ({outcome.request})"
            )


class Aim:
    """Aims most generated cases at a real stream, the served model, a valid image or state.

    Purely random ids and images would almost always be answered 404 or 400 and never reach
    the code that changes a stream. ``states`` are the streams' latest exported states (sent
    back as state imports). ``hostile`` adds well-formed tensors of huge finite values, which
    must be refused or leave every stream valid.
    """

    def __init__(self, hostile: bool = True) -> None:
        self.states: dict[str, bytes] = {}
        self.hostile = hostile

    def strategy(self, case: Any) -> st.SearchStrategy[Any]:
        """The generated ``case``, aimed by a drawn choice.

        The choice comes from a Hypothesis-seeded ``Random``, evenly: drawn integers would lean
        to the smallest, and the hostile choice (1) would almost never come.
        """
        streams = sorted(STREAMS)
        return st.randoms(use_true_random=False).map(
            lambda r: self.apply(
                case, r.randrange(AIM_CHOICES), r.choice(streams), r.choice(ADAPTERS)
            )
        )

    def apply(self, case: Any, choice: int, stream_id: str, adapter: str) -> Any:
        """``case`` with its ids, model, adapter, images or state made real (unless the last
        ``choice``, which leaves it as generated)."""
        if choice == AIM_CHOICES - 1:
            return case
        path = case.operation.path
        parameters = case.path_parameters or {}
        if "stream_id" in parameters:
            parameters["stream_id"] = stream_id
        if "model" in parameters:
            parameters["model"] = MODEL
        if "version" in parameters and choice == 0:
            parameters["version"] = "1"
        body = case.body
        hostile = self.hostile and choice == 1
        if path.endswith("/predict") and (choice == 0 or hostile):
            if case.media_type == "application/json":
                case.body = {"images": [EXAMPLE_PNG_BASE64]}
            elif case.media_type == "multipart/form-data":
                case.body = {"images": [base64.b64decode(EXAMPLE_PNG_BASE64)]}
            elif case.media_type == "application/octet-stream":
                values, dtype = tensor_values(hostile)
                case.body = values.tobytes()
                case.query = {**(case.query or {}), "shape": "1,3,32,32", "dtype": dtype}
        elif path.endswith("/infer") and (choice == 0 or hostile) and isinstance(body, dict):
            values, dtype = tensor_values(hostile)
            datatype = "FP32" if dtype == "float32" else "UINT8"
            tensor = {"name": "input", "shape": [1, 3, 32, 32], "datatype": datatype}
            body["inputs"] = [{**tensor, "data": values.tolist()}]
            body["parameters"] = {"stream_id": stream_id}
        elif path.endswith("/state") and case.method.upper() == "PUT" and choice < 2:
            # its own state (accepted) or another adapter's (refused unless it is cam-2)
            case.body = self.states.get(stream_id if choice == 0 else "cam-2", b"")
        elif isinstance(body, dict):
            if isinstance(body.get("parameters"), dict):  # OIP infer
                body["parameters"]["stream_id"] = stream_id
            if "adapter" in body:
                body["adapter"] = adapter
            if "model" in body:
                body["model"] = MODEL
            if "id" in body and choice == 0:
                body["id"] = stream_id
        return case


def tensor_values(hostile: bool) -> tuple[np.ndarray, str]:
    """One image [1, 3, 32, 32]: uint8 pixels, or float32 values up to 1e37 (finite, hostile)."""
    rng = np.random.default_rng()
    if not hostile:
        return rng.integers(0, 256, 3 * 32 * 32).astype(np.uint8), "uint8"
    scale = np.float32(10.0) ** rng.integers(0, 38, 3 * 32 * 32).astype(np.float32)
    return (rng.standard_normal(3 * 32 * 32).astype(np.float32) * scale), "float32"


def aimed_schema(document: dict[str, Any], aim: Aim, config: dict[str, Any] | None = None) -> Any:
    """The OpenAPI ``document`` loaded by schemathesis, its generated cases aimed by ``aim``.

    ``config`` is schemathesis's configuration (as in ``schemathesis.toml``); by default, valid
    and invalid requests are generated.
    """
    settings = {"generation": {"mode": "all"}, **(config or {})}
    schema = schemathesis.openapi.from_dict(
        document, config=schemathesis.Config.from_dict(settings)
    )

    def flatmap_case(context: Any, case: Any) -> st.SearchStrategy[Any]:
        return aim.strategy(case)

    schema.hook(flatmap_case)  # a schemathesis hook: the function's name says which
    return schema


class Fuzzer:
    """Runs generated requests against a server and checks them and the streams' states.

    Args:
        url: the server's base URL.
        aim: the aim of the cases, whose states this fuzzer keeps up to date.
        snapshot: every stream's state by id (compared around refused requests).
    """

    def __init__(
        self,
        url: str,
        aim: Aim,
        snapshot: Callable[[httpx.Client], dict[str, bytes]] = snapshot,
    ) -> None:
        self.url = url
        self.aim = aim
        self.client = httpx.Client(base_url=url, timeout=60.0)
        self.session = requests.Session()
        self.take_snapshot = snapshot
        self.last: dict[str, bytes] | None = None  # the streams' states after the last case

    def close(self) -> None:
        """Close the HTTP clients."""
        self.client.close()
        self.session.close()

    def restore(self) -> None:
        """Put the fuzz streams back: delete any other, create missing ones, adapt each once."""
        self.last = None
        present = {s["id"] for s in self.client.get("/v1/streams?limit=1000").json()["data"]}
        for stream_id in present - set(STREAMS):
            self.client.delete(f"/v1/streams/{stream_id}")
        for stream_id in set(STREAMS) - present:
            created = self.client.post("/v1/streams", json={"id": stream_id, **STREAMS[stream_id]})
            created.raise_for_status()
            image = base64.b64decode(EXAMPLE_PNG_BASE64)
            files = [("images", ("a.png", image, "image/png"))]
            self.client.post(f"/v1/streams/{stream_id}/predict", files=files).raise_for_status()

    # --- one case ---

    def run(self, case: Any) -> Outcome:
        """Send one generated request; check its response, and every stream after it.

        The streams' states are exported before and after the request: after a 4xx they must be
        unchanged, and after any request every state must be valid (finite; counts, variances
        and second moments >= 0). A stream found invalid is deleted (and created again), so one
        poisoning counts once.
        """
        before = self.last or self.take_snapshot(self.client)
        self.aim.states = before
        response = case.call(base_url=self.url, session=self.session, timeout=60)
        outcome = Outcome(
            f"{case.method.upper()} {case.operation.path}",
            response.status_code,
            request=case.as_curl_command()[:400],
        )
        for kind, check in CHECKS.items():
            try:
                case.validate_response(response, checks=[check])
            except FailureGroup as failures:
                outcome.problems[kind] = "; ".join(f.title for f in failures.exceptions)
        after = self.last = self.take_snapshot(self.client)
        changed = sorted(sid for sid in before | after if before.get(sid) != after.get(sid))
        if changed and 400 <= response.status_code < 500:
            outcome.problems[CHANGED] = f"streams {', '.join(changed)}"
        invalid = {sid: why for sid, state in after.items() if (why := state_problem(state))}
        if invalid:
            outcome.problems[INVALID] = "; ".join(f"{sid}: {why}" for sid, why in invalid.items())
            for stream_id in invalid:
                self.client.delete(f"/v1/streams/{stream_id}")
        if response.status_code < 300 or outcome.problems:
            self.restore()
        return outcome


def fuzz(fuzzer: Fuzzer, schema: Any, seconds: float, examples_per_round: int, seed: int) -> Tally:
    """Generate and run cases of ``schema``'s operations, one after another, for ``seconds``."""
    tally = Tally()
    operations = [result.ok() for result in schema.get_all_operations()]
    strategies = [
        operation.as_strategy(generation_mode=mode)
        for operation in operations
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
    ]
    strategies += [s for operation in operations for s in operation.get_strategies_from_examples()]
    deadline = time.monotonic() + seconds
    rounds = 0
    while strategies and time.monotonic() < deadline:
        for strategy in list(strategies):
            if time.monotonic() >= deadline:
                break
            try:
                run_examples(fuzzer, strategy, tally, examples_per_round, seed + rounds)
            except hypothesis.errors.Unsatisfiable:  # no invalid request exists (no parameters)
                strategies.remove(strategy)
        rounds += 1
        log.info("round %d: %d cases, problems %s", rounds, tally.cases, dict(tally.problems))
    return tally


def run_examples(
    fuzzer: Fuzzer, strategy: st.SearchStrategy[Any], tally: Tally, count: int, seed: int
) -> None:
    """Run ``count`` cases drawn from ``strategy`` (without shrinking: every case is counted)."""

    @hypothesis.seed(seed)
    @hypothesis.settings(
        max_examples=count,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @hypothesis.given(strategy)
    def one(case: Any) -> None:
        tally.add(fuzzer.run(case))

    one()


@contextlib.contextmanager
def prepared(
    url: str, aim: Aim, snapshot: Callable[[httpx.Client], dict[str, bytes]] = snapshot
) -> Iterator[Fuzzer]:
    """A fuzzer of the server at ``url`` with its streams created."""
    fuzzer = Fuzzer(url, aim, snapshot)
    try:
        fuzzer.restore()
        yield fuzzer
    finally:
        fuzzer.close()


def report(tally: Tally, seconds: float, where: str) -> str:
    """The "Fuzzing" section of docs/reliability.md."""
    rows = [("cases", tally.cases)]
    rows += [(kind, tally.problems[kind]) for kind in (*CHECKS, CHANGED, INVALID)]
    statuses = ", ".join(f"{status}: {n}" for status, n in sorted(tally.statuses.items()))
    lines = [
        "## Fuzzing",
        "",
        f"Machine: {where}; server and fuzzer on the same machine. Command: "
        f"`{command_line()}` ({seconds:g} s). Requests generated by schemathesis from the "
        "server's OpenAPI document, valid and invalid ones, aimed at three real streams; each "
        "response checked against the document; every stream's exported state compared "
        "before and after each refused (4xx) request, and checked valid (finite, counts and "
        "variances >= 0) after every request. Raw tensors include finite float32 values up to "
        "1e37.",
        "",
        table(["", "count"], rows),
        "",
        f"Statuses: {statuses}.",
    ]
    if tally.examples:
        lines += ["", "Problems by operation, and the first case of each:", ""]
        for kind, example in tally.examples.items():
            where = ", ".join(f"{op} {n}" for (k, op), n in tally.where.most_common() if k == kind)
            lines.append(f"- {kind}: {where}; first: `{example[:300]}`")
    lines += [
        "",
        "The same harness runs a few hundred cases in the test suite "
        "(`tests/service/test_fuzz.py`).",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--seconds", type=float, default=300.0, help="time budget of the run")
    parser.add_argument("--examples", type=int, default=25, help="cases per strategy and round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/reliability.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from bench.http import local_server

    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(local_server("cpu", store="local"))
        aim = Aim()
        schema = aimed_schema(httpx.get(f"{url}/openapi.json").json(), aim)
        fuzzer = stack.enter_context(prepared(url, aim))
        started = time.monotonic()
        tally = fuzz(fuzzer, schema, args.seconds, args.examples, args.seed)
        elapsed = time.monotonic() - started
    text = report(tally, round(elapsed), machine("cpu"))
    write_section(args.out, "bench.fuzz", text, title="Reliability")
    log.info("\n%s", text)


if __name__ == "__main__":
    main()
