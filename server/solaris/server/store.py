"""The store interface every tier implements (L1 in memory, L2 on Redis), and the batch types
that cross it. A read answers a whole BatchGet as arrays, never as per-row
objects: the serving path stays vectorised and the garbage collector has nothing to track.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple, Protocol

import numpy as np

FLOAT32 = np.dtype("<f4")
FLOAT16 = np.dtype("<f2")
TIMES = np.dtype([("computed_at", "<f8"), ("stale_at", "<f8"), ("expires_at", "<f8")])
"""A row's times, wall-clock seconds: computed, HIT until `stale_at`, STALE until `expires_at`."""
NEVER_STORED = np.array((0.0, -np.inf, -np.inf), TIMES)
"""The times of a row the store does not hold: expired since forever."""


def never_stored(rows: int) -> np.ndarray:
    """Times for `rows` rows the store does not hold."""
    return np.full(rows, NEVER_STORED, TIMES)


class RowStatus(IntEnum):
    """What the store held for one requested pair; values match the proto's RowStatus."""

    HIT = 1
    MISS = 2
    STALE = 3


class Freshness(NamedTuple):
    """When a batch of embeddings was computed and how long it is served.

    Times are wall-clock seconds (time.time()) so that they mean the same in every process
    sharing a store. Until `stale_at` a row is a HIT; until `expires_at`, STALE; then gone.
    """

    model_version: str
    computed_at: float
    stale_at: float
    expires_at: float

    @classmethod
    def starting(
        cls, model_version: str, computed_at: float, ttl_seconds: float, stale_seconds: float
    ) -> "Freshness":
        stale_at = computed_at + ttl_seconds
        return cls(model_version, computed_at, stale_at, stale_at + stale_seconds)


class UserItems(NamedTuple):
    """One user's pairs to read."""

    user_id: str
    item_ids: Sequence[str]


class UserVectors(NamedTuple):
    """One user's pairs to write: row i of `vectors` (n x dim float32) for the i-th item."""

    user_id: str
    item_ids: Sequence[str]
    vectors: np.ndarray


@dataclass(frozen=True, slots=True)
class Rows:
    """A batch read: row i answers the i-th requested item.

    Rows the store does not hold (never stored, or expired by the `now` of the read) are zero
    in `values` and have the times of NEVER_STORED. `times` is an array of TIMES records.
    """

    values: np.ndarray
    times: np.ndarray
    model_version: str

    def statuses(self, now: float) -> np.ndarray:
        """HIT while fresh, STALE in the grace window, MISS once expired or never stored."""
        hit = now < self.times["stale_at"]
        if hit.all():  # a warm read: one comparison, and HIT is 1 (True)
            return hit.astype(np.uint8)
        live = now < self.times["expires_at"]
        status = np.where(hit, RowStatus.HIT, np.where(live, RowStatus.STALE, RowStatus.MISS))
        return status.astype(np.uint8)

    def ages_ms(self, now: float) -> np.ndarray:
        """Milliseconds since each live row was computed; 0 for a MISS."""
        age_ms = now - self.times["computed_at"]
        age_ms *= 1000.0
        np.maximum(age_ms, 0.0, out=age_ms)
        expired = now >= self.times["expires_at"]
        if expired.any():
            age_ms[expired] = 0.0
        return age_ms.astype(np.uint32)


class Store(Protocol):
    """A tier of the embedding store, keyed by (user_id, item_id)."""

    dim: int

    async def read(
        self,
        user_id: str,
        item_ids: Sequence[str],
        dtype: np.dtype,
        now: float,
        deadline: float | None = None,
    ) -> Rows:
        """The rows for `item_ids`, in order, as `dtype` (FLOAT32 or FLOAT16). A row expired by
        `now` (the caller's clock: wall-clock seconds, or a replay's simulated ones) is read as
        never stored, zero-filled. A tier that waits on the network gives up by `deadline` (a
        time.monotonic() instant)."""
        ...

    async def close(self) -> None:
        """Releases connections, from the event loop that used them."""
        ...

    async def write(
        self, user_id: str, item_ids: Sequence[str], vectors: np.ndarray, freshness: Freshness
    ) -> None:
        """Stores row i of `vectors` (n x dim float32) for the i-th item."""
        ...

    async def read_many(
        self, wanted: Sequence[UserItems], dtype: np.dtype, now: float
    ) -> list[Rows]:
        """`read` for several users, in one round trip where the tier is across a network:
        how a daemon checks a batch's pairs for freshness."""
        ...

    async def write_many(self, batch: Sequence[UserVectors], freshness: Freshness) -> None:
        """`write` for several users, in one round trip where the tier is across a network."""
        ...
