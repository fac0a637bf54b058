"""The L1 (MemoryStore) alone, in process: what a read and a write cost, and what a pair weighs.

  1. read_sync of 500 items, all hits (one user's 500 pairs of a 100,000-pair store), in the
     store's dtype and in the other one;
  2. write_sync of 500 new pairs into a store with room, and into a full one (evicting 500);
  3. bytes per pair holding 100,000 pairs of 128 values (200 users x 500 items, ~12-byte ids),
     in the store's dtype: the cap's reckoning (nbytes), what tracemalloc sees allocated
     (the preallocated tables included, the cap set to exactly those pairs), and the growth of
     the process's RSS, against the payload (dim x itemsize);
  4. what a user costs beyond its pairs (tracemalloc), against USER_OVERHEAD_BYTES;
  5. reads beside a thread writing into a full store of a million pairs (every write
     evicting): the reads' latency, where choosing eviction candidates would stall them.

Timings are medians of many calls; run it on a quiet machine.

    .venv/bin/python bench/l1.py [--dtype float16] [--rounds 300]
"""

import argparse
import gc
import statistics
import threading
import time
import tracemalloc
from collections.abc import Callable
from functools import partial

import numpy as np

from solaris.server.l1 import USER_OVERHEAD_BYTES, MemoryStore, pair_bytes
from solaris.server.store import FLOAT16, FLOAT32, Freshness

DIM = 128
USERS = 200
ITEMS = 500


def user_id(n: int) -> str:
    return f"user-{n:06d}"


def item_ids(count: int = ITEMS, offset: int = 0) -> list[str]:
    return [f"item-{n + offset:07d}" for n in range(count)]


def fill(store: MemoryStore, users: int = USERS) -> None:
    vectors = np.random.default_rng(0).standard_normal((ITEMS, DIM)).astype(np.float32)
    freshness = Freshness.starting("v1", time.time(), 3_600.0, 60.0)
    for n in range(users):
        store.write_sync(user_id(n), item_ids(), vectors, freshness)


def median_us(call: Callable[[], object], rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        call()
        samples.append(time.perf_counter_ns() - start)
    return statistics.median(samples) / 1_000


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def timings(dtype: np.dtype, rounds: int) -> None:
    store = MemoryStore(2 * 1024**3, DIM, dtype)
    fill(store)
    items = item_ids()
    now = time.time()
    for asked in (dtype, FLOAT32 if dtype == FLOAT16 else FLOAT16):
        read = median_us(partial(store.read_sync, user_id(7), items, asked, now), rounds)
        print(f"read_sync, 500 hits, as {asked.name}: {read:.1f} us")

    vectors = np.ones((ITEMS, DIM), np.float32)
    freshness = Freshness.starting("v1", time.time(), 3_600.0, 60.0)
    fresh_users = iter(range(USERS, 10**9))
    write = median_us(
        lambda: store.write_sync(user_id(next(fresh_users)), items, vectors, freshness), rounds
    )
    print(f"write_sync, 500 new pairs, room left: {write:.1f} us")

    full = MemoryStore(store_bytes_for(dtype, USERS), DIM, dtype)
    fill(full)
    evicting = median_us(
        lambda: full.write_sync(user_id(next(fresh_users)), items, vectors, freshness), rounds
    )
    print(f"write_sync, 500 new pairs, full (evicting 500): {evicting:.1f} us")


def store_bytes_for(dtype: np.dtype, users: int) -> int:
    """The cap that holds exactly `users` x 500 pairs, by the store's own reckoning."""
    probe = MemoryStore(2 * 1024**3, DIM, dtype)
    fill(probe, users)
    return probe.nbytes


def memory(dtype: np.dtype) -> None:
    cap = store_bytes_for(dtype, USERS)
    pairs = USERS * ITEMS
    gc.collect()
    rss_before = rss_bytes()
    tracemalloc.start()
    store = MemoryStore(cap, DIM, dtype)
    fill(store)
    traced, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    gc.collect()
    rss = rss_bytes() - rss_before
    assert len(store) == pairs, len(store)
    payload = DIM * dtype.itemsize
    print(f"{pairs:,} pairs of {DIM} {dtype.name}, payload {payload} B a pair:")
    for name, total in (("nbytes", store.nbytes), ("tracemalloc", traced), ("RSS", rss)):
        print(f"  {name:<11} {total / pairs:7.1f} B a pair ({total / pairs / payload:.2f}x)")


def reads_beside_a_writer(rounds: int) -> None:
    """A store of a million small pairs, full: a thread writes new pairs (each write evicting
    500) while this one reads 500 hits at a time; the reads' latency and the writes' pace.
    Choosing the next eviction candidates sorts a million stamps: it must not stall reads."""
    dim, users = 8, 2_000
    items, vectors = item_ids(), np.ones((ITEMS, dim), np.float32)
    freshness = Freshness.starting("v1", time.time(), 3_600.0, 60.0)
    probe = MemoryStore(2 * 1024**3, dim, FLOAT16)
    probe.write_sync(user_id(0), items, vectors, freshness)
    store = MemoryStore(users * probe.nbytes, dim, FLOAT16)
    for n in range(users):
        store.write_sync(user_id(n), items, vectors, freshness)
    writes, newest = 20 * rounds, [users - 1]

    def write() -> None:
        for n in range(users, users + writes):
            store.write_sync(user_id(n), items, vectors, freshness)
            newest[0] = n

    writer = threading.Thread(target=write)
    latencies = []
    start = time.perf_counter()
    writer.start()
    while writer.is_alive():
        began = time.perf_counter_ns()
        store.read_sync(user_id(newest[0]), items, FLOAT16, time.time())
        latencies.append((time.perf_counter_ns() - began) / 1_000)
    elapsed = time.perf_counter() - start
    p50, p99 = np.percentile(latencies, [50, 99])
    print(
        f"{len(store):,} pairs, {writes / elapsed:.0f} evicting writes/s beside reads: "
        f"read p50 {p50:.0f} us, p99 {p99:.0f} us, slowest {max(latencies):.0f} us"
    )


def user_overhead() -> None:
    """What a user costs beyond its id's str and its pairs' index entries (a hash and a row,
    12 bytes each), as tracemalloc sees it: USER_OVERHEAD_BYTES must stay above this. The
    user counts sit just past the dict's resizes, where a user costs the most."""
    dim = 8
    freshness = Freshness.starting("v1", time.time(), 3_600.0, 60.0)
    for users, pairs, writes in ((21_850, 1, 1), (87_400, 1, 1), (2_000, 500, 10)):
        ids = [user_id(n) for n in range(users)]
        items, vectors = item_ids(pairs), np.ones((pairs, dim), np.float32)
        store = MemoryStore(users * (pairs * pair_bytes(dim, FLOAT16) + 1_000), dim, FLOAT16)
        tracemalloc.start()
        for user in ids:
            for part in np.array_split(np.arange(pairs), writes):
                store.write_sync(user, [items[i] for i in part], vectors[part], freshness)
        traced = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        per_user = (traced - users * pairs * 12) / users
        print(f"{users:,} users of {pairs} pairs: {per_user:.0f} B a user beyond the index")
    print(f"  (counted: USER_OVERHEAD_BYTES = {USER_OVERHEAD_BYTES})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    dtype = np.dtype(args.dtype)
    memory(dtype)
    user_overhead()
    timings(dtype, args.rounds)
    reads_beside_a_writer(args.rounds)


if __name__ == "__main__":
    main()
