"""L1 in front of L2: reads go to memory first and to Redis only for what memory lacks, filling
memory with what Redis had; writes go to both.

Redis failing never fails a read. A read that Redis cannot answer in time is answered from L1
alone (misses as misses); Redis is then left alone for a backoff that doubles up to 5 s, and
the next read after it is the probe. Changes are logged once and reported to whoever watches
(the sidecar's health service).
"""

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
import redis.exceptions

from solaris.server.errors import Unavailable
from solaris.server.l1 import MemoryStore
from solaris.server.redis_store import RedisStore
from solaris.server.store import FLOAT32, Freshness, Rows

REDIS_ERRORS = (redis.exceptions.RedisError, OSError, TimeoutError)
_FIRST_BACKOFF_SECONDS = 0.1
_MAX_BACKOFF_SECONDS = 5.0
_ANSWER_MARGIN_SECONDS = 0.001
logger = logging.getLogger("solaris.redis")


class Reachability:
    """Whether Redis is worth asking now, with exponential backoff after failures."""

    def __init__(self) -> None:
        self.up = True
        self.errors = 0
        self._watchers: list[Callable[[bool], None]] = []
        self._retry_at = 0.0
        self._backoff = _FIRST_BACKOFF_SECONDS

    def watch(self, on_change: Callable[[bool], None]) -> None:
        """Calls `on_change(up)` each time Redis is lost or found again."""
        self._watchers.append(on_change)

    def worth_trying(self) -> bool:
        return self.up or time.monotonic() >= self._retry_at

    def failed(self, error: BaseException) -> None:
        self.errors += 1
        if self.up:
            self.up = False
            self._backoff = _FIRST_BACKOFF_SECONDS
            logger.warning("Redis unreachable (%r): serving from L1 alone, retrying", error)
            self._notify()
        else:
            self._backoff = min(self._backoff * 2, _MAX_BACKOFF_SECONDS)
        self._retry_at = time.monotonic() + self._backoff

    def succeeded(self) -> None:
        if not self.up:
            self.up = True
            logger.warning("Redis reachable again")
            self._notify()

    def _notify(self) -> None:
        for on_change in self._watchers:
            on_change(self.up)


class TieredStore:
    """L1 (memory) in front of L2 (Redis), as one Store."""

    def __init__(
        self,
        l1: MemoryStore,
        l2: RedisStore,
        timeout_seconds: float,
        reachability: Reachability | None = None,
    ) -> None:
        self.l1 = l1
        self.l2 = l2
        self.dim = l1.dim
        self.timeout_seconds = timeout_seconds
        self.reachability = reachability or Reachability()
        self.l2_hits = 0

    async def read(
        self,
        user_id: str,
        item_ids: Sequence[str],
        dtype: np.dtype,
        now: float,
        deadline: float | None = None,
    ) -> Rows:
        rows = self.l1.read_sync(user_id, item_ids, dtype, now)
        lacking = np.flatnonzero(rows.times["expires_at"] <= now)
        if not lacking.size or not self.reachability.worth_trying():
            return rows
        wanted = _picked(item_ids, lacking)
        timeout = self._timeout(deadline)
        try:
            found = await asyncio.wait_for(self.l2.read(user_id, wanted, FLOAT32, now), timeout)
        except REDIS_ERRORS as error:
            # Running out of the caller's deadline says nothing about Redis.
            if not (isinstance(error, TimeoutError) and timeout < self.timeout_seconds):
                self.reachability.failed(error)
            return rows
        self.reachability.succeeded()
        return self._merge(user_id, rows, lacking, wanted, found, dtype, now)

    async def close(self) -> None:
        """Closes L2's connections; L1 is shared with others and left as it is."""
        await self.l2.close()

    async def write(
        self, user_id: str, item_ids: Sequence[str], vectors: np.ndarray, freshness: Freshness
    ) -> None:
        """Writes L2, then L1. Raises Unavailable, writing nothing, when L2 cannot be written:
        the daemon leaves its task unacknowledged, and the retry must not find the pairs
        fresh in L1 and acknowledge work that never reached the shared store."""
        if not self.reachability.worth_trying():
            raise Unavailable("Redis unreachable: not stored")
        try:
            await asyncio.wait_for(
                self.l2.write(user_id, item_ids, vectors, freshness), self.timeout_seconds
            )
        except REDIS_ERRORS as error:
            self.reachability.failed(error)
            raise Unavailable(f"Redis unreachable: not stored ({error!r})") from error
        self.reachability.succeeded()
        self.l1.write_sync(user_id, item_ids, vectors, freshness)

    def _timeout(self, deadline: float | None) -> float:
        if deadline is None:
            return self.timeout_seconds
        left = deadline - time.monotonic() - _ANSWER_MARGIN_SECONDS
        return max(0.0, min(self.timeout_seconds, left))

    def _merge(
        self,
        user_id: str,
        rows: Rows,
        lacking: np.ndarray,
        wanted: list[str],
        found: Rows,
        dtype: np.dtype,
        now: float,
    ) -> Rows:
        live = found.times["expires_at"] > now
        if not live.any():
            return rows
        self.l2_hits += int(live.sum())
        if live.all():
            items, values, times = wanted, found.values, found.times
        else:
            items = _picked(wanted, np.flatnonzero(live))
            values, times = found.values[live], found.times[live]
        self.l1.write_rows(user_id, items, values, times, found.model_version)
        if len(items) == len(rows.times):
            # A cold read: every row is Redis's.
            return Rows(values.astype(dtype, copy=False), times, found.model_version)
        # L1's rows are fresh arrays of this read alone: fill them in place.
        rows.values[lacking[live]] = values.astype(dtype, copy=False)
        rows.times[lacking[live]] = times
        return Rows(rows.values, rows.times, rows.model_version or found.model_version)


def _picked(item_ids: Sequence[str], rows: np.ndarray) -> list[str]:
    """The items at `rows` (ascending): all of them, on a cold read, without a pass over each."""
    if len(rows) == len(item_ids):
        return list(item_ids)
    return [item_ids[row] for row in rows.tolist()]
