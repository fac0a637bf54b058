"""Recent call durations, to tell whether a call still has time to succeed."""

import threading
import time
from collections import deque
from collections.abc import Callable


class RecentDurations:
    """The last `size` durations seen within `window_seconds`. Old ones age out, so one slow
    spell does not make the client skip calls for ever."""

    def __init__(
        self,
        size: int = 64,
        window_seconds: float = 10.0,
        min_samples: int = 8,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_seconds = window_seconds
        self.min_samples = min_samples
        self._clock = clock
        self._lock = threading.Lock()
        self._samples: deque[tuple[float, float]] = deque(maxlen=size)

    def add(self, seconds: float) -> None:
        with self._lock:
            self._samples.append((self._clock(), seconds))

    def quantile(self, q: float) -> float | None:
        """The q-quantile of recent durations; None with fewer than `min_samples` of them."""
        recent = self._recent()
        if len(recent) < self.min_samples:
            return None
        recent.sort()
        return recent[min(len(recent) - 1, int(q * len(recent)))]

    def maximum(self) -> float:
        return max(self._recent(), default=0.0)

    def _recent(self) -> list[float]:
        oldest = self._clock() - self.window_seconds
        with self._lock:
            return [seconds for at, seconds in self._samples if at >= oldest]
