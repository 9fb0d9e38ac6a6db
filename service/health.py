"""Whether the state store answers, for the readiness probe, asked at most once a second."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from service.stores import StateStore, StoreError

logger = logging.getLogger(__name__)

PING_CACHE_S = 1.0


class StoreHealth:
    """The store's last ping result, renewed when older than ``cache_s``.

    Probes from several kubelets and load balancers share one ping per ``cache_s``, so they
    cannot hammer Redis; concurrent probes wait for the ping in flight instead of sending more.
    """

    def __init__(
        self,
        store: StateStore,
        cache_s: float = PING_CACHE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.cache_s = cache_s
        self.clock = clock
        self._lock = asyncio.Lock()
        self._checked_at: float | None = None
        self._reachable = True

    @property
    def answered(self) -> bool:
        """Whether the store answered its last ping (True before the first), without pinging."""
        return self._reachable

    async def reachable(self) -> bool:
        """Whether the store answered its last ping (pinged again if that is too old)."""
        async with self._lock:
            now = self.clock()
            if self._checked_at is not None and now - self._checked_at < self.cache_s:
                return self._reachable
            try:
                await asyncio.to_thread(self.store.ping)
                reachable = True
            except StoreError as error:
                reachable = False
                if self._reachable:  # log the transitions, not every probe
                    logger.warning("not ready: the state store does not answer: %s", error)
            if reachable and not self._reachable:
                logger.info("ready again: the state store answers")
            self._checked_at, self._reachable = self.clock(), reachable
            return reachable
