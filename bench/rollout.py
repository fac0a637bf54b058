"""The hit rate across a model rollout, with and without waiting for coverage: two serve-only
sidecars on one redis-server of their own, steady reads of random users (each answer's misses
prefetched, as a ranker does), the old version's pairs all stored and its daemon running; then
a daemon of a new version starts, computing at a bounded rate (a model that sleeps per pair).
One sidecar rolls out as shipped (the new version once it covers the reads); the other
switches as soon as it sees the new version (`--rollout-deadline-seconds 0`, what every
sidecar did before). Prints each second's hit rate and version for both, and the lowest.

    .venv/bin/python bench/rollout.py [--seconds 40] [--pairs-per-second 2000]
"""

import argparse
import asyncio
import contextlib
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
from _common import fill_redis, start_redis

from solaris.app.compose import build_sidecar, daemon_l2
from solaris.precompute.daemon import PrecomputeDaemon
from solaris.precompute.features import UserWork
from solaris.precompute.settings import PrecomputeSettings
from solaris.server.redis_store import DAEMON_REDIS_TIMEOUT_SECONDS, connect_blocking
from solaris.server.settings import SidecarSettings
from solaris.server.sidecar import Sidecar
from solaris.server.work_stream import StreamWorkSource
from solaris.v1 import embedding_store_pb2 as pb
from solaris.v1.embedding_store_pb2_grpc import EmbeddingStoreStub

DIM = 32
USERS = 200
ITEMS = [f"item-{i}" for i in range(50)]
READS_PER_SECOND = 100
NEW_VERSION_AT = 5.0


class PacedModel:
    """Computes zeros under `model_version`, taking 1/`pairs_per_second` s a pair."""

    def __init__(self, model_version: str, pairs_per_second: float) -> None:
        self.model_version = model_version
        self.seconds_per_pair = 1 / pairs_per_second

    def compute(self, work: Sequence[UserWork]) -> np.ndarray:
        pairs = sum(len(user.item_ids) for user in work)
        time.sleep(pairs * self.seconds_per_pair)
        return np.zeros((pairs, DIM), np.float32)


def start_daemon(settings: SidecarSettings, version: str, pace: float) -> PrecomputeDaemon:
    client = connect_blocking(settings.redis, DAEMON_REDIS_TIMEOUT_SECONDS)
    source = StreamWorkSource(client, settings.claim_idle_seconds, version)
    daemon = PrecomputeDaemon(
        PacedModel(version, pace),
        daemon_l2(settings, version),
        source,
        PrecomputeSettings(batch_wait_ms=1.0, batch_pairs=256),
        settings.ttl_seconds,
        settings.stale_seconds,
    )
    daemon.start()
    return daemon


@dataclass
class Seconds:
    """Rows and hits per second of the run, and the versions answers named."""

    rows: dict[int, int] = field(default_factory=dict)
    hits: dict[int, int] = field(default_factory=dict)
    versions: dict[int, set[str]] = field(default_factory=dict)

    def add(self, second: int, response: pb.BatchGetResponse) -> None:
        statuses = list(response.statuses)
        self.rows[second] = self.rows.get(second, 0) + len(statuses)
        self.hits[second] = self.hits.get(second, 0) + len(statuses) - statuses.count(pb.MISS)
        self.versions.setdefault(second, set()).add(response.model_version or "-")

    def rate(self, second: int) -> float:
        return self.hits.get(second, 0) / max(1, self.rows.get(second, 0))


async def read_steadily(sidecar: Sidecar, seconds: Seconds, start: float, end: float) -> None:
    users = random.Random(0)
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        stub = EmbeddingStoreStub(channel)
        next_read = time.monotonic()
        while next_read < end:
            user = f"user-{users.randrange(USERS)}"
            response = await stub.BatchGet(pb.BatchGetRequest(user_id=user, item_ids=ITEMS))
            seconds.add(int(time.monotonic() - start), response)
            missed = [i for i, s in zip(ITEMS, response.statuses, strict=True) if s == pb.MISS]
            if missed:  # as a ranker does: fire and forget
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await stub.Prefetch(pb.PrefetchRequest(user_id=user, item_ids=missed))
            next_read += 1 / READS_PER_SECOND
            await asyncio.sleep(max(0.0, next_read - time.monotonic()))


async def run(url: str, seconds: float, pace: float) -> tuple[Seconds, Seconds]:
    await fill_redis(url, USERS, ITEMS, DIM, "v1")
    base = SidecarSettings(port=0, dim=DIM, redis=url, rollout_samples_per_second=20.0)
    old = start_daemon(base, "v1", pace)
    shipped = build_sidecar(base.model_copy(update={"rollout_window_reads": 50}))
    cliff = build_sidecar(base.model_copy(update={"rollout_deadline_seconds": 0.0}))
    for sidecar in (shipped, cliff):
        await sidecar.start()
    await asyncio.sleep(1.0)  # both serve v1
    figures = (Seconds(), Seconds())
    start = time.monotonic()
    end = start + seconds
    reading = asyncio.gather(
        *(read_steadily(s, f, start, end) for s, f in zip((shipped, cliff), figures, strict=True))
    )
    await asyncio.sleep(NEW_VERSION_AT)
    new = start_daemon(base, "v2", pace)
    await reading
    for daemon in (old, new):
        await asyncio.to_thread(daemon.stop)
    for sidecar in (shipped, cliff):
        await sidecar.stop(grace=0)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--pairs-per-second", type=float, default=2000.0)
    args = parser.parse_args()
    server, url = start_redis()
    try:
        shipped, cliff = asyncio.run(run(url, args.seconds, args.pairs_per_second))
    finally:
        server.kill()
    print(
        f"{USERS} users x {len(ITEMS)} items read at {READS_PER_SECOND}/s per sidecar; v2's "
        f"daemon starts at {NEW_VERSION_AT:.0f} s and computes {args.pairs_per_second:.0f} "
        "pairs/s; v1's keeps running"
    )
    print("second  rollout (hit rate, versions)   switch at once (hit rate, versions)")
    for second in sorted(shipped.rows):
        left, right = (",".join(sorted(f.versions.get(second, ()))) for f in (shipped, cliff))
        rates = f"{shipped.rate(second):8.3f} {left:12}     {cliff.rate(second):8.3f}"
        print(f"{second:6d}  {rates} {right}")
    lowest = [min(f.rate(s) for s in f.rows) for f in (shipped, cliff)]
    print(f"lowest second: rollout {lowest[0]:.3f}, switch at once {lowest[1]:.3f}")


if __name__ == "__main__":
    main()
