"""The shared store and queue on Redis, against what a user would build without us.

In one run, on a redis-server of its own:
  1. `BatchGet` of 500 items x 128 float32 answered from Redis (L1 cold: each call is for
     another user), beside the ranker doing the MGET itself with redis-py on the same keys
     and decoding the same values; and the sidecar's L1-warm answer for scale.
  2. How fast one and two `solaris precompute` daemons (reference model, CPU) drain the same
     backlog from the work stream.

    .venv/bin/python bench/redis_l2.py [--calls 400] [--users 40] [--tasks 150]
"""

import argparse
import asyncio
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import grpc
import numpy as np
import redis
from _common import fill_redis, start_redis

from solaris.precompute.export import reference_model
from solaris.server.prefetch_queue import PrefetchTask
from solaris.server.redis_store import (
    connect,
    pair_key,
    value_layout,
)
from solaris.server.work_stream import STREAM_KEY, StreamWorkQueue
from solaris.v1 import embedding_store_pb2 as pb
from solaris.v1.embedding_store_pb2_grpc import EmbeddingStoreStub

DIM = 128
ITEMS = 500
VERSION = "bench"


def items() -> list[str]:
    return [f"item-{n}" for n in range(ITEMS)]


def run_sidecar(url: str, ready: "multiprocessing.connection.Connection") -> None:
    from solaris.app.compose import build_sidecar
    from solaris.server.settings import SidecarSettings

    async def main() -> None:
        # An L1 of 1 MiB holds about two users' rows: cycling through many users keeps it cold.
        settings = SidecarSettings(port=0, redis=url, cache_bytes=1024**2, redis_timeout_ms=1000)
        sidecar = build_sidecar(settings)
        await sidecar.start()
        ready.send(sidecar.port)
        await asyncio.Event().wait()

    asyncio.run(main())


def timings(call: Callable[[int], object], count: int) -> list[float]:
    taken = []
    for n in range(count):
        start = time.perf_counter()
        call(n)
        taken.append(time.perf_counter() - start)
    return taken


def summary(taken: list[float]) -> str:
    cuts = statistics.quantiles(taken, n=100)
    return f"p50 {cuts[49] * 1e3:6.2f} ms   p99 {cuts[98] * 1e3:6.2f} ms"


def read_path(url: str, users: int, calls: int) -> None:
    asyncio.run(fill_redis(url, users, items(), DIM, VERSION))
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    server = context.Process(target=run_sidecar, args=(url, send), daemon=True)
    server.start()
    direct = redis.Redis.from_url(url)
    layout = value_layout(DIM)
    ids = items()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{receive.recv()}") as channel:
            stub = EmbeddingStoreStub(channel)

            def sidecar_cold(n: int) -> None:
                request = pb.BatchGetRequest(user_id=f"user-{n % users}", item_ids=ids)
                answer = stub.BatchGet(request, timeout=5)
                assert pb.MISS not in answer.statuses
                np.frombuffer(answer.embeddings, np.float32).reshape(ITEMS, DIM)

            def sidecar_warm(n: int) -> None:
                request = pb.BatchGetRequest(user_id="user-0", item_ids=ids)
                np.frombuffer(stub.BatchGet(request, timeout=5).embeddings, np.float32)

            def ranker_mget(n: int) -> None:
                user = f"user-{n % users}"
                blobs = direct.mget([pair_key(VERSION, user, item) for item in ids])
                np.frombuffer(b"".join(blobs), layout)["values"]

            sidecar_cold(0)
            cold, mget = [], []
            for _ in range(4):
                cold += timings(sidecar_cold, calls // 4)
                mget += timings(ranker_mget, calls // 4)
            warm = timings(sidecar_warm, calls)
    finally:
        server.terminate()
    print(f"BatchGet {ITEMS} x {DIM} float32 from Redis, {calls} calls each, {users} users")
    print(f"  sidecar, L1 cold (Redis MGET) : {summary(cold)}")
    print(f"  ranker's own redis-py MGET    : {summary(mget)}")
    print(f"  sidecar, L1 warm (for scale)  : {summary(warm)}")


def drain_rate(url: str, daemons: int, tasks: int, model_dir: str) -> float:
    client = redis.Redis.from_url(url)
    client.flushall()
    command = [sys.executable, "-m", "solaris.app.cli", "--log-level", "WARNING"]
    command += ["precompute", "--redis", url, "--model-dir", model_dir, "--batch-pairs", "256"]
    processes = [subprocess.Popen(command) for _ in range(daemons)]
    try:
        while consumers(client) < daemons:
            time.sleep(0.1)
        work = [
            PrefetchTask(f"drain-{n}", tuple(f"cand-{k}" for k in range(32)), ("h1", "h2"))
            for n in range(tasks)
        ]
        start = time.perf_counter()
        asyncio.run(submit(url, work))
        while not drained(client, tasks):
            time.sleep(0.02)
        return tasks * 32 / (time.perf_counter() - start)
    finally:
        for process in processes:
            process.terminate()
            process.wait()


def consumers(client: redis.Redis) -> int:
    """Daemons ready for work: connections blocked in XREADGROUP on the stream."""
    return sum(1 for info in client.client_list() if info.get("cmd") == "xreadgroup")


def drained(client: redis.Redis, tasks: int) -> bool:
    [group] = client.xinfo_groups(STREAM_KEY)
    return group["entries-read"] == tasks and group["pending"] == 0


async def submit(url: str, tasks: list[PrefetchTask]) -> None:
    client = connect(url, 5.0)
    queue = StreamWorkQueue(client, 1024**3, 256, 5.0)
    for task in tasks:
        await queue.submit(task)
    await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--users", type=int, default=40)
    parser.add_argument("--tasks", type=int, default=150)
    parser.add_argument("--model-dir", default=tempfile.gettempdir() + "/solaris-bench")
    args = parser.parse_args()
    reference_model(args.model_dir)
    process, url = start_redis()
    try:
        read_path(url, args.users, args.calls)
        one = drain_rate(url, 1, args.tasks, args.model_dir)
        two = drain_rate(url, 2, args.tasks, args.model_dir)
    finally:
        process.kill()
    print(f"Draining {args.tasks} tasks x 32 candidates from the stream (reference model, CPU)")
    print(f"  one daemon : {one:8,.0f} pairs/s")
    print(f"  two daemons: {two:8,.0f} pairs/s   ({two / one:.2f}x)")


if __name__ == "__main__":
    main()
