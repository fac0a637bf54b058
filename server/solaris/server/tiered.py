"""L1 in front of L2: reads go to memory first and to Redis only for what memory lacks, filling
memory with what Redis had; writes go to both.

Both tiers answer for the one model version the L2 store reads (`RedisStore.model_version`):
rows L1 holds of another are not served, so an answer never mixes versions.

Redis failing never fails a read. A read that Redis does not answer within its budget (the
Redis timeout, or the caller's deadline if sooner) is answered from L1 alone, misses as misses;
that alone says nothing about Redis (`solaris.server.reachability` decides that). Once Redis is
down, reads leave it alone for a backoff that doubles up to 5 s, and the next read after it is
the probe.
"""

from collections.abc import Sequence

import numpy as np

from solaris.server.errors import Unavailable
from solaris.server.l1 import MemoryStore
from solaris.server.reachability import REDIS_ERRORS, Reachability, within
from solaris.server.redis_store import RedisStore
from solaris.server.store import Freshness, Rows, UserItems, UserVectors

__all__ = ["Reachability", "TieredStore"]
_ANSWER_MARGIN_SECONDS = 0.001


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
        # One version per answer: both tiers read the version served as the read began.
        version = self.l2.model_version
        rows = self.l1.read_sync(user_id, item_ids, dtype, now, version)
        lacking = np.flatnonzero(rows.times["expires_at"] <= now)
        if not lacking.size or not self.reachability.worth_trying():
            return rows
        wanted = _picked(item_ids, lacking)
        # As Redis holds them: L1 takes them in its dtype and the answer in its own, each
        # converting (if at all) once.
        reading = self.l2.read(user_id, wanted, None, now, version=version)
        until = None if deadline is None else deadline - _ANSWER_MARGIN_SECONDS
        try:
            found = await within(reading, self.timeout_seconds, self.reachability, until)
        except REDIS_ERRORS:
            return rows
        return self._merge(user_id, rows, lacking, wanted, found, dtype, now)

    async def close(self) -> None:
        """Closes L2's connections once the calls past their budget are answered (or Redis is
        given up on); L1 is shared with others and left as it is."""
        await self.reachability.settle()
        await self.l2.close()

    async def read_many(
        self, wanted: Sequence[UserItems], dtype: np.dtype, now: float
    ) -> list[Rows]:
        """Each user's rows from L1, and what L1 lacks from L2 in one round trip; all of the
        version served as the read began, as `read`."""
        version = self.l2.model_version
        rows = [
            self.l1.read_sync(user_id, item_ids, dtype, now, version)
            for user_id, item_ids in wanted
        ]
        lacking = [np.flatnonzero(found.times["expires_at"] <= now) for found in rows]
        asked = [index for index, missing in enumerate(lacking) if missing.size]
        if not asked or not self.reachability.worth_trying():
            return rows
        items = {index: _picked(wanted[index].item_ids, lacking[index]) for index in asked}
        reading = self.l2.read_many(
            [UserItems(wanted[index].user_id, items[index]) for index in asked],
            None,
            now,
            version,
        )
        try:
            found = await within(reading, self.timeout_seconds, self.reachability)
        except REDIS_ERRORS:
            return rows
        for index, from_l2 in zip(asked, found, strict=True):
            user_id = wanted[index].user_id
            rows[index] = self._merge(
                user_id, rows[index], lacking[index], items[index], from_l2, dtype, now
            )
        return rows

    async def write(
        self, user_id: str, item_ids: Sequence[str], vectors: np.ndarray, freshness: Freshness
    ) -> None:
        await self.write_many([UserVectors(user_id, item_ids, vectors)], freshness)

    async def write_many(self, batch: Sequence[UserVectors], freshness: Freshness) -> None:
        """Writes L2, then L1, both the values as Redis keeps them (float16 by default), so
        that this sidecar answers what every other one reads. Raises Unavailable, writing no
        L1, when L2 did not take the pairs in time: the daemon leaves its task unacknowledged,
        and the retry must not find the pairs fresh in L1 and acknowledge work that never
        reached the shared store."""
        if not self.reachability.worth_trying():
            raise Unavailable("Redis unreachable: not stored")
        batch = [
            UserVectors(user_id, item_ids, self.l2.as_stored(vectors))
            for user_id, item_ids, vectors in batch
        ]
        writing = self.l2.write_many(batch, freshness)
        try:
            await within(writing, self.timeout_seconds, self.reachability)
        except REDIS_ERRORS as error:
            raise Unavailable(f"Redis unreachable: not stored ({error!r})") from error
        for user_id, item_ids, vectors in batch:
            self.l1.write_sync(user_id, item_ids, vectors, freshness)

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
