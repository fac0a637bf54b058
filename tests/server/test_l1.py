"""The L1 store: byte cap with least-recently-used eviction, expiry, and both dtypes."""

import gc
import random
import threading
import time
from collections import OrderedDict

import numpy as np
import pytest

from solaris.server.l1 import MemoryStore, entry_bytes, pair_bytes, user_bytes
from solaris.server.store import FLOAT16, FLOAT32, TIMES, Freshness, RowStatus

DIM = 16


def fresh(ttl: float = 60.0, stale: float = 0.0, version: str = "v1") -> Freshness:
    return Freshness.starting(version, time.time(), ttl, stale)


def rows_of(*values: float) -> np.ndarray:
    return np.array([np.full(DIM, value) for value in values], np.float32)


def held(store: MemoryStore, user: str, items: list[str]) -> list[bool]:
    statuses = store.read_sync(user, items, FLOAT32, time.time()).statuses(time.time())
    return [bool(status != RowStatus.MISS) for status in statuses]


def holds(store: MemoryStore, pairs: list[tuple[str, str]]) -> np.ndarray:
    """Which pairs the store holds, asked without touching recency."""
    return store.stale_at(pairs) > -np.inf


def test_eviction_keeps_bytes_under_the_cap_and_drops_the_least_recently_used() -> None:
    store = MemoryStore(max_bytes=user_bytes("u") + 3 * pair_bytes(DIM), dim=DIM)
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

    assert len(store) == (50_000 - user_bytes("user")) // store.pair_bytes
    assert store.evictions == 2_000 - len(store)


def test_eviction_follows_the_order_of_last_use_exactly() -> None:
    """Against an OrderedDict kept in the test: reads and overwrites in random order, with
    enough rows that each eviction's candidates serve several writes."""
    rng = random.Random(7)
    store = MemoryStore(max_bytes=user_bytes("u") + 500 * pair_bytes(DIM), dim=DIM)
    model: OrderedDict[str, None] = OrderedDict()
    for step in range(300):
        items = [f"i{rng.randrange(900)}" for _ in range(rng.randrange(1, 40))]
        if step % 3:
            store.write_sync("u", items, np.zeros((len(items), DIM), np.float32), fresh())
            for item in items:
                model[item] = None
                model.move_to_end(item)
            while len(model) > 500:
                model.popitem(last=False)
        else:
            store.read_sync("u", items, FLOAT32, time.time())
            for item in items:
                if item in model:
                    model.move_to_end(item)
        everything = [f"i{n}" for n in range(900)]
        assert holds(store, [("u", item) for item in everything]).tolist() == [
            item in model for item in everything
        ]
    assert store.evictions > 500


def test_the_cap_stays_exact_under_churn_of_users_and_id_lengths() -> None:
    rng = random.Random(3)
    store = MemoryStore(max_bytes=40_000, dim=DIM, dtype=FLOAT16)
    written: set[tuple[str, str]] = set()
    now = time.time()
    for _ in range(400):
        user = "u" * rng.randrange(1, 40) + str(rng.randrange(30))
        items = [str(rng.randrange(200)) * rng.randrange(1, 8) for _ in range(rng.randrange(12))]
        ttl = rng.choice([5.0, 1_000.0])
        vectors = np.ones((len(items), DIM), np.float32)
        store.write_sync(user, items, vectors, Freshness.starting("v", now, ttl, 0.0))
        written.update((user, item) for item in items)
        if rng.random() < 0.2:
            store.read_sync(user, items[:3], FLOAT16, now + 10.0)  # drops the expired
        assert store.nbytes <= store.max_bytes

        pairs = sorted(written)
        kept = [pair for pair, is_held in zip(pairs, holds(store, pairs), strict=True) if is_held]
        users = {user for user, _ in kept}
        assert len(store) == len(kept)
        assert store.nbytes == len(kept) * store.pair_bytes + sum(map(user_bytes, users))
    assert store.evictions > 0


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


def test_a_float16_store_keeps_one_rounded_copy_and_answers_float32_exactly_from_it() -> None:
    store = MemoryStore(max_bytes=10**6, dim=DIM, dtype=FLOAT16)
    stored = np.random.default_rng(1).normal(size=(2, DIM)).astype(np.float32)
    store.write_sync("u", ["a", "b"], stored, fresh())

    as_float16 = store.read_sync("u", ["a", "b"], FLOAT16, time.time()).values
    as_float32 = store.read_sync("u", ["a", "b"], FLOAT32, time.time()).values

    assert np.array_equal(as_float16, stored.astype(np.float16))
    assert as_float32.dtype == FLOAT32
    assert np.array_equal(as_float32, stored.astype(np.float16).astype(np.float32))
    assert store.pair_bytes == pair_bytes(DIM, FLOAT16) < pair_bytes(DIM, FLOAT32)


