"""Label feedback: true labels for earlier predictions, and the live accuracy they give.

A stream with feedback on remembers, for its last requests, each image's adapted and source
predicted class (:class:`PredictionLog`). A label sent later for (request id, image index) is
scored against both, once, into a window of the last labelled images (:class:`FeedbackWindow`):
the live accuracy of the adapted predictions next to the source model's on the same images, the
only direct measure of whether adaptation helps the stream.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field


@dataclass
class LoggedRequest:
    """One request's predicted classes, adapted and source, and which images are labelled."""

    adapted: list[int]
    source: list[int]
    labelled: set[int] = field(default_factory=set)


class UnknownPredictionError(LookupError):
    """A label refers to a request the stream does not remember, or an image it did not have."""


class PredictionLog:
    """The predicted classes of a stream's last ``max_requests`` requests, by request id."""

    def __init__(self, max_requests: int) -> None:
        self.max_requests = max_requests
        self._requests: OrderedDict[str, LoggedRequest] = OrderedDict()

    def add(self, request_id: str, adapted: list[int], source: list[int]) -> None:
        """Remember a request's classes (forgetting the oldest request beyond the bound)."""
        self._requests[request_id] = LoggedRequest(adapted, source)
        self._requests.move_to_end(request_id)
        while len(self._requests) > self.max_requests:
            self._requests.popitem(last=False)

    def find(self, request_id: str, index: int) -> LoggedRequest:
        """The logged request of an image; UnknownPredictionError if it is not remembered."""
        logged = self._requests.get(request_id)
        if logged is None:
            raise UnknownPredictionError(
                f"request {request_id[:80]!r} is not among the stream's last "
                f"{self.max_requests} predictions with feedback on"
            )
        if not 0 <= index < len(logged.adapted):
            raise UnknownPredictionError(
                f"request {request_id[:80]!r} had {len(logged.adapted)} images; "
                f"index {index} is out of range"
            )
        return logged

    def __len__(self) -> int:
        return len(self._requests)


@dataclass(frozen=True)
class Accuracy:
    """Live accuracy over the window: labelled images, adapted and source accuracy (None: 0)."""

    labels: int
    adapted: float | None
    source: float | None
    labels_total: int


class FeedbackWindow:
    """Whether the adapted and the source prediction were right, for the last ``size`` labels."""

    def __init__(self, size: int) -> None:
        self._outcomes: deque[tuple[bool, bool]] = deque(maxlen=size)
        self._adapted = 0
        self._source = 0
        self.total = 0

    def add(self, adapted_right: bool, source_right: bool) -> None:
        """Score one labelled image (the oldest one leaves a full window)."""
        if len(self._outcomes) == self._outcomes.maxlen:
            old_adapted, old_source = self._outcomes[0]
            self._adapted -= old_adapted
            self._source -= old_source
        self._outcomes.append((adapted_right, source_right))
        self._adapted += adapted_right
        self._source += source_right
        self.total += 1

    def accuracy(self) -> Accuracy:
        """The window's accuracies."""
        count = len(self._outcomes)
        if not count:
            return Accuracy(0, None, None, self.total)
        return Accuracy(count, self._adapted / count, self._source / count, self.total)


@dataclass
class Feedback:
    """A stream's feedback: its prediction log and its live accuracy window."""

    log: PredictionLog
    window: FeedbackWindow

    def score(self, labels: list[tuple[str, int, int]]) -> Scored:
        """Score ``(request id, image index, true class)`` labels.

        All or nothing: an unknown request or index raises UnknownPredictionError before any
        label counts. An image labelled before is not counted again.
        """
        found = [(self.log.find(rid, index), index, label) for rid, index, label in labels]
        scored = Scored()
        for logged, index, label in found:
            if index in logged.labelled:
                scored.duplicates += 1
                continue
            logged.labelled.add(index)
            adapted, source = logged.adapted[index] == label, logged.source[index] == label
            self.window.add(adapted, source)
            scored.scored += 1
            scored.adapted_right += adapted
            scored.source_right += source
        return scored


@dataclass
class Scored:
    """What a batch of labels did: scored, duplicates, and right adapted / source predictions."""

    scored: int = 0
    duplicates: int = 0
    adapted_right: int = 0
    source_right: int = 0
