"""How long `solaris.redis` health takes to follow Redis while every read is an L1 hit: a real
`solaris serve --redis` process, a redis-server of its own killed (SIGKILL: connections
refused) or hung (SIGSTOP: nothing answers), then brought back. Prints the seconds to
NOT_SERVING and back to SERVING, each way, `--runs` times.

    .venv/bin/python bench/redis_health.py [--runs 3]
"""

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import grpc
from _common import fill_redis, free_port, start_redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from solaris.v1 import embedding_store_pb2 as pb
from solaris.v1.embedding_store_pb2_grpc import EmbeddingStoreStub

DIM = 8
ITEMS = [f"item-{i}" for i in range(8)]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def redis_status(health: health_pb2_grpc.HealthStub) -> int:
    request = health_pb2.HealthCheckRequest(service="solaris.redis")
    try:
        return int(health.Check(request, timeout=1).status)
    except grpc.RpcError:
        return -1


def until(
    health: health_pb2_grpc.HealthStub, status: int, read: Callable[[], object] | None = None
) -> float:
    """Seconds until `solaris.redis` reports `status`, reading (L1 hits) all the while."""
    began = time.monotonic()
    while redis_status(health) != status:
        if read is not None:
            read()
        time.sleep(0.005)
    return time.monotonic() - began


def one_run(how: str) -> tuple[float, float]:
    redis_server, url = start_redis()
    asyncio.run(fill_redis(url, 1, ITEMS, DIM, "v1"))
    port = free_port()
    command = [sys.executable, "-m", "solaris.app.cli", "serve", "--precompute", "false"]
    command += ["--port", str(port), "--redis", url, "--dim", str(DIM), "--grace-seconds", "0"]
    sidecar = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health, stub = health_pb2_grpc.HealthStub(channel), EmbeddingStoreStub(channel)
            until(health, SERVING)
            request = pb.BatchGetRequest(user_id="user-0", item_ids=ITEMS)
            while set(stub.BatchGet(request, timeout=5).statuses) != {pb.HIT}:
                time.sleep(0.05)
            os.kill(redis_server.pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
            down = until(health, NOT_SERVING, lambda: stub.BatchGet(request, timeout=5))
            if how == "kill":
                redis_server.wait()
                redis_server = subprocess.Popen(redis_server.args, stdout=subprocess.DEVNULL)
            else:
                os.kill(redis_server.pid, signal.SIGCONT)
            return down, until(health, SERVING)
    finally:
        sidecar.send_signal(signal.SIGTERM)
        sidecar.wait()
        redis_server.kill()
        redis_server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    runs = parser.parse_args().runs
    for how in ("kill", "stop"):
        for _ in range(runs):
            down, up = one_run(how)
            print(f"redis {how:4}: NOT_SERVING after {down:.2f} s, SERVING again after {up:.2f} s")


if __name__ == "__main__":
    main()
