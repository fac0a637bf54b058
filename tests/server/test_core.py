"""The core without a transport: expiry, staleness and deadlines."""

import time

import numpy as np
import pytest

from solaris.server.core import EmbeddingService
from solaris.server.errors import DeadlineExceeded
from solaris.server.l1 import MemoryStore
from solaris.server.prefetch_queue import PrefetchQueue
from solaris.server.request_log import RequestLog
from solaris.server.settings import SidecarSettings
from solaris.server.store import Freshness, RowStatus

DIM = 4


@pytest.fixture
def service() -> EmbeddingService:
    settings = SidecarSettings(dim=DIM, ttl_seconds=60, stale_seconds=30)
    return EmbeddingService(
        settings, MemoryStore(1024**2, DIM), RequestLog(retain_bytes=1024**2), PrefetchQueue(100)
    )


async def store_at(service: EmbeddingService, item: str, computed_at: float) -> None:
    freshness = Freshness.starting("v1", computed_at, ttl_seconds=60, stale_seconds=30)
    await service.store.write("u", [item], np.ones((1, DIM), np.float32), freshness)


async def test_expiry_turns_a_hit_into_a_miss(service: EmbeddingService) -> None:
    now = time.time()
    await store_at(service, "fresh", now)
    await store_at(service, "stale", now - 70)
    await store_at(service, "expired", now - 100)

    result = await service.batch_get("u", ["fresh", "stale", "expired"])

    assert result.statuses.tolist() == [RowStatus.HIT, RowStatus.STALE, RowStatus.MISS]
    assert result.values[:2].tolist() == [[1.0] * DIM] * 2
    assert result.values[2].tolist() == [0.0] * DIM
    assert result.ages_ms[1] >= 70_000


async def test_a_stale_pair_is_prefetched_again(service: EmbeddingService) -> None:
    now = time.time()
    await store_at(service, "fresh", now)
    await store_at(service, "stale", now - 70)

    result = await service.prefetch("u", ["fresh", "stale"])

    assert (result.queued, result.already_fresh) == (1, 1)


async def test_a_passed_deadline_does_no_work(service: EmbeddingService) -> None:
    with pytest.raises(DeadlineExceeded, match="before the store was read"):
        await service.batch_get("u", ["a"], deadline=time.monotonic() - 0.001)
    with pytest.raises(DeadlineExceeded, match="before the work was queued"):
        await service.prefetch("u", ["a"], deadline=time.monotonic() - 0.001)

    assert len(service.request_log) == 0
    assert service.work_queue.pairs == 0


async def test_put_refuses_vectors_of_the_wrong_shape(service: EmbeddingService) -> None:
    with pytest.raises(ValueError, match="shape"):
        await service.put("u", ["a", "b"], np.zeros((2, DIM + 1), np.float32), "v1")


async def test_the_request_log_says_when_each_served_row_goes_stale(
    service: EmbeddingService,
) -> None:
    now = time.time()
    await store_at(service, "fresh", now)

    await service.batch_get("u", ["fresh", "absent"])

    (logged,) = service.request_log.snapshot()
    assert logged.statuses.tolist() == [RowStatus.HIT, RowStatus.MISS]
    assert logged.stale_at[0] == pytest.approx(now + 60)


async def test_under_a_simulated_clock_an_expired_pair_is_zero_filled_and_dropped() -> None:
    """The store reads time from the service's clock, not the machine's: a replay hours ahead
    of real time sees a pair expire when its clock says so."""
    simulated = [time.time() + 10_000.0]
    store = MemoryStore(1024**2, DIM)
    settings = SidecarSettings(dim=DIM, ttl_seconds=60, stale_seconds=30)
    service = EmbeddingService(
        settings,
        store,
        RequestLog(retain_bytes=1024**2),
        PrefetchQueue(100),
        clock=lambda: simulated[0],
    )
    await service.put("u", ["a"], np.ones((1, DIM), np.float32), "v1")
    assert (await service.batch_get("u", ["a"])).statuses.tolist() == [RowStatus.HIT]

    simulated[0] += 91.0
    result = await service.batch_get("u", ["a"])

    assert result.statuses.tolist() == [RowStatus.MISS]
    assert not result.values.any()
    assert result.model_version == ""
    assert len(store) == 0
