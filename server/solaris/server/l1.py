"""L1: the sidecar's in-process store, capped in bytes, least recently used evicted first.

Layout. Every pair has a row in preallocated numpy tables: its vector, in the one dtype the
store was made with, its times, a last-used stamp, its model version's number and its user's
number. Each user has a sorted array of its items' 64-bit hashes beside an array of their
rows, so a read is one dict lookup for the user and one `searchsorted` for all of its items,
and it stamps every row it returns with one fancy-index assignment. There is no per-entry
Python object: the garbage collector has nothing to walk (with a million entries as objects,
one full collection paused the process for 375 ms, measured here), and a pair costs its
payload plus PAIR_OVERHEAD_BYTES, plus its user's share of USER_OVERHEAD_BYTES.

One copy of each vector is kept. A float16 store answers a float32 read exactly (through a
lookup table); a float32 store rounds a float16 read to nearest, as numpy casts. A read in
the store's own dtype is the fast one: make the store in the dtype its readers ask for.

Items are told apart within a user by Python's `hash` of the id: SipHash, 64 bits, keyed at
random per process (an exact dict of ids would cost ~130 bytes a pair). An item looked up is
taken for another of its user's with odds of (that user's pairs) / 2**64: with 1,000 pairs a
user and a million items looked up a second, about once in 600 years. Users are told apart
exactly, by a dict.

Eviction is exact LRU: the oldest 1/16 of the rows are found at once (`argpartition` over
the stamps) and kept, oldest first, as candidates; each eviction takes the next candidates
not used since (their stamp unchanged). A writer about to run short chooses them before
taking the lock, so reads go on meanwhile. Pairs used in one call are stamped in request
order, as the OrderedDict this replaces kept them.

Why not aiocache: its interface is one object per key, which is exactly what this layout
avoids. The lock lets the precompute worker threads and the event loop share the store.
"""

import math
import sys
import threading
from collections.abc import Sequence

import numpy as np

from solaris.server.aggregates import Aggregates, aggregate_bytes
from solaris.server.store import (
    FLOAT16,
    FLOAT32,
    NEVER_STORED,
    TIMES,
    Freshness,
    Rows,
    UserItems,
    UserVectors,
)

PairKey = tuple[str, str]

_STAMP = np.dtype(np.uint64)
_VERSION = np.dtype(np.uint16)
_NUMBER = np.dtype(np.int32)  # a row's or a user's number
_HASH = np.dtype(np.int64)
_FREE = np.iinfo(_STAMP).max  # the stamp of a row no pair holds: never a candidate
_MAX_VERSIONS = int(np.iinfo(_VERSION).max)
_CANDIDATE_FRACTION = 16

# Per row: times, stamp, version, user, its place on the free-row stack, a flag for drops;
# per pair, in its user's index: hash and row; and a share of the eviction candidates.
_ROW_TABLES = (TIMES, _STAMP, _VERSION, _NUMBER, _NUMBER, np.dtype(np.bool_))
_INDEX_ENTRY = (_HASH, _NUMBER)
_CANDIDATE_SHARE = math.ceil((_NUMBER.itemsize + _STAMP.itemsize) / _CANDIDATE_FRACTION)
PAIR_OVERHEAD_BYTES = sum(t.itemsize for t in _ROW_TABLES + _INDEX_ENTRY) + _CANDIDATE_SHARE
"""What a pair costs beyond its vector: 56 bytes, all in numpy arrays of known item sizes."""

USER_OVERHEAD_BYTES = 352
"""What a user costs beyond its id's str: its dict entry and number, three list slots, and its
index's two arrays (objects and allocations). Measured with tracemalloc: at most 323 bytes a
user (1,000 to 200,000 users of 1, 3 or 500 pairs, written at once or in up to 50 writes, the
dict's resizes included), counted with a margin. The store's own few objects (about 1 KB,
whatever it holds) are not counted."""

_STR_HEADER_BYTES = 80
"""sys.getsizeof of an empty str of the widest kind (76) and its terminator, rounded up."""


def pair_bytes(dim: int, dtype: np.dtype = FLOAT32) -> int:
    """What each pair of `dim` values of `dtype` counts against the cap, its user aside."""
    return dim * np.dtype(dtype).itemsize + PAIR_OVERHEAD_BYTES


def user_bytes(user_id: str) -> int:
    """What a user holding at least one pair counts against the cap, once for all its pairs."""
    return USER_OVERHEAD_BYTES + sys.getsizeof(user_id)


