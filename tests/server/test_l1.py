"""The L1 store: byte cap with least-recently-used eviction, and expiry carried per entry."""

import time

import numpy as np
import pytest

from solaris.server.embedding import ENTRY_OVERHEAD_BYTES, Embedding, RowStatus
from solaris.server.l1 import ByteCappedLRU, L1Cache

DIM = 16


def embedding(value: float = 1.0, ttl: float = 60.0, stale: float = 0.0) -> Embedding:
    return Embedding.fresh(np.full(DIM, value, np.float32), "v1", ttl, stale)


def entry_size(user: str, item: str) -> int:
    return DIM * (4 + 2) + len(user) + len(item) + ENTRY_OVERHEAD_BYTES


def test_eviction_keeps_bytes_under_the_cap_and_drops_the_least_recently_used() -> None:
    one = entry_size("u", "i0")
    lru = ByteCappedLRU(max_bytes=3 * one)
    lru.put_many([(("u", f"i{n}"), embedding(n)) for n in range(3)])
    lru.get_many([("u", "i0")])

    lru.put_many([(("u", "i3"), embedding(3))])

    assert lru.nbytes <= lru.max_bytes
    assert lru.evictions == 1
    present = lru.get_many([("u", f"i{n}") for n in range(4)])
    assert [entry is not None for entry in present] == [True, False, True, True]


def test_many_writes_never_exceed_the_cap() -> None:
    lru = ByteCappedLRU(max_bytes=50_000)

    for n in range(2_000):
        lru.put_many([(("user", f"item{n}"), embedding(n))])
        assert lru.nbytes <= lru.max_bytes

    assert len(lru) == 50_000 // entry_size("user", "item1000")


def test_overwrite_replaces_the_entry_and_its_bytes() -> None:
    lru = ByteCappedLRU(max_bytes=10_000)
    lru.put_many([(("u", "i"), embedding(1.0))])
    lru.put_many([(("u", "i"), embedding(2.0))])

    assert len(lru) == 1
    assert lru.nbytes == entry_size("u", "i")
    assert lru.get_many([("u", "i")])[0].vector[0] == 2.0


def test_an_entry_larger_than_the_cap_is_not_stored_and_evicts_nothing() -> None:
    lru = ByteCappedLRU(max_bytes=entry_size("u", "i"))
    lru.put_many([(("u", "i"), embedding())])

    lru.put_many([(("u", "huge"), Embedding.fresh(np.zeros(4096, np.float32), "v1", 60))])

    assert lru.get_many([("u", "i"), ("u", "huge")])[0] is not None
    assert len(lru) == 1


def test_expired_entries_read_as_missing_and_free_their_bytes() -> None:
    lru = ByteCappedLRU(max_bytes=10_000)
    lru.put_many([(("u", "i"), embedding(ttl=10.0))])

    assert lru.get_many([("u", "i")], now=time.time() + 11.0) == [None]
    assert lru.nbytes == 0


def test_status_is_hit_then_stale_then_miss() -> None:
    entry = Embedding.fresh(np.zeros(DIM, np.float32), "v1", 10.0, 5.0, now=100.0)

    assert [entry.status(t) for t in (100.0, 109.9, 110.0, 114.9, 115.0)] == [
        RowStatus.HIT,
        RowStatus.HIT,
        RowStatus.STALE,
        RowStatus.STALE,
        RowStatus.MISS,
    ]


async def test_aiocache_interface_reads_and_writes_the_lru() -> None:
    cache = L1Cache(max_bytes=10_000)
    first, second = embedding(1.0), embedding(2.0)

    await cache.multi_set([(("u", "a"), first), (("u", "b"), second)])

    assert await cache.multi_get([("u", "b"), ("u", "x"), ("u", "a")]) == [second, None, first]
    assert await cache.exists(("u", "a"))
    assert await cache.delete(("u", "a")) == 1
    assert await cache.get(("u", "a")) is None


async def test_aiocache_ttl_is_refused_because_expiry_lives_in_the_embedding() -> None:
    cache = L1Cache(max_bytes=10_000)

    with pytest.raises(ValueError, match="ttl"):
        await cache.set(("u", "a"), embedding(), ttl=5)
