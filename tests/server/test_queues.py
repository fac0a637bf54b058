"""The bounded Prefetch queue, the request log, and its form on the Redis request stream."""

import gc
import json
import random
import tracemalloc

import numpy as np
import pytest

from solaris.server.errors import ResourceExhausted
from solaris.server.prefetch_queue import PrefetchQueue, PrefetchTask
from solaris.server.request_log import LoggedRequest, RequestLog, held_bytes
from solaris.server.request_stream import (
    FIELD,
    PartJoiner,
    decode_entry,
    decode_request,
    encode_entries,
    encode_request,
    entry_bytes,
)
from solaris.server.store import TIMES, RowStatus

HIT, MISS, STALE = RowStatus.HIT, RowStatus.MISS, RowStatus.STALE


def test_prefetch_queue_serves_highest_priority_first_then_arrival_order() -> None:
    queue = PrefetchQueue(max_pairs=10)
    for user, priority in [("a", 0), ("b", 5), ("c", 0), ("d", 5)]:
        queue.put(PrefetchTask(user, ("i",), priority=priority))

    assert [task.user_id for task in queue.take(max_tasks=10, timeout=0)] == ["b", "d", "a", "c"]
    assert queue.pairs == 0


def test_prefetch_queue_refuses_a_task_whole_when_it_does_not_fit() -> None:
    queue = PrefetchQueue(max_pairs=3)
    queue.put(PrefetchTask("a", ("1", "2")))

    with pytest.raises(ResourceExhausted):
        queue.put(PrefetchTask("b", ("1", "2")))

    assert queue.pairs == 2
    assert [task.user_id for task in queue.take(max_tasks=5, timeout=0)] == ["a"]


def test_prefetch_queue_take_returns_empty_after_its_timeout() -> None:
    assert PrefetchQueue(max_pairs=3).take(max_tasks=1, timeout=0.01) == []


def logged(user: str, items: tuple[str, ...], seed: int = 0, batches: int = 3) -> LoggedRequest:
    """A read as the sidecar logs it: statuses of every kind, served rows going stale at one of
    `batches` times (as rows computed together do), and stale_at a view of the read's times."""
    rng = np.random.default_rng(seed)
    statuses = rng.choice([HIT, MISS, STALE], len(items)).astype(np.uint8)
    times = np.zeros(len(items), TIMES)
    times["stale_at"] = 1.7e9 + rng.integers(0, batches, len(items)) * 61.25
    times["stale_at"][statuses == MISS] = -np.inf
    return LoggedRequest(user, items, statuses, 1.7e9 + 0.5, times["stale_at"])


def assert_same(decoded: LoggedRequest | None, request: LoggedRequest) -> None:
    assert decoded is not None
    assert (decoded.user_id, decoded.item_ids, decoded.time) == (
        request.user_id,
        request.item_ids,
        request.time,
    )
    assert decoded.statuses.tolist() == request.statuses.tolist()
    assert decoded.stale_at.tolist() == request.stale_at.tolist()


def ids(count: int, length: int = 12, seed: int = 0) -> tuple[str, ...]:
    rng = random.Random(seed)
    return tuple(
        "".join(rng.choices("abcdefghijklmnopqrstuvwxyz0123456789", k=length)) for _ in range(count)
    )


def test_the_request_log_keeps_none_by_default_and_hands_every_read_to_its_listeners() -> None:
    log = RequestLog()
    assert not log.active, "with no listener, the serving path builds no request at all"
    heard: list[LoggedRequest] = []
    log.listeners.append(heard.append)

    for n in range(3):
        log.append(logged(f"u{n}", ("a", "b")))

    assert log.active
    assert [request.user_id for request in heard] == ["u0", "u1", "u2"]
    assert (log.snapshot(), log.nbytes, log.dropped_requests) == ([], 0, 0)


