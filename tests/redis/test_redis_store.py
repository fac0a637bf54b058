"""The store contract, passed by the memory store and the Redis store alike, and what is
particular to Redis: keys, expiry, corrupt values."""

import asyncio
import struct
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest
import redis.exceptions
from redis.crc import key_slot

from solaris.server.l1 import MemoryStore
from solaris.server.redis_store import RedisStore, connect, pair_key, read_stale_at
from solaris.server.store import (
    FLOAT16,
    FLOAT32,
    Freshness,
    RowStatus,
    Store,
    UserItems,
    UserVectors,
)
from tests.redis.conftest import RedisProcess

DIM = 8
VERSION = "v1"


def fresh(ttl: float = 60.0, stale: float = 60.0) -> Freshness:
    return Freshness.starting(VERSION, time.time(), ttl, stale)


def vectors(rows: int) -> np.ndarray:
    return np.random.default_rng(rows).standard_normal((rows, DIM)).astype(np.float32)


@pytest.fixture(params=["memory", "redis-float16", "redis-float32"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield MemoryStore(1024**2, DIM)
        return
    server: RedisProcess = request.getfixturevalue("redis_server")
    client = connect(server.url, 1.0)
    yield RedisStore(client, DIM, VERSION, stored_dtype=np.dtype(request.param.split("-")[1]))
    await client.aclose()


def as_stored(store: Store, written: np.ndarray) -> np.ndarray:
    """`written` as `store` keeps it: rounded to float16 in Redis by default."""
    return written.astype(getattr(store, "stored_dtype", FLOAT32)).astype(FLOAT32)


async def test_rows_come_back_as_written_in_request_order(store: Store) -> None:
    written = vectors(3)
    freshness = fresh()
    await store.write("user", ["a", "b", "c"], written, freshness)
    rows = await store.read("user", ["c", "x", "a"], FLOAT32, time.time())
    assert rows.values.dtype == FLOAT32
    assert np.array_equal(rows.values[[0, 2]], as_stored(store, written)[[2, 0]])
    assert not rows.values[1].any()
    assert list(rows.statuses(time.time())) == [RowStatus.HIT, RowStatus.MISS, RowStatus.HIT]
    assert np.allclose(rows.times[0].tolist(), freshness[1:])
    assert rows.model_version == VERSION


async def test_many_users_are_written_and_read_as_each_alone(store: Store) -> None:
    first, second = vectors(2), vectors(3)
    batch = [UserVectors("u1", ["a", "b"], first), UserVectors("u2", ["a", "b", "c"], second)]
    await store.write_many(batch, fresh())
    now = time.time()
    wanted = [UserItems("u2", ["c", "a", "x"]), UserItems("u1", ["b"]), UserItems("u3", ["a"])]

    answers = await store.read_many(wanted, FLOAT32, now)

    assert [rows.statuses(now).tolist() for rows in answers] == [
        [RowStatus.HIT, RowStatus.HIT, RowStatus.MISS],
        [RowStatus.HIT],
        [RowStatus.MISS],
    ]
    assert np.array_equal(answers[0].values[:2], as_stored(store, second)[[2, 0]])
    assert np.array_equal(answers[1].values, as_stored(store, first)[[1]])
    alone = await store.read("u2", ["c", "a", "x"], FLOAT32, now)
    assert np.array_equal(alone.values, answers[0].values)
    assert np.array_equal(alone.times, answers[0].times)


async def test_float16_reads_are_the_float32_rows_cast(store: Store) -> None:
    written = vectors(2)
    await store.write("user", ["a", "b"], written, fresh())
    rows = await store.read("user", ["a", "b"], FLOAT16, time.time())
    assert rows.values.dtype == FLOAT16
    assert np.array_equal(rows.values, written.astype(FLOAT16))


async def test_users_do_not_see_each_others_rows(store: Store) -> None:
    await store.write("user-1", ["a"], vectors(1), fresh())
    rows = await store.read("user-2", ["a"], FLOAT32, time.time())
    assert list(rows.statuses(time.time())) == [RowStatus.MISS]


async def test_a_row_past_its_ttl_is_stale_then_gone(store: Store) -> None:
    await store.write("user", ["a"], vectors(1), fresh(ttl=0.05, stale=0.15))
    await asyncio.sleep(0.1)
    assert list((await store.read("user", ["a"], FLOAT32, time.time())).statuses(time.time())) == [
        RowStatus.STALE
    ]
    await asyncio.sleep(0.15)
    assert list((await store.read("user", ["a"], FLOAT32, time.time())).statuses(time.time())) == [
        RowStatus.MISS
    ]


def test_keys_carry_the_version_and_share_a_cluster_slot_per_user() -> None:
    keys = [pair_key(VERSION, "user-7", f"item-{n}") for n in range(50)]
    assert all(key.startswith(f"solaris:{VERSION}:") for key in keys)
    assert len({key_slot(key.encode()) for key in keys}) == 1


def test_a_brace_in_a_user_id_cannot_make_two_pairs_share_a_key() -> None:
    assert pair_key(VERSION, "a}:b", "c") != pair_key(VERSION, "a", "b}:c")
    tagged = pair_key(VERSION, "a}:b", "c")
    assert key_slot(tagged.encode()) == key_slot(pair_key(VERSION, "a}:b", "d").encode())


async def test_redis_expires_the_key_itself(redis_server: RedisProcess) -> None:
    client = connect(redis_server.url, 1.0)
    store = RedisStore(client, DIM, VERSION)
    await store.write("user", ["a"], vectors(1), fresh(ttl=10, stale=5))
    ttl_ms = redis_server.client().pttl(pair_key(VERSION, "user", "a"))
    await client.aclose()
    assert 14_000 < ttl_ms <= 15_000


async def test_a_corrupt_value_is_a_counted_miss(redis_server: RedisProcess) -> None:
    client = connect(redis_server.url, 1.0)
    store = RedisStore(client, DIM, VERSION)
    await store.write("user", ["a", "b", "c"], vectors(3), fresh())
    raw = redis_server.client()
    raw.set(pair_key(VERSION, "user", "a"), b"garbage")
    good = raw.get(pair_key(VERSION, "user", "b"))
    assert good is not None
    raw.set(pair_key(VERSION, "user", "b"), b"\x09" + good[1:])
    rows = await store.read("user", ["a", "b", "c"], FLOAT32, time.time())
    await client.aclose()
    assert list(rows.statuses(time.time())) == [RowStatus.MISS, RowStatus.MISS, RowStatus.HIT]
    assert store.corrupt_values == 2


async def test_a_bad_header_of_the_right_length_is_a_counted_miss(
    redis_server: RedisProcess,
) -> None:
    """Every value present and of the stored length (the read parsed in one piece), one of
    them with another format byte."""
    client = connect(redis_server.url, 1.0)
    store = RedisStore(client, DIM, VERSION)
    written = vectors(3).astype(FLOAT16).astype(FLOAT32)
    await store.write("user", ["a", "b", "c"], written, fresh())
    raw = redis_server.client()
    good = raw.get(pair_key(VERSION, "user", "b"))
    assert good is not None
    raw.set(pair_key(VERSION, "user", "b"), b"\x09" + good[1:])
    rows = await store.read("user", ["c", "b", "a"], FLOAT32, time.time())
    await client.aclose()
    assert list(rows.statuses(time.time())) == [RowStatus.HIT, RowStatus.MISS, RowStatus.HIT]
    assert np.array_equal(rows.values, [written[2], np.zeros(DIM), written[0]])
    assert store.corrupt_values == 1


async def test_the_client_sends_what_redis_py_would(redis_server: RedisProcess) -> None:
    """Commands are packed by hiredis: every argument type redis-py takes round-trips, a
    command name holding a space is split, and what redis-py refuses is still refused."""
    client = connect(redis_server.url, 1.0)
    await client.set("bytearray", bytearray(b"\x00\xff"))
    await client.set("memoryview", memoryview(b"view"))
    await client.set("text", "\u00fc")
    await client.set("number", 1.5, px=60_000)
    got = await client.mget(["bytearray", "memoryview", "text", "number"])
    config = await client.config_get("maxmemory-policy")
    with pytest.raises(redis.exceptions.DataError):
        await client.set("flag", True)
    await client.aclose()
    assert got == [b"\x00\xff", b"view", "\u00fc".encode(), b"1.5"]
    assert "maxmemory-policy" in config
    packer = client.connection_pool.connection_class.pack_command
    assert packer is not redis.asyncio.Connection.pack_command  # not redis-py's own, in Python


def legacy_value(row: np.ndarray, freshness: Freshness, dim: int = DIM) -> bytes:
    """A value as sidecars and daemons before the compact layout wrote it: format 1, dtype 1
    (float32), the dim, the three times, the version's length and bytes, float32 values."""
    version = freshness.model_version.encode()
    header = struct.pack("<BBI3dB", 1, 1, dim, *freshness[1:], len(version))
    return header + version + row.astype("<f4").tobytes()


async def test_a_value_is_a_format_byte_its_times_and_its_values(
    redis_server: RedisProcess,
) -> None:
    """Float16 by default, float32 when told; no dim and no model version (the key has it)."""
    client = connect(redis_server.url, 1.0)
    freshness = fresh()
    written = vectors(1)
    await RedisStore(client, DIM, VERSION).write("user", ["half"], written, freshness)
    wide = RedisStore(client, DIM, VERSION, stored_dtype=FLOAT32)
    await wide.write("user", ["single"], written, freshness)
    await client.aclose()
    raw = redis_server.client()
    half, single = (
        raw.get(pair_key(VERSION, "user", "half")),
        raw.get(pair_key(VERSION, "user", "single")),
    )
    assert half == struct.pack("<B3d", 2, *freshness[1:]) + written.astype("<f2").tobytes()
    assert single == struct.pack("<B3d", 3, *freshness[1:]) + written.astype("<f4").tobytes()


async def test_a_rolling_upgrade_reads_every_layout_in_one_read(
    redis_server: RedisProcess,
) -> None:
    """Values in the legacy layout, compact float32 and compact float16 side by side (writers
    of each during an upgrade): all HITs, each exactly as stored."""
    client = connect(redis_server.url, 1.0)
    store = RedisStore(client, DIM, VERSION)
    written, freshness = vectors(3), fresh()
    redis_server.client().set(pair_key(VERSION, "user", "old"), legacy_value(written[0], freshness))
    wide = RedisStore(client, DIM, VERSION, stored_dtype=FLOAT32)
    await wide.write("user", ["single"], written[1:2], freshness)
    await store.write("user", ["half"], written[2:], freshness)
    mixed = await store.read("user", ["old", "single", "half"], FLOAT32, time.time())
    as_stored = await store.read("user", ["old", "single", "half"], None, time.time())
    halves = await store.read("user", ["half", "half"], None, time.time())
    legacy = await store.read("user", ["old"], FLOAT16, time.time())
    await client.aclose()
    expected = [written[0], written[1], written[2].astype(FLOAT16).astype(FLOAT32)]
    assert np.array_equal(mixed.values, expected)
    assert list(mixed.statuses(time.time())) == [RowStatus.HIT] * 3
    assert np.allclose(mixed.times["stale_at"], freshness.stale_at)
    assert as_stored.values.dtype == FLOAT32  # float32 where a batch holds both
    assert np.array_equal(as_stored.values, expected)
    assert halves.values.dtype == FLOAT16  # as stored: no round trip through float32
    assert np.array_equal(halves.values, written[[2, 2]].astype(FLOAT16))
    assert np.array_equal(legacy.values, written[:1].astype(FLOAT16))
    assert store.corrupt_values == 0


async def test_a_value_of_no_layout_this_reader_takes_is_a_counted_miss(
    redis_server: RedisProcess,
) -> None:
    client = connect(redis_server.url, 1.0)
    store = RedisStore(client, DIM, VERSION)
    row, freshness = vectors(1)[0], fresh()
    await store.write("user", ["good", "half"], vectors(2), freshness)
    raw = redis_server.client()
    half = raw.get(pair_key(VERSION, "user", "half"))
    assert half is not None
    bad = {
        "another version": legacy_value(row, freshness._replace(model_version="v9")),
        "another legacy dim": legacy_value(np.ones(DIM + 1), freshness, DIM + 1),
        "another compact dim": half + b"\x00\x00",
        "cut short": half[:-1],
        "float32's format byte on float16's length": b"\x03" + half[1:],
    }
    for item, value in bad.items():
        raw.set(pair_key(VERSION, "user", item), value)
    rows = await store.read("user", ["good", *bad], FLOAT32, time.time())
    stale_at = read_stale_at(raw, DIM, VERSION, [("user", item) for item in ["good", *bad]])
    await client.aclose()
    assert list(rows.statuses(time.time())) == [RowStatus.HIT] + [RowStatus.MISS] * len(bad)
    assert not rows.values[1:].any()
    assert store.corrupt_values == len(bad)
    assert stale_at.tolist() == [freshness.stale_at] + [-np.inf] * len(bad)


async def test_freshness_is_read_from_the_header_of_either_layout(
    redis_server: RedisProcess,
) -> None:
    client = connect(redis_server.url, 1.0)
    freshness = fresh()
    await RedisStore(client, DIM, VERSION).write("user", ["half"], vectors(1), freshness)
    wide = RedisStore(client, DIM, VERSION, stored_dtype=FLOAT32)
    await wide.write("user", ["single"], vectors(1), freshness)
    await client.aclose()
    raw = redis_server.client()
    raw.set(pair_key(VERSION, "user", "old"), legacy_value(vectors(1)[0], freshness))
    pairs = [("user", item) for item in ["half", "single", "old", "absent"]]
    assert read_stale_at(raw, DIM, VERSION, pairs).tolist() == [freshness.stale_at] * 3 + [-np.inf]
