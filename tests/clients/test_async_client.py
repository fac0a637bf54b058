"""The asyncio client: the same promises as the blocking one, under concurrency."""

import asyncio
import time

import numpy as np
import pytest

from solaris.app.compose import SidecarParts
from solaris.clients import AsyncEmbeddingClient, ClientOptions, FallbackReason, RowStatus
from solaris.server.sidecar import Sidecar
from tests.clients.conftest import MODEL_VERSION, vectors
from tests.clients.test_sync_client import SLACK, item_ids
from tests.conftest import DIM

CALLS = 50


async def test_concurrent_calls_each_get_their_own_rows(sidecar: Sidecar) -> None:
    stored = {f"user-{n}": vectors(4, seed=n) for n in range(CALLS)}
    for user_id, rows in stored.items():
        await sidecar.service.put(user_id, item_ids(4), rows, MODEL_VERSION)
    async with AsyncEmbeddingClient(sidecar.address, DIM, deadline=5) as client:
        answers = await asyncio.gather(
            *(client.batch_get(user_id, item_ids(4)) for user_id in stored)
        )
    for (user_id, rows), answer in zip(stored.items(), answers, strict=True):
        assert np.array_equal(answer.values, rows), user_id
        assert list(answer.status) == [RowStatus.HIT] * 4
    assert client.stats.calls == CALLS


async def test_concurrent_calls_to_a_slow_sidecar_all_fall_back_in_time(slow_sidecar: str) -> None:
    async with AsyncEmbeddingClient(slow_sidecar, DIM, deadline=0.3) as client:
        started = time.monotonic()
        answers = await asyncio.gather(
            *(client.batch_get(f"user-{n}", item_ids(4)) for n in range(CALLS))
        )
        took = time.monotonic() - started
    assert took < 0.3 + SLACK
    assert {answer.fallback_reason for answer in answers} <= {
        FallbackReason.DEADLINE,
        FallbackReason.BREAKER_OPEN,
    }
    assert all((answer.status == RowStatus.FALLBACK).all() for answer in answers)


async def test_the_breaker_opens_on_a_dead_sidecar(dead_address: str) -> None:
    options = ClientOptions(failures_to_open=2, open_seconds=30)
    async with AsyncEmbeddingClient(dead_address, DIM, deadline=1, options=options) as client:
        first = [await client.batch_get("user", ["item-0"]) for _ in range(2)]
        then = await client.batch_get("user", ["item-0"])
        assert client.breaker_state == "open"
    assert [a.fallback_reason for a in first] == [FallbackReason.UNAVAILABLE] * 2
    assert then.fallback_reason is FallbackReason.BREAKER_OPEN


async def test_misses_are_prefetched_in_the_background(
    sidecar: Sidecar, parts: SidecarParts
) -> None:
    async with AsyncEmbeddingClient(sidecar.address, DIM, deadline=5) as client:
        answer = await client.batch_get("user", item_ids(3), prefetch_misses=True)
        for _ in range(100):
            if parts.prefetch_queue.pairs == 3:
                break
            await asyncio.sleep(0.02)
    assert answer.fallback_reason is FallbackReason.MISS
    assert parts.prefetch_queue.pairs == 3


async def test_a_lone_string_is_refused_not_read_as_one_id_per_character(
    dead_address: str,
) -> None:
    async with AsyncEmbeddingClient(dead_address, DIM) as client:
        with pytest.raises(ValueError, match="item_ids: must be a sequence of ids"):
            await client.batch_get("user", "abc")
        with pytest.raises(ValueError, match="item_ids: must be a sequence of ids"):
            client.prefetch("user", "abc")
        with pytest.raises(ValueError, match="history: must be a sequence of ids"):
            client.prefetch("user", ["a"], "abc")
    assert (client.stats.calls, client.stats.prefetches_sent) == (0, 0)
