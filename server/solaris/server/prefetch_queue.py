"""The Prefetch queue: pairs a ranker says it will score soon, waiting for the precompute
daemon. Bounded in pairs; a request that does not fit is refused whole, so what is already
queued is never lost or displaced. Highest priority first, then first come first served.
"""

import heapq
import itertools
import threading
from dataclasses import dataclass, field

from solaris.server.errors import ResourceExhausted


@dataclass(frozen=True, slots=True)
class PrefetchTask:
    """Items to compute for one user, with the history the model should read."""

    user_id: str
    item_ids: tuple[str, ...]
    history: tuple[str, ...] = ()
    priority: int = 0
    receipt: str = field(default="", compare=False)
    """Where the task came from, to acknowledge it once done (a stream entry id), or ""."""


@dataclass(order=True)
class _Slot:
    sort_key: tuple[int, int]
    task: PrefetchTask = field(compare=False)


class PrefetchQueue:
    """A thread-safe priority queue capped in pairs."""

    def __init__(self, max_pairs: int) -> None:
        self.max_pairs = max_pairs
        self._heap: list[_Slot] = []
        self._pairs = 0
        self._order = itertools.count()
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)

    @property
    def pairs(self) -> int:
        return self._pairs

    def put(self, task: PrefetchTask) -> None:
        """Queues the task whole, or raises ResourceExhausted and queues nothing."""
        with self._lock:
            if self._pairs + len(task.item_ids) > self.max_pairs:
                raise ResourceExhausted(
                    f"prefetch queue full: {self._pairs} of {self.max_pairs} pairs queued, "
                    f"{len(task.item_ids)} more do not fit"
                )
            heapq.heappush(self._heap, _Slot((-task.priority, next(self._order)), task))
            self._pairs += len(task.item_ids)
            self._not_empty.notify()

    async def submit(self, task: PrefetchTask) -> None:
        self.put(task)

    def ack(self, tasks: list[PrefetchTask]) -> None:
        """Nothing to do: a task taken from memory is gone."""

    def close(self) -> None:
        """Nothing to release: the queue belongs to the sidecar."""

    def take(self, max_tasks: int, timeout: float | None = None) -> list[PrefetchTask]:
        """Removes up to `max_tasks` tasks, best first, waiting up to `timeout` for the first."""
        with self._not_empty:
            if not self._heap:
                self._not_empty.wait(timeout)
            taken: list[PrefetchTask] = []
            while self._heap and len(taken) < max_tasks:
                task = heapq.heappop(self._heap).task
                self._pairs -= len(task.item_ids)
                taken.append(task)
            return taken
