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
from adapters.pool import StatePool

FORMAT = "tta-serve/stream-state/1"
METADATA_KEY = "tta-serve"


def export_state(pool: StatePool, slot: int, metadata: dict) -> bytes:
    """One stream's state as safetensors bytes with ``metadata`` (JSON-able) in the header."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in pool.read(slot).items()}
    header = {METADATA_KEY: json.dumps({"format": FORMAT, **metadata}, sort_keys=True)}
    return save_tensors(tensors, metadata=header)


def read_state(data: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    """Parse exported bytes into tensors and metadata; StateMismatchError when malformed."""
    try:
        tensors = load_tensors(data)
        with_header = _header(data)
    except (SafetensorError, ValueError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StateMismatchError(f"not a tta-serve stream state: {error}") from None
    raw = with_header.get("__metadata__", {}).get(METADATA_KEY)
    if raw is None:
        raise StateMismatchError("not a tta-serve stream state: no tta-serve metadata")
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError as error:
        raise StateMismatchError(f"malformed tta-serve metadata: {error}") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise StateMismatchError(f"unsupported state format (expected {FORMAT})")
    return tensors, metadata


def check_state(pool: StatePool, tensors: dict[str, torch.Tensor], expected: dict) -> None:
    """Raise StateMismatchError unless ``tensors`` fit the pool exactly and are finite.

    ``expected`` holds the metadata fields that must match (model, adapter, layers, ...).
    """
    layout = pool.layout()
    missing, extra = layout.keys() - tensors.keys(), tensors.keys() - layout.keys()
    if missing or extra:
        raise StateMismatchError(
            f"state tensors do not match the stream: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(extra)[:5]}"
        )
    for name, (shape, dtype) in layout.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise StateMismatchError(
                f"state tensor {name} is {tuple(tensor.shape)} {tensor.dtype}, "
                f"expected {shape} {dtype}"
            )
        if not torch.isfinite(tensor).all():
            raise StateMismatchError(f"state tensor {name} holds NaN or infinite values")


def check_metadata(metadata: dict, expected: dict) -> None:
    """Raise StateMismatchError where the metadata disagrees with the target stream."""
    for key, value in expected.items():
        found = metadata.get(key)
        if isinstance(value, float) and isinstance(found, float) and math.isclose(value, found):
            continue
        if found != value:
            raise StateMismatchError(f"state is for {key}={found!r}, this stream has {value!r}")


def _header(data: bytes) -> dict:
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size].decode("utf-8"))
