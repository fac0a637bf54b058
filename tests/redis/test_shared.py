"""Sidecars and daemons sharing one Redis: real redis-server processes, real sidecars over
gRPC, a real daemon process killed with SIGKILL, and Redis itself killed under load."""

import asyncio
import contextlib
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from solaris.app.compose import daemon_l2, shared_daemon
from solaris.precompute.export import ExportReport
from solaris.precompute.runner import OnnxRunner
from solaris.precompute.settings import PrecomputeSettings
from solaris.server.prefetch_queue import PrefetchTask
from solaris.server.redis_store import RedisStore, connect, pair_key
from solaris.server.redis_streams import shard_keys
from solaris.server.request_stream import REQUEST_STREAM_KEY, decode_request
from solaris.server.rollout import announce
from solaris.server.settings import SidecarSettings
from solaris.server.sidecar import REDIS_HEALTH_NAME, Sidecar
from solaris.server.store import Freshness
from solaris.server.tiered import TieredStore
from solaris.server.work_stream import STREAM_KEY, StreamWorkQueue
from solaris.v1 import embedding_store_pb2 as pb
from solaris.v1.embedding_store_pb2_grpc import EmbeddingStoreStub
from tests.clients.conftest import free_port
from tests.conftest import DIM, wait_until
from tests.redis.conftest import (
    NO_DAEMON,
    RedisProcess,
    batch_get,
    started,
)


async def until_all_hits(sidecar: Sidecar, user: str, items: list[str]) -> pb.BatchGetResponse:
    for _ in range(300):
        answer = await batch_get(sidecar, user, items)
        if set(answer.statuses) == {pb.HIT}:
            return answer
        await asyncio.sleep(0.05)
    raise AssertionError(f"not all HIT: {list(answer.statuses)}")


async def redis_health(sidecar: Sidecar) -> int:
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        answer = await stub.Check(health_pb2.HealthCheckRequest(service=REDIS_HEALTH_NAME))
        return answer.status


def stored_keys(server: RedisProcess) -> int:
    """Embeddings stored (not the streams' shard keys, `solaris:work:{0-0}`)."""
    return sum(1 for _ in server.client().scan_iter("solaris:*:{*}:*", count=1000))


async def test_a_write_goes_to_both_tiers_and_a_read_fills_l1(
    shared_settings: SidecarSettings, sidecars: list[Sidecar]
) -> None:
    writer = await started(shared_settings, NO_DAEMON)
    reader = await started(shared_settings.model_copy(update={"port": 0}), NO_DAEMON)
    sidecars += [writer, reader]
    tiers(writer).l2.use_version("v1")
    tiers(reader).l2.use_version("v1")
    # Values float16 holds exactly: Redis keeps float16 by default.
    vectors = np.random.default_rng(0).standard_normal((2, DIM)).astype(np.float16)
    vectors = vectors.astype(np.float32)
    await writer.service.put("user", ["a", "b"], vectors, "v1")
    assert len(tiers(writer).l1) == 2
    assert len(tiers(reader).l1) == 0
    answer = await batch_get(reader, "user", ["a", "b"])
    assert list(answer.statuses) == [pb.HIT, pb.HIT]
    assert np.frombuffer(answer.embeddings, np.float32).reshape(2, DIM).tolist() == (
        vectors.tolist()
    )
    assert len(tiers(reader).l1) == 2


async def test_two_sidecars_see_each_others_precomputed_pairs(
    shared_settings: SidecarSettings,
    with_daemon: PrecomputeSettings,
    sidecars: list[Sidecar],
    tiny_model: ExportReport,
) -> None:
    computing = await started(shared_settings, with_daemon)
    serving = await started(shared_settings, NO_DAEMON)
    sidecars += [computing, serving]
    items = ["i1", "i2", "i3"]
    async with grpc.aio.insecure_channel(serving.address) as channel:
        await EmbeddingStoreStub(channel).Prefetch(
            pb.PrefetchRequest(user_id="u", item_ids=items, history=["h1", "h2"])
        )
    from_serving = await until_all_hits(serving, "u", items)
    from_computing = await batch_get(computing, "u", items)
    assert from_serving.embeddings == from_computing.embeddings
    assert from_serving.model_version == tiny_model.model_version