def test_the_request_log_keeps_the_newest_reads_within_its_bytes() -> None:
    one = held_bytes(logged("u0", ids(50)))
    log = RequestLog(retain_bytes=2 * one + one // 2)

    for n in range(4):
        log.append(logged(f"u{n}", ids(50, seed=n)))

    assert [request.user_id for request in log.snapshot()] == ["u2", "u3"]
    assert log.nbytes <= log.retain_bytes
    assert log.dropped_requests == 2


def test_the_request_logs_bytes_are_the_memory_it_holds() -> None:
    """What the log counts is what its requests keep alive, their ids' strings included, and
    not the whole of a read's times that a view of them would hold."""
    log = RequestLog(retain_bytes=1024**3)
    RequestLog(retain_bytes=1024**3).append(logged("warm", ids(500)))  # first-use allocations
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(20):
            log.append(logged(f"user-{n}", ids(500, seed=n)))
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()

    assert 0.95 * held <= log.nbytes <= 1.05 * held


def test_a_logged_request_survives_the_request_stream() -> None:
    statuses = np.array([HIT, MISS], np.uint8)
    request = LoggedRequest("u", ("hit", "miss"), statuses, 100.0, np.array([160.0, -np.inf]))

    (value,) = encode_request(request).values()

    assert_same(decode_request({FIELD: value}), request)  # type: ignore[dict-item]


@pytest.mark.parametrize(
    "items",
    [
        ids(500),
        ("nul\x00inside", "", "\x00", "é", "🙂" * 3),
        ("ü" * 100, "plain", "日本語"),
        ("one",),
    ],
    ids=["500 plain", "nul and empty", "non-ascii", "one"],
)
@pytest.mark.parametrize("batches", [1, 3, 2000], ids=["one batch", "three", "all distinct"])
def test_every_read_survives_the_binary_form(items: tuple[str, ...], batches: int) -> None:
    request = logged("user-ü", items, seed=len(items), batches=batches)

    (value,) = encode_entries(request, entry_bytes(256))

    assert_same(decode_request({FIELD: value}), request)


def test_a_500_item_read_defining_its_12_byte_ids_is_its_ids_and_about_4_bytes_an_item() -> None:
    """The first read of an epoch names every id whole (about 7 KB before numbers, 18 KB as
    JSON before that); later reads name them by number (tests.server.test_request_stream)."""
    items = ids(500)
    request = logged("user-123456", items)

    (value,) = encode_entries(request, entry_bytes(256))

    assert len(value) < 500 * 12 + 500 * 4 + 100


def test_a_miss_goes_stale_at_minus_infinity_whatever_the_store_said() -> None:
    """A miss's stale_at means nothing, so it is not sent."""
    statuses = np.array([MISS, HIT], np.uint8)
    request = LoggedRequest("u", ("a", "b"), statuses, 10.0, np.array([0.0, 70.0]))

    decoded = decode_request({FIELD: encode_entries(request, entry_bytes(256))[0]})

    assert decoded is not None
    assert decoded.stale_at.tolist() == [-np.inf, 70.0]


@pytest.mark.parametrize("max_id_bytes", [32, 256, 20_000])
def test_a_read_too_large_for_one_entry_goes_in_parts_that_join_whole_in_any_order(
    max_id_bytes: int,
) -> None:
    most = entry_bytes(max_id_bytes)
    count = 3 * most // (max_id_bytes // 2)  # about three entries' worth
    items = (*ids(count, length=max_id_bytes // 2, seed=1), "x" * max_id_bytes)
    request = logged("u" * max_id_bytes, items, batches=40)

    values = encode_entries(request, most)
    parts = [decode_entry({FIELD: value}) for value in values]

    assert len(values) > 1
    assert max(map(len, values)) <= most
    joiner = PartJoiner()
    random.Random(0).shuffle(parts)
    joined = [joiner.add(part) for part in parts if part is not None]
    assert joined[:-1] == [None] * (len(values) - 1)
    assert_same(joined[-1], request)


def test_a_read_whose_parts_do_not_all_come_is_let_go_and_counted() -> None:
    joiner = PartJoiner(max_pending=2)
    most = entry_bytes(32)
    for n in range(4):
        first, *_ = encode_entries(logged(f"u{n}", ids(3000, seed=n)), most)
        assert joiner.add(decode_entry({FIELD: first})) is None  # type: ignore[arg-type]

    assert joiner.incomplete == 2


def test_every_cut_short_or_padded_entry_is_refused() -> None:
    request = logged("user", ("a", "b\x00c", "d", "e", "f"))
    (value,) = encode_entries(request, entry_bytes(256))

    for end in range(len(value)):
        assert decode_request({FIELD: value[:end]}) is None, end
    assert decode_request({FIELD: value + b"\x00"}) is None


def test_a_request_from_an_older_sidecar_never_asks_for_a_refresh() -> None:
    older = json.dumps(["u", ["a"], [1], 100.0]).encode()

    decoded = decode_request({b"request": older})

    assert decoded is not None
    assert decoded.stale_at.tolist() == [np.inf]


def test_a_json_request_from_a_sidecar_before_the_binary_form_still_reads() -> None:
    """A fleet upgrading sidecars one by one: the speculator reads both forms."""
    entry = json.dumps(["u", ["a", "b"], [1, 2], 100.0, [160.0, None]]).encode()

    decoded = decode_request({b"request": entry})

    assert decoded is not None
    assert (decoded.user_id, decoded.item_ids, decoded.statuses.tolist()) == (
        "u",
        ("a", "b"),
        [1, 2],
    )
    assert decoded.stale_at.tolist() == [160.0, -np.inf]


@pytest.mark.parametrize(
    "entry",
    [
        ["u", ["a", "b"], [1], 0.0],
        ["u", ["a"], [1], float("nan")],
        ["u", ["a"], [1], 0.0, [float("nan")]],
        ["u", ["a"], [1], 0.0, ["soon"]],
        ["u", ["a"], [1], 0.0, [1.0, 2.0]],
        ["u", ["a"], [300], 0.0],
        [1, ["a"], [1], 0.0],
    ],
)
def test_a_malformed_request_entry_is_refused(entry: list) -> None:
    assert decode_request({b"request": json.dumps(entry).encode()}) is None


@pytest.mark.parametrize(
    ("change", "at"),
    [
        (b"\x03", 0),  # an unknown version
        (b"\x00", -1),  # a status of 0 in the last packed byte (one item: 0b01 -> 0b00)
        (b"\x7f\xf8\x00\x00\x00\x00\x00\x00"[::-1], 3),  # a NaN time
    ],
    ids=["version", "status", "time"],
)
def test_a_binary_entry_with_a_value_out_of_place_is_refused(change: bytes, at: int) -> None:
    request = LoggedRequest("u", ("a",), np.array([MISS], np.uint8), 1.0, np.array([-np.inf]))
    value = bytearray(encode_entries(request, entry_bytes(256))[0])
    at = at % len(value)
    value[at : at + len(change)] = change

    assert decode_request({FIELD: bytes(value)}) is None


def test_a_stale_at_index_past_its_table_is_refused() -> None:
    items = tuple("abcdefghijkl")
    statuses = np.full(len(items), HIT, np.uint8)
    request = LoggedRequest("u", items, statuses, 1.0, np.array([5.0, 6.0, 7.0] * 4))
    value = bytearray(encode_entries(request, entry_bytes(256))[0])
    value[-1] = 0xFF  # the last four rows' 2-bit index: 3, and the table holds 3 values

    assert decode_request({FIELD: bytes(value)}) is None
