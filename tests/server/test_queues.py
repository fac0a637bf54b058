"""The bounded Prefetch queue and request log."""

import numpy as np
import pytest

from solaris.server.errors import ResourceExhausted
from solaris.server.prefetch_queue import PrefetchQueue, PrefetchTask
from solaris.server.request_log import LoggedRequest, RequestLog


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
        log.append(LoggedRequest(f"u{n}", items, np.ones(2, np.uint8), float(n)))

    assert [request.user_id for request in log.snapshot()] == ["u2", "u3"]
    assert log.rows == 4
    assert log.dropped_requests == 2
