"""The miss ladder's aggregates: decayed means of computed pair embeddings, per user, per item
and per model version, kept in L1 beside the pairs and filled into missed rows on a read.

Updated as pairs are written (the precompute's writes, not the read path). Each aggregate is a
mean weighted by age: at each update the weight it holds is halved per `half_life_seconds`
elapsed and the new pairs are added at weight 1, so recent pairs weigh more. An aggregate
belongs to one model version: a write of another version starts it afresh, and a read uses an
aggregate only of the answer's version, so two versions never mix.

Bounded in number (`capacity`) and in bytes: the store that owns them passes the bytes it can
spare, and counts `nbytes` in its cap. At capacity the least recently updated is dropped.
A read fills with numpy gathers: one dict lookup for the user, one per missed item.
"""

import enum
import sys
import threading
from collections.abc import Sequence
from itertools import repeat

import numpy as np

from solaris.server.store import FLOAT16, FLOAT32

_SLOT = np.dtype(np.int32)

AGGREGATE_OVERHEAD_BYTES = 320
"""What an aggregate costs beyond its vectors and its id's str: its dict entry and key tuple
(about 120 bytes), an item's entry in the by-id dict (about 100), and its weight, update time
and version (20 bytes), with a margin."""


class RowTier(enum.IntEnum):
    """Which tier filled a row; values match the proto's RowTier."""

    PAIR = 1
    USER = 2
    ITEM = 3
    GLOBAL = 4
    NONE = 5


class _Kind(enum.IntEnum):
    USER = 0
    ITEM = 1
    GLOBAL = 2


def aggregate_bytes(key: str, dim: int) -> int:
    """What one aggregate keyed by `key` counts against the cap: its mean in float32 and a
    float16 copy (numpy casts to float16 element by element: copying them in at each update,
    off the read path, keeps a float16 read from paying ~150 us a 500-row answer for it)."""
    return (
        AGGREGATE_OVERHEAD_BYTES + sys.getsizeof(key) + dim * (FLOAT32.itemsize + FLOAT16.itemsize)
    )


