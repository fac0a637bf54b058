"""The request log: every read the sidecar answered, handed to its listeners (the embedded
speculator, the Redis request stream), which keep what they need in bounded buffers of their
own. The log itself keeps the latest requests only if asked to (`retain_bytes`, for tests and
inspection: nothing in the sidecar reads them back), bounded by an estimate of the memory
they hold, oldest dropped first.
"""

import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

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


def held_bytes(request: LoggedRequest) -> int:
    """The memory a request keeps alive once only the log holds it: its objects, its ids'
    strings and its arrays (which own their data: `RequestLog` keeps a copy)."""
    items = request.item_ids
    return (
        sys.getsizeof(request)
        + sys.getsizeof(request.user_id)
        + sys.getsizeof(items)
        + sum(map(sys.getsizeof, items))
        + sys.getsizeof(request.statuses)
        + sys.getsizeof(request.stale_at)
    )


class RequestLog:
    """Hands each answered read to its listeners; keeps the latest up to `retain_bytes`
    (0: none). Thread-safe."""

    def __init__(self, retain_bytes: int = 0) -> None:
        self.retain_bytes = retain_bytes
        self.dropped_requests = 0
        """Requests let go to stay within `retain_bytes` (none when it is 0)."""
        self.listeners: list[Callable[[LoggedRequest], None]] = []
        """Called with each request as it is logged (the Redis shipper, the embedded
        speculator): each keeps what it needs."""
        self._requests: deque[tuple[LoggedRequest, int]] = deque()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        """Whether a request logged now reaches anything: the serving path builds none when
        nothing would see it."""
        return bool(self.listeners) or self.retain_bytes > 0

    def append(self, request: LoggedRequest) -> None:
        for listener in self.listeners:
            listener(request)
        if self.retain_bytes > 0:
            self._retain(request)

    def _retain(self, request: LoggedRequest) -> None:
        # Own copies: a view would keep its whole base (the read's times) alive.
        owned = replace(request, statuses=request.statuses.copy(), stale_at=request.stale_at.copy())
        size = held_bytes(owned)
        with self._lock:
            self._requests.append((owned, size))
            self._bytes += size
            while self._bytes > self.retain_bytes:
                _, dropped = self._requests.popleft()
                self._bytes -= dropped
                self.dropped_requests += 1

    def snapshot(self) -> list[LoggedRequest]:
        """The requests now held, oldest first."""
        with self._lock:
            return [request for request, _ in self._requests]

    @property
    def nbytes(self) -> int:
        """The memory the requests held keep alive (as `held_bytes` reckons it)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._requests)

    def __iter__(self) -> Iterator[LoggedRequest]:
        return iter(self.snapshot())
