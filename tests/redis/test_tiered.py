"""L1 in front of Redis: what a lost Redis, a short deadline and a restarted Redis do."""

import asyncio
import time

import numpy as np
import pytest

from solaris.app.compose import daemon_l2, shared_daemon
from solaris.precompute.export import ExportReport
from solaris.precompute.runner import OnnxRunner
from solaris.precompute.settings import PrecomputeSettings
from solaris.server.errors import Unavailable
from solaris.server.l1 import MemoryStore
from solaris.server.prefetch_queue import PrefetchTask
from solaris.server.redis_store import RedisStore, connect
from solaris.server.rollout import VERSIONS_KEY
from solaris.server.settings import SidecarSettings
from solaris.server.store import FLOAT16, FLOAT32, Freshness
from solaris.server.tiered import TieredStore
from tests.conftest import DIM, wait_until
from tests.redis.conftest import RedisProcess
from tests.redis.test_shared import stored_keys, submit_all


def freshness() -> Freshness:
    return Freshness.starting("v1", time.time(), 60, 60)


async def test_a_write_redis_refuses_reaches_neither_tier(redis_server: RedisProcess) -> None:
    client = connect(redis_server.url, 0.2)
    tiered = TieredStore(MemoryStore(1024**2, DIM), RedisStore(client, DIM, "v1"), 0.2)
    redis_server.kill()
    with pytest.raises(Unavailable):
        await tiered.write("user", ["a"], np.ones((1, DIM)), freshness())
    await client.aclose()
    assert len(tiered.l1) == 0
    assert not tiered.reachability.up


async def test_a_read_cut_short_by_its_deadline_does_not_mark_redis_down(
    redis_server: RedisProcess,
) -> None:
    client = connect(redis_server.url, 0.5)
    tiered = TieredStore(MemoryStore(1024**2, DIM), RedisStore(client, DIM, "v1"), 0.5)
    await tiered.read("user", ["a"], FLOAT32, time.time(), deadline=time.monotonic())
    await tiered.close()
    assert tiered.reachability.up
    assert tiered.reachability.errors == 0


def test_a_daemon_carries_on_after_redis_restarts_empty(
    settings: SidecarSettings, redis_server: RedisProcess, tiny_model: ExportReport
) -> None:
    shared = SidecarSettings(
        **{**vars(settings), "redis": redis_server.url, "claim_idle_seconds": 1}
    )
    runner = OnnxRunner(tiny_model.path, "cpu", 1)
    precompute = PrecomputeSettings(model=str(tiny_model.path), batch_wait_ms=1.0)
    daemon = shared_daemon(shared, precompute, runner, daemon_l2(shared, runner.model_version))
    daemon.start()
    try:
        asyncio.run(submit_all(shared, [PrefetchTask("u1", ("a", "b"))]))
        assert wait_until(lambda: stored_keys(redis_server) == 2, timeout=20)
        redis_server.kill()
        redis_server.start()
        asyncio.run(submit_all(shared, [PrefetchTask("u2", ("c",))]))
        assert wait_until(lambda: stored_keys(redis_server) == 1, timeout=30)
        assert wait_until(lambda: redis_server.client().hlen(VERSIONS_KEY) == 1, 10)
    finally:
        daemon.stop()


@pytest.mark.parametrize("l1_dtype", [FLOAT16, FLOAT32])
async def test_l1_fills_from_float16_values_in_its_own_dtype(
    redis_server: RedisProcess, l1_dtype: np.dtype
) -> None:
    """A cold read answers Redis's float16 rows, in either dtype asked for, and leaves them in
    L1 (of either dtype) to answer the same the next time."""
    client = connect(redis_server.url, 0.5)
    written = np.random.default_rng(0).standard_normal((3, DIM)).astype(np.float32)
    await RedisStore(client, DIM, "v1").write("user", ["a", "b", "c"], written, freshness())
    l1 = MemoryStore(1024**2, DIM, l1_dtype)
    tiered = TieredStore(l1, RedisStore(client, DIM, "v1"), 0.5)
    halves = written.astype(FLOAT16)
    cold = await tiered.read("user", ["c", "a"], FLOAT16, time.time())
    cold_wide = await tiered.read("user", ["b"], FLOAT32, time.time())
    warm = l1.read_sync("user", ["a", "b", "c"], FLOAT16, time.time())
    await tiered.close()
    assert cold.values.dtype == FLOAT16
    assert np.array_equal(cold.values, halves[[2, 0]])
    assert cold_wide.values.dtype == FLOAT32
    assert np.array_equal(cold_wide.values, halves[[1]].astype(FLOAT32))
    assert tiered.l2_hits == 3
    assert np.array_equal(warm.values, halves)
