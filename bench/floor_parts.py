"""Where serve-only's BatchGet spends its time beyond the bare grpc.aio floor (bench/floor.py's
contenders 1 and 2), with two servers between them, interleaved in one run.

    .venv/bin/python bench/floor_parts.py [--seconds 1] [--rounds 7]

Contenders, each in its own process, 500 items x 128 dims float16, one user, every row a hit:
  floor: as floor.py's, a bare grpc.aio server answering the bytes of a warm solaris answer;
  floor + lookup: the same server doing, each call, the least a Python server answering from
    a hashed index must: make the request's ids into strings, hash them, find them in a sorted
    index, gather their rows from a 100,000-row table and join the answer's bytes;
  solaris, core stubbed: serve-only whose core answers one read it made at start: what is left
    is the servicer (admission, deadline, errors), the serializer and the sidecar's server;
  solaris serve-only: floor.py's contender 2.

Each figure as in floor.py (p50 and p99 of back-to-back calls, calls/s with 16 in flight, the
median over the rounds, the order rotating), and the server's CPU per call with 16 in flight
(its utime + stime from /proc): what a call costs the server, whatever else the machine runs.
"""

import argparse
import asyncio
import contextlib
import os
import statistics
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import grpc
import numpy as np
from _common import calls_per_second, latencies
from floor import DIM, ITEMS, RANKER, SERVE_ONLY, SPAWN, VERSION, requests_for, sidecar_grpc_options

from solaris.v1 import embedding_store_pb2 as pb
from solaris.v1.embedding_store_pb2_grpc import EmbeddingStoreStub

TABLE_ROWS = 100_000
REQUEST = requests_for([RANKER])[0]


# ---- the servers, each in a process of its own; each sends (port, pid) when it serves ----


def run_sidecar(stubbed: bool, ready: Connection) -> None:
    from solaris.app.compose import build_sidecar
    from solaris.server.store import FLOAT16

    async def main() -> None:
        sidecar = build_sidecar(SERVE_ONLY)
        await sidecar.start()
        vectors = np.random.default_rng(0).standard_normal((len(ITEMS), DIM), np.float32)
        await sidecar.service.put(RANKER, ITEMS, vectors, VERSION)
        if stubbed:
            read = await sidecar.service.batch_get(RANKER, tuple(ITEMS), FLOAT16)

            async def batch_get(*_: object) -> Any:
                return read

            sidecar.service.batch_get = batch_get  # type: ignore[method-assign]
        ready.send((sidecar.port, os.getpid()))
        await asyncio.Event().wait()

    asyncio.run(main())


def run_floor(answer: bytes, lookup: bool, ready: Connection) -> None:
    """floor.py's floor; with `lookup`, making its answer as a hashed index would."""
    embeddings = pb.BatchGetResponse.FromString(answer).embeddings
    start = answer.index(embeddings)
    head, tail = answer[:start], answer[start + len(embeddings) :]
    rng = np.random.default_rng(0)
    table = rng.standard_normal((TABLE_ROWS, DIM)).astype(np.float16)
    held = np.sort(np.fromiter(map(hash, ITEMS), np.int64, len(ITEMS)))
    held_rows = rng.permutation(TABLE_ROWS)[: len(ITEMS)].astype(np.int32)

    async def batch_get(request: pb.BatchGetRequest, context: object) -> bytes:
        if not lookup:
            return answer
        ids = tuple(request.item_ids)
        hashes = np.fromiter(map(hash, ids), np.int64, len(ids))
        order = hashes.argsort()
        rows = np.empty(len(ids), np.int32)
        rows[order] = held_rows.take(held.searchsorted(hashes.take(order)), mode="clip")
        return b"".join((head, table.take(rows, axis=0).data, tail))

    asyncio.run(serve(batch_get, ready))


async def serve(
    batch_get: Callable[[pb.BatchGetRequest, Any], Awaitable[bytes]], ready: Connection
) -> None:
    server = grpc.aio.server(options=sidecar_grpc_options(SERVE_ONLY.max_message_bytes))
    handler = grpc.unary_unary_rpc_method_handler(
        batch_get, request_deserializer=pb.BatchGetRequest.FromString
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("solaris.v1.EmbeddingStore", {"BatchGet": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    ready.send((port, os.getpid()))
    await server.wait_for_termination()


def start(stack: contextlib.ExitStack, target: Callable[..., None], *args: object) -> "Server":
    receive, send = SPAWN.Pipe(duplex=False)
    process = SPAWN.Process(target=target, args=(*args, send), daemon=True)
    process.start()
    stack.callback(process.join, 10)
    stack.callback(process.terminate)
    port, pid = receive.recv()
    return Server(f"127.0.0.1:{port}", pid)


# ---- measurement ----


@dataclass
class Server:
    address: str
    pid: int
    rounds: list[tuple[float, float, float, float]] = field(default_factory=list)
    """(p50 ms, p99 ms, calls/s at 16, server CPU us per call at 16) per round."""

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def measure(self, seconds: float) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = EmbeddingStoreStub(channel)
            taken = latencies(lambda _: stub.BatchGet(REQUEST, timeout=5), seconds)
        before = self.cpu_seconds()
        rate = asyncio.run(calls_per_second(self.address, [REQUEST], 16, seconds))
        cpu = (self.cpu_seconds() - before) / (rate * seconds) * 1e6
        cuts = statistics.quantiles(taken, n=100)
        self.rounds.append((cuts[49] * 1e3, cuts[98] * 1e3, rate, cpu))

    def medians(self) -> list[float]:
        return [statistics.median(figure) for figure in zip(*self.rounds, strict=True)]


def main() -> None:
    load = os.getloadavg()[0]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="Seconds per figure a round.")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        serve_only = start(stack, run_sidecar, False)
        with grpc.insecure_channel(serve_only.address) as channel:
            answer = EmbeddingStoreStub(channel).BatchGet(REQUEST, timeout=5).SerializeToString()
        servers = {
            "floor": start(stack, run_floor, answer, False),
            "floor + lookup": start(stack, run_floor, answer, True),
            "solaris, core stubbed": start(stack, run_sidecar, True),
            "solaris serve-only": serve_only,
        }
        order = list(servers.values())
        for server in order:
            server.measure(0.3)
            server.rounds.clear()
        for turn in range(args.rounds):
            for server in order[turn % len(order) :] + order[: turn % len(order)]:
                server.measure(args.seconds)
    print(f"BatchGet 500 x {DIM} float16: medians of {args.rounds} interleaved rounds of")
    print(f"{args.seconds:g} s per figure; {os.cpu_count()} CPUs, load average {load:.2f} at start")
    print()
    print("| server | p50 ms | p99 ms | calls/s at 16 | server CPU us a call at 16 | vs floor |")
    print("| --- | --- | --- | --- | --- | --- |")
    floor = servers["floor"].medians()
    for name, server in servers.items():
        p50, p99, rate, cpu = server.medians()
        ratios = f"p50 {p50 / floor[0]:.2f}x, calls/s {rate / floor[2]:.2f}x"
        print(f"| {name} | {p50:.2f} | {p99:.2f} | {rate:.0f} | {cpu:.0f} | {ratios} |")


if __name__ == "__main__":
    main()