def test_duplicates_are_answered_per_occurrence_and_the_last_write_of_an_item_wins() -> None:
    store = MemoryStore(max_bytes=10**6, dim=DIM)
    store.write_sync("u", ["a", "b", "a"], rows_of(1, 2, 3), fresh())

    rows = store.read_sync("u", ["a", "x", "a", "b"], FLOAT32, time.time())

    assert rows.values[:, 0].tolist() == [3.0, 0.0, 3.0, 2.0]
    assert len(store) == 2


def test_a_large_read_in_any_order_answers_every_position_from_its_own_row() -> None:
    """Hashes are looked up in sorted order and the rows put back in request order."""
    store = MemoryStore(max_bytes=10**6, dim=DIM)
    rng = np.random.default_rng(3)
    items = [f"item-{n}" for n in range(300)]
    stored = rng.normal(size=(300, DIM)).astype(np.float32)
    store.write_sync("u", items[::2], stored[::2], fresh())  # two writes: a merged index
    store.write_sync("u", items[1::2], stored[1::2], fresh())
    asked = rng.choice([*range(300), -1, -2], 700).tolist()  # duplicates, and misses
    names = [items[n] if n >= 0 else f"absent-{n}" for n in asked]

    rows = store.read_sync("u", names, FLOAT32, time.time())

    expected = np.stack([stored[n] if n >= 0 else np.zeros(DIM, np.float32) for n in asked])
    assert np.array_equal(rows.values, expected)


def test_users_do_not_see_each_others_rows() -> None:
    store = MemoryStore(max_bytes=10**6, dim=DIM)
    store.write_sync("u1", ["a"], rows_of(1), fresh())
    store.write_sync("u2", ["a"], rows_of(2), fresh())

    assert store.read_sync("u1", ["a"], FLOAT32, time.time()).values[0, 0] == 1.0
    assert store.read_sync("u2", ["a"], FLOAT32, time.time()).values[0, 0] == 2.0
    assert held(store, "u3", ["a"]) == [False]


def test_overwrite_replaces_the_row_and_keeps_its_bytes() -> None:
    store = MemoryStore(max_bytes=10_000, dim=DIM)
    store.write_sync("u", ["i"], rows_of(1.0), fresh())
    store.write_sync("u", ["i"], rows_of(2.0), fresh(version="v2"))

    rows = store.read_sync("u", ["i"], FLOAT32, time.time())
    assert len(store) == 1
    assert store.nbytes == user_bytes("u") + store.pair_bytes
    assert rows.values[0, 0] == 2.0
    assert rows.model_version == "v2"


def test_the_newest_row_read_names_the_version() -> None:
    store = MemoryStore(max_bytes=10**6, dim=DIM)
    now = time.time()
    store.write_sync("u", ["a"], rows_of(1), Freshness.starting("new", now, 60, 0))
    store.write_sync("u", ["b"], rows_of(1), Freshness.starting("old", now - 5, 60, 0))

    assert store.read_sync("u", ["b", "a"], FLOAT32, now).model_version == "new"
    assert store.read_sync("u", ["b"], FLOAT32, now).model_version == "old"


def test_a_read_for_one_version_serves_no_row_of_another_and_drops_it() -> None:
    store = MemoryStore(max_bytes=10**6, dim=DIM)
    store.write_sync("u", ["a"], rows_of(1), fresh(version="new"))
    store.write_sync("u", ["b"], rows_of(2), fresh(version="old"))
    now = time.time()

    rows = store.read_sync("u", ["a", "b"], FLOAT32, now, model_version="new")

    assert rows.model_version == "new"
    assert rows.statuses(now).tolist() == [RowStatus.HIT, RowStatus.MISS]
    assert rows.values[:, 0].tolist() == [1.0, 0.0]
    assert len(store) == 1  # b, of the old version, is gone
    assert store.read_sync("u", ["a"], FLOAT32, now, model_version="other").model_version == ""


def test_rows_filled_from_l2_keep_their_own_times() -> None:
    store = MemoryStore(max_bytes=10**6, dim=DIM)
    times = np.array([(100.0, 110.0, 120.0), (100.0, 200.0, 300.0)], TIMES)

    store.write_rows("u", ["a", "b"], rows_of(1, 2), times, "v1")

    rows = store.read_sync("u", ["a", "b"], FLOAT32, 150.0)
    assert rows.statuses(150.0).tolist() == [RowStatus.MISS, RowStatus.HIT]
    assert len(store) == 1