def test_two_daemons_share_the_stream_without_computing_a_pair_twice(
    shared_settings: SidecarSettings,
    with_daemon: PrecomputeSettings,
    redis_server: RedisProcess,
    tiny_model: ExportReport,
) -> None:
    daemons = []
    for _ in range(2):
        runner = OnnxRunner(tiny_model.path, "cpu", 1)
        store = daemon_l2(shared_settings, runner.model_version)
        daemons.append(shared_daemon(shared_settings, with_daemon, runner, store))
        daemons[-1].start()
    tasks = [PrefetchTask(f"user-{n}", tuple(f"item-{k}" for k in range(5))) for n in range(40)]
    asyncio.run(submit_all(shared_settings, tasks, pause=0.01))
    try:
        assert wait_until(lambda: stored_keys(redis_server) == 200, timeout=30)
        assert wait_until(lambda: pending(redis_server) == 0, timeout=10)
    finally:
        for daemon in daemons:
            daemon.stop()
    computed = [daemon.stats.pairs_computed for daemon in daemons]
    assert sum(computed) == 200
    assert min(computed) > 0


@pytest.mark.parametrize("shards", [1, 3])
def test_tasks_of_a_daemon_killed_mid_batch_are_claimed_and_finished(
    shared_settings: SidecarSettings,
    with_daemon: PrecomputeSettings,
    redis_server: RedisProcess,
    tiny_model: ExportReport,
    shards: int,
) -> None:
    """With the stream sharded, a survivor claims what was left pending on every shard."""
    shared_settings = shared_settings.model_copy(update={"stream_shards": shards})
    # Enough work that the doomed daemon is still at it when the kill lands.
    tasks = [PrefetchTask(f"user-{n}", tuple(f"item-{k}" for k in range(8))) for n in range(1500)]
    asyncio.run(submit_all(shared_settings, tasks))
    command = [sys.executable, "-m", "solaris.app.cli", "precompute"]
    command += ["--redis", redis_server.url, "--model", str(tiny_model.path), "--dim", str(DIM)]
    command += ["--batch-pairs", "64", "--claim-idle-seconds", "1"]
    command += ["--stream-shards", str(shards), "--speculation", ""]
    doomed = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: pending(redis_server, shards) > 0, timeout=60)
    finally:
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()
    assert stored_keys(redis_server) < 12_000
    runner = OnnxRunner(tiny_model.path, "cpu", 1)
    survivor = shared_daemon(
        shared_settings, with_daemon, runner, daemon_l2(shared_settings, runner.model_version)
    )
    survivor.start()
    try:
        assert wait_until(lambda: stored_keys(redis_server) == 12_000, timeout=60)
        assert wait_until(lambda: pending(redis_server, shards) == 0, timeout=10)
    finally:
        survivor.stop()
    assert survivor.source.claimed > 0


async def test_batch_get_answers_in_time_while_redis_dies_and_comes_back(
    shared_settings: SidecarSettings, redis_server: RedisProcess, sidecars: list[Sidecar]
) -> None:
    await write_to_redis(redis_server, "user", "kept")
    sidecar = await started(shared_settings, NO_DAEMON)
    sidecars.append(sidecar)
    items = ["kept", "never-stored"]
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        stub = EmbeddingStoreStub(channel)
        request = pb.BatchGetRequest(user_id="user", item_ids=items)
        answer = await stub.BatchGet(request, timeout=0.5)
        assert list(answer.statuses) == [pb.HIT, pb.MISS]
        redis_server.kill()
        slowest = 0.0
        for _ in range(50):
            began = time.monotonic()
            answer = await stub.BatchGet(request, timeout=0.5)
            slowest = max(slowest, time.monotonic() - began)
            assert list(answer.statuses) == [pb.HIT, pb.MISS]
        assert slowest < 0.5
        assert await redis_health(sidecar) == health_pb2.HealthCheckResponse.NOT_SERVING
        redis_server.start()
        await write_to_redis(redis_server, "user", "never-stored")
        for _ in range(200):
            answer = await stub.BatchGet(request, timeout=0.5)
            if list(answer.statuses) == [pb.HIT, pb.HIT]:
                break
            await asyncio.sleep(0.05)
    assert list(answer.statuses) == [pb.HIT, pb.HIT]
    # Health follows on the event loop, a moment after the read that found Redis back.
    for _ in range(100):
        if await redis_health(sidecar) == health_pb2.HealthCheckResponse.SERVING:
            break
        await asyncio.sleep(0.05)
    assert await redis_health(sidecar) == health_pb2.HealthCheckResponse.SERVING


