"""The L1 store: byte cap with least-recently-used eviction, expiry, and both dtypes."""

import gc
import time

import numpy as np
import pytest

from solaris.server.l1 import MemoryStore
from solaris.server.store import FLOAT16, FLOAT32, Freshness, RowStatus

DIM = 16


def fresh(ttl: float = 60.0, stale: float = 0.0, version: str = "v1") -> Freshness:
    return Freshness.starting(version, time.time(), ttl, stale)


def rows_of(*values: float) -> np.ndarray:
    return np.array([np.full(DIM, value) for value in values], np.float32)


def held(store: MemoryStore, user: str, items: list[str]) -> list[bool]:
    return (
        store.read_sync(user, items, FLOAT32, time.time()).statuses(time.time()) != RowStatus.MISS
    ).tolist()


def test_eviction_keeps_bytes_under_the_cap_and_drops_the_least_recently_used() -> None:
    one = MemoryStore(max_bytes=10**6, dim=DIM).entry_bytes(("u", "i0"))
    store = MemoryStore(max_bytes=3 * one, dim=DIM)
    store.write_sync("u", ["i0", "i1", "i2"], rows_of(0, 1, 2), fresh())
    store.read_sync("u", ["i0"], FLOAT32, time.time())

    store.write_sync("u", ["i3"], rows_of(3), fresh())

    assert store.nbytes <= store.max_bytes
    assert store.evictions == 1
    assert held(store, "u", ["i0", "i1", "i2", "i3"]) == [True, False, True, True]


def test_many_writes_never_exceed_the_cap() -> None:
    store = MemoryStore(max_bytes=50_000, dim=DIM)

    for n in range(2_000):
        store.write_sync("user", [f"item{n}"], rows_of(n), fresh())
        assert store.nbytes <= store.max_bytes

    assert len(store) == 50_000 // store.entry_bytes(("user", "item1000"))
    assert store.evictions == 2_000 - len(store)


def test_reads_return_what_was_written_in_request_order_in_both_dtypes() -> None:
    store = MemoryStore(max_bytes=10**6, dim=DIM)
    stored = np.random.default_rng(0).normal(size=(3, DIM)).astype(np.float32)
    store.write_sync("u", ["a", "b", "c"], stored, fresh(version="v9"))

    as_float32 = store.read_sync("u", ["c", "missing", "a"], FLOAT32, time.time())
    as_float16 = store.read_sync("u", ["b"], FLOAT16, time.time())

    assert np.array_equal(as_float32.values, np.stack([stored[2], np.zeros(DIM), stored[0]]))
    assert as_float32.model_version == "v9"
    assert as_float16.values.dtype == FLOAT16
    assert np.array_equal(as_float16.values[0], stored[1].astype(np.float16))


def test_overwrite_replaces_the_row_and_keeps_its_bytes() -> None:
    store = MemoryStore(max_bytes=10_000, dim=DIM)
    store.write_sync("u", ["i"], rows_of(1.0), fresh())
    store.write_sync("u", ["i"], rows_of(2.0), fresh(version="v2"))

    rows = store.read_sync("u", ["i"], FLOAT32, time.time())
    assert len(store) == 1
    assert store.nbytes == store.entry_bytes(("u", "i"))
    assert rows.values[0, 0] == 2.0
    assert rows.model_version == "v2"


def test_a_cap_too_small_for_one_row_is_refused() -> None:
    with pytest.raises(ValueError, match="cache_bytes"):
        MemoryStore(max_bytes=100, dim=DIM)


def test_wrongly_shaped_vectors_are_refused_and_store_nothing() -> None:
    store = MemoryStore(max_bytes=10_000, dim=DIM)

    with pytest.raises(ValueError, match="shape"):
        store.write_sync("u", ["a", "b"], np.zeros((2, DIM + 1), np.float32), fresh())

    assert len(store) == 0


def test_expired_rows_read_as_zero_misses_and_free_their_bytes() -> None:
    store = MemoryStore(max_bytes=10_000, dim=DIM)
    store.write_sync("u", ["i"], rows_of(5.0), fresh(ttl=10.0))

    later = time.time() + 11.0
    rows = store.read_sync("u", ["i"], FLOAT32, later)

    assert rows.statuses(later).tolist() == [RowStatus.MISS]
    assert not rows.values.any()
    assert store.nbytes == 0
    assert len(store) == 0


def test_status_is_hit_then_stale_then_miss() -> None:
    store = MemoryStore(max_bytes=10_000, dim=DIM)
    store.write_sync("u", ["i"], rows_of(1.0), Freshness.starting("v1", 100.0, 10.0, 5.0))
    times = (100.0, 109.9, 110.0, 114.9, 115.0)

    statuses = [store.read_sync("u", ["i"], FLOAT32, t).statuses(t)[0] for t in times]

    assert statuses == [
        RowStatus.HIT,
        RowStatus.HIT,
        RowStatus.STALE,
        RowStatus.STALE,
        RowStatus.MISS,
    ]


async def test_the_async_interface_reads_and_writes_the_same_rows() -> None:
    store = MemoryStore(max_bytes=10_000, dim=DIM)

    await store.write("u", ["a"], rows_of(7.0), fresh())

    assert (await store.read("u", ["a"], FLOAT32, time.time())).values[0, 0] == 7.0


def test_the_garbage_collector_has_no_entries_to_walk() -> None:
    store = MemoryStore(max_bytes=10**6, dim=DIM)
    items = [f"i{n}" for n in range(1_000)]
    store.write_sync("u", items, np.zeros((1_000, DIM), np.float32), fresh())
    gc.collect()

    tracked_before = len(gc.get_objects())
    store.write_sync("v", items, np.zeros((1_000, DIM), np.float32), fresh())
    gc.collect()

    assert len(gc.get_objects()) - tracked_before < 100
