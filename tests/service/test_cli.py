"""The ``tta-serve`` command line: help, version, serve flags, models, states, config checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from service import cli
from service.settings import Settings
from tests.service.helpers import post_pixels, random_pixels, running_server, server_settings

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]


def invoke(*args: str, env: dict[str, str] | None = None) -> Any:
    """Run the CLI in-process; the result has exit_code, stdout and stderr."""
    return runner.invoke(cli.app, list(args), env=env)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy of the environment without TTA_ variables: none leaks in, and `--config` (which
    names the file in the environment) leaks out to no other test."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TTA_")}
    monkeypatch.setattr(os, "environ", environ)


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
    """The settings ``serve`` would have served with (the server itself is not started)."""
    calls: list[Settings] = []
    monkeypatch.setattr("service.main.serve", calls.append)
    return calls


def test_help_lists_the_commands() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("serve", "models", "export-state", "import-state", "check-config"):
        assert command in result.stdout
    assert "export-onnx" in result.stdout


def test_version() -> None:
    result = invoke("--version")
    assert (result.exit_code, result.stdout) == (0, "tta-serve 0.1.0\n")


def test_no_command_serves_the_environment(served: list[Settings]) -> None:
    result = invoke(env={"TTA_PORT": "9123"})
    assert result.exit_code == 0, result.output
    assert served[0].port == 9123


def test_flags_override_the_environment_and_the_file(
    served: list[Settings], tmp_path: Path
) -> None:
    config = tmp_path / "tta.toml"
    config.write_text('port = 7000\nstore = "redis"\nmax_batch_size = 32\n')
    result = invoke(
        "serve",
        "--config",
        str(config),
        "--port",
        "9001",
        "--model",
        "cifar10_resnet20",
        "--model",
        "cifar10_resnet32",
        "--device",
        "cpu",
        "--store",
        "memory",
        # a non-loopback host without keys must be allowed explicitly (docs/security.md)
        env={"TTA_PORT": "8001", "TTA_HOST": "0.0.0.0", "TTA_ALLOW_UNAUTHENTICATED": "true"},
    )
    assert result.exit_code == 0, result.output
    (settings,) = served
    assert (settings.port, settings.host, settings.store) == (9001, "0.0.0.0", "memory")
    assert settings.models == ["cifar10_resnet20", "cifar10_resnet32"]
    assert settings.max_batch_size == 32  # from the file


def test_invalid_settings_are_one_clear_message(served: list[Settings]) -> None:
    result = invoke("serve", "--port", "70000")
    assert result.exit_code == 2 and not served
    assert "invalid settings:\n  port: Input should be less than or equal to 65535" in result.stderr
    assert "Traceback" not in result.output


def test_check_config_names_unknown_variables(tmp_path: Path) -> None:
    result = invoke("check-config", env={"TTA_MAX_BATCHSIZE": "64", "TTA_SHARED_DIR": "/x"})
    assert result.exit_code == 1
    assert result.stderr == (
        "tta-serve: unknown variable TTA_MAX_BATCHSIZE (did you mean TTA_MAX_BATCH_SIZE?)\n"
    )


def test_check_config_validates_the_file(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"port": 9000, "models": ["cifar10_resnet32"]}))
    result = invoke("check-config", "--config", str(good))
    assert result.exit_code == 0, result.output
    assert result.stdout == "ok: serves cifar10_resnet32 on 127.0.0.1:9000\n"
    bad = tmp_path / "bad.toml"
    bad.write_text("max_batchsize = 3\nport = 'x'\n")
    result = invoke("check-config", "--config", str(bad))
    assert result.exit_code == 2
    assert "max_batchsize: Extra inputs are not permitted" in result.stderr
    assert "port: Input should be a valid integer" in result.stderr
    result = invoke("check-config", "--config", str(tmp_path / "none.toml"))
    assert result.exit_code == 2 and "no such file" in result.stderr


def test_check_config_finds_missing_model_files(tmp_path: Path) -> None:
    config = tmp_path / "tta.toml"
    config.write_text(
        "[[user_models]]\nname = 'mine'\nfactory = 'pkg.nets:build'\n"
        f"weights = '{tmp_path / 'mine.safetensors'}'\nlabels = ['a', 'b']\ninput_size = [8, 8]\n"
    )
    result = invoke("check-config", "--config", str(config))
    assert result.exit_code == 1
    assert f"model mine: no such file {tmp_path / 'mine.safetensors'}" in result.stderr


def test_models_lists_the_registry_without_loading() -> None:
    result = invoke("models")
    assert result.exit_code == 0
    assert "cifar10_resnet20\tcifar_resnet20\t32x32\t10 classes\n" in result.stdout
    assert "resnet50\tresnet50\t224x224\t1000 classes\n" in result.stdout


def test_states_move_between_servers(tmp_path: Path, model_cache: Path) -> None:
    """export-state from one server (and from its store), import-state into another."""
    source = server_settings(tmp_path / "a", model_cache)
    with running_server(source) as server, server.client() as http:
        assert invoke("models", "--url", server.url).stdout.startswith("cifar10_resnet20\t")
        http.post("/v1/streams", json={"id": "cam", "adapter": "adabn"})
        assert post_pixels(http, "cam", random_pixels(8, 1)).status_code == 200
        exported = tmp_path / "cam.safetensors"
        result = invoke("export-state", "cam", "-o", str(exported), "--url", server.url)
        assert result.exit_code == 0, result.output
        assert exported.read_bytes() == http.get("/v1/streams/cam/state").content
        missing = invoke("export-state", "nobody", "-o", str(tmp_path / "x"), "--url", server.url)
        assert missing.exit_code == 1
        assert missing.stderr.startswith("tta-serve: GET ") and ": 404 " in missing.stderr
    # the server flushed at shutdown: the local store holds the same state
    from_store = tmp_path / "stored.safetensors"
    result = invoke(
        "export-state", "cam", "-o", str(from_store), "--store", "local", "--data-dir",
        str(tmp_path / "a"),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert from_store.read_bytes() == exported.read_bytes()
    with running_server(server_settings(tmp_path / "b", model_cache)) as other:
        result = invoke("import-state", "cam", str(exported), "--url", other.url)
        assert result.exit_code == 0, result.output
        assert "created stream cam (cifar10_resnet20, adabn)" in result.stdout
        with other.client() as http:
            assert http.get("/v1/streams/cam/state").content == exported.read_bytes()
            assert http.get("/v1/streams/cam").json()["samples"] == 8


def test_a_server_that_does_not_answer_is_one_line(tmp_path: Path) -> None:
    result = invoke("export-state", "cam", "-o", str(tmp_path / "x"), "--url", "http://127.0.0.1:9")
    assert result.exit_code == 1
    assert result.stderr.startswith("tta-serve: GET http://127.0.0.1:9/v1/streams/cam/state: ")
    assert "does not answer" in result.stderr and len(result.stderr.splitlines()) == 1


def test_offline_without_weights_is_one_clear_line(tmp_path: Path) -> None:
    """The real entry point, offline with an empty cache: the reason, and no traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTA_")}
    env |= {"TTA_MODEL_CACHE_DIR": str(tmp_path), "TTA_STORE": "memory", "TTA_PORT": "0"}
    env["TTA_TYPO_SETTING"] = "1"
    process = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode != 0
    assert "Traceback" not in process.stderr, process.stderr
    errors = [line for line in process.stderr.splitlines() if " ERROR " in line]
    assert "cannot start: weights for cifar10_resnet20 are not in the cache" in errors[0]
    assert "TTA_TYPO_SETTING is not a setting and is ignored" in process.stderr


def test_export_onnx_is_a_command(tmp_path: Path, model_cache: Path) -> None:
    file = tmp_path / "r20.onnx"
    result = invoke("export-onnx", "cifar10_resnet20", str(file), "--cache-dir", str(model_cache))
    assert result.exit_code == 0, result.output
    assert result.stdout == f"wrote cifar10_resnet20 to {file} with 19 BatchNormalization nodes\n"
    unknown = invoke("export-onnx", "resnet2000", str(file), "--cache-dir", str(model_cache))
    assert unknown.exit_code == 1 and "Unknown model 'resnet2000'" in unknown.stderr
