"""What several bench scripts share: a free port, a redis-server (or a Redis Cluster) of their
own, and the two
timing loops (back-to-back blocking calls, and many concurrent calls on one grpc.aio channel).
"""

import asyncio
import itertools
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import numpy as np
import redis

from solaris.server.redis_store import MODEL_VERSION_KEY, RedisStore, connect
from solaris.server.store import Freshness
from solaris.v1 import embedding_store_pb2 as pb
from solaris.v1.embedding_store_pb2_grpc import EmbeddingStoreStub

# The generated stub is typed for a blocking channel; on a grpc.aio one its calls are awaited.
AsyncStub = Any


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def start_redis(
    options: Sequence[str] = (), folder: str | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """A redis-server on a free port, without persistence, once it answers; and its URL.
    `options` are more flags; it runs in `folder`."""
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed")
    port = free_port()
    command = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        *options,
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, cwd=folder)
    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            time.sleep(0.02)
    return process, f"redis://127.0.0.1:{port}/0"


def start_cluster(folder: str) -> tuple[list[subprocess.Popen[bytes]], str]:
    """A Redis Cluster of 3 masters and 3 replicas on free ports, each node in a folder of its
    own under `folder`, once every node says it is ok; and its `--redis` URL."""
    nodes = []
    for index in range(6):
        os.mkdir(node_folder := os.path.join(folder, str(index)))
        options = ["--cluster-enabled", "yes", "--cluster-port", str(free_port())]
        nodes.append(start_redis(options, node_folder))
    addresses = [url.removeprefix("redis://").removesuffix("/0") for _, url in nodes]
    create = ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "1"]
    subprocess.run([*create, "--cluster-yes"], check=True, stdout=subprocess.DEVNULL)
    for address in addresses:
        client = redis.Redis.from_url(f"redis://{address}")
        while client.cluster("info").get("cluster_state") != "ok":
            time.sleep(0.05)
    return [process for process, _ in nodes], f"redis+cluster://{addresses[0]}"


async def fill_redis(url: str, users: int, item_ids: list[str], dim: int, version: str) -> None:
    """Random float32 rows for `user-0` ... `user-<users - 1>` x `item_ids` under `version`,
    published as the current model, as a daemon writes them."""
    client = connect(url, 5.0)
    store = RedisStore(client, dim, version)
    freshness = Freshness.starting(version, time.time(), 3600, 600)
    rng = np.random.default_rng(0)
    for user in range(users):
        vectors = rng.standard_normal((len(item_ids), dim)).astype(np.float32)
        await store.write(f"user-{user}", item_ids, vectors, freshness)
    await client.set(MODEL_VERSION_KEY, version)
    await client.aclose()


def latencies(call: Callable[[int], object], seconds: float) -> list[float]:
    """Seconds each call took: `call(0)`, `call(1)`, ... back to back for `seconds`."""
    taken: list[float] = []
    end = time.perf_counter() + seconds
    for n in itertools.count():
        start = time.perf_counter()
        if start >= end:
            break
        call(n)
        taken.append(time.perf_counter() - start)
    return taken


async def calls_per_second(
    address: str,
    requests: Sequence[pb.BatchGetRequest],
    workers: int,
    seconds: float,
    per_call_seconds: float = 5.0,
) -> float:
    """BatchGets answered per second with `workers` calls in flight on one grpc.aio channel,
    the requests taken in turn (after one call to open the connection)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub: AsyncStub = EmbeddingStoreStub(channel)
        await stub.BatchGet(requests[0], timeout=per_call_seconds)
        turns = itertools.count()
        end = time.perf_counter() + seconds

        async def worker() -> int:
            done = 0
            while time.perf_counter() < end:
                await stub.BatchGet(requests[next(turns) % len(requests)], timeout=per_call_seconds)
                done += 1
            return done

        start = time.perf_counter()
        done = await asyncio.gather(*(worker() for _ in range(workers)))
        return sum(done) / (time.perf_counter() - start)
