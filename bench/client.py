"""What the client costs over a bare stub, and how fast it falls back when the sidecar is down.

In one run: `BatchGet` of 500 items x 128 dims (all hits, float32 on the wire) through a bare
generated stub (building the request and viewing the answer as an array, the least a ranker
would write) and through `EmbeddingClient`, alternating in rounds so both see the same machine.
Then the time a call takes to return fallback rows when nothing listens, with the breaker
closed (each call tries the connection) and open (each call is skipped).

    .venv/bin/python bench/client.py [--items 500] [--dim 128] [--seconds 4]
"""

import argparse
import multiprocessing
import socket
import statistics
import time
from collections.abc import Callable

import grpc
import numpy as np
from batch_get import USER, item_ids, run_sidecar

from solaris.clients import ClientOptions, EmbeddingClient, FallbackReason
from solaris.v1 import embedding_store_pb2 as pb
from solaris.v1.embedding_store_pb2_grpc import EmbeddingStoreStub

ROUNDS = 10


def timings(call: Callable[[], object], count: int) -> list[float]:
    taken = []
    for _ in range(count):
        start = time.perf_counter()
        call()
        taken.append(time.perf_counter() - start)
    return taken


def summary(taken: list[float]) -> str:
    cuts = statistics.quantiles(taken, n=100)
    return f"p50 {cuts[49] * 1e6:8,.0f} µs   p99 {cuts[98] * 1e6:8,.0f} µs"


def overhead(address: str, items: int, dim: int, seconds: float) -> None:
    ids = item_ids(items)
    with (
        grpc.insecure_channel(address) as channel,
        EmbeddingClient(address, dim, deadline=1) as client,
    ):
        stub = EmbeddingStoreStub(channel)

        def bare_call() -> np.ndarray:
            request = pb.BatchGetRequest(user_id=USER, item_ids=ids, dtype=pb.FLOAT32)
            answer = stub.BatchGet(request, timeout=1)
            return np.frombuffer(answer.embeddings, np.float32).reshape(items, dim)

        client_call = lambda: client.batch_get(USER, ids)  # noqa: E731
        assert client_call().fallback_reason is None
        per_round = max(1, int(seconds / ROUNDS / timings(bare_call, 20)[-1]))
        bare, wrapped = [], []
        for _ in range(ROUNDS):
            bare += timings(bare_call, per_round)
            wrapped += timings(client_call, per_round)
    print(f"BatchGet {items} x {dim} float32, all hits, {len(bare)} calls each")
    print(f"  bare stub            : {summary(bare)}")
    print(f"  EmbeddingClient      : {summary(wrapped)}")
    extra = statistics.median(wrapped) - statistics.median(bare)
    print(f"  client overhead (p50): {extra * 1e6:,.0f} µs (checks, copy, statuses, counters)")


def time_to_fallback(items: int, dim: int, calls: int) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{probe.getsockname()[1]}"
    ids = item_ids(items)
    never_opens = ClientOptions(failures_to_open=10**9)
    opens = ClientOptions(failures_to_open=1, open_seconds=3600)
    print(f"Time to fallback rows ({items} x {dim} zeros), nothing listening, {calls} calls")
    for label, options, reason in (
        ("breaker closed", never_opens, FallbackReason.UNAVAILABLE),
        ("breaker open  ", opens, FallbackReason.BREAKER_OPEN),
    ):
        with EmbeddingClient(dead, dim, deadline=0.05, options=options) as client:
            client.batch_get(USER, ids)
            assert client.batch_get(USER, ids).fallback_reason is reason
            print(f"  {label}: {summary(timings(lambda: client.batch_get(USER, ids), calls))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    server = context.Process(target=run_sidecar, args=(args.items, args.dim, send), daemon=True)
    server.start()
    try:
        overhead(f"127.0.0.1:{receive.recv()}", args.items, args.dim, args.seconds)
    finally:
        server.terminate()
    time_to_fallback(args.items, args.dim, calls=2_000)


if __name__ == "__main__":
    main()
