"""Prometheus metrics for the sidecar and the daemon, served over HTTP at /metrics.

The serving path records only what it alone knows (rows by status, read latency, request
size), once per read. Everything else (L1 bytes and evictions, queue depth, runner and Redis
counters) is read from the live objects when Prometheus scrapes, so it costs nothing between
scrapes. Each process (and each sidecar in a test) has its own registry.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from solaris.server.settings import BindError
from solaris.server.store import RowStatus

if TYPE_CHECKING:
    from solaris.precompute.daemon import DaemonStats
    from solaris.precompute.shared_speculation import SharedSpeculationStats

READ_SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)
REQUEST_ITEMS_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2000, 4096)


class ReadMetrics:
    """What the serving path records, once per answered read."""

    def __init__(self, registry: CollectorRegistry) -> None:
        rows = Counter("solaris_rows", "Rows answered, by status.", ["status"], registry=registry)
        self._rows = {status: rows.labels(status.name.lower()) for status in RowStatus}
        self._seconds = Histogram(
            "solaris_read_seconds",
            "Time to answer a Get or BatchGet inside the sidecar.",
            buckets=READ_SECONDS_BUCKETS,
            registry=registry,
        )
        self._items = Histogram(
            "solaris_read_items",
            "Items asked for in one Get or BatchGet.",
            buckets=REQUEST_ITEMS_BUCKETS,
            registry=registry,
        )

    def observe(self, statuses: np.ndarray, seconds: float) -> None:
        counts = np.bincount(statuses, minlength=len(RowStatus) + 1)
        for status, counter in self._rows.items():
            if counts[status]:
                counter.inc(int(counts[status]))
        self._seconds.observe(seconds)
        self._items.observe(len(statuses))


@dataclass(eq=False)
class LiveValues(Collector):
    """Gauges and counters read from live objects at scrape time: name -> (help, read)."""

    gauges: dict[str, tuple[str, Callable[[], float]]] = field(default_factory=dict)
    counters: dict[str, tuple[str, Callable[[], float]]] = field(default_factory=dict)

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        for name, (help_text, read) in self.gauges.items():
            yield GaugeMetricFamily(name, help_text, value=read())
        for name, (help_text, read) in self.counters.items():
            yield CounterMetricFamily(name, help_text, value=read())


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> tuple[object, int]:
    """Starts the /metrics HTTP server on a thread; returns it and the port it bound."""
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as error:
        raise BindError("metrics_port", f"{host}:{port}", error.strerror or "") from error
    return server, server.server_port


def daemon_values(live: LiveValues, stats: Callable[[], "DaemonStats | None"]) -> None:
    """The precompute daemon's counters, read from `stats()` (None before it starts)."""
    names = {
        "solaris_runner_pairs": ("pairs_computed", "Pairs the model computed and stored."),
        "solaris_runner_batches": ("batches", "Model batches run."),
        "solaris_runner_failed_batches": ("failed_batches", "Model batches that raised."),
        "solaris_poison_pairs_dropped": ("poison_pairs_dropped", "Pairs the model fails on."),
        "solaris_pairs_already_fresh": ("pairs_already_fresh", "Work skipped: already fresh."),
        "solaris_store_write_failures": ("write_failures", "Batches not stored (Redis down)."),
        "solaris_precompute_loop_errors": ("loop_errors", "Unexpected errors in the daemon loop."),
    }
    for name, (attribute, help_text) in names.items():
        live.counters[name] = (help_text, _stat_reader(stats, attribute))


def speculation_values(
    live: LiveValues, stats: Callable[[], "SharedSpeculationStats | None"]
) -> None:
    """The shared speculator's counters, read from `stats()` (None where there is none)."""
    live.gauges["solaris_speculator_leading"] = (
        "1 while this process is the speculator for every sidecar.",
        _stat_reader(stats, "leading"),
    )
    names = {
        "solaris_speculator_requests_read": ("requests_read", "Reads learnt from, all sidecars."),
        "solaris_speculator_pairs_added": ("pairs_added", "Pairs added to the work stream."),
        "solaris_speculator_backlog_waits": (
            "waits_for_backlog",
            "Rounds that added nothing: the daemons had enough work waiting.",
        ),
    }
    for name, (attribute, help_text) in names.items():
        live.counters[name] = (help_text, _stat_reader(stats, attribute))


def _stat_reader(stats: Callable[[], object | None], attribute: str) -> Callable[[], float]:
    def read() -> float:
        current = stats()
        return float(getattr(current, attribute)) if current is not None else 0.0

    return read
