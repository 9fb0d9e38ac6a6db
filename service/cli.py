"""The ``tta-serve`` command line: serve (the default), list models, move states, check configs.

Flags override the environment (``TTA_*``), which overrides the config file (``--config`` or
``TTA_CONFIG_FILE``). Errors a user can fix (an invalid setting, a missing file, a server that
does not answer) are one line on stderr and exit status 1 or 2, never a traceback.

Example:
    $ tta-serve serve --port 9000 --model cifar10_resnet32 --store memory
    $ tta-serve check-config --config tta.toml
    $ tta-serve export-state camera-7 -o camera-7.safetensors --url http://127.0.0.1:8000
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

import pydantic
import typer

from service.settings import CONFIG_FILE_ENV, Settings, unknown_variables

DEFAULT_URL = "http://127.0.0.1:8000"

app = typer.Typer(
    name="tta-serve",
    help="A test-time adaptation server: per-stream BatchNorm statistics, adapted online.\n\n"
    "Without a command, `serve` with the settings of the environment (TTA_*).",
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help=f"a .toml or .json settings file (else ${CONFIG_FILE_ENV}); the environment wins "
        "over it",
        dir_okay=False,
    ),
]
UrlOption = Annotated[str, typer.Option("--url", help="a running tta-serve", envvar="TTA_URL")]


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one line to stderr and exit with ``code``."""
    typer.secho(f"tta-serve: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Settings from the flags given (not None), the environment and the config file.

    A missing or malformed file and invalid values exit with status 2 and what is wrong.
    """
    if config is not None:
        # The settings sources read the file's name from the environment (service.settings).
        os.environ[CONFIG_FILE_ENV] = str(config)
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**given)
    except pydantic.ValidationError as error:
        lines = [
            f"{'.'.join(str(part) for part in e['loc']) or 'settings'}: {e['msg']}"
            for e in error.errors()
        ]
        fail("invalid settings:\n  " + "\n  ".join(lines), 2)
    except (OSError, ValueError) as error:  # the config file is missing, unreadable, malformed
        fail(f"invalid config file: {error}", 2)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tta-serve {package_version('tta-serve')}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def root(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="print the version"),
    ] = False,
) -> None:
    """Serve when no command is given."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(serve)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="address to bind (TTA_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port (TTA_PORT)")] = None,
    model: Annotated[
        list[str] | None,
        typer.Option(help="a registered model to serve; repeat for several (TTA_MODELS)"),
    ] = None,
    device: Annotated[
        Literal["auto", "cpu", "cuda"] | None, typer.Option(help="cpu, cuda or auto (TTA_DEVICE)")
    ] = None,
    store: Annotated[
        Literal["local", "redis", "memory"] | None,
        typer.Option(help="where stream states persist (TTA_STORE)"),
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="the local store's directory (TTA_DATA_DIR)")
    ] = None,
    redis_url: Annotated[str | None, typer.Option(help="the Redis store (TTA_REDIS_URL)")] = None,
    log_format: Annotated[
        Literal["text", "json"] | None, typer.Option(help="text or JSON lines (TTA_LOG_FORMAT)")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Serve the models over HTTP (one uvicorn worker); exit non-zero if the start-up fails."""
    from service.main import serve as run  # the app and uvicorn load only to serve

    settings = load_settings(
        config,
        host=host,
        port=port,
        models=model,
        device=device,
        store=store,
        data_dir=data_dir,
        redis_url=redis_url,
        log_format=log_format,
    )
    run(settings)


@app.command("models")
def list_models_command(
    url: Annotated[
        str | None, typer.Option("--url", help="list a running server's models instead")
    ] = None,
) -> None:
    """List the registered models (nothing is built or downloaded), or a server's."""
    if url is not None:
        for served in _request("GET", f"{url}/v1/models")["data"]:
            size = "x".join(map(str, served["input_size"]))
            labels = len(served["labels"])
            typer.echo(f"{served['name']}\t{served['architecture']}\t{size}\t{labels} classes")
        return
    from models import get_spec, list_models

    for name in list_models():
        spec = get_spec(name)
        size = "x".join(map(str, spec.input_size))
        typer.echo(f"{name}\t{spec.architecture}\t{size}\t{spec.num_classes} classes")


@app.command("export-state")
def export_state(
    stream: Annotated[str, typer.Argument(help="the stream's id")],
    output: Annotated[Path, typer.Option("--output", "-o", help="the file to write")],
    url: Annotated[
        str | None, typer.Option("--url", help=f"a running tta-serve (e.g. {DEFAULT_URL})")
    ] = None,
    store: Annotated[
        Literal["local", "redis"] | None,
        typer.Option(help="read the last stored state from a store instead of a server"),
    ] = None,
    data_dir: Annotated[Path, typer.Option(help="the local store's directory")] = Path("./data"),
    redis_url: Annotated[str, typer.Option(help="the Redis store")] = "redis://127.0.0.1:6379/0",
) -> None:
    """Write a stream's state (safetensors + JSON metadata) from a server or a store."""
    if (url is None) == (store is None):
        fail("give exactly one of --url and --store", 2)
    if url is not None:
        data = _request("GET", f"{url}/v1/streams/{stream}/state", raw=True)
    else:
        data = _stored_state(stream, store or "local", data_dir, redis_url)
    output.write_bytes(data)
    typer.echo(f"wrote {len(data)} bytes of stream {stream} to {output}")


@app.command("import-state")
def import_state(
    stream: Annotated[str, typer.Argument(help="the stream's id")],
    file: Annotated[Path, typer.Argument(help="an exported state", exists=True, dir_okay=False)],
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Load an exported state into a server's stream, creating it from the file if absent."""
    from safetensors import SafetensorError, safe_open

    from adapters.state_io import METADATA_KEY

    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = json.loads((handle.metadata() or {})[METADATA_KEY])
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as error:
        fail(f"{file} is not a tta-serve stream state: {error}")
    if _request("GET", f"{url}/v1/streams/{stream}", missing_ok=True) is None:
        body = {
            "id": stream,
            "model": metadata["model"],
            "adapter": metadata["adapter"],
            "preset": "paper",  # the file's config is complete: no preset adds to it
            "config": metadata["config"],
        }
        _request("POST", f"{url}/v1/streams", body=json.dumps(body).encode(), json_body=True)
        typer.echo(f"created stream {stream} ({metadata['model']}, {metadata['adapter']})")
    _request("PUT", f"{url}/v1/streams/{stream}/state", body=file.read_bytes())
    typer.echo(f"imported {file} into stream {stream}")


@app.command("check-config")
def check_config(config: ConfigOption = None) -> None:
    """Validate the config file and the environment; name unknown TTA_ variables. Exit 1 if bad."""
    problems = [
        f"unknown variable {name}" + (f" (did you mean {nearest}?)" if nearest else "")
        for name, nearest in unknown_variables(os.environ)
    ]
    settings = load_settings(config)
    files = [(m.name, m.file) for m in settings.onnx_models]
    files += [(m.name, m.weights) for m in settings.user_models]
    problems += [
        f"model {name}: no such file {path}"
        for name, path in files
        if not path.expanduser().is_file()
    ]
    for problem in problems:
        typer.secho(f"tta-serve: {problem}", fg=typer.colors.RED, err=True)
    if problems:
        raise typer.Exit(1)
    served = [*settings.models, *settings.file_model_names()]
    typer.echo(f"ok: serves {', '.join(served)} on {settings.host}:{settings.port}")


@app.command("export-onnx")
def export_onnx(
    model: Annotated[str, typer.Argument(help="a registered model (tta-serve models)")],
    file: Annotated[Path, typer.Argument(help="the .onnx file to write")],
    cache_dir: Annotated[
        Path | None, typer.Option(help="weights cache (TTA_MODEL_CACHE_DIR)")
    ] = None,
) -> None:
    """Write a registered model to ONNX with its BatchNorm layers kept as nodes."""
    from models import ModelError
    from models.export_onnx import export_onnx as write  # torch.onnx only when asked

    cache = cache_dir or load_settings().model_cache_dir
    try:
        layers = write(model, file, cache_dir=cache)
    except ModelError as error:
        fail(str(error))
    typer.echo(f"wrote {model} to {file} with {layers} BatchNormalization nodes")


def _stored_state(stream: str, kind: Literal["local", "redis"], data_dir: Path, url: str) -> bytes:
    """The state bytes of a stream's record in a store (its last flushed state)."""
    from service.stores import StoreError, create_store

    try:
        opened = create_store(kind, directory=data_dir.expanduser() / "streams", redis_url=url)
    except StoreError as error:
        fail(f"cannot open the {kind} store: {error}")
    try:
        record = opened.get(stream)
    except StoreError as error:
        fail(f"cannot read stream {stream}: {error}")
    finally:
        opened.close()
    if record is None:
        fail(f"no stream {stream!r} in the {kind} store")
    return record.state


def _request(
    method: str,
    url: str,
    *,
    body: bytes | None = None,
    json_body: bool = False,
    raw: bool = False,
    missing_ok: bool = False,
) -> Any:
    """One HTTP request to a server: its JSON (or bytes); an error answer exits with its message."""
    content_type = "application/json" if json_body else "application/octet-stream"
    headers = {"content-type": content_type} if body is not None else {}
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            data: bytes = response.read()
    except urllib.error.HTTPError as error:
        if missing_ok and error.code == 404:
            return None
        fail(f"{method} {url}: {error.code} {_message(error.read())}")
    except OSError as error:  # refused, unreachable, timed out
        fail(f"{method} {url}: the server does not answer ({error})")
    return data if raw else json.loads(data)


def _message(body: bytes) -> str:
    """The message of an error body (``{"error": {"code", "message"}}``), else the body."""
    text = body.decode(errors="replace")
    try:
        error = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return text
    return str(error.get("message", error) if isinstance(error, dict) else error)


def main() -> None:
    """The ``tta-serve`` entry point."""
    app()


if __name__ == "__main__":
    main()
