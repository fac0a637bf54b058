"""Redis memory bounded in bytes: a real `solaris serve --redis` given Prefetches and reads
far larger than its work- and request-stream budgets, against a redis-server with a
`maxmemory` and the `volatile-ttl` policy the k8s base sets. The streams stay within their
budgets, and so no embedding (the only keys with a TTL, the only ones Redis may evict) is
pushed out."""

from dataclasses import replace

import grpc

from solaris.server.prefetch_queue import PrefetchTask
from solaris.server.redis_streams import StreamFields
from solaris.server.request_stream import REQUEST_STREAM_KEY, stream_length
from solaris.server.work_stream import (
    MAX_TASK_ITEMS,
    STREAM_KEY,
    decode_task,
    encode_tasks,
    work_entry_bytes,
)
from solaris.v1 import embedding_store_pb2 as pb
from solaris.v1.embedding_store_pb2_grpc import EmbeddingStoreStub
from tests.conftest import wait_until
from tests.redis.conftest import RedisProcess
from tests.redis.test_health import serve, store_pairs

BUDGET = 1024**2


def test_the_streams_keep_to_their_bytes_and_no_embedding_is_evicted(
    redis_server: RedisProcess,
) -> None:
    check = redis_server.client()
    check.config_set("maxmemory", 8 * 1024**2)
    check.config_set("maxmemory-policy", "volatile-ttl")
    users, items = [f"user-{i}" for i in range(50)], [f"item-{i}" for i in range(16)]
    store_pairs(redis_server, users, items)
    pairs = len(users) * len(items)
    flags = ("--work-stream-bytes", str(BUDGET), "--request-stream-bytes", str(BUDGET))
    flags += ("--redis-timeout-ms", "2000")  # 800 KB Prefetches
    with serve(redis_server.url, *flags) as (_, address), grpc.insecure_channel(address) as channel:
        stub = EmbeddingStoreStub(channel)
        for prefetch in range(20):
            wanted = [f"{prefetch}-{i:0>200}" for i in range(4096)]
            stub.Prefetch(pb.PrefetchRequest(user_id="u", item_ids=wanted), timeout=30)
            stub.BatchGet(pb.BatchGetRequest(user_id="u", item_ids=wanted), timeout=30)
        kept = stream_length(BUDGET, 256)
        assert wait_until(lambda: check.xlen(REQUEST_STREAM_KEY) >= kept, timeout=30)
    entries = check.xrange(STREAM_KEY)
    assert len(entries) > 3
    assert max(len(fields[b"task"]) for _, fields in entries) <= work_entry_bytes(256)
    assert check.memory_usage(STREAM_KEY, samples=0) <= BUDGET
    assert check.memory_usage(REQUEST_STREAM_KEY, samples=0) <= BUDGET
    assert check.info("stats")["evicted_keys"] == 0
    assert sum(1 for _ in check.scan_iter("solaris:v1:*", count=1000)) == pairs


def test_a_task_larger_than_an_entry_goes_in_parts_with_the_most_recent_history() -> None:
    items = tuple(f"{i:0>256}" for i in range(4096))
    history = tuple(f"h{i:0>255}" for i in range(256))
    task = PrefetchTask("user", items, history, priority=7)
    parts = [decode_task("0-1", fields_of(entry)) for entry in encode_tasks(task, 16_320)]
    assert all(len(task_bytes(entry)) <= 16_320 for entry in encode_tasks(task, 16_320))
    assert tuple(item for part in parts if part for item in part.item_ids) == items
    assert {(part.user_id, part.priority) for part in parts if part} == {("user", 7)}
    kept = {part.history for part in parts if part}
    assert len(kept) == 1
    assert 0 < len(next(iter(kept))) < len(history)
    assert history[-len(next(iter(kept))) :] == next(iter(kept))
    small = PrefetchTask("user", ("a", "b"), ("h",))
    assert [decode_task("0-1", fields_of(entry)) for entry in encode_tasks(small, 16_320)] == [
        replace(small, receipt="0-1")
    ]


def test_a_task_of_many_short_items_goes_in_parts_of_at_most_max_task_items() -> None:
    items = tuple(f"i{n}" for n in range(3 * MAX_TASK_ITEMS + 5))
    parts = [
        decode_task("0-1", fields_of(entry))
        for entry in encode_tasks(PrefetchTask("u", items), 16_320)
    ]
    assert [len(part.item_ids) for part in parts if part] == [MAX_TASK_ITEMS] * 3 + [5]
    assert tuple(item for part in parts if part for item in part.item_ids) == items


def task_bytes(entry: StreamFields) -> bytes:
    value = entry["task"]
    assert isinstance(value, bytes)
    return value


def fields_of(entry: StreamFields) -> dict[bytes, bytes]:
    return {b"task": task_bytes(entry)}
