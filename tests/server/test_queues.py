"""The bounded Prefetch queue, the request log, and its form on the Redis request stream."""

import json

import numpy as np
import pytest

from solaris.server.errors import ResourceExhausted
from solaris.server.prefetch_queue import PrefetchQueue, PrefetchTask
from solaris.server.request_log import LoggedRequest, RequestLog
from solaris.server.request_stream import decode_request, encode_request
from solaris.server.store import RowStatus


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


def test_request_log_keeps_at_most_its_rows_dropping_the_oldest() -> None:
    log = RequestLog(max_rows=5)
    for n in range(4):
        items = (f"i{n}", f"j{n}")
        log.append(LoggedRequest(f"u{n}", items, np.ones(2, np.uint8), float(n), np.zeros(2)))

    assert [request.user_id for request in log.snapshot()] == ["u2", "u3"]
    assert log.rows == 4
    assert log.dropped_requests == 2


def test_a_logged_request_survives_the_request_stream() -> None:
    statuses = np.array([RowStatus.HIT, RowStatus.MISS], np.uint8)
    request = LoggedRequest("u", ("hit", "miss"), statuses, 100.0, np.array([160.0, -np.inf]))

    decoded = decode_request({k.encode(): v.encode() for k, v in encode_request(request).items()})

    assert decoded is not None
    assert (decoded.user_id, decoded.item_ids, decoded.time) == ("u", ("hit", "miss"), 100.0)
    assert decoded.statuses.tolist() == [RowStatus.HIT, RowStatus.MISS]
    assert decoded.stale_at.tolist() == [160.0, -np.inf]


def test_a_request_from_an_older_sidecar_never_asks_for_a_refresh() -> None:
    older = json.dumps(["u", ["a"], [1], 100.0]).encode()

    decoded = decode_request({b"request": older})

    assert decoded is not None
    assert decoded.stale_at.tolist() == [np.inf]


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