def entry_bytes(dim: int, id_bytes: int = 0, dtype: np.dtype = FLOAT32) -> int:
    """The most one pair of `dim` values can count against the cap, alone in the store, when
    its ids take `id_bytes` UTF-8 bytes: the smallest cap that surely holds it. The settings
    refuse a cap below one full-size entry. Only the user's id is kept, but a str can take up
    to 4 bytes for each UTF-8 byte, so all of `id_bytes` is counted at that width."""
    return pair_bytes(dim, dtype) + USER_OVERHEAD_BYTES + _STR_HEADER_BYTES + 4 * id_bytes


class _Users:
    """Each user's number, id, and index: its items' hashes, sorted, beside their rows."""

    def __init__(self) -> None:
        self.numbers: dict[str, int] = {}
        self.ids: list[str] = []
        self.hashes: list[np.ndarray] = []
        self.rows: list[np.ndarray] = []
        self._spare: list[int] = []

    def add(self, user_id: str) -> int:
        if self._spare:
            number = self._spare.pop()
            self.ids[number] = user_id
        else:
            number = len(self.ids)
            self.ids.append(user_id)
            self.hashes.append(np.empty(0, _HASH))
            self.rows.append(np.empty(0, _NUMBER))
        self.numbers[user_id] = number
        return number

    def remove(self, number: int) -> str:
        user_id = self.ids[number]
        del self.numbers[user_id]
        self.ids[number] = ""
        self._spare.append(number)
        return user_id

    def find(self, number: int, hashes: np.ndarray) -> np.ndarray:
        """Each hash's row in this user's index, -1 where it has none."""
        held = self.hashes[number]
        if not held.size:
            return np.full(hashes.size, -1, _NUMBER)
        # Searched in sorted order: a binary search for random hashes mispredicts about every
        # other branch (~55 ns a hash at 500, measured on the serving path), and for sorted
        # ones it follows the last, so the sort (SIMD, branch-free) more than pays for itself.
        order = hashes.argsort()
        wanted = hashes.take(order)
        at = held.searchsorted(wanted)  # held.size past the last: clipped to it below
        rows = np.empty(hashes.size, _NUMBER)
        found = held.take(at, mode="clip") == wanted
        rows[order] = np.where(found, self.rows[number].take(at, mode="clip"), -1)
        return rows

    def insert(self, number: int, hashes: np.ndarray, rows: np.ndarray) -> None:
        """Adds `hashes` (sorted, distinct, none held yet) with their rows."""
        held = self.hashes[number]
        if not held.size:
            self.hashes[number], self.rows[number] = hashes, rows
            return
        at = np.searchsorted(held, hashes) + np.arange(hashes.size)
        is_new = np.zeros(held.size + hashes.size, np.bool_)
        is_new[at] = True
        merged_hashes = np.empty(is_new.size, _HASH)
        merged_rows = np.empty(is_new.size, _NUMBER)
        merged_hashes[at], merged_hashes[~is_new] = hashes, held
        merged_rows[at], merged_rows[~is_new] = rows, self.rows[number]
        self.hashes[number], self.rows[number] = merged_hashes, merged_rows

    def discard(self, number: int, dropped: np.ndarray) -> bool:
        """Takes the rows flagged in `dropped` out of this user's index; whether it is empty."""
        keep = ~dropped.take(self.rows[number])
        self.hashes[number] = self.hashes[number][keep]
        self.rows[number] = self.rows[number][keep]
        return not self.rows[number].size


