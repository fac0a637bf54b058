"""The request log: every read the sidecar answered, handed to its listeners (the embedded
speculator, the Redis request stream). It also keeps the latest requests, bounded in rows
(requested pairs; the oldest go first), for `snapshot`: only tests read that back today, and
the rows it keeps count toward the sidecar's memory beside L1.
"""

import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class LoggedRequest:
    """One answered read. `statuses` holds a RowStatus value per item, in request order, and
    `stale_at` when each served row goes stale (meaningless for a miss): the speculator's
    refresh needs it, and the sidecar has it at hand."""

    user_id: str
    item_ids: tuple[str, ...]
    statuses: np.ndarray
    time: float
    stale_at: np.ndarray


class RequestLog:
    """A thread-safe, row-capped log of answered reads."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.dropped_requests = 0
        self._requests: deque[LoggedRequest] = deque()
        self._rows = 0
        self._lock = threading.Lock()
        self.listeners: list[Callable[[LoggedRequest], None]] = []
        """Called with each request as it is logged (the Redis shipper, when there is one)."""

    def append(self, request: LoggedRequest) -> None:
        for listener in self.listeners:
            listener(request)
        with self._lock:
            self._requests.append(request)
            self._rows += len(request.item_ids)
            while self._rows > self.max_rows:
                oldest = self._requests.popleft()
                self._rows -= len(oldest.item_ids)
                self.dropped_requests += 1

    def snapshot(self) -> list[LoggedRequest]:
        """The requests now held, oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def rows(self) -> int:
        return self._rows

    def __len__(self) -> int:
        return len(self._requests)

    def __iter__(self) -> Iterator[LoggedRequest]:
        return iter(self.snapshot())
