"""The sidecar process's server: the EmbeddingStore service on a grpc.aio server that also
serves standard health checking and reflection, its /metrics, and the background work beside
it. What the parts are (stores, queues, a daemon) is the composition root's business
(`solaris.app.compose`); this module only runs them."""

import asyncio
import logging
import signal
from collections.abc import Sequence
from http.server import HTTPServer

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from solaris.server.background import Background
from solaris.server.core import EmbeddingService
from solaris.server.grpc_api.admission import Admission
from solaris.server.grpc_api.servicer import EmbeddingStoreHandlers, add_to_server
from solaris.server.metrics import serve_metrics
from solaris.server.settings import BindError, SidecarSettings
from solaris.server.tiered import Reachability
from solaris.v1 import embedding_store_pb2

SERVICE_NAME = embedding_store_pb2.DESCRIPTOR.services_by_name["EmbeddingStore"].full_name
REDIS_HEALTH_NAME = "solaris.redis"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
KEEPALIVE_TIMEOUT_MS = 20_000
MIN_CLIENT_PING_MS = 10_000
logger = logging.getLogger("solaris.server")


class QuietDisconnects(logging.Filter):
    """gRPC logs an ERROR with a traceback (`ExecuteBatchError`) for every answer it could not
    send because its caller had gone: an ordinary event for a server, told here in one DEBUG
    line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if type(error).__name__ != "ExecuteBatchError":
            return True
        logger.debug("a caller went away before its answer was sent (%s)", record.getMessage())
        return False


GRPC_SERVER_LOGGER = logging.getLogger("grpc._cython.cygrpc")


def quiet_disconnects() -> None:
    """Installs QuietDisconnects on gRPC's server logger, once."""
    if not any(isinstance(each, QuietDisconnects) for each in GRPC_SERVER_LOGGER.filters):
        GRPC_SERVER_LOGGER.addFilter(QuietDisconnects())


def server_options(settings: SidecarSettings) -> list[tuple[str, int]]:
    """The gRPC server's limits. Connections are not closed for age or idleness: a ranker's
    one channel to its sidecar would pay a reconnect on the serving path for it."""
    limit = settings.max_message_bytes
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", 0),
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        # A connection whose peer has gone (no answer to a ping) is closed with its calls.
        ("grpc.keepalive_time_ms", int(settings.keepalive_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        # Clients keep idle connections alive with pings; allow them every 10 s, and close a
        # connection that pings more often (gRPC's default: after two strikes).
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_MS),
    ]


class Sidecar:
    """One sidecar: build it, `await start()`, and `await stop()` to drain and close."""

    def __init__(
        self,
        settings: SidecarSettings,
        service: EmbeddingService,
        registry: CollectorRegistry,
        background: Sequence[Background] = (),
        redis: Reachability | None = None,
        admission: Admission | None = None,
    ) -> None:
        """`redis`, whether the store's Redis tier answers (when it has one), is reported as
        the health service's `solaris.redis`: the sidecar itself stays SERVING (it answers
        from L1), and a probe or an operator can see the degradation. `admission` counts the
        calls in flight and the bytes of their answers (the composition root reports it in
        the metrics)."""
        self.settings = settings
        self.service = service
        self.registry = registry
        self.background = list(background)
        self.admission = admission or Admission(settings.unsent_bytes_cap)
        self.health = HealthServicer()
        self.redis = redis
        if redis is not None:
            redis.watch(self._report_redis)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._metrics_server: HTTPServer | None = None
        self._health_updates: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def start(self) -> None:
        """Binds the port (so a port taken fails before anything runs), starts the background
        work, then serves."""
        quiet_disconnects()
        self._server = self._grpc_server()
        address = f"{self.settings.host}:{self.settings.port}"
        try:
            self.port = self._server.add_insecure_port(address)
        except RuntimeError as error:
            raise BindError("port", address) from error
        for work in self.background:
            await work.start()
        await self._server.start()
        await self.health.set(SERVICE_NAME, _SERVING)
        if self.redis is not None:
            await self.health.set(REDIS_HEALTH_NAME, _SERVING if self.redis.up else _NOT_SERVING)
        if self.settings.metrics_port:
            self._metrics_server, self.metrics_port = serve_metrics(
                self.registry, self.settings.metrics_host, self.settings.metrics_port
            )
        logger.info("serving solaris.v1.EmbeddingStore on %s", self.address)

    async def stop(self, grace: float | None = None) -> None:
        """Reports NOT_SERVING, lets the calls in flight answer and refuses new ones (see
        `Admission.drain`) within `grace`, stops the gRPC server, then the background work,
        newest first, and closes the store."""
        if self._server is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.settings.grace_seconds if grace is None else grace)
        await self.health.enter_graceful_shutdown()
        await self.admission.drain(deadline - loop.time())
        await self._server.stop(max(0.0, deadline - loop.time()))
        self._server = None
        for work in reversed(self.background):
            await work.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        await self.service.store.close()
        logger.info("stopped")

    def _grpc_server(self) -> grpc.aio.Server:
        server = grpc.aio.server(options=server_options(self.settings))
        add_to_server(EmbeddingStoreHandlers(self.service, self.admission), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        services = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
        reflection.enable_server_reflection((*services, reflection.SERVICE_NAME), server)
        return server

    def _report_redis(self, up: bool) -> None:
        update = asyncio.get_running_loop().create_task(
            self.health.set(REDIS_HEALTH_NAME, _SERVING if up else _NOT_SERVING)
        )
        self._health_updates.add(update)
        update.add_done_callback(self._health_updates.discard)


async def serve_until_signalled(sidecar: Sidecar) -> None:
    """Runs a sidecar until SIGTERM or SIGINT, then drains it."""
    await sidecar.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    logger.info("signal received: draining for up to %.1fs", sidecar.settings.grace_seconds)
    await sidecar.stop()
