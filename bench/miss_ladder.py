"""What the miss ladder costs a read: the core's BatchGet (no gRPC) of 500 items for a user
holding some pairs, plain misses (the floor) beside enriched ones, for a user whose aggregate
fills every miss and for a cold user whose misses go to the item tier and the global mean.

    .venv/bin/python bench/miss_ladder.py [--reads 2000] [--hit-share 0.4]
"""

import argparse
import asyncio
import statistics
import time

import numpy as np

from solaris.server.aggregates import RowTier
from solaris.server.core import EmbeddingService
from solaris.server.l1 import MemoryStore
from solaris.server.prefetch_queue import PrefetchQueue
from solaris.server.request_log import RequestLog
from solaris.server.settings import SidecarSettings
from solaris.server.store import FLOAT16

DIM, ITEMS, USERS = 128, 500, 200


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=2000)
    parser.add_argument("--hit-share", type=float, default=0.4)
    args = parser.parse_args()
    asyncio.run(run(args.reads, args.hit_share))


async def run(reads: int, hit_share: float) -> None:
    settings = SidecarSettings(dim=DIM, cache_bytes=1024**3, l1_dtype="float16")
    store = MemoryStore(settings.l1_bytes, DIM, FLOAT16, aggregate_share=1 / 16)
    service = EmbeddingService(
        settings, store, RequestLog(), PrefetchQueue(1), aggregates=store.aggregates
    )
    rng = np.random.default_rng(0)
    items = [f"item-{i}" for i in range(ITEMS * 4)]
    held = int(ITEMS * hit_share)
    for user in range(USERS):
        chosen = [items[i] for i in rng.choice(len(items), held, replace=False)]
        vectors = rng.standard_normal((held, DIM)).astype(np.float32)
        await service.put(f"user-{user}", chosen, vectors, "v1")
    warm = [f"user-{u}" for u in range(USERS)]
    print(f"{ITEMS} items a read, {hit_share:.0%} held by the user, {DIM} float16, {reads} reads")
    for label, users in (("user with pairs", warm), ("cold user", ["cold"])):
        plain = await timed(service, users, items, reads, enrich=False)
        enriched = await timed(service, users, items, reads, enrich=True)
        print(
            f"  {label:16}  plain {plain:7.1f} us   enriched {enriched:7.1f} us   "
            f"(+{enriched - plain:.1f} us)"
        )
    result = await service.batch_get("cold", items[:ITEMS], FLOAT16, enrich=True)
    tiers = {tier.name: int((result.tiers == tier).sum()) for tier in RowTier}
    print(f"  cold user's tiers: {tiers}")


async def timed(
    service: EmbeddingService, users: list[str], items: list[str], reads: int, enrich: bool
) -> float:
    """Median microseconds a read."""
    rng = np.random.default_rng(1)
    took = []
    for read in range(reads):
        start = int(rng.integers(0, len(items) - ITEMS))
        wanted = items[start : start + ITEMS]
        began = time.perf_counter()
        await service.batch_get(users[read % len(users)], wanted, FLOAT16, enrich=enrich)
        took.append(time.perf_counter() - began)
    return statistics.median(took) * 1e6


if __name__ == "__main__":
    main()
