"""What `solaris.redis` health says, against real processes: a `solaris serve --redis` sidecar,
a redis-server the test kills and restarts, and loader processes that keep the sidecar's
event loop busy. Health follows Redis whatever the traffic, and only Redis."""

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from solaris.server.redis_store import RedisStore, connect
from solaris.server.rollout import announce
from solaris.server.sidecar import REDIS_HEALTH_NAME
from solaris.server.store import Freshness
from solaris.v1 import embedding_store_pb2 as pb
from solaris.v1.embedding_store_pb2_grpc import EmbeddingStoreStub
from tests.conftest import DIM, wait_until
from tests.ops.test_metrics import scrape
from tests.redis.conftest import RedisProcess
from tests.server.serving import free_port, wait_until_serving

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
LOADERS = 16
ROUNDS = 6


@contextmanager
def serve(redis_url: str, *flags: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A real `solaris serve --redis` process, serve-only: (the process, its address)."""
    port = free_port()
    command = [sys.executable, "-m", "solaris.app.cli", "serve", "--precompute", "false"]
    command += ["--port", str(port), "--redis", redis_url, "--dim", str(DIM)]
    command += ["--grace-seconds", "0", *flags]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    address = f"127.0.0.1:{port}"
    with process, grpc.insecure_channel(address) as channel:
        try:
            wait_until_serving(channel)
            yield process, address
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)


def store_pairs(server: RedisProcess, users: list[str], items: list[str]) -> None:
    """What a daemon would do: every (user, item) pair stored under model v1, v1 published."""

    async def write() -> None:
        client = connect(server.url, 5.0)
        store = RedisStore(client, DIM, "v1")
        freshness = Freshness.starting("v1", time.time(), 3600, 60)
        vectors = np.ones((len(items), DIM), np.float32)
        for user in users:
            await store.write(user, items, vectors, freshness)
        announce(server.client(), "v1")
        await client.aclose()

    asyncio.run(write())


def redis_health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        request = health_pb2.HealthCheckRequest(service=REDIS_HEALTH_NAME)
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status


class HealthWatch:
    """Every status `solaris.redis` reports over a Watch stream, from a thread."""

    def __init__(self, address: str) -> None:
        self.seen: list[int] = []
        self._channel = grpc.insecure_channel(address)
        request = health_pb2.HealthCheckRequest(service=REDIS_HEALTH_NAME)
        self._stream = health_pb2_grpc.HealthStub(self._channel).Watch(request)
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        try:
            for answer in self._stream:
                self.seen.append(answer.status)
        except grpc.RpcError:
            pass

    def close(self) -> None:
        self._stream.cancel()
        self._channel.close()
        self._thread.join(timeout=5)


def test_health_follows_a_dead_redis_with_only_l1_hits(redis_server: RedisProcess) -> None:
    """Every read an L1 hit: Redis dying still turns `solaris.redis` NOT_SERVING (and
    `solaris_redis_up` 0), and its return SERVING again, each change logged once."""
    items = [f"item-{i}" for i in range(8)]
    store_pairs(redis_server, ["user"], items)
    request = pb.BatchGetRequest(user_id="user", item_ids=items)
    metrics_port = free_port()
    flags = ("--metrics-port", str(metrics_port))
    with (
        serve(redis_server.url, *flags) as (process, address),
        grpc.insecure_channel(address) as channel,
    ):
        stub = EmbeddingStoreStub(channel)
        assert wait_until(lambda: set(stub.BatchGet(request, timeout=5).statuses) == {pb.HIT})
        assert redis_health(address) == SERVING
        redis_server.kill()
        killed = time.monotonic()

        def lost() -> bool:
            assert set(stub.BatchGet(request, timeout=5).statuses) == {pb.HIT}
            return redis_health(address) == NOT_SERVING

        assert wait_until(lost, timeout=20)
        print(f"solaris.redis NOT_SERVING {time.monotonic() - killed:.2f} s after Redis died")
        assert scrape(metrics_port)["solaris_redis_up"] == 0
        redis_server.start()
        assert wait_until(lambda: redis_health(address) == SERVING, timeout=20)
        assert scrape(metrics_port)["solaris_redis_up"] == 1
        process.send_signal(signal.SIGTERM)
        logs = process.communicate(timeout=20)[1]
    assert logs.count("Redis unreachable") == 1, logs
    assert logs.count("Redis reachable again") == 1, logs


def load(
    address: str, users: list[str], items: list[str], rounds: int
) -> tuple[int, int, list[str]]:
    """One loader process: a Prefetch, then BatchGets of every user's items, `rounds` times;
    (rows, MISS rows, errors)."""
    rows = misses = 0
    errors: list[str] = []
    with grpc.insecure_channel(address) as channel:
        stub = EmbeddingStoreStub(channel)
        try:
            stub.Prefetch(pb.PrefetchRequest(user_id=users[0], item_ids=["new"]), timeout=5)
        except grpc.RpcError as error:
            errors.append(f"Prefetch: {error}")
        for _ in range(rounds):
            for user in users:
                answer = stub.BatchGet(pb.BatchGetRequest(user_id=user, item_ids=items), timeout=5)
                rows += len(answer.statuses)
                misses += list(answer.statuses).count(pb.MISS)
    return rows, misses, errors


def first_in_line(server: RedisProcess) -> None:
    """Redis ahead of the loaders for the CPU (as on a host of its own in production): the
    loaders are to keep the sidecar's event loop busy, not to keep Redis from answering."""
    assert server.process is not None
    try:
        os.setpriority(os.PRIO_PROCESS, server.process.pid, -10)
    except PermissionError:
        pytest.skip("raising redis-server's priority takes CAP_SYS_NICE")


def test_a_busy_sidecar_never_takes_a_healthy_redis_for_down(redis_server: RedisProcess) -> None:
    """Sixteen loader processes against one sidecar (behind them for the CPU, Redis ahead)
    whose L1 holds a few pairs, so that most reads go to Redis while the event loop is busy:
    every loader's first Prefetch is taken, every pair Redis holds comes back, and
    `solaris.redis` stays SERVING throughout."""
    users = [f"user-{i}" for i in range(64)]
    items = [f"item-{i}" for i in range(16)]
    store_pairs(redis_server, users, items)
    first_in_line(redis_server)
    flags = ("--cache-bytes", "32Ki")
    with serve(redis_server.url, *flags) as (sidecar, address):
        os.setpriority(os.PRIO_PROCESS, sidecar.pid, 19)  # behind the loaders for the CPU
        watch = HealthWatch(address)
        context = get_context("spawn")
        with ProcessPoolExecutor(LOADERS, mp_context=context) as loaders:
            shares = [users[i::LOADERS] + users for i in range(LOADERS)]
            done = [loaders.submit(load, address, share, items, ROUNDS) for share in shares]
            counts = [future.result() for future in done]
        watch.close()
    rows = sum(count[0] for count in counts)
    misses = sum(count[1] for count in counts)
    print(f"{misses} MISS rows of {rows}")
    assert [error for count in counts for error in count[2]] == []
    assert rows == LOADERS * ROUNDS * (len(users) + len(users) // LOADERS) * len(items)
    assert misses == 0
    assert SERVING in watch.seen
    assert NOT_SERVING not in watch.seen
