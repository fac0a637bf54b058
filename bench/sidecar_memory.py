"""What a serve-only sidecar uses beside its L1, with the Kubernetes settings (1Gi limit,
cache fraction 0.5, Redis; the rest from k8s/base/settings.env).

On a redis-server of its own, it stores more pairs than L1 holds (as a daemon would), starts
`solaris serve` as a real process, reads every pair through BatchGet (500 items a call, one
user a call) so that L1 fills from Redis, then keeps serving concurrent BatchGets, each shipped
to the request stream. It samples the process's RSS and, from /metrics, the L1's bytes; VmHWM
is the peak.

    .venv/bin/python bench/sidecar_memory.py [--calls 12000] [--concurrency 8]
"""

import argparse
import asyncio
import math
import os
import random
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from _common import free_port, start_redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from solaris.server.redis_store import MODEL_VERSION_KEY, RedisStore, connect
from solaris.server.store import Freshness
from solaris.v1 import embedding_store_pb2 as pb
from solaris.v1.embedding_store_pb2_grpc import EmbeddingStoreStub

DIM = 128
ITEMS = 500
CATALOGUE = 1_000_000
VERSION = "bench"
LIMIT = 1024**3
FRACTION = 0.5
MiB = 1024**2
# The generated stub is typed for a blocking channel; on a grpc.aio one its calls are awaited.
AsyncStub = Any
SETTINGS_ENV = Path(__file__).resolve().parent.parent / "k8s" / "base" / "settings.env"


def items_of(user: int) -> list[str]:
    """A user's candidates: 500 distinct items of a catalogue of a million, the same each run."""
    picks = np.random.default_rng(user).choice(CATALOGUE, ITEMS, replace=False)
    return [f"item-{pick:07d}" for pick in picks]


async def fill_redis(url: str, users: int) -> None:
    """Every user's pairs under VERSION, published as the current model, as a daemon does."""
    client = connect(url, 10.0)
    store = RedisStore(client, DIM, VERSION)
    freshness = Freshness.starting(VERSION, time.time(), 3600, 600)
    rng = np.random.default_rng(0)
    for user in range(users):
        vectors = rng.standard_normal((ITEMS, DIM), np.float32)
        await store.write(f"user-{user:06d}", items_of(user), vectors, freshness)
    await client.set(MODEL_VERSION_KEY, VERSION)
    await client.aclose()


def k8s_environment() -> dict[str, str]:
    """settings.env as the ConfigMap gives it; the flags below override what they name."""
    lines = SETTINGS_ENV.read_text().splitlines()
    pairs = [line.split("=", 1) for line in lines if "=" in line and not line.startswith("#")]
    return {name: value for name, value in pairs}


def start_sidecar(url: str, port: int, metrics_port: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "solaris.app.cli", "serve", "--precompute", "false"]
    command += ["--redis", url, "--memory-limit", "1Gi", "--cache-fraction", str(FRACTION)]
    command += ["--port", str(port), "--metrics-port", str(metrics_port), "--dim", str(DIM)]
    environment = {**os.environ, **k8s_environment()}
    return subprocess.Popen(command, env=environment, stderr=subprocess.DEVNULL)


def wait_serving(port: int) -> None:
    request = health_pb2.HealthCheckRequest(service="")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(600):
            try:
                if health.Check(request, timeout=0.5).status == 1:
                    return
            except grpc.RpcError:
                time.sleep(0.1)
    raise RuntimeError("the sidecar never became healthy")


def status_bytes(pid: int, field: str) -> int:
    """A `kB` line of /proc/<pid>/status (VmRSS, VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for {pid}")


def l1_bytes(metrics_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as page:
        for line in page.read().decode().splitlines():
            if line.startswith("solaris_l1_bytes "):
                return int(float(line.split()[1]))
    raise RuntimeError("no solaris_l1_bytes in /metrics")


class Sampler(threading.Thread):
    """Samples (RSS, L1 bytes) every half second until stopped."""

    def __init__(self, pid: int, metrics_port: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.metrics_port = pid, metrics_port
        self.samples: list[tuple[int, int]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.5):
            rss = status_bytes(self.pid, "VmRSS")
            self.samples.append((rss, l1_bytes(self.metrics_port)))


async def batch_get(stub: AsyncStub, user: int) -> int:
    """Misses in one BatchGet of a user's candidates (a Redis read past its deadline misses)."""
    request = pb.BatchGetRequest(user_id=f"user-{user:06d}", item_ids=items_of(user))
    answer = await stub.BatchGet(request, timeout=10)
    return sum(status == pb.MISS for status in answer.statuses)


