"""The store contract, passed by the memory store and the Redis store alike, and what is
particular to Redis: keys, expiry, corrupt values."""

import asyncio
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest
import redis.exceptions
from redis.crc import key_slot

from solaris.server.l1 import MemoryStore
from solaris.server.redis_store import RedisStore, connect, pair_key
from solaris.server.store import FLOAT16, FLOAT32, Freshness, RowStatus, Store
from tests.redis.conftest import RedisProcess

DIM = 8
VERSION = "v1"


def fresh(ttl: float = 60.0, stale: float = 60.0) -> Freshness:
    return Freshness.starting(VERSION, time.time(), ttl, stale)


def vectors(rows: int) -> np.ndarray:
    return np.random.default_rng(rows).standard_normal((rows, DIM)).astype(np.float32)


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield MemoryStore(1024**2, DIM)
        return
    server: RedisProcess = request.getfixturevalue("redis_server")
    client = connect(server.url, 1.0)
    yield RedisStore(client, DIM, VERSION)
    await client.aclose()


async def test_rows_come_back_as_written_in_request_order(store: Store) -> None:
    written = vectors(3)
    freshness = fresh()
    await store.write("user", ["a", "b", "c"], written, freshness)
    rows = await store.read("user", ["c", "x", "a"], FLOAT32, time.time())
    assert np.array_equal(rows.values[[0, 2]], written[[2, 0]])
    assert not rows.values[1].any()
    assert list(rows.statuses(time.time())) == [RowStatus.HIT, RowStatus.MISS, RowStatus.HIT]
    assert np.allclose(rows.times[0].tolist(), freshness[1:])
    assert rows.model_version == VERSION


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
    written = vectors(3)
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
