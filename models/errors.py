"""Typed errors raised by the models package.

The service maps each of them to one HTTP status in one place; everything here derives from
`ModelError`, so a caller that only cares "the model could not be loaded" catches that.
"""

from collections.abc import Iterable


class ModelError(Exception):
    """Base class of every error raised while resolving, fetching or loading a model."""


class UnknownModelError(ModelError, KeyError):
    """A model name that is not in the registry; the message lists the valid names."""

    def __init__(self, name: str, valid: Iterable[str]) -> None:
        self.name = name
        self.valid = sorted(valid)
        super().__init__(f"Unknown model {name!r}; valid: {', '.join(self.valid)}")

    def __str__(self) -> str:
        # KeyError.__str__ would wrap the message in quotes.
        return str(self.args[0])


class IncompatibleModelError(ModelError):
    """A model that cannot be served with test-time adaptation (e.g. no BatchNorm2d layer)."""


class WeightsUnavailableError(ModelError):
    """Weights that are neither cached nor downloadable, or a weights file that does not exist."""


class WeightsChecksumError(ModelError):
    """A weights file whose sha256 does not match the expected digest."""