async def read_all(stub: AsyncStub, users: int) -> int:
    """Reads every user's pairs until none misses; returns the calls made."""
    calls = 0
    for user in range(users):
        for _ in range(20):
            calls += 1
            if await batch_get(stub, user) == 0:
                break
    return calls


async def keep_serving(stub: AsyncStub, users: int, calls: int, workers: int) -> None:
    """`calls` BatchGets of random users, `workers` at a time."""

    async def worker(share: int) -> None:
        for _ in range(share):
            await batch_get(stub, random.randrange(users))

    await asyncio.gather(*(worker(calls // workers) for _ in range(workers)))


async def traffic(port: int, users: int, calls: int, workers: int) -> int:
    options = [("grpc.max_receive_message_length", 64 * MiB)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        stub = EmbeddingStoreStub(channel)
        filling = await read_all(stub, users)
        await keep_serving(stub, users, calls, workers)
    return filling + calls


def report(pid: int, idle_rss: int, sampler: Sampler, calls: int) -> None:
    cap = int(LIMIT * FRACTION)
    peak = status_bytes(pid, "VmHWM")
    rss, held = sampler.samples[-1]
    beside = max(sampled - l1 for sampled, l1 in sampler.samples)
    print(f"{calls} BatchGets of {ITEMS} items; limit {LIMIT / MiB:.0f} MiB")
    print(f"L1 cap                 {cap / MiB:7.1f} MiB")
    print(f"L1 bytes at the end    {held / MiB:7.1f} MiB")
    print(f"RSS at idle            {idle_rss / MiB:7.1f} MiB")
    print(f"RSS at the end         {rss / MiB:7.1f} MiB")
    print(f"peak RSS (VmHWM)       {peak / MiB:7.1f} MiB")
    print(f"peak RSS - L1 bytes    {(peak - held) / MiB:7.1f} MiB beside L1")
    print(f"most RSS - L1, sampled {beside / MiB:7.1f} MiB")
    if peak > LIMIT:
        print(f"PEAK RSS IS PAST THE LIMIT by {(peak - LIMIT) / MiB:.1f} MiB")


def stop(sidecar: subprocess.Popen[bytes]) -> None:
    """SIGTERM, as the kubelet sends it; past the pod's 30 s grace, SIGKILL, said aloud."""
    sidecar.terminate()
    try:
        sidecar.wait(timeout=30)
    except subprocess.TimeoutExpired:
        print("the sidecar did not exit within 30 s of SIGTERM: killed")
        sidecar.kill()
        sidecar.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=12_000, help="BatchGets after the fill.")
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    # An L1 entry costs at least its float32 and float16 copies: this many users overfill it.
    users = math.ceil(LIMIT * FRACTION / (DIM * 6) / ITEMS) + 1
    redis_server, url = start_redis()
    sidecar = None
    try:
        asyncio.run(fill_redis(url, users))
        port, metrics_port = free_port(), free_port()
        sidecar = start_sidecar(url, port, metrics_port)
        wait_serving(port)
        time.sleep(2)
        idle_rss = status_bytes(sidecar.pid, "VmRSS")
        sampler = Sampler(sidecar.pid, metrics_port)
        sampler.start()
        calls = asyncio.run(traffic(port, users, args.calls, args.concurrency))
        sampler.stopped.set()
        sampler.join()
        report(sidecar.pid, idle_rss, sampler, calls)
    finally:
        if sidecar is not None:
            stop(sidecar)
        redis_server.terminate()
        redis_server.wait()


if __name__ == "__main__":
    main()
