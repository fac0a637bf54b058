"""Sidecars and daemons on a real Redis Cluster (3 masters, 3 replicas): reads, writes and
both streams work across its slots, and the streams' shards spread over its masters."""

import asyncio
import contextlib
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import IO

import grpc
import numpy as np
import pytest
import redis.asyncio.cluster
import redis.cluster
from grpc_health.v1 import health_pb2, health_pb2_grpc

from solaris.precompute.export import ExportReport
from solaris.precompute.settings import PrecomputeSettings
from solaris.server.redis_store import connect, node_url, pair_key
from solaris.server.redis_streams import shard_keys, shard_of
from solaris.server.request_stream import REQUEST_STREAM_KEY
from solaris.server.settings import CLUSTER_STREAM_SHARDS, SidecarSettings
from solaris.server.sidecar import REDIS_HEALTH_NAME, Sidecar
from solaris.server.work_stream import STREAM_KEY
from solaris.v1 import embedding_store_pb2 as pb
from solaris.v1.embedding_store_pb2_grpc import EmbeddingStoreStub
from tests.conftest import DIM, wait_until
from tests.redis.conftest import (
    NO_DAEMON,
    REDIS_CLI,
    REDIS_SERVER,
    ClusterProcesses,
    batch_get,
    started,
)
from tests.server.serving import free_port, serving, wait_until_serving

pytestmark = pytest.mark.cluster


@pytest.fixture
def cluster_settings(settings: SidecarSettings, redis_cluster: ClusterProcesses) -> SidecarSettings:
    return settings.model_copy(
        update={
            "redis": redis_cluster.url,
            "redis_timeout_ms": 200,
            "claim_idle_seconds": 1.0,
            "prefetch_queue_pairs": 10_000,
        }
    )


def cluster_client(cluster: ClusterProcesses) -> redis.cluster.RedisCluster:
    return redis.cluster.RedisCluster.from_url(node_url(cluster.url))


async def test_prefetched_pairs_are_computed_and_read_back_from_a_cluster(
    cluster_settings: SidecarSettings,
    with_daemon: PrecomputeSettings,
    sidecars: list[Sidecar],
    redis_cluster: ClusterProcesses,
) -> None:
    computing = await started(cluster_settings, with_daemon)
    serving = await started(cluster_settings, NO_DAEMON)
    sidecars += [computing, serving]
    users = [f"user-{n}" for n in range(12)]
    items = [f"item-{k}" for k in range(5)]
    async with grpc.aio.insecure_channel(serving.address) as channel:
        stub = EmbeddingStoreStub(channel)
        for user in users:
            await stub.Prefetch(pb.PrefetchRequest(user_id=user, item_ids=items, history=["h"]))
    for user in users:
        answer = await until_all_hits(serving, user, items)
        assert np.frombuffer(answer.embeddings, np.float32).reshape(-1, DIM).any()
    check = cluster_client(redis_cluster)
    # Every shard got work (12 users over 6 shards), and each shard lives on its own slot.
    work = shard_keys(STREAM_KEY, CLUSTER_STREAM_SHARDS)
    assert sum(check.xlen(key) > 0 for key in work) >= 3
    # (on a thread: this loop runs the sidecars)
    done = lambda: all(  # noqa: E731
        group["pending"] == 0 for key in work for group in check.xinfo_groups(key)
    )
    assert await asyncio.to_thread(wait_until, done)
    # The reads went to the request stream's shards.
    requests = shard_keys(REQUEST_STREAM_KEY, CLUSTER_STREAM_SHARDS)
    shipped = lambda: sum(check.xlen(key) for key in requests) >= len(users)  # noqa: E731
    assert await asyncio.to_thread(wait_until, shipped)


@contextlib.contextmanager
def precompute(
    cluster: ClusterProcesses,
    model: ExportReport,
    *flags: str,
    stderr: IO[bytes] | int = subprocess.DEVNULL,
) -> Iterator[subprocess.Popen[bytes]]:
    """`solaris precompute` on the cluster with `flags`, as its own process (its stderr to
    `stderr`, by default nowhere); killed at the end."""
    command = [sys.executable, "-m", "solaris.app.cli", "precompute", "--redis", cluster.url]
    command += ["--model", str(model.path), "--dim", str(DIM), *flags]
    process = subprocess.Popen(command, stderr=stderr)
    try:
        yield process
    finally:
        process.send_signal(signal.SIGCONT)  # if the test left it stopped
        process.kill()
        process.wait()


