"""How fast one daemon takes work off the shared stream, with a model that computes nothing:
the most a GPU could be fed. Against its floor, in the same run, rounds interleaved: a bare
redis-py loop that reads the same entries as one consumer of a group (XREADGROUP of a batch's
worth), SETs a value of the same size for each pair in one pipeline, and acknowledges them.

The daemon's figure includes what it does per batch beside the model: decoding tasks, the
freshness check (an MGET per user, pipelined) and writing the pairs (a script per user,
pipelined).

    .venv/bin/python bench/daemon_intake.py [--tasks 600] [--rounds 3]
"""

import argparse
import json
import statistics
import time
from collections.abc import Sequence

import numpy as np
import redis
from _common import start_redis

from solaris.app.compose import daemon_l2
from solaris.precompute.daemon import PrecomputeDaemon
from solaris.precompute.features import UserWork
from solaris.precompute.settings import PrecomputeSettings
from solaris.server.prefetch_queue import PrefetchTask
from solaris.server.redis_store import encode_values
from solaris.server.settings import StoreSettings
from solaris.server.store import Freshness
from solaris.server.work_stream import STREAM_KEY, StreamWorkSource, encode_tasks, work_group

DIM = 128
FLOOR_GROUP = "bench-floor"
FRESHNESS = Freshness.starting("null", time.time(), 3600, 600)


class NullModel:
    """Computes nothing: zeros, at once."""

    model_version = "null"

    def compute(self, work: Sequence[UserWork]) -> np.ndarray:
        return np.zeros((sum(len(w.item_ids) for w in work), DIM), np.float32)


def fill(client: redis.Redis, round_: int, tasks: int, items: int) -> None:
    """`tasks` new tasks of `items` new pairs each, for users of this round alone."""
    client.delete(STREAM_KEY)
    pipe = client.pipeline(transaction=False)
    for n in range(tasks):
        item_ids = tuple(f"item-{n}-{i}" for i in range(items))
        task = PrefetchTask(f"user-{round_}-{n % 50}", item_ids, (), 0)
        for fields in encode_tasks(task, 16_000):
            pipe.xadd(STREAM_KEY, fields)
    pipe.execute()
    client.xgroup_create(STREAM_KEY, work_group(NullModel.model_version), id="0")
    client.xgroup_create(STREAM_KEY, FLOOR_GROUP, id="0")


def daemon_seconds(url: str, pairs: int) -> float:
    settings = StoreSettings(redis=url, dim=DIM)
    source = StreamWorkSource(redis.Redis.from_url(url), 60.0, NullModel.model_version)
    store = daemon_l2(settings, NullModel.model_version)
    daemon = PrecomputeDaemon(NullModel(), store, source, PrecomputeSettings(), 3600, 600)
    start = time.perf_counter()
    daemon.start()
    while daemon.stats.pairs_computed + daemon.stats.pairs_already_fresh < pairs:
        time.sleep(0.001)
    taken = time.perf_counter() - start
    daemon.stop()
    return taken


def floor_seconds(client: redis.Redis, entries: int, batch: int) -> float:
    value = encode_values(np.zeros((1, DIM), np.float32), FRESHNESS)[0]
    start = time.perf_counter()
    read = 0
    while read < entries:
        answer = client.xreadgroup(FLOOR_GROUP, "floor", {STREAM_KEY: ">"}, count=batch)
        news = [entry for _, entries_read in answer for entry in entries_read]
        pipe = client.pipeline(transaction=False)
        for _, fields in news:
            user_id, item_ids, _, _ = json.loads(fields[b"task"])
            for item_id in item_ids:
                pipe.set(f"floor:{{{user_id}}}:{item_id}", value, px=3_600_000)
        pipe.xack(STREAM_KEY, FLOOR_GROUP, *(entry_id for entry_id, _ in news))
        pipe.execute()
        read += len(news)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    server, url = start_redis()
    client = redis.Redis.from_url(url)
    batch_pairs = PrecomputeSettings().batch_pairs
    try:
        for items in (8, 64):
            ours, floor = [], []
            for round_ in range(args.rounds):
                fill(client, round_, args.tasks, items)
                ours.append(daemon_seconds(url, args.tasks * items))
                floor.append(floor_seconds(client, args.tasks, max(1, batch_pairs // items)))
            report(items, args.tasks, statistics.median(ours), statistics.median(floor))
    finally:
        server.terminate()


def report(items: int, tasks: int, ours: float, floor: float) -> None:
    print(f"tasks of {items} pairs ({tasks} tasks, medians):")
    for name, seconds in (("daemon, null model", ours), ("XREADGROUP+SET+XACK", floor)):
        rates = f"{tasks / seconds:9,.0f} tasks/s {tasks * items / seconds:11,.0f} pairs/s"
        print(f"  {name:<19}: {rates}")
    print(f"  daemon / floor     : {floor / ours:9.2f}x")


if __name__ == "__main__":
    main()
