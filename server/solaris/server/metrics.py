"""Prometheus metrics for the sidecar and the daemon, served over HTTP at /metrics.

The serving path records only what it alone knows (rows by status, read latency, request
size), once per read. Everything else (L1 bytes and evictions, queue depth, runner and Redis
counters) is read from the live objects when Prometheus scrapes, so it costs nothing between
scrapes. Each process (and each sidecar in a test) has its own registry.
"""

import bisect
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import cast

import numpy as np
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from solaris.server.aggregates import RowTier
from solaris.server.grpc_api.admission import Admission
from solaris.server.l1 import MemoryStore
from solaris.server.metrics_http import ThreadedMetricsServer
from solaris.server.prefetch_queue import PrefetchQueue
from solaris.server.reachability import Reachability
from solaris.server.redis_store import RedisStore
from solaris.server.request_log import RequestLog
from solaris.server.request_stream import EPOCH_SECONDS, RequestShipper
from solaris.server.rollout import Rollout
from solaris.server.store import RowStatus

READ_SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)
REQUEST_ITEMS_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2000, 4096)

_go_float = cast("Callable[[float], str]", floatToGoString)
"""How prometheus_client writes a bucket bound (its function is untyped)."""


class ReadMetrics(Collector):
    """What the serving path records, once per answered read: rows by status, read latency and
    request size. Kept as plain counts and turned into metric families only when Prometheus
    scrapes: prometheus_client's Counter and Histogram take a lock and walk their buckets on
    every update, about 25 us a read, as much as the rest of the read's bookkeeping."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._rows = [0] * (max(RowStatus) + 1)
        """Rows answered, by RowStatus value."""
        self._tiers = [0] * (max(RowTier) + 1)
        """Rows answered, by RowTier value: which tier of the miss ladder filled them."""
        self._seconds = _Buckets(READ_SECONDS_BUCKETS)
        self._items = _Buckets(REQUEST_ITEMS_BUCKETS)
        self._created = time.time()
        self._lock = threading.Lock()  # the scrape may run on another thread
        registry.register(self)

    def observe(self, statuses: np.ndarray, tiers: np.ndarray, seconds: float) -> None:
        counts = np.bincount(statuses, minlength=len(self._rows)).tolist()
        by_tier = np.bincount(tiers, minlength=len(self._tiers)).tolist()
        with self._lock:
            self._rows = [held + new for held, new in zip(self._rows, counts, strict=False)]
            self._tiers = [held + new for held, new in zip(self._tiers, by_tier, strict=False)]
            self._seconds.observe(seconds)
            self._items.observe(len(statuses))

    def describe(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        """The families, for the registry to refuse a second set of read metrics."""
        return self.collect()

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        with self._lock:
            rows, tiers = list(self._rows), list(self._tiers)
            seconds, items = self._seconds.copy(), self._items.copy()
        family = CounterMetricFamily("solaris_rows", "Rows answered, by status.", labels=["status"])
        for status in RowStatus:
            family.add_metric([status.name.lower()], rows[status], created=self._created)
        yield family
        by_tier = CounterMetricFamily(
            "solaris_rows_by_tier",
            "Rows answered, by the tier that filled them: pair (HIT or STALE), the miss "
            "ladder's user, item or global aggregate, or none (zeros).",
            labels=["tier"],
        )
        for tier in RowTier:
            by_tier.add_metric([tier.name.lower()], tiers[tier], created=self._created)
        yield by_tier
        yield seconds.family(
            "solaris_read_seconds",
            "Time to answer a Get or BatchGet inside the sidecar.",
            self._created,
        )
        yield items.family(
            "solaris_read_items", "Items asked for in one Get or BatchGet.", self._created
        )


class _Buckets:
    """A histogram's counts: how many values fell in each bucket (not cumulative), and their
    sum; the last bucket is +Inf."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le).
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def copy(self) -> "_Buckets":
        copied = _Buckets(self.bounds)
        copied.counts, copied.sum = list(self.counts), self.sum
        return copied

    def family(self, name: str, help_text: str, created: float) -> HistogramMetricFamily:
        """As prometheus_client's Histogram exports it: cumulative buckets, sum, count and
        created."""
        bounds = [_go_float(bound) for bound in self.bounds] + ["+Inf"]
        cumulative = itertools.accumulate(self.counts)
        family = HistogramMetricFamily(name, help_text)
        family.add_metric([], list(zip(bounds, cumulative, strict=True)), self.sum)
        family.add_sample(f"{name}_created", {}, created)
        return family


class LiveValues(Collector):
    """Gauges and counters read from live objects at scrape time. Each component's values are
    registered once, by a typed function beside it, from the process's composition root."""

    def __init__(self) -> None:
        self._gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self._counters: dict[str, tuple[str, Callable[[], float]]] = {}
        self._infos: dict[str, tuple[str, Callable[[], dict[str, str]]]] = {}

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self._gauges[name] = (help_text, read)

    def counter(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self._counters[name] = (help_text, read)

    def info(self, name: str, help_text: str, read: Callable[[], dict[str, str]]) -> None:
        """`name_info{label="value", ...} 1`, the labels read at scrape time."""
        self._infos[name] = (help_text, read)

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | InfoMetricFamily]:
        for name, (help_text, read) in self._gauges.items():
            yield GaugeMetricFamily(name, help_text, value=read())
        for name, (help_text, read) in self._counters.items():
            yield CounterMetricFamily(name, help_text, value=read())
        for name, (help_text, labels) in self._infos.items():
            yield InfoMetricFamily(name, help_text, value=labels())


