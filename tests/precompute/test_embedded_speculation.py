"""The embedded speculator's buffer of answered reads: bounded in requested pairs, the
oldest reads dropped and counted, the rest learnt from."""

import itertools

import numpy as np

from solaris.precompute.embedded_speculation import EmbeddedSpeculation
from solaris.precompute.speculator import Policy, SpeculationSettings, Speculator
from solaris.server.prefetch_queue import PrefetchQueue
from solaris.server.request_log import LoggedRequest
from solaris.server.store import RowStatus


def misses(user: str, items: tuple[str, ...]) -> LoggedRequest:
    statuses = np.full(len(items), RowStatus.MISS, np.uint8)
    return LoggedRequest(user, items, statuses, 0.0, np.full(len(items), -np.inf))


def test_the_buffer_keeps_the_newest_reads_within_its_pairs() -> None:
    ticks = itertools.count(1000.0, 10.0)  # ten seconds a look: the budget is never short
    speculator = Speculator(
        SpeculationSettings(1000.0, frozenset({Policy.MISS})),
        lambda pairs: np.full(len(pairs), -np.inf),
        clock=lambda: next(ticks),
    )
    embedded = EmbeddedSpeculation(PrefetchQueue(10), speculator, 10, buffered_pairs=5)

    for user in range(4):
        embedded.observe(misses(f"u{user}", ("a", "b")))

    assert embedded.dropped_reads == 2
    tasks = embedded.take(max_tasks=10, timeout=0)
    assert sorted((task.user_id, sorted(task.item_ids)) for task in tasks) == [
        ("u2", ["a", "b"]),
        ("u3", ["a", "b"]),
    ]
