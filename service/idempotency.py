"""Idempotent predictions: a retried request gets its first response and adapts the stream once.

A predict request with an ``Idempotency-Key`` header leaves, in its stream, the key, a
fingerprint of the request and the result it got. The keys travel in the stream's stored
state (its service metadata), written in the same store write as the state the request made:
under ``durability=sync`` a request that was answered is remembered, and one whose write did
not happen changed nothing, so a retry after a crash is applied exactly once either way.
The window is bounded: the last ``max_keys`` keys of the stream, none older than ``window_s``.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")  # printable ASCII, no spaces


def fingerprint(*parts: bytes | str) -> str:
    """A digest of what makes two requests the same request (body, parameters)."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


@dataclass(frozen=True)
class Remembered:
    """A key's request fingerprint, its result (JSON-ready) and when it was first answered."""

    fingerprint: str
    result: dict[str, Any]
    at: float  # unix time


class IdempotencyCache:
    """One stream's remembered keys, oldest first, bounded in number and age."""

    def __init__(self, max_keys: int, window_s: float) -> None:
        self.max_keys = max_keys
        self.window_s = window_s
        self._keys: OrderedDict[str, Remembered] = OrderedDict()

    def get(self, key: str, now: float) -> Remembered | None:
        """The remembered answer of ``key`` (None if unknown or out of the window)."""
        self._expire(now)
        return self._keys.get(key)

    def put(self, key: str, remembered: Remembered) -> None:
        """Remember ``key`` (forgetting the oldest beyond the bounds)."""
        self._keys[key] = remembered
        self._keys.move_to_end(key)
        self._expire(remembered.at)

    def _expire(self, now: float) -> None:
        while self._keys and (
            len(self._keys) > self.max_keys
            or now - next(iter(self._keys.values())).at > self.window_s
        ):
            self._keys.popitem(last=False)

    def to_list(self) -> list[list[Any]]:
        """The keys as JSON-ready rows, for the stream's stored metadata."""
        return [[key, r.fingerprint, r.at, r.result] for key, r in self._keys.items()]

    @classmethod
    def from_list(cls, rows: object, max_keys: int, window_s: float) -> IdempotencyCache:
        """The cache stored by :meth:`to_list` (rows that are not valid are skipped)."""
        cache = cls(max_keys, window_s)
        if isinstance(rows, list):
            for row in rows:
                if (
                    isinstance(row, list)
                    and len(row) == 4
                    and isinstance(row[0], str)
                    and isinstance(row[1], str)
                    and isinstance(row[2], int | float)
                    and isinstance(row[3], dict)
                ):
                    cache._keys[row[0]] = Remembered(row[1], row[3], float(row[2]))
        return cache

    def __len__(self) -> int:
        return len(self._keys)
