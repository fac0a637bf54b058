"""L1: the sidecar's in-process store, capped in bytes, least recently used evicted first.

aiocache gives the async cache interface the rest of the sidecar talks to (`multi_get`,
`multi_set`, ...), but its memory backend has no size cap and keeps a timer per key. The
cap and the expiry are enforced here instead: expiry lazily on read (each Embedding carries
its own times), the cap on every write. The structure is guarded by a lock so that the
precompute worker threads and the event loop can share it.
"""

import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from aiocache.base import BaseCache
from aiocache.serializers import NullSerializer

from solaris.server.embedding import Embedding

PairKey = tuple[str, str]


class ByteCappedLRU:
    """A thread-safe map from (user_id, item_id) to Embedding holding at most `max_bytes`."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self.evictions = 0
        self._entries: OrderedDict[PairKey, tuple[Embedding, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get_many(self, keys: Sequence[PairKey], now: float | None = None) -> list[Embedding | None]:
        """The live embedding for each key, or None; an expired entry is dropped on sight."""
        now = time.time() if now is None else now
        found: list[Embedding | None] = []
        with self._lock:
            for key in keys:
                slot = self._entries.get(key)
                if slot is None:
                    found.append(None)
                elif now >= slot[0].expires_at:
                    self._remove(key)
                    found.append(None)
                else:
                    self._entries.move_to_end(key)
                    found.append(slot[0])
        return found

    def put_many(self, items: Iterable[tuple[PairKey, Embedding]]) -> None:
        """Stores each item, evicting the least recently used entries to stay under the cap.

        An entry larger than the whole cap is not stored: keeping it would evict everything.
        """
        with self._lock:
            for key, embedding in items:
                size = embedding.size_bytes(*key)
                if size > self.max_bytes:
                    continue
                self._remove(key)
                self._entries[key] = (embedding, size)
                self._bytes += size
                self._evict_to_cap()

    def delete(self, key: PairKey) -> bool:
        with self._lock:
            return self._remove(key)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def _remove(self, key: PairKey) -> bool:
        slot = self._entries.pop(key, None)
        if slot is None:
            return False
        self._bytes -= slot[1]
        return True

    def _evict_to_cap(self) -> None:
        while self._bytes > self.max_bytes:
            _, (_, size) = self._entries.popitem(last=False)
            self._bytes -= size
            self.evictions += 1


class L1Cache(BaseCache):
    """aiocache's interface over a ByteCappedLRU. Keys are (user_id, item_id) tuples.

    Expiry lives in each Embedding, so the `ttl` of aiocache's `set` is refused rather than
    silently ignored.
    """

    NAME = "solaris-l1"

    def __init__(self, max_bytes: int) -> None:
        super().__init__(serializer=NullSerializer(), timeout=None)
        self.lru = ByteCappedLRU(max_bytes)

    async def _get(
        self, key: PairKey, encoding: str | None, _conn: object = None
    ) -> Embedding | None:
        return self.lru.get_many([key])[0]

    async def _multi_get(
        self, keys: Sequence[PairKey], encoding: str | None, _conn: object = None
    ) -> list[Embedding | None]:
        return self.lru.get_many(keys)

    async def _set(
        self,
        key: PairKey,
        value: Embedding,
        ttl: float | None,
        _cas_token: object = None,
        _conn: object = None,
    ) -> bool:
        _refuse_ttl(ttl)
        self.lru.put_many([(key, value)])
        return True

    async def _multi_set(
        self, pairs: Iterable[tuple[PairKey, Embedding]], ttl: float | None, _conn: object = None
    ) -> bool:
        _refuse_ttl(ttl)
        self.lru.put_many(pairs)
        return True

    async def _exists(self, key: PairKey, _conn: object = None) -> bool:
        return self.lru.get_many([key])[0] is not None

    async def _delete(self, key: PairKey, _conn: object = None) -> int:
        return int(self.lru.delete(key))

    async def _clear(self, namespace: str | None, _conn: object = None) -> bool:
        self.lru.clear()
        return True


def _refuse_ttl(ttl: float | None) -> None:
    if ttl is not None:
        raise ValueError("L1Cache takes no ttl: expiry is carried by each Embedding")