async def test_misses_become_hits_through_the_speculator_on_a_cluster(
    cluster_settings: SidecarSettings,
    redis_cluster: ClusterProcesses,
    tiny_model: ExportReport,
    sidecars: list[Sidecar],
) -> None:
    """No Prefetch: the reads go to the request stream's shards, the speculator (holding its
    lease, a script on the cluster) reads them all and adds work to the work stream's shards,
    and a daemon computes it."""
    with precompute(redis_cluster, tiny_model, "--speculation", "miss", "--batch-wait-ms", "1"):
        sidecar = await started(cluster_settings, NO_DAEMON)
        sidecars.append(sidecar)
        users = [f"user-{n}" for n in range(6)]
        assert len({shard_of(user, CLUSTER_STREAM_SHARDS) for user in users}) >= 3
        items = [f"item-{n}" for n in range(10)]
        for user in users:
            for _ in range(600):
                answer = await batch_get(sidecar, user, items)
                if set(answer.statuses) == {pb.HIT}:
                    break
                await asyncio.sleep(0.05)
            assert set(answer.statuses) == {pb.HIT}, user


async def test_the_cluster_client_packs_with_hiredis_and_sends_an_mget_to_its_slot(
    redis_cluster: ClusterProcesses,
) -> None:
    client = connect(redis_cluster.url, 1.0)
    assert isinstance(client, redis.asyncio.cluster.RedisCluster)
    keys = [pair_key("v", user, "i") for user in ("user-1", "user-2", "user-3")]
    await client.set(keys[0], b"one")
    await client.set(keys[1], b"two")
    assert await client.mget([keys[0], pair_key("v", "user-1", "j")]) == [b"one", None]
    # Keys of other users' slots are refused by Redis, not read from the wrong node.
    assert len({redis_cluster.master_of(key).port for key in keys}) > 1
    with pytest.raises(redis.exceptions.ResponseError, match="don't hash to the same slot"):
        await client.mget(keys)
    nodes = client.nodes_manager.nodes_cache.values()
    await client.aclose()
    assert len(nodes) >= 3  # every master
    for node in nodes:
        assert node.connection_class.pack_command is not redis.asyncio.Connection.pack_command


def test_the_shards_of_each_stream_spread_over_every_master(
    cluster_settings: SidecarSettings, redis_cluster: ClusterProcesses
) -> None:
    for stream in (STREAM_KEY, REQUEST_STREAM_KEY):
        keys = shard_keys(stream, cluster_settings.shards)
        masters = {redis_cluster.master_of(key).port for key in keys}
        assert len(masters) == 3


async def until_all_hits(sidecar: Sidecar, user: str, items: list[str]) -> pb.BatchGetResponse:
    for _ in range(600):
        answer = await batch_get(sidecar, user, items)
        if set(answer.statuses) == {pb.HIT}:
            return answer
        await asyncio.sleep(0.05)
    raise AssertionError(f"not all HIT: {list(answer.statuses)}")


@pytest.fixture
def daemon_process(
    redis_cluster: ClusterProcesses, tiny_model: ExportReport
) -> Iterator[subprocess.Popen[bytes]]:
    """A daemon computing Prefetch work alone (no speculator)."""
    flags = ["--batch-pairs", "64", "--claim-idle-seconds", "1", "--speculation", ""]
    with precompute(redis_cluster, tiny_model, *flags) as process:
        yield process


def users_on(cluster: ClusterProcesses, master: int, version: str, shards: int) -> list[str]:
    """Users whose pairs and work shard both live on the master on port `master`."""
    work = shard_keys(STREAM_KEY, shards)
    found = []
    for n in range(2000):
        user = f"user-{n}"
        pairs_there = cluster.master_of(pair_key(version, user, "i")).port == master
        if pairs_there and cluster.master_of(work[shard_of(user, shards)]).port == master:
            found.append(user)
            if len(found) == 2:
                return found
    raise AssertionError("no two users live on one master")


class Callers:
    """BatchGets for `users`, back to back on a thread, each with a 0.5 s deadline: every
    answer or error is kept, and the health of `solaris.redis` after each round."""

    def __init__(self, port: int, users: list[str], items: list[str]) -> None:
        self.port = port
        self.users = users
        self.items = items
        self.answers: list[pb.BatchGetResponse] = []
        self.errors: list[grpc.RpcError] = []
        self.health: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Callers":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = EmbeddingStoreStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            redis_health = health_pb2.HealthCheckRequest(service=REDIS_HEALTH_NAME)
            while not self._stop.is_set():
                self.health.append(health.Check(redis_health, timeout=0.5).status)
                for user in self.users:
                    request = pb.BatchGetRequest(user_id=user, item_ids=self.items)
                    try:
                        self.answers.append(stub.BatchGet(request, timeout=0.5))
                    except grpc.RpcError as error:
                        self.errors.append(error)


