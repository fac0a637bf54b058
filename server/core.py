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


@dataclass(frozen=True, slots=True)
class BatchResult:
    """A read's answer: `values` is (n, dim) float32 in request order, MISS rows zero."""

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

    async def get(self, user_id: str, item_id: str, deadline: float | None = None) -> BatchResult:
        """One pair: a BatchResult of one row."""
        check_id("user_id", user_id, self.settings.max_id_bytes)
        check_id("item_id", item_id, self.settings.max_id_bytes)
        return await self._read(user_id, (item_id,), deadline)

    async def batch_get(
        self, user_id: str, item_ids: Sequence[str], deadline: float | None = None
    ) -> BatchResult:
        """Looks every pair up and logs the read. `deadline` is a time.monotonic() instant."""
        check_id("user_id", user_id, self.settings.max_id_bytes)
        check_id_list("item_ids", item_ids, self.settings.max_items, self.settings.max_id_bytes)
        return await self._read(user_id, item_ids, deadline)

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
        self, user_id: str, item_ids: Sequence[str], deadline: float | None
    ) -> BatchResult:
        _check_deadline(deadline)
        found = await self.store.multi_get([(user_id, item) for item in item_ids])
        now = time.time()
        result = self._assemble(found, now)
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

    def _assemble(self, found: list[Embedding | None], now: float) -> BatchResult:
        count = len(found)
        values = np.zeros((count, self.settings.dim), dtype=np.float32)
        statuses = np.full(count, RowStatus.MISS, dtype=np.uint8)
        ages_ms = np.zeros(count, dtype=np.uint32)
        model_version = ""
        for row, embedding in enumerate(found):
            if embedding is None:
                continue
            status = embedding.status(now)
            if status is RowStatus.MISS:
                continue
            values[row] = embedding.vector
            statuses[row] = status
            ages_ms[row] = embedding.age_ms(now)
            model_version = embedding.model_version
        return BatchResult(values, statuses, ages_ms, model_version)


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded("deadline passed before the store was read")
