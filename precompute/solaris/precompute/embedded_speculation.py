"""The embedded daemon's work source once speculation is on: Prefetch tasks become hints, the
sidecar's answered reads become observations, and the daemon computes what the speculator
hands out within its budget.

The serving path only appends each answered read to a buffer bounded in requested pairs
(what its memory grows with); the daemon's thread feeds the buffer to the speculator when it
next takes work, so speculation costs a read nothing but that append. Learning holds the GIL,
so the daemon's thread learns in slices of about 0.1 ms and pauses between them: a serving
thread waiting on the GIL gets it at the next pause, not after the interpreter's switch
interval (5 ms), which is what learning a burst of reads in one go would cost a read's p99."""

import threading
import time
from collections import deque

from solaris.precompute.daemon import HistoryBook
from solaris.precompute.speculator import Speculator, by_user
from solaris.server.prefetch_queue import PrefetchQueue, PrefetchTask
from solaris.server.request_log import LoggedRequest

_IDLE_SECONDS = 0.02
_HINTS_PER_TAKE = 1_000
_LEARN_SLICE_SECONDS = 0.0001
_LEARN_PAUSE_SECONDS = 0.0002
"""The daemon's thread learns for about a slice (one 500-item read takes about 0.1 ms), then
pauses: learning takes at most about a third of one core, which still follows thousands of
reads a second, and a serving thread waits for the GIL at most a slice (or one read, if
longer)."""


class EmbeddedSpeculation:
    """The embedded daemon's work source with speculation on."""

    def __init__(
        self,
        queue: PrefetchQueue,
        speculator: Speculator,
        history_bytes: int,
        buffered_pairs: int = 250_000,
    ) -> None:
        """`buffered_pairs`: the requested pairs of the reads waiting for the daemon's thread
        (about 25 MB at 12-byte ids), oldest reads dropped past it."""
        self.queue = queue
        self.speculator = speculator
        self.buffered_pairs = buffered_pairs
        self.dropped_reads = 0
        self._reads: deque[LoggedRequest] = deque()
        self._pairs = 0
        self._lock = threading.Lock()
        self.histories = HistoryBook(history_bytes)

    def observe(self, request: LoggedRequest) -> None:
        """Called on the serving path: an append, nothing more."""
        with self._lock:
            self._reads.append(request)
            self._pairs += len(request.item_ids)
            while self._pairs > self.buffered_pairs and len(self._reads) > 1:
                self._pairs -= len(self._reads.popleft().item_ids)
                self.dropped_reads += 1

    def _take_reads(self) -> list[LoggedRequest]:
        with self._lock:
            reads = list(self._reads)
            self._reads.clear()
            self._pairs = 0
        return reads

    def take(self, max_tasks: int, timeout: float | None = None) -> list[PrefetchTask]:
        """What the speculator hands out now, one task per user, waiting up to `timeout` for
        some. It may return more than `max_tasks`: a pair handed out is never dropped."""
        end = time.monotonic() + (timeout or 0)
        while True:
            tasks = self._take_now()
            if tasks or time.monotonic() >= end:
                return tasks
            time.sleep(min(_IDLE_SECONDS, max(0.0, end - time.monotonic())))

    def ack(self, tasks: list[PrefetchTask]) -> None:
        """The tasks' pairs are stored: the speculator may hand them out again once stale."""
        self.speculator.done((task.user_id, item) for task in tasks for item in task.item_ids)

    def close(self) -> None:
        """Nothing to release."""

    def _learn(self, reads: list[LoggedRequest]) -> None:
        slice_end = time.perf_counter() + _LEARN_SLICE_SECONDS
        for read in reads:
            self.speculator.observe((read,))
            if time.perf_counter() >= slice_end:
                time.sleep(_LEARN_PAUSE_SECONDS)
                slice_end = time.perf_counter() + _LEARN_SLICE_SECONDS

    def _take_now(self) -> list[PrefetchTask]:
        hints = self.queue.take(max_tasks=_HINTS_PER_TAKE, timeout=0)
        self._learn(self._take_reads())
        for hint in hints:
            self.histories.update(hint.user_id, hint.history)
            self.speculator.hint(hint.user_id, hint.item_ids, hint.priority)
        return [
            PrefetchTask(user, tuple(entry.item_id for entry in entries), self.histories.get(user))
            for user, entries in by_user(self.speculator.take()).items()
        ]
