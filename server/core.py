"""The sidecar's core: answers reads from the store and takes Prefetch hints. It knows no
transport; the gRPC servicer converts to and from it.

A read never waits on the model: it looks in the store, answers what is there, and logs the
request (hits and misses alike) for the speculator.
"""

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from aiocache.base import BaseCache

from solaris.server.embedding import Embedding, RowStatus
from solaris.server.errors import DeadlineExceeded
from solaris.server.prefetch_queue import PrefetchQueue, PrefetchTask
from solaris.server.request_log import LoggedRequest, RequestLog
from solaris.server.settings import ServeSettings
from solaris.server.validation import check_id, check_id_list, check_priority

FLOAT32 = np.dtype("<f4")
FLOAT16 = np.dtype("<f2")
# (computed_at, stale_at, expires_at) for a pair the store does not hold: always a MISS.
_NEVER_STORED = (0.0, -np.inf, -np.inf)


@dataclass(frozen=True, slots=True)
class BatchResult:
    """A read's answer: `values` is (n, dim) in request order, MISS rows zero."""

    values: np.ndarray
    statuses: np.ndarray
    ages_ms: np.ndarray
    model_version: str


@dataclass(frozen=True, slots=True)
class PrefetchResult:
    queued: int
    already_fresh: int


class EmbeddingService:
    """BatchGet and Prefetch over a store (aiocache interface, keys (user_id, item_id))."""

    def __init__(
        self,
        settings: ServeSettings,
        store: BaseCache,
        request_log: RequestLog,
        prefetch_queue: PrefetchQueue,
    ) -> None:
        self.settings = settings
        self.store = store
        self.request_log = request_log
        self.prefetch_queue = prefetch_queue

    async def get(
        self,
        user_id: str,
        item_id: str,
        dtype: np.dtype = FLOAT32,
        deadline: float | None = None,
    ) -> BatchResult:
        """One pair: a BatchResult of one row."""
        check_id("user_id", user_id, self.settings.max_id_bytes)
        check_id("item_id", item_id, self.settings.max_id_bytes)
        return await self._read(user_id, (item_id,), dtype, deadline)

    async def batch_get(
        self,
        user_id: str,
        item_ids: Sequence[str],
        dtype: np.dtype = FLOAT32,
        deadline: float | None = None,
    ) -> BatchResult:
        """Looks every pair up and logs the read.

        Args:
            dtype: FLOAT32 or FLOAT16, the dtype of the answer's `values`.
            deadline: a time.monotonic() instant past which no work starts.
        """
        check_id("user_id", user_id, self.settings.max_id_bytes)
        check_id_list("item_ids", item_ids, self.settings.max_items, self.settings.max_id_bytes)
        return await self._read(user_id, item_ids, dtype, deadline)

    async def put(
        self, user_id: str, item_ids: Sequence[str], vectors: np.ndarray, model_version: str
    ) -> None:
        """Stores freshly computed embeddings, one row of `vectors` per item."""
        expected = (len(item_ids), self.settings.dim)
        if vectors.shape != expected:
            raise ValueError(f"vectors: shape {vectors.shape}, expected {expected}")
        now = time.time()
        settings = self.settings
        await self.store.multi_set(
            [
                (
                    (user_id, item),
                    Embedding.fresh(
                        row, model_version, settings.ttl_seconds, settings.stale_seconds, now
                    ),
                )
                for item, row in zip(item_ids, vectors, strict=True)
            ]
        )

    async def _read(
        self, user_id: str, item_ids: Sequence[str], dtype: np.dtype, deadline: float | None
    ) -> BatchResult:
        _check_deadline(deadline)
        found = await self.store.multi_get([(user_id, item) for item in item_ids])
        now = time.time()
        result = self._assemble(found, now, dtype)
        self.request_log.append(LoggedRequest(user_id, tuple(item_ids), result.statuses, now))
        return result

    async def prefetch(
        self,
        user_id: str,
        item_ids: Sequence[str],
        history: Sequence[str] = (),
        priority: int = 0,
        deadline: float | None = None,
    ) -> PrefetchResult:
        """Queues the pairs not already fresh in the store; never waits for the model."""
        settings = self.settings
        check_id("user_id", user_id, settings.max_id_bytes)
        check_id_list("item_ids", item_ids, settings.max_items, settings.max_id_bytes)
        check_id_list(
            "history", history, settings.max_history, settings.max_id_bytes, allow_empty=True
        )
        check_priority(priority)
        _check_deadline(deadline)
        unique_items = list(dict.fromkeys(item_ids))
        found = await self.store.multi_get([(user_id, item) for item in unique_items])
        now = time.time()
        wanted = tuple(
            item
            for item, embedding in zip(unique_items, found, strict=True)
            if embedding is None or embedding.status(now) is not RowStatus.HIT
        )
        if wanted:
            self.prefetch_queue.put(PrefetchTask(user_id, wanted, tuple(history), priority))
        return PrefetchResult(queued=len(wanted), already_fresh=len(unique_items) - len(wanted))

    def _assemble(self, found: list[Embedding | None], now: float, dtype: np.dtype) -> BatchResult:
        """Packs the store's answers into arrays.

        This is the serving path, so it makes two list passes in C-speed comprehensions and
        does the rest with numpy, rather than one Python loop doing work per row.
        """
        zero_row = bytes(dtype.itemsize * self.settings.dim)
        field = "float16" if dtype == FLOAT16 else "float32"
        packed = bytearray(b"".join([zero_row if e is None else getattr(e, field) for e in found]))
        values = np.frombuffer(packed, dtype=dtype).reshape(len(found), self.settings.dim)
        times = np.array(
            [
                _NEVER_STORED if e is None else (e.computed_at, e.stale_at, e.expires_at)
                for e in found
            ],
            dtype=np.float64,
        ).reshape(len(found), 3)
        live = now < times[:, 2]
        values[~live] = 0.0
        statuses = np.where(
            now < times[:, 1], RowStatus.HIT, np.where(live, RowStatus.STALE, RowStatus.MISS)
        ).astype(np.uint8)
        ages_ms = np.where(live, np.maximum(0.0, now - times[:, 0]) * 1000.0, 0.0).astype(np.uint32)
        first_live = np.flatnonzero(live)
        model_version = found[first_live[0]].model_version if first_live.size else ""
        return BatchResult(values, statuses, ages_ms, model_version)


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded("deadline passed before the store was read")
