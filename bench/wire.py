"""The BatchGet serving path's Python work, in-process (no sockets): what the gRPC face adds to
a read, in microseconds per call.

- `build`: the answer's bytes for one read, from the core's BatchResult: through the generated
  BatchGetResponse (filled with `.tolist()`, then SerializeToString, as the servicer did
  before it encoded the bytes itself), and with `converters.batch_get_bytes`.
- `handler`: the whole registered BatchGet method against a warm L1 holding every pair (ages
  spread over the hour): the request parsed from its bytes, the handler (validation, L1 read,
  request log, metrics), the response serialized.
- `ids`: `check_id_list` iterating the request's repeated field (a new string per id per
  pass), copying that field into a tuple, and `check_id_list` over the tuple.

    .venv/bin/python bench/wire.py [--items 500] [--dim 128] [--rounds 3000]

`handler` drives the method `add_to_server` registers, as grpc.aio would, with a stand-in
context that has only time_remaining().
"""

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np

from solaris.app.compose import sidecar_parts
from solaris.server.core import BatchResult, EmbeddingService
from solaris.server.grpc_api.converters import batch_get_bytes
from solaris.server.grpc_api.servicer import EmbeddingStoreHandlers, add_to_server
from solaris.server.l1 import MemoryStore
from solaris.server.settings import SidecarSettings
from solaris.server.store import FLOAT16, Freshness
from solaris.server.validation import check_id_list
from solaris.v1 import embedding_store_pb2 as pb

USER = "user-1"
METHOD = "/solaris.v1.EmbeddingStore/BatchGet"


class Deadline:
    """The parts of a ServicerContext the BatchGet handler uses; its answer counts as sent
    once built."""

    def time_remaining(self) -> float:
        return 1.0

    def add_done_callback(self, callback: Callable[[object], None]) -> None:
        callback(self)


class Registry:
    """Stands in for a grpc.aio.Server: keeps the generic handlers registered on it."""

    def __init__(self) -> None:
        self.handlers: tuple[grpc.GenericRpcHandler, ...] = ()

    def add_generic_rpc_handlers(self, handlers: tuple[grpc.GenericRpcHandler, ...]) -> None:
        self.handlers += tuple(handlers)

    def method(self, name: str) -> Any:
        details = SimpleNamespace(method=name, invocation_metadata=())
        for handler in self.handlers:
            found = handler.service(details)
            if found is not None:
                return found
        raise LookupError(name)


def micros(run: Callable[[], object], rounds: int) -> tuple[float, float]:
    """Median and p99 of `rounds` calls, microseconds."""
    taken = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        taken.append(time.perf_counter() - start)
    taken.sort()
    return statistics.median(taken) * 1e6, taken[int(len(taken) * 0.99)] * 1e6


async def amicros(run: Callable[[], Any], rounds: int) -> tuple[float, float]:
    taken = []
    for _ in range(rounds):
        start = time.perf_counter()
        await run()
        taken.append(time.perf_counter() - start)
    taken.sort()
    return statistics.median(taken) * 1e6, taken[int(len(taken) * 0.99)] * 1e6


def as_message(result: BatchResult) -> bytes:
    """The answer as the servicer built it before: the generated message, then its bytes."""
    return pb.BatchGetResponse(
        dim=result.values.shape[1],
        dtype=pb.FLOAT16 if result.values.dtype == FLOAT16 else pb.FLOAT32,
        embeddings=result.values.tobytes(),
        statuses=result.statuses.tolist(),
        model_version=result.model_version,
        ages_ms=result.ages_ms.tolist(),
    ).SerializeToString()


def store(l1: MemoryStore, ids: list[str], dim: int) -> None:
    """Every pair, computed at a spread of times within the hour (as a ranker's reads find
    them), so the ages take one to four bytes each on the wire."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((len(ids), dim)).astype(np.float32)
    now = time.time()
    for row, age in enumerate(rng.uniform(0, 3600, len(ids))):
        freshness = Freshness.starting("bench", now - age, ttl_seconds=3600, stale_seconds=600)
        l1.write_sync(USER, ids[row : row + 1], vectors[row : row + 1], freshness)


async def setup(items: int, dim: int) -> tuple[EmbeddingService, Any, list[str]]:
    """A service with every pair in L1, and the BatchGet method registered for it."""
    parts = sidecar_parts(SidecarSettings(port=0, dim=dim, metrics_port=0))
    sidecar = parts.sidecar()
    service = sidecar.service
    ids = [f"item-{n}" for n in range(items)]
    store(parts.l1, ids, dim)
    registry = Registry()
    add_to_server(EmbeddingStoreHandlers(service, sidecar.admission), registry)  # type: ignore[arg-type]
    return service, registry.method(METHOD), ids


def report(name: str, figures: tuple[float, float]) -> None:
    print(f"{name:<36} p50 {figures[0]:8.1f} us   p99 {figures[1]:8.1f} us")


async def measure(service: EmbeddingService, method: Any, ids: list[str], rounds: int) -> None:
    raw = pb.BatchGetRequest(user_id=USER, item_ids=ids, dtype=pb.FLOAT16).SerializeToString()
    context = Deadline()

    async def call() -> bytes:
        answer = await method.unary_unary(method.request_deserializer(raw), context)
        return method.response_serializer(answer)  # type: ignore[no-any-return]

    parsed = pb.BatchGetResponse.FromString(await call())
    assert list(parsed.statuses) == [pb.HIT] * len(ids), "every pair should be a HIT"
    result = await service.batch_get(USER, ids, FLOAT16)
    request = pb.BatchGetRequest.FromString(raw)
    once = tuple(request.item_ids)
    limits = service.settings.max_items, service.settings.max_id_bytes
    report("build: message + SerializeToString", micros(lambda: as_message(result), rounds))
    report("build: converters.batch_get_bytes", micros(lambda: batch_get_bytes(result), rounds))
    report("handler: parse + BatchGet + bytes", await amicros(call, rounds))
    report(
        "ids: check_id_list(repeated field)",
        micros(lambda: check_id_list("item_ids", request.item_ids, *limits), rounds),
    )
    report("ids: tuple(repeated field)", micros(lambda: tuple(request.item_ids), rounds))
    report(
        "ids: check_id_list(tuple)",
        micros(lambda: check_id_list("item_ids", once, *limits), rounds),
    )


async def main(items: int, dim: int, rounds: int) -> None:
    service, method, ids = await setup(items, dim)
    print(f"{items} items x {dim} dims float16, {rounds} rounds each; the second pass is warm")
    for _ in range(2):
        await measure(service, method, ids, rounds)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3000)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.items, arguments.dim, arguments.rounds))
