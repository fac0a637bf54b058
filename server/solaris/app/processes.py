"""The two long-running processes of the `solaris` command, each built by the composition root
and run until SIGTERM or SIGINT: `serve` (the sidecar) and `precompute` (the shared daemon)."""

import asyncio
import logging
import signal
import threading

from redis.exceptions import RedisClusterException

from solaris.app.compose import DaemonParts, build_sidecar, daemon_parts, open_checked_runner
from solaris.app.settings import DaemonSettings, ServeSettings
from solaris.server.metrics import serve_metrics
from solaris.server.redis_store import redacted
from solaris.server.sidecar import serve_until_signalled

_FIRST_PAUSE_SECONDS = 0.25
_MOST_PAUSE_SECONDS = 5.0
logger = logging.getLogger("solaris.app")


def run_sidecar(settings: ServeSettings) -> None:
    """`solaris serve`: serves until signalled, then drains. One object holds both the
    sidecar's and the daemon's settings; with `precompute` off there is no daemon."""
    sidecar = build_sidecar(settings, settings if settings.precompute else None)
    asyncio.run(serve_until_signalled(sidecar))


def run_daemon(settings: DaemonSettings) -> None:
    """`solaris precompute`: computes for every sidecar until SIGTERM or SIGINT, then finishes
    the batch in hand (its tasks are acknowledged) and stops."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    parts = _parts_once_redis_answers(settings, stop)
    if parts is None:
        return
    parts.daemon.start()
    if parts.speculation is not None:
        parts.speculation.start()
    metrics = None
    if settings.metrics_port:
        host = settings.served_metrics_host
        metrics, _ = serve_metrics(parts.registry, host, settings.metrics_port)
    logger.info("precomputing for %s (model %s)", redacted(settings.redis), parts.model_version)
    stop.wait()
    if parts.speculation is not None:
        parts.speculation.stop()
    parts.daemon.stop()
    if metrics is not None:
        metrics.shutdown()
    logger.info("stopped")


def _parts_once_redis_answers(
    settings: DaemonSettings, stop: threading.Event
) -> DaemonParts | None:
    """The daemon's parts; on a Redis Cluster, once a node answers (its client finds the
    cluster when made), waiting with a backoff to 5 s rather than exit and wait on a
    supervisor's. None if stopped while waiting."""
    runner = open_checked_runner(settings, settings.dim)
    pause = _FIRST_PAUSE_SECONDS
    while True:
        try:
            return daemon_parts(settings, runner)
        except RedisClusterException as error:
            if pause == _FIRST_PAUSE_SECONDS:
                logger.warning("no node of the Redis Cluster answers (%s); waiting", error)
        if stop.wait(pause):
            return None
        pause = min(2 * pause, _MOST_PAUSE_SECONDS)
