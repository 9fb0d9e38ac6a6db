"""The examples and the README's walkthrough, run as written against a real server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from models.spec import CIFAR10_LABELS
from tests.service.helpers import Server, running_server, server_settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Server]:
    settings = server_settings(tmp_path_factory.mktemp("examples"), model_cache)
    with running_server(settings) as running:
        yield running


def run(command: list[str], cwd: Path) -> str:
    """Run a command with the project's environment (uv run finds the project from anywhere)."""
    env = {**os.environ, "UV_PROJECT": str(ROOT)}
    process = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stdout + process.stderr
    return process.stdout


def test_python_client(server: Server, tmp_path: Path) -> None:
    state = tmp_path / "client.safetensors"
    out = run(
        [sys.executable, str(ROOT / "examples" / "client.py"), "images", "--make", "5",
         "--url", server.url, "--stream", "client", "--batch", "2", "--export", str(state)],
        cwd=tmp_path,
    )  # fmt: skip
    lines = out.splitlines()
    assert lines[0] == "created stream client: cifar10_resnet20, adabn " + str(
        {"prior_images": 64.0, "window": None}
    )
    predictions = [line.split("\t") for line in lines[1:6]]
    assert [p[0] for p in predictions] == [f"image-{i:03d}.png" for i in range(5)]
    assert all(p[1] in CIFAR10_LABELS and 0 < float(p[2]) <= 1 for p in predictions)
    assert re.fullmatch(r"drift after 5 images: early [\d.]+, late [\d.]+ \(Jeffreys\), "
                        r"entropy [\d.]+, confidence [\d.]+", lines[6])  # fmt: skip
    with server.client() as http:
        assert state.read_bytes() == http.get("/v1/streams/client/state").content
    client = [sys.executable, str(ROOT / "examples" / "client.py"), "images"]
    again = run([*client, "--url", server.url, "--stream", "client"], cwd=tmp_path)
    assert again.startswith("stream client exists: adapting it further\n")


def test_curl_walkthrough(server: Server, tmp_path: Path) -> None:
    out = run(["bash", str(ROOT / "examples" / "curl.sh"), server.url], cwd=tmp_path)
    assert '"id":"curl-demo"' in out and '"predictions"' in out and '"outputs"' in out
    assert out.rstrip().endswith("204")


def readme_block(heading: str) -> str:
    """The first ```sh block of the README after ``heading``."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(f"\n{heading}\n") :]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match is not None
    return match.group(1)


def test_readme_use_block_runs_as_written(server: Server, tmp_path: Path) -> None:
    """Every command of README "Use", the server's port put in for localhost:8000."""
    script = readme_block("## Use").replace("localhost:8000", server.url.removeprefix("http://"))
    out = run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path)
    assert "error" not in out, out
    assert out.count('"stream_id":"camera-7"') == 2  # the two predicts
    assert '"outputs"' in out and '"early"' in out
    assert out.rstrip().endswith("}") and (tmp_path / "camera-7.safetensors").stat().st_size > 0


def test_triton_client_example(server: Server, tmp_path: Path) -> None:
    """Triton's own client: a stateless request, then a sequence that creates, adapts and ends
    its stream (deleted at sequence_end, the default)."""
    address = server.url.removeprefix("http://")
    out = run(
        [sys.executable, str(ROOT / "examples" / "triton_client.py"), "--url", address,
         "--sequence", "42"],
        cwd=tmp_path,
    )  # fmt: skip
    lines = out.splitlines()
    assert lines[0] == "live True ready True"
    assert lines[1].startswith("stateless: [") and len(lines) == 7
    for step, line in enumerate(lines[2:]):
        assert line.startswith(f"sequence 42 step {step}: [")
        labels = re.findall(r"'([a-z]+)'", line.split("] ")[0])
        assert len(labels) == 4 and set(labels) <= set(CIFAR10_LABELS)
        assert f"'stream_id': '42', 'samples': {4 * (step + 1)}" in line  # one stream adapts
    with server.client() as http:
        assert http.get("/v1/streams/42").status_code == 404  # ended: deleted