async def test_a_sidecar_starts_and_answers_with_redis_unreachable(
    shared_settings: SidecarSettings, sidecars: list[Sidecar]
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    sidecar = await started(shared_settings.model_copy(update={"redis": dead}), NO_DAEMON)
    sidecars.append(sidecar)
    answer = await batch_get(sidecar, "user", ["a"])
    assert list(answer.statuses) == [pb.MISS]
    assert await redis_health(sidecar) == health_pb2.HealthCheckResponse.NOT_SERVING
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await EmbeddingStoreStub(channel).Prefetch(
                pb.PrefetchRequest(user_id="user", item_ids=["a"])
            )
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "Redis" in (refused.value.details() or "")


async def test_a_corrupt_value_is_served_as_a_miss_and_counted(
    shared_settings: SidecarSettings, redis_server: RedisProcess, sidecars: list[Sidecar]
) -> None:
    await write_to_redis(redis_server, "user", "good")
    sidecar = await started(shared_settings, NO_DAEMON)
    sidecars.append(sidecar)
    redis_server.client().set(pair_key("v1", "user", "bad"), b"\x01\x01not a header")
    answer = await batch_get(sidecar, "user", ["good", "bad"])
    assert list(answer.statuses) == [pb.HIT, pb.MISS]
    assert tiers(sidecar).l2.corrupt_values == 1


async def write_to_redis(server: RedisProcess, user: str, item: str) -> None:
    """What a daemon would do: store a pair under model v1 and announce v1."""
    client = connect(server.url, 1.0)
    freshness = Freshness.starting("v1", time.time(), 60, 60)
    await RedisStore(client, DIM, "v1").write(user, [item], np.ones((1, DIM)), freshness)
    announce(server.client(), "v1")
    await client.aclose()


async def submit_all(
    settings: SidecarSettings, tasks: list[PrefetchTask], pause: float = 0
) -> None:
    client = connect(settings.redis, 1.0)
    queue = StreamWorkQueue(client, 256 * 1024**2, 256, 1.0, shards=settings.shards)
    for task in tasks:
        await queue.submit(task)
        if pause:
            await asyncio.sleep(pause)
    await client.aclose()


def pending(server: RedisProcess, shards: int = 1) -> int:
    """Work entries read but not acknowledged, on every shard, by the daemons of every model
    version."""
    found = 0
    for key in shard_keys(STREAM_KEY, shards):
        with contextlib.suppress(redis.exceptions.ResponseError):
            found += sum(group["pending"] for group in server.client().xinfo_groups(key))
    return found


async def test_every_sidecars_reads_reach_one_request_stream(
    shared_settings: SidecarSettings, redis_server: RedisProcess, sidecars: list[Sidecar]
) -> None:
    first = await started(shared_settings, NO_DAEMON)
    second = await started(shared_settings, NO_DAEMON)
    sidecars += [first, second]
    await batch_get(first, "user-1", ["a", "b"])
    await batch_get(second, "user-2", ["c"])
    entries: list = []
    for _ in range(100):
        entries = redis_server.client().xrange(REQUEST_STREAM_KEY)
        if len(entries) == 2:
            break
        await asyncio.sleep(0.02)
    logged = sorted(
        (request.user_id, request.item_ids, list(request.statuses))
        for request in (decode_request(fields) for _, fields in entries)
        if request is not None
    )
    assert logged == [("user-1", ("a", "b"), [pb.MISS, pb.MISS]), ("user-2", ("c",), [pb.MISS])]


def tiers(sidecar: Sidecar) -> TieredStore:
    store = sidecar.service.store
    assert isinstance(store, TieredStore)
    return store
