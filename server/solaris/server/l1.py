"""L1: the sidecar's in-process store, capped in bytes, least recently used evicted first.

Embeddings live in preallocated numpy tables (float32 and float16 copies, cast once on
write), and an OrderedDict maps each (user_id, item_id) to its row and keeps the recency
order. A read gathers all of a BatchGet's rows with one fancy index. There is no per-entry
Python object: with a million entries as objects, one full garbage collection paused the
process for 375 ms (measured here); with tables, the collector has nothing to walk but the
index's keys, which it stops tracking.

Why not aiocache: its interface is one object per key, which is exactly what this layout
avoids. The lock lets the precompute worker threads and the event loop share the store.
"""

import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from solaris.server.store import FLOAT16, FLOAT32, NEVER_STORED, TIMES, Freshness, Rows

PairKey = tuple[str, str]
# What a row costs beyond its vectors and times: the index's dict entry, the key tuple, and
# the two id strings' object headers. Id lengths are added per entry.
INDEX_OVERHEAD_BYTES = 250


def entry_bytes(dim: int, id_bytes: int = 0) -> int:
    """What one entry of `dim` values counts against the cap, its two ids taking `id_bytes`:
    the smallest cap that holds it. The settings refuse a cap below one full-size entry."""
    row_bytes = dim * (FLOAT32.itemsize + FLOAT16.itemsize) + TIMES.itemsize + 4
    return row_bytes + INDEX_OVERHEAD_BYTES + id_bytes


class MemoryStore:
    """A thread-safe, byte-capped LRU store of embeddings of one `dim`."""

    def __init__(self, max_bytes: int, dim: int) -> None:
        self.dim = dim
        self.max_bytes = max_bytes
        self._bytes_without_ids = entry_bytes(dim)
        capacity = max_bytes // self._bytes_without_ids
        if capacity < 1:
            raise ValueError(f"cache_bytes: {max_bytes} cannot hold one {dim}-dim embedding")
        self.evictions = 0
        # np.zeros maps pages lazily: memory in use grows with the entries, up to the cap.
        self._float32 = np.zeros((capacity, dim), FLOAT32)
        self._float16 = np.zeros((capacity, dim), FLOAT16)
        self._times = np.zeros(capacity, TIMES)
        self._version_of_row = np.zeros(capacity, np.int32)
        self._versions: list[str] = []
        self._slots: OrderedDict[PairKey, int] = OrderedDict()
        self._free = list(range(capacity - 1, -1, -1))
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes held, by the same reckoning as the cap."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._slots)

    def entry_bytes(self, key: PairKey) -> int:
        return self._bytes_without_ids + len(key[0]) + len(key[1])

    async def read(
        self,
        user_id: str,
        item_ids: Sequence[str],
        dtype: np.dtype,
        now: float,
        deadline: float | None = None,
    ) -> Rows:
        return self.read_sync(user_id, item_ids, dtype, now)

    async def write(
        self, user_id: str, item_ids: Sequence[str], vectors: np.ndarray, freshness: Freshness
    ) -> None:
        self.write_sync(user_id, item_ids, vectors, freshness)

    async def close(self) -> None:
        """Nothing to release: the tables live as long as the store."""

    def stale_at(self, pairs: Sequence[PairKey]) -> np.ndarray:
        """Each pair's stale_at (-inf if not held), without touching recency: for speculation."""
        get = self._slots.get
        with self._lock:
            slots = np.array([get(pair, -1) for pair in pairs], dtype=np.int64)
            stale_at = self._times["stale_at"][np.maximum(slots, 0)]
        return np.where(slots >= 0, stale_at, -np.inf)

    def read_sync(self, user_id: str, item_ids: Sequence[str], dtype: np.dtype, now: float) -> Rows:
        """The rows for `item_ids` as of `now`; reading a row makes it the most recently used,
        and a row expired by `now` is zero-filled and dropped."""
        keys = [(user_id, item) for item in item_ids]
        with self._lock:
            slots = np.array(self._touch(keys), dtype=np.int64)
            found = slots >= 0
            rows = np.where(found, slots, 0)
            table = self._float16 if dtype == FLOAT16 else self._float32
            values = table[rows]
            times = self._times[rows]
            live = found & (now < times["expires_at"])
            self._drop_expired(keys, found & ~live)
            version = self._newest_version(rows, times, live)
        times[~live] = NEVER_STORED
        values[~live] = 0
        return Rows(values, times, version)

    def write_sync(
        self, user_id: str, item_ids: Sequence[str], vectors: np.ndarray, freshness: Freshness
    ) -> None:
        """Stores row i of `vectors` for the i-th item, evicting least recently used rows."""
        times = np.array(tuple(freshness[1:]), TIMES)
        self.write_rows(user_id, item_ids, vectors, times, freshness.model_version)

    def write_rows(
        self,
        user_id: str,
        item_ids: Sequence[str],
        vectors: np.ndarray,
        times: np.ndarray,
        model_version: str,
    ) -> None:
        """Like write_sync, with `times` (TIMES records) per row or one for all: how rows read
        from L2, each with its own times, fill L1."""
        vectors = np.asarray(vectors, dtype=FLOAT32)
        if vectors.shape != (len(item_ids), self.dim):
            raise ValueError(
                f"vectors: shape {vectors.shape}, expected {(len(item_ids), self.dim)}"
            )
        with self._lock:
            rows = np.array([self._claim((user_id, item)) for item in item_ids], dtype=np.int64)
            self._float32[rows] = vectors
            self._float16[rows] = vectors.astype(FLOAT16)
            self._times[rows] = times
            self._version_of_row[rows] = self._version_id(model_version)

    def _touch(self, keys: list[PairKey]) -> list[int]:
        get = self._slots.get
        slots = [get(key, -1) for key in keys]
        move_to_end = self._slots.move_to_end
        for key, slot in zip(keys, slots, strict=True):
            if slot >= 0:
                move_to_end(key)
        return slots

    def _drop_expired(self, keys: list[PairKey], expired: np.ndarray) -> None:
        for index in np.flatnonzero(expired):
            key = keys[index]
            slot = self._slots.pop(key, None)
            if slot is not None:
                self._free.append(slot)
                self._bytes -= self.entry_bytes(key)

    def _newest_version(self, rows: np.ndarray, times: np.ndarray, live: np.ndarray) -> str:
        if not live.any():
            return ""
        newest = np.flatnonzero(live)[np.argmax(times["computed_at"][live])]
        return self._versions[int(self._version_of_row[rows[newest]])]

    def _claim(self, key: PairKey) -> int:
        slot = self._slots.get(key)
        if slot is not None:
            self._slots.move_to_end(key)
            return slot
        size = self.entry_bytes(key)
        while not self._free or self._bytes + size > self.max_bytes:
            self._evict_oldest()
        slot = self._free.pop()
        self._slots[key] = slot
        self._bytes += size
        return slot

    def _evict_oldest(self) -> None:
        key, slot = self._slots.popitem(last=False)
        self._free.append(slot)
        self._bytes -= self.entry_bytes(key)
        self.evictions += 1

    def _version_id(self, model_version: str) -> int:
        try:
            return self._versions.index(model_version)
        except ValueError:
            self._versions.append(model_version)
            return len(self._versions) - 1