def prefetch_until_hits(port: int, user: str, items: list[str], timeout: float = 60) -> None:
    """Prefetches `items` (again while Redis refuses it) until a BatchGet has them all."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = EmbeddingStoreStub(channel)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(grpc.RpcError):
                stub.Prefetch(pb.PrefetchRequest(user_id=user, item_ids=items, history=["h"]))
            for _ in range(20):
                answer = stub.BatchGet(pb.BatchGetRequest(user_id=user, item_ids=items), timeout=2)
                if set(answer.statuses) == {pb.HIT}:
                    return
                time.sleep(0.1)
        raise AssertionError(f"{user}: never all HIT")


def test_a_master_killed_under_load_fails_over_without_errors_or_restarts(
    redis_cluster: ClusterProcesses,
    daemon_process: subprocess.Popen[bytes],
    tiny_model: ExportReport,
) -> None:
    port = free_port()
    flags = ["--port", str(port), "--dim", str(DIM), "--redis", redis_cluster.url]
    address = f"127.0.0.1:{port}"
    with serving(flags, stderr=subprocess.DEVNULL), grpc.insecure_channel(address) as ch:
        wait_until_serving(ch)
        first = redis_cluster.master_of(pair_key(tiny_model.model_version, "user-0", "i"))
        served, waiting = users_on(
            redis_cluster, first.port, tiny_model.model_version, CLUSTER_STREAM_SHARDS
        )
        items = [f"item-{k}" for k in range(8)]
        prefetch_until_hits(port, served, items)
        # Work for `waiting` is in its shard on the doomed master, replicated, unread.
        daemon_process.send_signal(signal.SIGSTOP)
        EmbeddingStoreStub(ch).Prefetch(
            pb.PrefetchRequest(user_id=waiting, item_ids=items, history=["h"])
        )
        redis_cluster.wait_until_replicated(first)
        with Callers(port, [served, waiting], items) as callers:
            first.kill()
            promoted = redis_cluster.master_of(pair_key(tiny_model.model_version, served, "i"))
            daemon_process.send_signal(signal.SIGCONT)
            # The daemon, on the new master, finds the work queued before the kill ...
            prefetch_until_hits(port, waiting, items)
            # ... and new work for users of the promoted master is computed and read.
            prefetch_until_hits(port, served, [f"new-{k}" for k in range(8)])
        assert promoted.port != first.port
        # What was replicated before the kill is all there on the promoted master.
        keys = [pair_key(tiny_model.model_version, served, item) for item in items]
        assert None not in cluster_client(redis_cluster).mget(keys)
        assert callers.errors == []
        # Redis was down while a master was (some users unreadable), and is up again.
        assert health_pb2.HealthCheckResponse.NOT_SERVING in callers.health
        assert callers.health[-1] == health_pb2.HealthCheckResponse.SERVING
        # The sidecar kept answering from memory (L1) what it had read before the kill.
        assert all(pb.HIT in answer.statuses for answer in callers.answers[::2])
        assert daemon_process.poll() is None


def test_a_daemon_started_before_its_cluster_waits_for_it(tiny_model: ExportReport) -> None:
    """`solaris precompute` finds no node (its cluster client looks when made): it waits, and
    computes once the cluster is up."""
    if REDIS_SERVER is None or REDIS_CLI is None:
        pytest.skip("redis-server and redis-cli are not installed")
    cluster = ClusterProcesses()
    flags = ("--speculation", "")
    try:
        with (
            tempfile.TemporaryFile() as log,
            precompute(cluster, tiny_model, *flags, stderr=log) as daemon,
        ):
            assert wait_until(lambda: b"no node of the Redis Cluster" in read(log), timeout=60)
            assert daemon.poll() is None
            cluster.start()
            port = free_port()
            flags = ("--port", str(port), "--dim", str(DIM), "--redis", cluster.url)
            with serving(flags, stderr=subprocess.DEVNULL):
                with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                    wait_until_serving(channel)
                prefetch_until_hits(port, "user-1", ["a", "b"])
    finally:
        cluster.kill()


def read(file: IO[bytes]) -> bytes:
    file.seek(0)
    return file.read()
