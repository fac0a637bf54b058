"""Counters a ranker can export: calls, rows by status, fallbacks by reason, latency."""

import bisect
import threading
from collections import Counter
from dataclasses import dataclass

import numpy as np

from solaris.clients._result import FallbackReason, RowStatus, RowTier

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
"""Upper bounds in seconds of the latency histogram (Prometheus style; one more for +Inf)."""


@dataclass(frozen=True)
class StatsSnapshot:
    """Counts since the client was made. Rates are over rows (hit) and calls (fallback)."""

    calls: int
    rows: int
    rows_by_status: dict[RowStatus, int]
    rows_by_tier: dict[RowTier, int]
    """Rows by the tier that filled them: PAIR, an aggregate's, or NONE (the fallback)."""
    fallbacks_by_reason: dict[FallbackReason, int]
    latency_buckets: tuple[int, ...]
    """Calls per bucket of `LATENCY_BUCKETS`, the last for slower ones (not cumulative)."""
    latency_sum_seconds: float
    prefetches_sent: int
    prefetches_failed: int
    prefetches_dropped: int

    @property
    def hit_rate(self) -> float:
        """Rows served from the store (HIT or STALE) over rows asked for."""
        served = self.rows_by_status.get(RowStatus.HIT, 0) + self.rows_by_status.get(
            RowStatus.STALE, 0
        )
        return served / self.rows if self.rows else 0.0

    def fallback_rate(self, reason: FallbackReason) -> float:
        """Calls with at least one row from the fallback for `reason`, over all calls."""
        return self.fallbacks_by_reason.get(reason, 0) / self.calls if self.calls else 0.0


class ClientStats:
    """Thread-safe counters, updated once per call."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls = 0
        self._rows_by_status: Counter[RowStatus] = Counter()
        self._rows_by_tier: Counter[RowTier] = Counter()
        self._fallbacks: Counter[FallbackReason] = Counter()
        self._latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self._latency_sum = 0.0
        self._prefetch: Counter[str] = Counter()

    def record_call(
        self, status: np.ndarray, tier: np.ndarray, reason: FallbackReason | None, seconds: float
    ) -> None:
        counts = np.bincount(status, minlength=len(RowStatus) + 1)
        by_tier = np.bincount(tier, minlength=len(RowTier) + 1)
        with self._lock:
            self._calls += 1
            for row_status in RowStatus:
                self._rows_by_status[row_status] += int(counts[row_status])
            for row_tier in RowTier:
                self._rows_by_tier[row_tier] += int(by_tier[row_tier])
            if reason is not None:
                self._fallbacks[reason] += 1
            self._latency[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            self._latency_sum += seconds

    def record_prefetch(self, outcome: str) -> None:
        """`outcome` is "sent", "failed" or "dropped" (skipped: breaker open or too many)."""
        with self._lock:
            self._prefetch[outcome] += 1

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            return StatsSnapshot(
                calls=self._calls,
                rows=sum(self._rows_by_status.values()),
                rows_by_status=dict(self._rows_by_status),
                rows_by_tier=dict(self._rows_by_tier),
                fallbacks_by_reason=dict(self._fallbacks),
                latency_buckets=tuple(self._latency),
                latency_sum_seconds=self._latency_sum,
                prefetches_sent=self._prefetch["sent"],
                prefetches_failed=self._prefetch["failed"],
                prefetches_dropped=self._prefetch["dropped"],
            )