def test_speculation_reads_stale_at_without_touching_recency() -> None:
    store = MemoryStore(max_bytes=user_bytes("u") + 2 * pair_bytes(DIM), dim=DIM)
    store.write_sync("u", ["a", "b"], rows_of(1, 2), fresh(ttl=60.0))

    stale_at = store.stale_at([("u", "a"), ("u", "zzz"), ("nobody", "a")])
    store.write_sync("u", ["c"], rows_of(3), fresh())

    assert stale_at[0] == pytest.approx(time.time() + 60.0, abs=5.0)
    assert stale_at[1:].tolist() == [-np.inf, -np.inf]
    assert held(store, "u", ["a", "b", "c"]) == [False, True, True]


def test_a_write_larger_than_the_store_keeps_its_last_items() -> None:
    store = MemoryStore(max_bytes=user_bytes("u") + 3 * pair_bytes(DIM), dim=DIM)

    store.write_sync("u", ["a", "b", "c", "d", "e"], rows_of(1, 2, 3, 4, 5), fresh())

    assert held(store, "u", ["a", "b", "c", "d", "e"]) == [False, False, True, True, True]
    assert store.evictions == 2
    assert store.nbytes == store.max_bytes


def test_a_user_id_too_long_for_the_cap_stores_nothing_and_evicts_nothing() -> None:
    store = MemoryStore(max_bytes=user_bytes("u") + 2 * pair_bytes(DIM), dim=DIM)
    store.write_sync("u", ["a"], rows_of(1), fresh())

    store.write_sync("u" * 10_000, ["a"], rows_of(2), fresh())

    assert held(store, "u", ["a"]) == [True]
    assert len(store) == 1


def test_the_cap_settings_check_holds_one_entry_of_the_longest_ids_in_any_script() -> None:
    for user in ("u" * 40, "é" * 20, "€" * 13, "😀" * 10, "😀" + "a" * 36):
        id_bytes = 2 * len(user.encode())
        store = MemoryStore(entry_bytes(DIM, id_bytes), DIM)

        store.write_sync(user, [user], rows_of(1), fresh())

        assert held(store, user, [user]) == [True]


def test_a_cap_too_small_for_one_row_is_refused() -> None:
    with pytest.raises(ValueError, match="cache_bytes"):
        MemoryStore(max_bytes=100, dim=DIM)
    with pytest.raises(ValueError, match="dtype"):
        MemoryStore(max_bytes=10**6, dim=DIM, dtype=np.dtype(np.float64))


def test_wrongly_shaped_vectors_are_refused_and_store_nothing() -> None:
    store = MemoryStore(max_bytes=10_000, dim=DIM)

    with pytest.raises(ValueError, match="shape"):
        store.write_sync("u", ["a", "b"], np.zeros((2, DIM + 1), np.float32), fresh())

    assert len(store) == 0


def test_expired_rows_read_as_zero_misses_and_free_their_bytes() -> None:
    store = MemoryStore(max_bytes=10_000, dim=DIM)
    store.write_sync("u", ["i"], rows_of(5.0), fresh(ttl=10.0))

    later = time.time() + 11.0
    rows = store.read_sync("u", ["i", "i"], FLOAT32, later)

    assert rows.statuses(later).tolist() == [RowStatus.MISS, RowStatus.MISS]
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


def test_a_writer_thread_and_a_reader_share_the_store() -> None:
    store = MemoryStore(max_bytes=60_000, dim=DIM)
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for n in range(400):
                items = [f"i{(n * 7 + k) % 300}" for k in range(10)]
                store.write_sync(f"u{n % 5}", items, np.full((10, DIM), n, np.float32), fresh())
        except BaseException as error:  # the assertion below reports it
            errors.append(error)

    writer = threading.Thread(target=write)
    writer.start()
    while writer.is_alive():
        rows = store.read_sync("u1", [f"i{k}" for k in range(300)], FLOAT32, time.time())
        found = rows.statuses(time.time()) != RowStatus.MISS
        assert (rows.values[found] == rows.values[found][:, :1]).all()
    writer.join()

    assert errors == []
    pairs = [(f"u{u}", f"i{k}") for u in range(5) for k in range(300)]
    kept = holds(store, pairs)
    users = {pair[0] for pair, is_held in zip(pairs, kept, strict=True) if is_held}
    assert store.nbytes == int(kept.sum()) * store.pair_bytes + sum(map(user_bytes, users))


def test_the_garbage_collector_has_no_entries_to_walk() -> None:
    store = MemoryStore(max_bytes=10**6, dim=DIM)
    items = [f"i{n}" for n in range(1_000)]
    store.write_sync("u", items, np.zeros((1_000, DIM), np.float32), fresh())
    gc.collect()

    tracked_before = len(gc.get_objects())
    store.write_sync("v", items, np.zeros((1_000, DIM), np.float32), fresh())
    gc.collect()

    assert len(gc.get_objects()) - tracked_before < 100
