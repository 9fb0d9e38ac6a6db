"""Test-time adapters of BatchNorm statistics, and the engine that serves many streams at once.

``ADAPTERS`` maps each canonical name to its :class:`~adapters.base.Adapter`; ``get_adapter``
fails with the valid names.
"""

from adapters import adabn, alpha_bn, balanced, gated, momentum, source, tbn, unmix_tns
from adapters.base import (
    Adapter,
    AdapterError,
    InvalidStateError,
    StateMismatchError,
    UnknownAdapterError,
    no_update,
)

ADAPTERS: dict[str, Adapter] = {
    module.ADAPTER.name: module.ADAPTER
    for module in (source, tbn, adabn, alpha_bn, unmix_tns, momentum, balanced, gated)
}


def get_adapter(name: str) -> Adapter:
    """The registered adapter of this name, or UnknownAdapterError listing the valid ones."""
    try:
        return ADAPTERS[name]
    except KeyError:
        raise UnknownAdapterError(name, sorted(ADAPTERS)) from None


def stateless_adapters() -> list[str]:
    """The adapters whose streams never change: a request can use them without a stream."""
    return sorted(name for name, adapter in ADAPTERS.items() if adapter.update is no_update)


__all__ = [
    "ADAPTERS",
    "Adapter",
    "AdapterError",
    "InvalidStateError",
    "StateMismatchError",
    "UnknownAdapterError",
    "get_adapter",
    "stateless_adapters",
]