class _RowPool:
    """Which rows are held, when each was last used, and the order to evict them in."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        # Mapped lazily: rows past `used` are never read.
        self.stamps = np.zeros(capacity, _STAMP)
        self.used = 0  # rows [0, used) have been taken at least once
        self.held = 0
        self._free = np.empty(capacity, _NUMBER)
        self._free_count = 0
        self._clock = 0
        self._candidates = np.empty(0, _NUMBER)
        self._candidate_stamps = np.empty(0, _STAMP)

    @property
    def room(self) -> int:
        """How many more rows can be taken."""
        return self._free_count + self.capacity - self.used

    @property
    def clock(self) -> int:
        """The next stamp: every row stamped from now on is at least this."""
        return self._clock

    def next_stamps(self, count: int) -> np.ndarray:
        """Stamps for `count` pairs used now, in request order: newer than any before."""
        stamps = np.arange(self._clock, self._clock + count, dtype=_STAMP)
        self._clock += count
        return stamps

    def take(self, stamps: np.ndarray) -> np.ndarray:
        """A free row for each of `stamps`: the most recently freed first, then new ones."""
        count = stamps.size
        recycled = min(count, self._free_count)
        self._free_count -= recycled
        reused = self._free[self._free_count : self._free_count + recycled]
        new = np.arange(self.used, self.used + count - recycled, dtype=_NUMBER)
        self.used += new.size
        self.held += count
        rows = np.concatenate((reused, new))
        self.stamps[rows] = stamps
        return rows

    def release(self, rows: np.ndarray) -> None:
        """Frees `rows` (distinct, held)."""
        self.stamps[rows] = _FREE
        self._free[self._free_count : self._free_count + rows.size] = rows
        self._free_count += rows.size
        self.held -= rows.size

    def least_recent(self, count: int, protect: int) -> np.ndarray:
        """Up to `count` held rows, the least recently used first, none stamped `protect` or
        later; empty when every held row is."""
        while True:
            if self._candidates.size == 0:
                self.use_candidates(*self.oldest(count))
                if self._candidates.size == 0:
                    return self._candidates
            chunk = self._candidates[: 2 * count]
            chunk_stamps = self._candidate_stamps[: 2 * count]
            # Sorted: past the first protected candidate, every row is protected.
            open_end = int(np.searchsorted(chunk_stamps, protect))
            unused = np.flatnonzero(self.stamps.take(chunk[:open_end]) == chunk_stamps[:open_end])
            picked = unused[:count]
            rest = picked[-1] + 1 if picked.size == count else chunk.size
            if open_end < chunk.size:
                rest = self._candidates.size
            self._candidates = self._candidates[rest:]
            self._candidate_stamps = self._candidate_stamps[rest:]
            if picked.size or open_end < chunk.size:
                return chunk[picked]

    def candidates_short(self, count: int) -> bool:
        """Whether evicting `count` rows may need new candidates."""
        return self._candidates.size < count

    def oldest(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The oldest max(count, 1/16 of the held) rows, oldest first, and their stamps.

        Safe without the store's lock, so a writer can choose candidates while readers go on
        (numpy sorts without the GIL): it sorts a copy, and a row whose stamp has changed
        since, used or freed, is skipped when its turn comes, so what is evicted is still the
        least recently used."""
        stamps = self.stamps[: self.used].copy()
        wanted = min(stamps.size, max(count, math.ceil(self.held / _CANDIDATE_FRACTION)))
        if not wanted:
            return np.empty(0, _NUMBER), np.empty(0, _STAMP)
        oldest = np.argpartition(stamps, wanted - 1)[:wanted]
        oldest = oldest[np.argsort(stamps[oldest])]
        oldest = oldest[stamps[oldest] != _FREE]
        return oldest.astype(_NUMBER), stamps[oldest]

    def use_candidates(self, rows: np.ndarray, stamps: np.ndarray) -> None:
        self._candidates, self._candidate_stamps = rows, stamps


