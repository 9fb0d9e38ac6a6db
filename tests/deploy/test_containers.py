"""The Dockerfile and the compose files, checked statically, and their commands run on the host.

Docker cannot run here. The static tests parse the files (services, ports, volumes, pinned
images, healthchecks, every referenced file); the slow tests run what the containers would run:
the Dockerfile's `uv sync` commands into a fresh environment, the image's start command with the
image's and compose's environment, against Redis started with compose's command, until the
image's HEALTHCHECK command passes.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis
import yaml

from service.settings import Settings
from tests.service.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
GPU_OVERRIDE = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())
SERVICES = COMPOSE["services"]
PINNED = re.compile(r"^[\w./-]+:v?\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?$")
START_TIMEOUT_S = 120.0


# --- the Dockerfile, parsed -----------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    instructions = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, arguments = line.strip().partition(" ")
            instructions.append((keyword.upper(), " ".join(arguments.split())))
    return instructions


def build_args() -> dict[str, str]:
    """The ARG defaults (the base images)."""
    return dict(arg.split("=", 1) for keyword, arg in dockerfile() if keyword == "ARG")


def stages() -> dict[str, list[tuple[str, str]]]:
    """The instructions of each named stage (``FROM image AS name``)."""
    result: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for keyword, arguments in dockerfile():
        if keyword == "FROM":
            current = [(keyword, arguments)]
            result[arguments.split()[-1]] = current
        else:
            current.append((keyword, arguments))
    return result


def inherited(name: str) -> list[tuple[str, str]]:
    """The instructions of stage ``name`` preceded by those of the stages it is built FROM."""
    instructions = stages()[name]
    parent = instructions[0][1].split()[0]
    return (inherited(parent) if parent in stages() else []) + instructions


def stage_env(name: str) -> dict[str, str]:
    """The environment of stage ``name`` (its ENV and its parents')."""
    env: dict[str, str] = {}
    for keyword, arguments in inherited(name):
        if keyword == "ENV":
            env.update(dict(item.split("=", 1) for item in shlex.split(arguments)))
    return env


def exec_form(name: str, keyword: str) -> list[str]:
    """The exec-form (JSON) command of ``keyword`` (CMD, HEALTHCHECK) that stage ``name`` runs."""
    arguments = [a for k, a in inherited(name) if k == keyword][-1]
    return yaml.safe_load(arguments[arguments.index("[") :])


def uv_sync_commands() -> list[list[str]]:
    """The ``uv sync`` commands of the build stage, in order, without their cache mounts."""
    commands = []
    for keyword, arguments in stages()["build"]:
        if keyword == "RUN" and "uv sync" in arguments:
            commands.append(shlex.split(arguments[arguments.index("uv sync") :]))
    return commands


# --- static checks --------------------------------------------------------------------------


def test_dockerfile_has_cpu_and_cuda_targets_from_pinned_images() -> None:
    assert {"build", "runtime", "cpu", "cuda"} <= stages().keys()
    assert list(stages())[-1] == "cpu", "the default target (the last stage) is the CPU one"
    for image in build_args().values():
        assert PINNED.match(image), image
    assert stage_env("cuda")["TTA_DEVICE"] == "cuda"
    assert stage_env("cpu")["TTA_DEVICE"] == "cpu"
    # the CUDA stage asks the NVIDIA container toolkit for the driver's compute libraries
    assert "compute" in stage_env("cuda")["NVIDIA_DRIVER_CAPABILITIES"]


def test_dockerfile_installs_from_the_lock_and_runs_as_a_user() -> None:
    commands = uv_sync_commands()
    assert commands
    for command in commands:
        assert {"--frozen", "--no-dev"} <= set(command), command
    runtime = stages()["runtime"]
    (user,) = [arguments for keyword, arguments in runtime if keyword == "USER"]
    assert user not in {"root", "0"}
    # the weights cache and the local store are volumes, at the paths the settings point to
    (volumes,) = [yaml.safe_load(a) for k, a in runtime if k == "VOLUME"]
    env = stage_env("runtime")
    assert set(volumes) == {env["TTA_MODEL_CACHE_DIR"], env["TTA_DATA_DIR"]}
    assert exec_form("runtime", "CMD") == ["tta-serve"]
    assert "/v2/health/ready" in " ".join(exec_form("runtime", "HEALTHCHECK"))
    assert every_env_is_a_setting(env)


def every_env_is_a_setting(env: dict[str, str]) -> bool:
    """True if every ``TTA_`` variable names a field of Settings (a typo would be ignored)."""
    names = {key.removeprefix("TTA_").lower() for key in env if key.startswith("TTA_")}
    unknown = names - Settings.model_fields.keys()
    assert not unknown, f"not settings: {unknown}"
    return True


def test_every_copied_path_exists_and_is_not_ignored() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for keyword, arguments in dockerfile():
        if keyword == "COPY" and "--from=" not in arguments:
            *sources, _ = arguments.split()
            for source in sources:
                assert (ROOT / source).exists(), source
                assert not ignored(source, patterns), f"{source} is excluded by .dockerignore"


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore excludes ``path`` (last matching pattern wins, ``!`` re-includes)."""
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if fnmatch.fnmatch(path, pattern.removeprefix("!").rstrip("/")):
            excluded = not negated
    return excluded


def test_compose_services_images_and_ports() -> None:
    assert set(SERVICES) == {"redis", "tta-serve", "prometheus", "grafana", "traffic"}
    for name, service in SERVICES.items():
        if "build" in service:
            assert service["build"]["target"] in stages(), name
        else:
            assert PINNED.match(service["image"]), f"{name}: {service['image']}"
    ports = {name: service.get("ports", []) for name, service in SERVICES.items()}
    assert ports["tta-serve"] == ["8000:8000"]
    assert ports["prometheus"] == ["9090:9090"]
    assert ports["grafana"] == ["3000:3000"]
    assert SERVICES["traffic"]["profiles"] == ["traffic"]


def test_compose_healthchecks_and_start_order() -> None:
    for name in ("redis", "prometheus", "grafana"):
        assert SERVICES[name]["healthcheck"]["test"][0] == "CMD", name
    assert "tta-serve" not in [n for n, s in SERVICES.items() if "healthcheck" in s]
    # tta-serve's health is the image's HEALTHCHECK; the traffic client disables it
    assert SERVICES["traffic"]["healthcheck"] == {"disable": True}
    depends = {name: service.get("depends_on", {}) for name, service in SERVICES.items()}
    assert depends["tta-serve"] == {"redis": {"condition": "service_healthy"}}
    assert depends["grafana"] == {"prometheus": {"condition": "service_healthy"}}
    assert depends["traffic"] == {"tta-serve": {"condition": "service_healthy"}}
    # Prometheus must run when tta-serve is down, to alert on it
    assert depends["prometheus"] == {"tta-serve": {"condition": "service_started"}}
    assert "--appendonly" in SERVICES["redis"]["command"]
    redis = SERVICES["redis"]["command"]
    assert redis[redis.index("--appendonly") + 1] == "yes"


def test_compose_environment_is_valid_settings() -> None:
    env = SERVICES["tta-serve"]["environment"]
    assert env["TTA_STORE"] == "redis"
    assert env["TTA_REDIS_URL"].startswith("redis://redis:")
    assert every_env_is_a_setting(env)
    Settings(**{key.removeprefix("TTA_").lower(): value for key, value in env.items()})


def mount(volume: str) -> tuple[str, str]:
    """(source, target) of a short-syntax volume; ``${VAR:-default}`` sources give the default."""
    match = re.fullmatch(
        r"(\$\{\w+:-(?P<default>[^}]+)\}|(?P<source>[^:]+)):(?P<target>[^:]+)(:\w+)?", volume
    )
    assert match is not None, volume
    return match["default"] or match["source"], match["target"]


def test_compose_mounts_exist_and_volumes_are_declared() -> None:
    declared = set(COMPOSE["volumes"])
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source, target = mount(volume)
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source}"
            else:
                assert source in declared, f"{name}: {source}"
            assert target.startswith("/"), f"{name}: {target}"
    mounts = dict(mount(volume)[::-1] for volume in SERVICES["tta-serve"]["volumes"])
    env = stage_env("runtime")
    assert set(mounts) == {env["TTA_MODEL_CACHE_DIR"], env["TTA_DATA_DIR"]}


def test_prometheus_and_grafana_point_at_the_compose_services() -> None:
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    (job,) = [job for job in prometheus["scrape_configs"] if job["job_name"] == "tta-serve"]
    (exposed,) = [a for k, a in stages()["runtime"] if k == "EXPOSE"]
    assert job["static_configs"][0]["targets"] == [f"tta-serve:{exposed}"]
    provisioning = ROOT / "deploy/grafana/provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())[
        "datasources"
    ]
    assert source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards/tta.yml").read_text())["providers"]
    grafana_mounts = dict(mount(volume)[::-1] for volume in SERVICES["grafana"]["volumes"])
    assert grafana_mounts[provider["options"]["path"]] == "./deploy/grafana/dashboards"
    home = SERVICES["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (ROOT / "deploy/grafana/dashboards" / Path(home).name).is_file()


def test_gpu_override_reserves_a_gpu_for_the_cuda_target() -> None:
    service = GPU_OVERRIDE["services"]["tta-serve"]
    assert service["build"]["target"] == "cuda"
    assert service["environment"]["TTA_DEVICE"] == "cuda"
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    # the base file itself needs no GPU
    assert "deploy" not in SERVICES["tta-serve"]


def test_the_lock_is_up_to_date() -> None:
    uv = shutil.which("uv")
    assert uv is not None, "uv not found"
    result = subprocess.run(
        [uv, "lock", "--check"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


# --- the containers' commands, run on the host ----------------------------------------------


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh environment made by the Dockerfile's ``uv sync`` commands, in their order.

    Same commands and lock; hard links from uv's cache and no bytecode compilation (the image
    copies and compiles), so that it takes seconds here.
    """
    venv = tmp_path_factory.mktemp("image") / "venv"
    env = {
        **os.environ,
        "UV_PROJECT_ENVIRONMENT": str(venv),
        "UV_LINK_MODE": "hardlink",
        "UV_COMPILE_BYTECODE": "0",
        "UV_PYTHON": sys.executable,
    }
    env.pop("VIRTUAL_ENV", None)
    for command in uv_sync_commands():
        subprocess.run(command, cwd=ROOT, env=env, check=True, timeout=600)
    return venv


@contextlib.contextmanager
def compose_redis(workdir: Path) -> Iterator[int]:
    """redis-server with compose's command line (AOF on), on a free loopback port."""
    port = free_port()
    command = [
        *SERVICES["redis"]["command"],
        "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
    ]  # fmt: skip
    if shutil.which(command[0]) is None:
        pytest.fail("redis-server not found: `apt-get install -y redis-server`")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    cli, *arguments = SERVICES["redis"]["healthcheck"]["test"][1:]
    healthcheck = [cli, "-p", str(port), *arguments]
    try:
        wait_until(lambda: process.poll() is None and run_quietly(healthcheck) == 0, "redis")
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


def run_quietly(command: list[str], env: dict[str, str] | None = None) -> int:
    """The exit status of ``command``, its output discarded."""
    return subprocess.run(command, env=env, capture_output=True, timeout=30, check=False).returncode


def wait_until(
    condition: Callable[[], bool], what: str, timeout_s: float = START_TIMEOUT_S
) -> None:
    """Poll ``condition()`` until it is true; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    pytest.fail(f"{what} did not pass within {timeout_s} s")


@pytest.mark.slow
def test_image_environment_imports_the_server_and_the_traffic_generator(image_venv: Path) -> None:
    python = image_venv / "bin" / "python"
    script = "import service.main, bench.traffic, torch; print(torch.__version__)"
    result = subprocess.run([python, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (image_venv / "bin" / exec_form("runtime", "CMD")[0]).is_file()


@pytest.mark.slow
def test_start_command_becomes_healthy_with_compose_settings(
    image_venv: Path, tmp_path: Path, model_cache: Path
) -> None:
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    with compose_redis(redis_dir) as redis_port:
        port = free_port()
        env = {
            **os.environ,
            **stage_env("cpu"),
            **SERVICES["tta-serve"]["environment"],
            # what differs on the host: loopback addresses, the temp dirs, the venv on PATH
            "TTA_HOST": "127.0.0.1",
            "TTA_PORT": str(port),
            "TTA_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "TTA_MODEL_CACHE_DIR": str(model_cache),
            "TTA_DATA_DIR": str(tmp_path / "state"),
            "PATH": f"{image_venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
        }
        env.pop("VIRTUAL_ENV", None)
        healthcheck = exec_form("runtime", "HEALTHCHECK")
        assert run_quietly(healthcheck, env) != 0, "healthy before the server started"
        server = subprocess.Popen(exec_form("cpu", "CMD"), cwd=ROOT, env=env)
        try:
            wait_until(lambda: server.poll() is None and run_quietly(healthcheck, env) == 0,
                       "the image's HEALTHCHECK")  # fmt: skip
            url = f"http://127.0.0.1:{port}"
            created = httpx.post(f"{url}/v1/streams", json={"id": "camera-1"}, timeout=30)
            assert created.status_code == 201, created.text
            assert "tta_http_requests_total" in httpx.get(f"{url}/metrics").text
        finally:
            server.terminate()  # what `docker stop` sends; uvicorn re-raises it when done
            assert server.wait(timeout=60) in (0, -signal.SIGTERM)
        # the shutdown flushed the stream to Redis
        client = redis.Redis(port=redis_port)
        assert client.dbsize() > 0
        client.close()
