"""The sidecar's core: answers reads from the store and takes Prefetch hints. It knows no
transport; the gRPC servicer converts to and from it.

A read never waits on the model: it looks in the store, answers what is there, and logs the
request (hits and misses alike) for the speculator.
"""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from solaris.server.aggregates import Aggregates, RowTier
from solaris.server.errors import DeadlineExceeded
from solaris.server.metrics import ReadMetrics
from solaris.server.prefetch_queue import PrefetchTask
from solaris.server.request_log import LoggedRequest, RequestLog
from solaris.server.settings import SidecarSettings
from solaris.server.store import FLOAT32, Freshness, RowStatus, Store
from solaris.server.validation import check_id, check_id_list, check_priority


class WorkQueue(Protocol):
    """Where Prefetch work goes: the in-process queue, or the shared Redis stream."""

    async def submit(self, task: PrefetchTask) -> None: ...


@dataclass(frozen=True, slots=True)
class BatchResult:
    """A read's answer: `values` is (n, dim) in request order, MISS rows zero or filled from
    the tier `tiers` (RowTier codes, uint8) names."""

    values: np.ndarray
    statuses: np.ndarray
    ages_ms: np.ndarray
    model_version: str
    tiers: np.ndarray


@dataclass(frozen=True, slots=True)
class PrefetchResult:
    """A Prefetch's answer: pairs queued, and pairs skipped as already fresh."""

    queued: int
    already_fresh: int


class EmbeddingService:
    """BatchGet and Prefetch over a store keyed by (user_id, item_id)."""

    def __init__(
        self,
        settings: SidecarSettings,
        store: Store,
        request_log: RequestLog,
        work_queue: WorkQueue,
        metrics: ReadMetrics | None = None,
        clock: Callable[[], float] = time.time,
        aggregates: Aggregates | None = None,
    ) -> None:
        """`clock` is wall-clock seconds; the replay passes a simulated one. `aggregates`, the
        miss ladder's (kept by L1), fill missed rows; without them every MISS is zeros."""
        self.settings = settings
        self.aggregates = aggregates
        self.store = store
        self.request_log = request_log
        self.work_queue = work_queue
        self.metrics = metrics
        self.clock = clock

    async def get(
        self,
        user_id: str,
        item_id: str,
        dtype: np.dtype = FLOAT32,
        deadline: float | None = None,
        enrich: bool | None = None,
    ) -> BatchResult:
        """One pair: a BatchResult of one row."""
        check_id("user_id", user_id, self.settings.max_id_bytes)
        check_id("item_id", item_id, self.settings.max_id_bytes)
        return await self._read(user_id, (item_id,), dtype, deadline, enrich)

    async def batch_get(
        self,
        user_id: str,
        item_ids: Sequence[str],
        dtype: np.dtype = FLOAT32,
        deadline: float | None = None,
        enrich: bool | None = None,
    ) -> BatchResult:
        """Looks every pair up and logs the read.

        Args:
            dtype: FLOAT32 or FLOAT16, the dtype of the answer's `values`.
            deadline: a time.monotonic() instant past which no work starts.
            enrich: fill missed rows from the aggregates (the miss ladder); None: as the
                `miss_ladder` setting says.
        """
        check_id("user_id", user_id, self.settings.max_id_bytes)
        check_id_list("item_ids", item_ids, self.settings.max_items, self.settings.max_id_bytes)
        return await self._read(user_id, item_ids, dtype, deadline, enrich)

    async def put(
        self, user_id: str, item_ids: Sequence[str], vectors: np.ndarray, model_version: str
    ) -> None:
        """Stores freshly computed embeddings, one row of `vectors` per item, fresh from now."""
        settings = self.settings
        freshness = Freshness.starting(
            model_version, self.clock(), settings.ttl_seconds, settings.stale_seconds
        )
        await self.store.write(user_id, item_ids, vectors, freshness)

    async def _read(
        self,
        user_id: str,
        item_ids: Sequence[str],
        dtype: np.dtype,
        deadline: float | None,
        enrich: bool | None,
    ) -> BatchResult:
        _check_deadline(deadline, "before the store was read")
        started = time.perf_counter()
        now = self.clock()
        rows = await self.store.read(user_id, item_ids, dtype, now, deadline)
        statuses = rows.statuses(now)
        missed = statuses == RowStatus.MISS
        tiers = np.where(missed, np.uint8(RowTier.NONE), np.uint8(RowTier.PAIR))
        values, version = rows.values, rows.model_version
        if enrich is None:
            enrich = self.settings.miss_ladder
        if enrich and self.aggregates is not None and missed.any():
            values, version = self._enrich(user_id, item_ids, values, missed, tiers, version, now)
        result = BatchResult(values, statuses, rows.ages_ms(now), version, tiers)
        if self.request_log.active:
            stale_at = rows.times["stale_at"]
            self.request_log.append(
                LoggedRequest(user_id, tuple(item_ids), result.statuses, now, stale_at)
            )
        if self.metrics is not None:
            self.metrics.observe(result.statuses, tiers, time.perf_counter() - started)
        return result

    def _enrich(
        self,
        user_id: str,
        item_ids: Sequence[str],
        values: np.ndarray,
        missed: np.ndarray,
        tiers: np.ndarray,
        version: str,
        now: float,
    ) -> tuple[np.ndarray, str]:
        """Fills the missed rows from the ladder and notes their tiers in `tiers`; the values
        and the answer's model version (the aggregates' when no row was the pair's own)."""
        assert self.aggregates is not None
        if not values.flags.writeable:
            values = values.copy()
        positions = np.flatnonzero(missed)
        filled, used = self.aggregates.fill(user_id, item_ids, values, positions, version, now)
        tiers[positions] = filled
        return values, version or used

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
        _check_deadline(deadline, "before the work was queued")
        unique_items = list(dict.fromkeys(item_ids))
        now = self.clock()
        rows = await self.store.read(user_id, unique_items, FLOAT32, now, deadline)
        fresh = rows.statuses(now) == RowStatus.HIT
        wanted = tuple(
            item for item, is_fresh in zip(unique_items, fresh, strict=True) if not is_fresh
        )
        if wanted:
            await self.work_queue.submit(PrefetchTask(user_id, wanted, tuple(history), priority))
        return PrefetchResult(queued=len(wanted), already_fresh=len(unique_items) - len(wanted))


def _check_deadline(deadline: float | None, before: str) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded(f"deadline passed {before}")
