"""The daemon on Redis: `solaris precompute` runs it alone, and `solaris serve --redis` embeds
the same daemon. It takes work from the shared stream and writes to the shared store."""

import logging
import signal
import threading
from typing import Any

from prometheus_client import CollectorRegistry

from solaris.precompute.daemon import PrecomputeDaemon
from solaris.precompute.runner import OnnxRunner, open_runner
from solaris.precompute.settings import PrecomputeSettings
from solaris.precompute.shared_speculation import SharedSpeculation, shared_speculation
from solaris.server.metrics import LiveValues, daemon_values, serve_metrics, speculation_values
from solaris.server.redis_store import (
    DAEMON_REDIS_TIMEOUT_SECONDS,
    RedisStore,
    connect,
    connect_blocking,
    redacted,
)
from solaris.server.settings import SettingsError, StoreSettings
from solaris.server.store import Store
from solaris.server.work_stream import StreamWorkSource

logger = logging.getLogger("solaris.precompute")


def check_dim(runner: OnnxRunner, dim: int) -> None:
    if runner.dim != dim:
        raise SettingsError(
            f"dim: the model {runner.path} makes {runner.dim}-wide embeddings, but dim is {dim}"
        )


def daemon_l2(settings: StoreSettings, model_version: str) -> RedisStore:
    """A RedisStore of the daemon's own: its client belongs to the daemon's event loop."""
    client = connect(settings.redis, DAEMON_REDIS_TIMEOUT_SECONDS)
    return RedisStore(client, settings.dim, model_version)


def stream_source(settings: StoreSettings, model_version: str) -> StreamWorkSource:
    client = connect_blocking(settings.redis, DAEMON_REDIS_TIMEOUT_SECONDS)
    return StreamWorkSource(client, settings.claim_idle_seconds, model_version)


def shared_daemon(
    settings: StoreSettings, precompute: PrecomputeSettings, runner: OnnxRunner, store: Store
) -> PrecomputeDaemon:
    return PrecomputeDaemon(
        runner,
        store,
        stream_source(settings, runner.model_version),
        precompute,
        settings.ttl_seconds,
        settings.stale_seconds,
    )


def run_until_signalled(settings: StoreSettings, precompute: PrecomputeSettings) -> None:
    """`solaris precompute`: computes for every sidecar until SIGTERM or SIGINT, then
    finishes the batch in hand (its tasks are acknowledged) and stops."""
    if not settings.redis:
        raise SettingsError("redis: solaris precompute needs --redis, the shared store and queue")
    runner = open_runner(precompute)
    check_dim(runner, settings.dim)
    store = daemon_l2(settings, runner.model_version)
    daemon = shared_daemon(settings, precompute, runner, store)
    speculation = shared_speculation(settings, precompute, runner.model_version)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    daemon.start()
    if speculation is not None:
        speculation.start()
    metrics = serve_daemon_metrics(settings, daemon, speculation)
    logger.info("precomputing for %s (model %s)", redacted(settings.redis), runner.model_version)
    stop.wait()
    if speculation is not None:
        speculation.stop()
    daemon.stop()
    if metrics is not None:
        metrics.shutdown()
    logger.info("stopped")


def serve_daemon_metrics(
    settings: StoreSettings, daemon: PrecomputeDaemon, speculation: SharedSpeculation | None
) -> Any:
    """The daemon's /metrics, when --metrics-port is set: runner, stream and speculator
    counters."""
    if not settings.metrics_port:
        return None
    live = LiveValues()
    daemon_values(live, lambda: daemon.stats)
    source = daemon.source
    if isinstance(source, StreamWorkSource):
        live.counters["solaris_tasks_claimed"] = (
            "Work entries claimed from a stopped daemon.",
            lambda: source.claimed,
        )
    live.counters["solaris_source_errors"] = (
        "Times the work source (Redis) could not be read.",
        lambda: daemon.stats.source_errors,
    )
    speculation_values(live, lambda: speculation.stats if speculation is not None else None)
    registry = CollectorRegistry()
    registry.register(live)
    server, _ = serve_metrics(registry, settings.metrics_host, settings.metrics_port)
    return server
