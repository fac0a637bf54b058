"""A circuit breaker, so that a dead sidecar costs the ranker nothing but the fallback."""

import threading
import time
from collections.abc import Callable


class CircuitBreaker:
    """Closed: calls go through and consecutive failures are counted. After
    `failures_to_open` in a row it opens, and calls are skipped for `open_seconds`. Then one
    probe call is let through (half-open): its success closes the breaker, its failure opens it
    again. A probe that never reports back is replaced after another `open_seconds`."""

    def __init__(
        self,
        failures_to_open: int,
        open_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failures_to_open < 1:
            raise ValueError(f"failures_to_open: must be at least 1, got {failures_to_open}")
        if open_seconds <= 0:
            raise ValueError(f"open_seconds: must be above 0, got {open_seconds}")
        self.failures_to_open = failures_to_open
        self.open_seconds = open_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._probe_sent_at: float | None = None

    @property
    def state(self) -> str:
        """ "closed", "open" or "half_open" (waiting for a probe to be sent or to report)."""
        with self._lock:
            if self._opened_at is None:
                return "closed"
            if self._clock() - self._opened_at < self.open_seconds:
                return "open"
            return "half_open"

    def allow(self) -> bool:
        """Whether to make a call now. In half-open state, True once: the caller is the probe."""
        with self._lock:
            if self._opened_at is None:
                return True
            now = self._clock()
            if now - self._opened_at < self.open_seconds:
                return False
            if self._probe_sent_at is not None and now - self._probe_sent_at < self.open_seconds:
                return False
            self._probe_sent_at = now
            return True

    def succeeded(self) -> None:
        with self._lock:
            self._failures = 0
            self._opened_at = None
            self._probe_sent_at = None

    def failed(self) -> None:
        with self._lock:
            self._failures += 1
            if self._opened_at is not None or self._failures >= self.failures_to_open:
                self._opened_at = self._clock()
                self._probe_sent_at = None