class Aggregates:
    """Per-user, per-item and global decayed means, thread-safe."""

    def __init__(
        self,
        dim: int,
        capacity: int,
        half_life_seconds: float,
        max_age_seconds: float = float("inf"),
    ) -> None:
        """`max_age_seconds`: an aggregate not updated for this long is not served (as a pair
        past its TTL and stale window is not)."""
        self.dim = dim
        self.capacity = capacity
        self.half_life_seconds = half_life_seconds
        self.max_age_seconds = max_age_seconds
        # np.zeros maps pages lazily: memory in use grows with the slots used.
        self._means = np.zeros((capacity, dim), FLOAT32)
        self._halves = np.zeros((capacity, dim), FLOAT16)
        self._weights = np.zeros(capacity)
        self._updated_at = np.zeros(capacity)
        self._version_of = np.zeros(capacity, _SLOT)
        self._slots: dict[tuple[int, str], int] = {}  # in order of last update, oldest first
        self._item_slots: dict[str, int] = {}  # the items' again, by id: a read looks up many
        self._free: list[int] = list(range(capacity - 1, -1, -1))
        self._versions: dict[str, int] = {}
        self._newest_version = ""
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes held: aggregate_bytes for each aggregate."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._slots)

    def new_bytes(self, user_id: str, item_ids: Sequence[str], model_version: str) -> int:
        """What adding the aggregates these pairs need but lack would count, at most."""
        keys = self._keys(user_id, item_ids, model_version)
        return sum(aggregate_bytes(key[1], self.dim) for key in keys if key not in self._slots)

    def add(
        self,
        user_id: str,
        item_ids: Sequence[str],
        vectors: np.ndarray,
        now: float,
        model_version: str,
        spare_bytes: int,
    ) -> int:
        """Folds the pairs (row i of `vectors` for item i) into their user's, items' and the
        version's aggregates; new ones only within `spare_bytes` more. The change in nbytes."""
        if not item_ids or not self.capacity:
            return 0
        vectors = np.asarray(vectors, FLOAT32)
        before = self._bytes
        with self._lock:
            version = self._versions.setdefault(model_version, len(self._versions))
            self._newest_version = model_version
            budget = before + spare_bytes
            user = self._slot((_Kind.USER, user_id), version, budget)
            if user >= 0:
                self._fold(
                    np.array([user], _SLOT), vectors.mean(axis=0, keepdims=True), len(item_ids), now
                )
            glob = self._slot((_Kind.GLOBAL, model_version), version, budget)
            if glob >= 0:
                self._fold(
                    np.array([glob], _SLOT), vectors.mean(axis=0, keepdims=True), len(item_ids), now
                )
            last = {item: index for index, item in enumerate(item_ids)}
            # Beyond capacity an item's slot could be taken back by a later one of this write.
            for item in list(last)[: max(0, len(last) - self.capacity + 2)]:
                del last[item]
            slots = np.fromiter(
                (self._slot((_Kind.ITEM, item), version, budget) for item in last), _SLOT, len(last)
            )
            rows = np.fromiter(last.values(), np.intp, len(last))
            kept = slots >= 0
            self._fold(slots[kept], vectors[rows[kept]], 1, now)
        return self._bytes - before

    def fill(
        self,
        user_id: str,
        item_ids: Sequence[str],
        values: np.ndarray,
        missed: np.ndarray,
        model_version: str,
        now: float,
    ) -> tuple[np.ndarray, str]:
        """Fills `values`' rows at positions `missed` (in place) from the most specific tier of
        `model_version` (the newest held when empty) updated within max_age_seconds of `now`;
        each missed row's tier, and the version used ("" when nothing was filled)."""
        tiers = np.full(missed.size, RowTier.NONE, np.uint8)
        means = self._halves if values.dtype == FLOAT16 else self._means
        with self._lock:
            version_name = model_version or self._newest_version
            version = self._versions.get(version_name, -1)
            if version < 0:
                return tiers, ""
            since = now - self.max_age_seconds
            user = self._find((_Kind.USER, user_id), version, since)
            if user >= 0:
                values[missed] = means[user]
                tiers[:] = RowTier.USER
                return tiers, version_name
            if missed.size == len(item_ids):
                ids = item_ids
            else:
                ids = [item_ids[i] for i in missed.tolist()]
            slots = np.fromiter(map(self._item_slots.get, ids, repeat(-1)), _SLOT, missed.size)
            found = slots >= 0
            held = slots[found]
            found[found] = (self._version_of.take(held) == version) & (
                self._updated_at.take(held) > since
            )
            if found.any():
                values[missed[found]] = means.take(slots[found], axis=0)
                tiers[found] = RowTier.ITEM
            rest = ~found
            glob = self._find((_Kind.GLOBAL, version_name), version, since)
            if glob >= 0 and rest.any():
                values[missed[rest]] = means[glob]
                tiers[rest] = RowTier.GLOBAL
            filled = bool((tiers != RowTier.NONE).any())
        return tiers, version_name if filled else ""

    def _keys(
        self, user_id: str, item_ids: Sequence[str], model_version: str
    ) -> set[tuple[int, str]]:
        keys = {(int(_Kind.ITEM), item) for item in item_ids}
        return keys | {(int(_Kind.USER), user_id), (int(_Kind.GLOBAL), model_version)}

    def _find(self, key: tuple[int, str], version: int, since: float) -> int:
        """The key's slot if it holds `version` updated after `since`, else -1."""
        slot = self._slots.get(key, -1)
        if slot < 0 or self._version_of[slot] != version or self._updated_at[slot] <= since:
            return -1
        return slot

    def _slot(self, key: tuple[int, str], version: int, budget: int) -> int:
        """The key's slot, moved to the newest end, started afresh if of another version;
        a new one if there is room (dropping the oldest at capacity), else -1."""
        slot = self._slots.pop(key, -1)
        if slot < 0:
            cost = aggregate_bytes(key[1], self.dim)
            if not self._free and self._slots:
                self._evict_oldest()
            if not self._free or self._bytes + cost > budget:
                return -1
            slot = self._free.pop()
            self._bytes += cost
            self._restart(slot)
        elif self._version_of[slot] != version:
            self._restart(slot)
        self._version_of[slot] = version
        self._slots[key] = slot
        if key[0] == _Kind.ITEM:
            self._item_slots[key[1]] = slot
        return slot

    def _restart(self, slot: int) -> None:
        """Empties a slot: its first pairs are then its mean exactly (0 + 1 * (x - 0))."""
        self._weights[slot] = 0.0
        self._means[slot] = 0.0

    def _evict_oldest(self) -> None:
        key = next(iter(self._slots))
        self._free.append(self._slots.pop(key))
        if key[0] == _Kind.ITEM:
            del self._item_slots[key[1]]
        self._bytes -= aggregate_bytes(key[1], self.dim)

    def _fold(self, slots: np.ndarray, means: np.ndarray, count: int, now: float) -> None:
        """Each slot's weight decays to `now`; then `count` pairs of mean `means[i]` join."""
        if not slots.size:
            return
        elapsed = np.maximum(now - self._updated_at[slots], 0.0)
        held = self._weights[slots] * np.exp2(-elapsed / self.half_life_seconds)
        total = held + count
        share = (count / total)[:, np.newaxis].astype(FLOAT32)
        self._means[slots] += share * (means - self._means[slots])
        self._halves[slots] = self._means[slots]
        self._weights[slots] = total
        self._updated_at[slots] = now
