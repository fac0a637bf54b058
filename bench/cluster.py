"""BatchGet from a Redis Cluster against a single Redis node, in one run.

Starts a redis-server and a cluster of 3 masters and 3 replicas (all on this machine), fills
both with the same users' pairs (500 items x 128 float32 each), runs a sidecar on each, and
times BatchGets with L1 cold (each call for another user, so each is one MGET), the two
sidecars taking turns in rounds. The floor is redis-py's own MGET of the same keys on each.

    .venv/bin/python bench/cluster.py [--calls 400] [--users 40]
"""

import argparse
import asyncio
import multiprocessing
import tempfile
from collections.abc import Callable

import grpc
import numpy as np
import redis
import redis.cluster
from _common import fill_redis, start_cluster, start_redis
from redis_l2 import run_sidecar, summary, timings

from solaris.server.redis_store import node_url, pair_key, value_layout
from solaris.v1 import embedding_store_pb2 as pb
from solaris.v1.embedding_store_pb2_grpc import EmbeddingStoreStub

DIM = 128
ITEMS = 500
VERSION = "bench"
ROUNDS = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--users", type=int, default=40)
    args = parser.parse_args()
    ids = [f"item-{n}" for n in range(ITEMS)]
    single, single_url = start_redis()
    folder = tempfile.TemporaryDirectory(prefix="solaris-bench-cluster-")
    cluster, cluster_url = start_cluster(folder.name)
    context = multiprocessing.get_context("spawn")
    sidecars = []
    try:
        calls: dict[str, tuple[Callable[[int], None], Callable[[int], None]]] = {}
        for name, url in (("single node", single_url), ("cluster", cluster_url)):
            asyncio.run(fill_redis(url, args.users, ids, DIM, VERSION))
            receive, send = context.Pipe(duplex=False)
            sidecar = context.Process(target=run_sidecar, args=(url, send), daemon=True)
            sidecar.start()
            sidecars.append(sidecar)
            calls[name] = (batch_get(receive.recv(), ids, args.users), mget(url, ids, args.users))
        taken: dict[str, list[float]] = {f"{name} {kind}": [] for name in calls for kind in "sm"}
        for sidecar_call, mget_call in calls.values():  # connections opened, not timed
            sidecar_call(0)
            mget_call(0)
        for _ in range(ROUNDS):
            for name, (sidecar_call, mget_call) in calls.items():
                taken[f"{name} s"] += timings(sidecar_call, args.calls // ROUNDS)
                taken[f"{name} m"] += timings(mget_call, args.calls // ROUNDS)
    finally:
        for sidecar in sidecars:
            sidecar.terminate()
        for process in [single, *cluster]:
            process.kill()
        folder.cleanup()
    print(f"BatchGet {ITEMS} x {DIM} float32, L1 cold, {args.calls} calls each, {args.users} users")
    for name in calls:
        print(f"  {name:11}: sidecar  {summary(taken[f'{name} s'])}")
        print(f"  {'':11}  floor: redis-py MGET  {summary(taken[f'{name} m'])}")


def batch_get(port: int, ids: list[str], users: int) -> Callable[[int], None]:
    stub = EmbeddingStoreStub(grpc.insecure_channel(f"127.0.0.1:{port}"))

    def call(n: int) -> None:
        answer = stub.BatchGet(pb.BatchGetRequest(user_id=f"user-{n % users}", item_ids=ids))
        assert pb.MISS not in answer.statuses
        np.frombuffer(answer.embeddings, np.float32).reshape(ITEMS, DIM)

    return call


def mget(url: str, ids: list[str], users: int) -> Callable[[int], None]:
    """The floor: the same MGET with redis-py (one slot: a cluster client sends it whole)."""
    client: redis.Redis | redis.cluster.RedisCluster = (
        redis.cluster.RedisCluster.from_url(node_url(url))
        if url.startswith("redis+cluster")
        else redis.Redis.from_url(url)
    )
    layout = value_layout(DIM, VERSION)

    def call(n: int) -> None:
        blobs = client.mget([pair_key(VERSION, f"user-{n % users}", item) for item in ids])
        np.frombuffer(b"".join(blobs), layout)["values"]

    return call


if __name__ == "__main__":
    main()
