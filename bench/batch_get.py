"""BatchGet of 500 items x 128 dims float16, all hits, from a Python client over loopback.

Prints p50/p99 latency at concurrency 1, calls per second at concurrency 1 and 16, and, in
the same run, what encoding and decoding the same answer costs as packed bytes versus as
`repeated float`. The sidecar runs in its own process, as it does beside a ranker.

    .venv/bin/python bench/batch_get.py [--items 500] [--dim 128] [--seconds 5]
"""

import argparse
import asyncio
import multiprocessing
import statistics
import time
from collections.abc import Callable

import grpc
import numpy as np
from _common import calls_per_second, latencies
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from solaris.app.compose import build_sidecar
from solaris.server.settings import SidecarSettings
from solaris.v1 import embedding_store_pb2 as pb
from solaris.v1.embedding_store_pb2_grpc import EmbeddingStoreStub

USER = "user-1"


def item_ids(count: int) -> list[str]:
    return [f"item-{n}" for n in range(count)]


def run_sidecar(items: int, dim: int, ready: "multiprocessing.connection.Connection") -> None:
    async def main() -> None:
        sidecar = build_sidecar(SidecarSettings(port=0, dim=dim))
        await sidecar.start()
        vectors = np.random.default_rng(0).standard_normal((items, dim)).astype(np.float32)
        await sidecar.service.put(USER, item_ids(items), vectors, "bench")
        ready.send(sidecar.port)
        await asyncio.Event().wait()

    asyncio.run(main())


def repeated_float_type() -> type:
    """A message with one `repeated float` field: the encoding packed bytes replace."""
    file = descriptor_pb2.FileDescriptorProto(
        name="bench_rows.proto", package="bench", syntax="proto3"
    )
    message = file.message_type.add(name="Rows")
    message.field.add(
        name="values",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("bench.Rows"))


def best_of(action: Callable[[], object], repeats: int = 200) -> float:
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def encoding_costs(items: int, dim: int) -> tuple[float, float]:
    """Median seconds to encode then decode one answer: (packed float16 bytes, repeated float)."""
    values = np.random.default_rng(1).standard_normal((items, dim)).astype(np.float32)
    rows_type = repeated_float_type()

    def packed() -> np.ndarray:
        wire = pb.BatchGetResponse(
            dim=dim, dtype=pb.FLOAT16, embeddings=values.astype("<f2").tobytes()
        )
        back = pb.BatchGetResponse.FromString(wire.SerializeToString())
        return np.frombuffer(back.embeddings, "<f2").reshape(-1, dim).astype(np.float32)

    def repeated() -> np.ndarray:
        wire = rows_type(values=values.ravel().tolist())
        back = rows_type.FromString(wire.SerializeToString())
        return np.array(back.values, dtype=np.float32).reshape(-1, dim)

    np.testing.assert_allclose(packed(), repeated(), atol=1e-2)
    return best_of(packed), best_of(repeated)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()

    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    server = context.Process(target=run_sidecar, args=(args.items, args.dim, send), daemon=True)
    server.start()
    address = f"127.0.0.1:{receive.recv()}"
    request = pb.BatchGetRequest(user_id=USER, item_ids=item_ids(args.items), dtype=pb.FLOAT16)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = EmbeddingStoreStub(channel)
            warm = stub.BatchGet(request)
            assert list(warm.statuses) == [pb.HIT] * args.items
            latencies(lambda n: stub.BatchGet(request, timeout=1), 1.0)
            taken = latencies(lambda n: stub.BatchGet(request, timeout=1), args.seconds)
        concurrent = asyncio.run(calls_per_second(address, [request], 16, args.seconds))
    finally:
        server.terminate()
    packed, repeated = encoding_costs(args.items, args.dim)

    quantiles = statistics.quantiles(taken, n=100)
    print(f"BatchGet {args.items} items x {args.dim} dims float16, all hits, loopback")
    print(
        f"  concurrency 1 : p50 {quantiles[49] * 1e3:.3f} ms  p99 {quantiles[98] * 1e3:.3f} ms"
        f"  {len(taken) / args.seconds:,.0f} calls/s"
    )
    print(f"  concurrency 16: {concurrent:,.0f} calls/s (grpc.aio client)")
    print("Encode + decode of the same answer, in-process (median)")
    print(f"  packed float16 bytes: {packed * 1e6:8.1f} us")
    print(f"  repeated float      : {repeated * 1e6:8.1f} us  ({repeated / packed:.1f}x packed)")


if __name__ == "__main__":
    main()
