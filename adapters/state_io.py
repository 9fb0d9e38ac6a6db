"""Export and import of one stream's state: safetensors tensors + JSON metadata, never pickle.

The file carries every state tensor of the stream (adapter state, drift observer, prediction
observer) and, in the safetensors header, a JSON record of what it belongs to: the model, its
BN layer widths, the adapter, its validated config and the seed of any random initialisation.
Import checks all of it against the target stream before a single value is written.
"""

from __future__ import annotations

import json
import math

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from adapters.base import StateMismatchError
from adapters.pool import StateLayout, StatePool

FORMAT = "tta-serve/stream-state/1"
METADATA_KEY = "tta-serve"


def export_state(pool: StatePool, slot: int, metadata: dict) -> bytes:
    """One stream's state as safetensors bytes with ``metadata`` (JSON-able) in the header."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in pool.read(slot).items()}
    header = {METADATA_KEY: json.dumps({"format": FORMAT, **metadata}, sort_keys=True)}
    return save_tensors(tensors, metadata=header)


def read_state(
    data: bytes,
    *,
    expected: dict | None = None,
    max_tensors: int | None = None,
    max_header_bytes: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Parse exported bytes into tensors and metadata; StateMismatchError when malformed.

    In order, each before the next is parsed: the header's size (at most ``max_header_bytes``),
    the metadata (it must agree with ``expected``, see :func:`check_metadata`), the number of
    tensors (at most ``max_tensors``), and only then the tensors: a hostile file cannot make
    the parser work for long.
    """
    try:
        size = _header_size(data)
        if max_header_bytes is not None and size > max_header_bytes:
            raise StateMismatchError(
                f"the state's header is {size} bytes, more than the {max_header_bytes} bytes a "
                "state of this stream needs"
            )
        header = _header(data)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as error:
        if isinstance(error, StateMismatchError):
            raise
        raise StateMismatchError(f"not a tta-serve stream state: {error}") from None
    metadata = _metadata(header)
    if expected is not None:
        check_metadata(metadata, expected)
    count = len(header) - ("__metadata__" in header)
    if max_tensors is not None and count > max_tensors:
        raise StateMismatchError(
            f"the state holds {count} tensors, a state of this stream has {max_tensors}"
        )
    try:
        tensors = load_tensors(data)
    except (SafetensorError, ValueError) as error:
        raise StateMismatchError(f"not a tta-serve stream state: {error}") from None
    return tensors, metadata


def _metadata(header: dict) -> dict:
    block = header.get("__metadata__", {})
    raw = block.get(METADATA_KEY) if isinstance(block, dict) else None
    if not isinstance(raw, str):
        raise StateMismatchError("not a tta-serve stream state: no tta-serve metadata")
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError as error:
        raise StateMismatchError(f"malformed tta-serve metadata: {error}") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise StateMismatchError(f"unsupported state format (expected {FORMAT})")
    return metadata


def check_state(layout: StateLayout, tensors: dict[str, torch.Tensor]) -> None:
    """Raise unless ``tensors`` fit the layout exactly and hold valid values.

    StateMismatchError for missing, unexpected or misshapen tensors; InvalidStateError for
    NaN, infinite or out-of-bounds values (a negative count or variance).
    """
    missing, extra = layout.shapes.keys() - tensors.keys(), tensors.keys() - layout.shapes.keys()
    if missing or extra:
        raise StateMismatchError(
            f"state tensors do not match the stream: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(extra)[:5]}"
        )
    for name, (shape, dtype) in layout.shapes.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise StateMismatchError(
                f"state tensor {name} is {tuple(tensor.shape)} {tensor.dtype}, "
                f"expected {shape} {dtype}"
            )
    layout.check(tensors)


def check_metadata(metadata: dict, expected: dict) -> None:
    """Raise StateMismatchError where the metadata disagrees with the target stream."""
    for key, value in expected.items():
        found = metadata.get(key)
        if isinstance(value, float) and isinstance(found, float) and math.isclose(value, found):
            continue
        if found != value:
            raise StateMismatchError(f"state is for {key}={found!r}, this stream has {value!r}")


def _header_size(data: bytes) -> int:
    size = int.from_bytes(data[:8], "little")
    if len(data) < 8 or size > len(data) - 8:
        raise ValueError("the data ends before its safetensors header does")
    return size


def _header(data: bytes) -> dict:
    size = _header_size(data)
    return json.loads(data[8 : 8 + size].decode("utf-8"))
