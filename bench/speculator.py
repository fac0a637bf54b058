"""How many ranking requests one speculator can learn from per second: the most traffic one
speculator can follow before it falls behind.

In one run, on synthetic traffic (50 candidates a request) and a redis-server of its own:
  1. the embedded speculator, fed in process by the sidecar's reads;
  2. the shared one, reading every sidecar's reads from the Redis request stream and adding
     work to the work stream;
each with every policy (every served pair due for refresh, the most work) and without refresh,
handing out up to BUDGET pairs a second (checking each is not already fresh in the store).

    .venv/bin/python bench/speculator.py [--requests 5000]
"""

import argparse
import time

import numpy as np
import redis
from redis_l2 import start_redis

from solaris.precompute.replay_traffic import SyntheticTraffic
from solaris.precompute.shared_speculation import SharedSpeculation
from solaris.precompute.speculator import Policy, SpeculationSettings, Speculator
from solaris.server.l1 import MemoryStore
from solaris.server.request_log import LoggedRequest
from solaris.server.request_stream import FIELD, REQUEST_STREAM_KEY, RequestEncoder, entry_bytes
from solaris.server.store import RowStatus
from solaris.server.work_stream import STREAM_KEY, work_group

DIM = 128
BUDGET = 10_000.0
POLICY_SETS = {
    "every policy": frozenset(Policy),
    "without refresh": frozenset(Policy) - {Policy.REFRESH},
}


def logged_requests(count: int) -> list[LoggedRequest]:
    """Synthetic requests, each pair a hit if its user asked for it before, else a miss."""
    events = [e for e in SyntheticTraffic(duration_seconds=3_600).events() if not e.is_hint]
    seen: set[tuple[str, str]] = set()
    requests = []
    for event in events[:count]:
        statuses = [
            RowStatus.HIT if (event.user_id, item) in seen else RowStatus.MISS
            for item in event.item_ids
        ]
        seen.update((event.user_id, item) for item in event.item_ids)
        requests.append(
            LoggedRequest(
                event.user_id,
                event.item_ids,
                np.array(statuses, np.uint8),
                0.0,
                np.zeros(len(statuses)),  # every served pair due for refresh: the most work
            )
        )
    return requests


def embedded_rate(requests: list[LoggedRequest], policies: frozenset[Policy]) -> float:
    store = MemoryStore(256 * 1024**2, DIM)
    speculator = Speculator(SpeculationSettings(BUDGET, policies), store.stale_at)
    start = time.perf_counter()
    for first in range(0, len(requests), 100):
        speculator.observe(requests[first : first + 100])
        speculator.take()
    return len(requests) / (time.perf_counter() - start)


def shared_rate(url: str, requests: list[LoggedRequest], policies: frozenset[Policy]) -> float:
    client = redis.Redis.from_url(url)
    client.flushall()
    client.xgroup_create(STREAM_KEY, work_group("bench"), id="0", mkstream=True)
    speculation = SharedSpeculation(
        redis.Redis.from_url(url),
        SpeculationSettings(BUDGET, policies),
        DIM,
        "bench",
        max_waiting_tasks=len(requests),  # no daemon takes work here: never held back
    )
    speculation.start()
    while not speculation.stats.leading:
        time.sleep(0.01)
    start = time.perf_counter()
    sidecar = RequestEncoder()  # one sidecar's: ids named by number once defined
    with client.pipeline(transaction=False) as pipe:
        for request in requests:
            for value in sidecar.encode(request, entry_bytes(256)):
                pipe.xadd(REQUEST_STREAM_KEY, {FIELD: value})
        pipe.execute()
    while speculation.stats.requests_read < len(requests):
        time.sleep(0.005)
    seconds = time.perf_counter() - start
    speculation.stop()
    client.close()
    return len(requests) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=5_000)
    args = parser.parse_args()
    requests = logged_requests(args.requests)
    process, url = start_redis()
    try:
        print(f"{len(requests):,} requests x 50 candidates; requests learnt from per second")
        print(f"{'policies':<16} {'embedded':>10} {'shared (Redis)':>15} {'ratio':>6}")
        for name, policies in POLICY_SETS.items():
            embedded = embedded_rate(requests, policies)
            shared = shared_rate(url, requests, policies)
            print(f"{name:<16} {embedded:10,.0f} {shared:15,.0f} {embedded / shared:5.1f}x")
    finally:
        process.kill()


if __name__ == "__main__":
    main()
