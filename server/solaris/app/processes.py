"""The two long-running processes of the `solaris` command, each built by the composition root
and run until SIGTERM or SIGINT: `serve` (the sidecar) and `precompute` (the shared daemon)."""

import asyncio
import logging
import signal
import threading

from solaris.app.compose import build_sidecar, daemon_parts
from solaris.app.settings import DaemonSettings, ServeSettings
from solaris.server.metrics import serve_metrics
from solaris.server.redis_store import redacted
from solaris.server.sidecar import serve_until_signalled

logger = logging.getLogger("solaris.app")


def run_sidecar(settings: ServeSettings) -> None:
    """`solaris serve`: serves until signalled, then drains. One object holds both the
    sidecar's and the daemon's settings; with `precompute` off there is no daemon."""
    sidecar = build_sidecar(settings, settings if settings.precompute else None)
    asyncio.run(serve_until_signalled(sidecar))


def run_daemon(settings: DaemonSettings) -> None:
    """`solaris precompute`: computes for every sidecar until SIGTERM or SIGINT, then finishes
    the batch in hand (its tasks are acknowledged) and stops."""
    parts = daemon_parts(settings)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
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