class MemoryStore:
    """A thread-safe, byte-capped LRU store of embeddings of one `dim`, held as `dtype`."""

    def __init__(
        self,
        max_bytes: int,
        dim: int,
        dtype: np.dtype = FLOAT32,
        aggregate_share: float = 0.0,
        half_life_seconds: float = 3600.0,
        aggregate_max_age_seconds: float = float("inf"),
    ) -> None:
        """`aggregate_share`: the most of `max_bytes` the miss ladder's aggregates may take
        (0: none are kept), bounding their number; what they hold counts in the cap like pairs,
        evicting pairs for room. `half_life_seconds` and `aggregate_max_age_seconds`: their
        decay and how long one not updated is served (see aggregates.py)."""
        self.dim = dim
        self.dtype = np.dtype(dtype)
        if self.dtype not in (FLOAT16, FLOAT32):
            raise ValueError(f"dtype: {self.dtype}; use FLOAT16 or FLOAT32")
        self.max_bytes = max_bytes
        self.pair_bytes = pair_bytes(dim, self.dtype)
        if max_bytes < entry_bytes(dim, 0, self.dtype):
            raise ValueError(f"cache_bytes: {max_bytes} cannot hold one {dim}-dim embedding")
        self.evictions = 0
        capacity = max_bytes // self.pair_bytes
        # np.zeros maps pages lazily: memory in use grows with the rows used.
        self._values = np.zeros((capacity, dim), self.dtype)
        self._times = np.zeros(capacity, TIMES)
        self._version_of_row = np.zeros(capacity, _VERSION)
        self._user_of_row = np.zeros(capacity, _NUMBER)
        self._dropped = np.zeros(capacity, np.bool_)
        self._pool = _RowPool(capacity)
        self._versions: list[str] = []
        self._users = _Users()
        self.aggregates = Aggregates(
            dim,
            int(max_bytes * aggregate_share) // aggregate_bytes("", dim),
            half_life_seconds,
            aggregate_max_age_seconds,
        )
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes held, by the same reckoning as the cap: pair_bytes for each pair,
        user_bytes(user) for each user holding one, and the aggregates' nbytes."""
        return self._bytes

    def __len__(self) -> int:
        return self._pool.held

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

    async def read_many(
        self, wanted: Sequence[UserItems], dtype: np.dtype, now: float
    ) -> list[Rows]:
        return [self.read_sync(user_id, item_ids, dtype, now) for user_id, item_ids in wanted]

    async def write_many(self, batch: Sequence[UserVectors], freshness: Freshness) -> None:
        for user_id, item_ids, vectors in batch:
            self.write_sync(user_id, item_ids, vectors, freshness)

    async def close(self) -> None:
        """Nothing to release: the tables live as long as the store."""

    def stale_at(self, pairs: Sequence[PairKey]) -> np.ndarray:
        """Each pair's stale_at (-inf if not held), without touching recency: for speculation."""
        hashes = _hashes([item for _, item in pairs])
        by_user: dict[str, list[int]] = {}
        for index, (user_id, _) in enumerate(pairs):
            by_user.setdefault(user_id, []).append(index)
        stale_at = np.full(len(pairs), -np.inf)
        with self._lock:
            for user_id, indices in by_user.items():
                number = self._users.numbers.get(user_id)
                if number is None:
                    continue
                rows = self._users.find(number, hashes[indices])
                found = self._times.take(rows)["stale_at"]
                stale_at[indices] = np.where(rows >= 0, found, -np.inf)
        return stale_at

    def read_sync(
        self,
        user_id: str,
        item_ids: Sequence[str],
        dtype: np.dtype,
        now: float,
        model_version: str | None = None,
    ) -> Rows:
        """The rows for `item_ids` as of `now`; reading a row makes it the most recently used,
        and a row expired by `now` is zero-filled and dropped. With `model_version`, a row of
        another version is read and dropped as expired: one answer holds one version's rows."""
        hashes = _hashes(item_ids)
        with self._lock:
            number = self._users.numbers.get(user_id)
            if number is None:
                return Rows(np.zeros((len(item_ids), self.dim), dtype), _never(len(item_ids)), "")
            rows = self._users.find(number, hashes)
            # take() gathers faster than fancy indexing; a miss (-1) takes the last row, a
            # copy that is zero-filled below.
            values = self._values.take(rows, axis=0)
            times = self._times.take(rows)
            live = (now < times["expires_at"]) & (rows >= 0)
            if model_version is not None:
                live &= self._of_version(rows, model_version)
            everything_live = bool(live.all())
            stamps = self._pool.next_stamps(rows.size)
            if everything_live:
                self._pool.stamps[rows] = stamps
            else:
                self._pool.stamps[rows[live]] = stamps[live]
                expired = rows[(rows >= 0) & ~live]
                if expired.size:
                    self._drop(np.unique(expired), keep=-1)
            version = self._newest_version(rows, times, live)
        values = _converted(values, dtype)
        if not everything_live:
            times[~live] = NEVER_STORED
            values[~live] = 0
        return Rows(values, times, version)

    def write_sync(
        self, user_id: str, item_ids: Sequence[str], vectors: np.ndarray, freshness: Freshness
    ) -> None:
        """Stores row i of `vectors` for the i-th item, evicting least recently used rows, and
        folds them into the miss ladder's aggregates: computed pairs arrive here (rows copied
        from L2 into L1 on a read go through write_rows and are not folded again)."""
        times = np.array(tuple(freshness[1:]), TIMES)
        protect = self._pool.clock  # this write's rows are stamped from here on
        self.write_rows(user_id, item_ids, vectors, times, freshness.model_version)
        if self.aggregates.capacity and item_ids:
            self._aggregate(user_id, item_ids, vectors, freshness, protect)

    def _aggregate(
        self,
        user_id: str,
        item_ids: Sequence[str],
        vectors: np.ndarray,
        freshness: Freshness,
        protect: int,
    ) -> None:
        """Folds the pairs into the aggregates, evicting least recently used pairs (none
        stamped `protect` or later) for room."""
        version = freshness.model_version
        with self._lock:
            wanted = self.aggregates.new_bytes(user_id, item_ids, version)
            if self._bytes + wanted > self.max_bytes:
                self._make_room(0, -1, protect, extra_bytes=wanted)
            self._bytes += self.aggregates.add(
                user_id,
                item_ids,
                vectors,
                freshness.computed_at,
                version,
                self.max_bytes - self._bytes,
            )

    def write_rows(
        self,
        user_id: str,
        item_ids: Sequence[str],
        vectors: np.ndarray,
        times: np.ndarray,
        model_version: str,
    ) -> None:
        """Like write_sync, with `times` (TIMES records) per row or one for all: how rows read
        from L2, each with its own times, fill L1. An item named twice keeps its last row.
        Float16 or float32 rows are converted to the store's dtype once, before the copy in
        (float16 rows into a float16 store not at all)."""
        vectors = np.asarray(vectors)
        if vectors.dtype not in (FLOAT16, FLOAT32):
            # Through float32, as the model computes, so a float16 store rounds as a float16 read.
            vectors = vectors.astype(FLOAT32)
        vectors = _converted(vectors, self.dtype)
        if vectors.shape != (len(item_ids), self.dim):
            raise ValueError(
                f"vectors: shape {vectors.shape}, expected {(len(item_ids), self.dim)}"
            )
        if not item_ids:
            return
        positions, hashes = _last_of_each(_hashes(item_ids))
        times = np.broadcast_to(np.asarray(times, TIMES), (len(item_ids),))
        self._choose_candidates_unlocked(len(item_ids))
        with self._lock:
            number = self._user_to_write(user_id)
            if number is None:
                self.evictions += positions.size  # an id too long to hold beside anything
                return
            version = self._version_id(model_version)
            protect = self._pool.clock
            stamps = self._pool.next_stamps(len(item_ids)).take(positions)
            rows = self._users.find(number, hashes)
            old = rows >= 0
            self._pool.stamps[rows[old]] = stamps[old]
            new = ~old
            rows[new] = self._add(number, hashes[new], positions[new], stamps[new], protect)
            self._fill(rows, positions, vectors, times, version)
            if not self._users.rows[number].size:
                self._remove_user(number)

    def _choose_candidates_unlocked(self, count: int) -> None:
        """When this write will likely evict and few candidates are left, chooses the next
        ones before taking the lock: at a million rows that takes milliseconds."""
        full = self._bytes + count * self.pair_bytes > self.max_bytes or self._pool.room < count
        if full and self._pool.candidates_short(count):
            candidates = self._pool.oldest(count)
            with self._lock:
                self._pool.use_candidates(*candidates)

    def _user_to_write(self, user_id: str) -> int | None:
        """The user's number, added if new; None if its id leaves no room for a pair."""
        number = self._users.numbers.get(user_id)
        if number is not None:
            return number
        if user_bytes(user_id) + self.pair_bytes > self.max_bytes:
            return None
        self._bytes += user_bytes(user_id)
        return self._users.add(user_id)

    def _add(
        self,
        number: int,
        hashes: np.ndarray,
        positions: np.ndarray,
        stamps: np.ndarray,
        protect: int,
    ) -> np.ndarray:
        """Rows for new pairs (`hashes` sorted), evicting for room but never a row stamped
        `protect` or later (this write's). Where even that leaves too little room, the last
        pairs in request order that fit; the others get row -1 and count as evicted."""
        rows = np.full(hashes.size, -1, _NUMBER)
        fit = self._make_room(hashes.size, number, protect)
        self.evictions += hashes.size - fit
        kept = np.sort(np.argsort(positions)[hashes.size - fit :])
        rows[kept] = self._pool.take(stamps[kept])
        self._user_of_row[rows[kept]] = number
        self._bytes += fit * self.pair_bytes
        self._users.insert(number, hashes[kept], rows[kept])
        return rows

    def _fill(
        self,
        rows: np.ndarray,
        positions: np.ndarray,
        vectors: np.ndarray,
        times: np.ndarray,
        version: int,
    ) -> None:
        """Writes item `positions[i]`'s vector and times into `rows[i]` (where not -1)."""
        if rows.size == vectors.shape[0] and (rows >= 0).all():
            # Every item distinct and kept: reorder the rows rather than copy the vectors.
            target = np.empty(rows.size, _NUMBER)
            target[positions] = rows
            self._values[target] = vectors
            self._times[target] = times
        else:
            kept = rows >= 0
            rows, positions = rows[kept], positions[kept]
            self._values[rows] = vectors[positions]
            self._times[rows] = times[positions]
        self._version_of_row[rows] = version

    def _make_room(self, count: int, keep: int, protect: int, extra_bytes: int = 0) -> int:
        """Evicts least recently used rows until `count` more pairs (and `extra_bytes`) fit,
        never user `keep` nor a row stamped `protect` or later; how many pairs fit (`count`
        unless nothing else is left)."""
        while True:
            short_rows = count - self._pool.room
            short_bytes = self._bytes + count * self.pair_bytes + extra_bytes - self.max_bytes
            if short_rows <= 0 and short_bytes <= 0:
                return count
            wanted = max(short_rows, -(-short_bytes // self.pair_bytes))
            rows = self._pool.least_recent(wanted, protect)
            if not rows.size:
                room = (self.max_bytes - self._bytes) // self.pair_bytes
                return max(0, min(self._pool.room, room, count))
            self._drop(rows, keep)
            self.evictions += rows.size

    def _drop(self, rows: np.ndarray, keep: int) -> None:
        """Frees `rows` (distinct, held) and removes users left with none, but `keep`."""
        self._pool.release(rows)
        self._bytes -= rows.size * self.pair_bytes
        affected = np.unique(self._user_of_row.take(rows)).tolist()
        self._dropped[rows] = True
        for number in affected:
            if self._users.discard(number, self._dropped) and number != keep:
                self._remove_user(number)
        self._dropped[rows] = False

    def _remove_user(self, number: int) -> None:
        self._bytes -= user_bytes(self._users.remove(number))

    def _newest_version(self, rows: np.ndarray, times: np.ndarray, live: np.ndarray) -> str:
        newest = int(np.where(live, times["computed_at"], -np.inf).argmax()) if live.size else 0
        if not live.size or not live[newest]:
            return ""
        return self._versions[int(self._version_of_row[rows[newest]])]

    def _of_version(self, rows: np.ndarray, model_version: str) -> np.ndarray:
        """Whether each of `rows` holds `model_version`'s embedding."""
        try:
            number = self._versions.index(model_version)
        except ValueError:
            return np.zeros(rows.size, np.bool_)
        of_version: np.ndarray = self._version_of_row.take(rows) == number
        return of_version

    def _version_id(self, model_version: str) -> int:
        try:
            return self._versions.index(model_version)
        except ValueError:
            pass
        if len(self._versions) == _MAX_VERSIONS:
            self._forget_unused_versions()
        self._versions.append(model_version)
        return len(self._versions) - 1

    def _forget_unused_versions(self) -> None:
        """Renumbers the versions some held row still has, forgetting the others."""
        held = np.flatnonzero(self._pool.stamps[: self._pool.used] != _FREE)
        used, renumbered = np.unique(self._version_of_row[held], return_inverse=True)
        self._versions = [self._versions[int(v)] for v in used]
        self._version_of_row[held] = renumbered


def _hashes(item_ids: Sequence[str]) -> np.ndarray:
    return np.fromiter(map(hash, item_ids), _HASH, len(item_ids))


def _last_of_each(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The position of each distinct hash's last occurrence, and the hashes, sorted by hash."""
    positions = np.argsort(hashes, kind="stable")
    ordered = hashes.take(positions)
    last = np.ones(ordered.size, np.bool_)
    np.not_equal(ordered[1:], ordered[:-1], out=last[:-1])
    if last.all():
        return positions, ordered
    return positions[last], ordered[last]


_HALF_TO_SINGLE = np.arange(1 << 16, dtype=np.uint16).view(FLOAT16).astype(FLOAT32)
"""Every float16's float32: a lookup converts faster than astype, which casts one at a time."""


def _converted(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`values` as `dtype`: float16 to float32 exactly, float32 to float16 to nearest."""
    if values.dtype == dtype:
        return values
    if values.dtype == FLOAT16:
        return _HALF_TO_SINGLE.take(values.view(np.uint16))
    return values.astype(dtype)


def _never(rows: int) -> np.ndarray:
    return np.full(rows, NEVER_STORED, TIMES)