def serve_metrics(
    registry: CollectorRegistry, host: str, port: int
) -> tuple[ThreadedMetricsServer, int]:
    """Starts the /metrics HTTP server on a thread of its own (for a process without an event
    loop); returns it and the port it bound."""
    server = ThreadedMetricsServer(registry)
    return server, server.start(host, port)


def l1_values(live: LiveValues, l1: MemoryStore) -> None:
    live.gauge("solaris_l1_bytes", "Bytes the L1 holds, as capped.", lambda: l1.nbytes)
    live.gauge("solaris_l1_entries", "Pairs the L1 holds.", lambda: len(l1))
    live.gauge(
        "solaris_l1_aggregates",
        "The miss ladder's aggregates (user, item, global) the L1 holds, within its bytes.",
        lambda: len(l1.aggregates),
    )
    live.gauge(
        "solaris_l1_aggregate_bytes",
        "Of solaris_l1_bytes, the bytes of the miss ladder's aggregates.",
        lambda: l1.aggregates.nbytes,
    )
    live.counter("solaris_l1_evictions", "L1 rows evicted.", lambda: l1.evictions)


def prefetch_queue_values(live: LiveValues, queue: PrefetchQueue) -> None:
    live.gauge(
        "solaris_prefetch_queue_pairs",
        "Pairs waiting in the in-process Prefetch queue.",
        lambda: queue.pairs,
    )


def redis_values(live: LiveValues, reachability: Reachability, l2: RedisStore) -> None:
    live.gauge("solaris_redis_up", "1 while Redis answers.", lambda: int(reachability.up))
    live.counter("solaris_redis_errors", "Redis calls failed.", lambda: reachability.errors)
    live.counter(
        "solaris_redis_timeouts",
        "Redis calls gone on without at their budget (a read answered from L1 alone).",
        lambda: reachability.timeouts,
    )
    live.counter(
        "solaris_redis_corrupt_values",
        "Redis values read as misses: header did not fit.",
        lambda: l2.corrupt_values,
    )


def rollout_values(live: LiveValues, rollout: Rollout) -> None:
    live.info(
        "solaris_model_version",
        "The model version served, the candidate rolling out (empty: none), and whether the "
        "served one is pinned.",
        lambda: {
            "served": rollout.served,
            "candidate": rollout.candidate,
            "pinned": str(rollout.pinned).lower(),
        },
    )
    coverage = rollout.coverage
    live.gauge(
        "solaris_rollout_candidate_hit_rate",
        "Of the pairs of sampled reads, the share the candidate version holds (0: no candidate).",
        lambda: coverage.rate(coverage.candidate),
    )
    live.gauge(
        "solaris_rollout_served_hit_rate",
        "Of the same sampled pairs, the share the served version holds.",
        lambda: coverage.rate(coverage.served),
    )
    stats = rollout.stats
    live.counter(
        "solaris_rollout_switches", "Switches to a new model version.", lambda: stats.switches
    )
    live.counter(
        "solaris_rollout_deadline_switches",
        "Of the switches, those made at the deadline: the new version held too little.",
        lambda: stats.deadline_switches,
    )
    live.counter(
        "solaris_rollout_shadow_reads",
        "Sampled reads looked up under the served and the candidate version.",
        lambda: stats.shadow_reads,
    )
    live.counter(
        "solaris_rollout_work_pairs",
        "The candidate's misses on sampled reads, added to the work stream.",
        lambda: stats.work_pairs,
    )
    live.counter(
        "solaris_rollout_errors",
        "Announcements, sampled reads or work the rollout did not get from or to Redis.",
        lambda: stats.errors,
    )


def request_log_values(live: LiveValues, log: RequestLog) -> None:
    live.gauge(
        "solaris_request_log_bytes",
        "Memory the request log keeps answered reads in (--request-log-bytes).",
        lambda: log.nbytes,
    )
    live.counter(
        "solaris_request_log_evicted",
        "Answered reads the request log let go to stay within --request-log-bytes.",
        lambda: log.dropped_requests,
    )


def shipper_values(live: LiveValues, shipper: RequestShipper) -> None:
    live.counter(
        "solaris_request_stream_dropped",
        "Answered reads not shipped to the Redis request stream: its buffer was full, or "
        "Redis failed.",
        lambda: shipper.dropped,
    )
    live.counter(
        "solaris_request_stream_entries",
        "Entries shipped to the Redis request stream.",
        lambda: shipper.shipped_entries,
    )
    live.counter(
        "solaris_request_stream_bytes",
        "Bytes of the entries shipped to the Redis request stream.",
        lambda: shipper.shipped_bytes,
    )
    live.gauge(
        "solaris_request_stream_id_table_bytes",
        "Memory the table numbering the ids on the request stream takes.",
        lambda: shipper.id_table_bytes,
    )
    live.counter(
        "solaris_request_stream_id_tables",
        f"Tables of ids begun for the request stream (every {EPOCH_SECONDS:g} s, or sooner "
        "when one is full or Redis lost entries).",
        lambda: shipper.epochs,
    )


def admission_values(live: LiveValues, admission: Admission) -> None:
    live.gauge(
        "solaris_unsent_answer_bytes",
        "Bytes of answers built but not yet taken by their callers (--max-unsent-bytes caps it).",
        lambda: admission.unsent_bytes,
    )
    live.gauge(
        "solaris_calls_in_flight", "EmbeddingStore calls in flight.", lambda: admission.calls
    )
    live.counter(
        "solaris_refused_unsent_full",
        "Reads refused (RESOURCE_EXHAUSTED): answers not yet sent held --max-unsent-bytes.",
        lambda: admission.refused_full,
    )
    live.counter(
        "solaris_refused_draining",
        "Calls refused (UNAVAILABLE) while the sidecar drained to stop.",
        lambda: admission.refused_draining,
    )
