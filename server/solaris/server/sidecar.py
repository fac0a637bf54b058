"""The sidecar process's server: the EmbeddingStore service on a grpc.aio server that also
serves standard health checking and reflection, its /metrics, and the background work beside
it. What the parts are (stores, queues, a daemon) is the composition root's business
(`solaris.app.compose`); this module only runs them."""

import asyncio
import ipaddress
import logging
import signal
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from solaris.server.background import Background
from solaris.server.core import EmbeddingService
from solaris.server.grpc_api.admission import Admission
from solaris.server.grpc_api.security import TokenCheck, server_credentials
from solaris.server.grpc_api.servicer import EmbeddingStoreHandlers, add_to_server
from solaris.server.metrics_http import MetricsServer
from solaris.server.settings import BindError, SidecarSettings, host_port
from solaris.server.tiered import Reachability
from solaris.v1 import embedding_store_pb2

SERVICE_NAME = embedding_store_pb2.DESCRIPTOR.services_by_name["EmbeddingStore"].full_name
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
HEALTH_SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", 4096),
    ("grpc.max_concurrent_streams", 16),
]
"""A health check is a few bytes; a watcher holds a stream."""
REDIS_HEALTH_NAME = "solaris.redis"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
KEEPALIVE_TIMEOUT_MS = 20_000
MIN_CLIENT_PING_MS = 10_000
logger = logging.getLogger("solaris.server")


def _bind(
    server: grpc.aio.Server,
    address: str,
    setting: str,
    credentials: grpc.ServerCredentials | None,
) -> int:
    """Binds `address` on `server`, with TLS when there are `credentials`; returns the port.

    Raises:
        BindError: naming `setting`.
    """
    try:
        if credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, credentials)
    except RuntimeError as error:
        raise BindError(setting, address) from error


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
        self.health_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._metrics_server: MetricsServer | None = None
        self._health_updates: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return host_port(self.settings.host, self.port or self.settings.port)

    async def start(self) -> None:
        """Binds the ports (so a port taken fails before anything runs), starts the background
        work, then serves."""
        quiet_disconnects()
        settings = self.settings
        self._server = self._grpc_server()
        address = host_port(settings.host, settings.port)
        self.port = _bind(self._server, address, "port", server_credentials(settings))
        if settings.health_port:
            self._health_server = self._health_only_server()
            address = host_port(settings.served_health_host, settings.health_port)
            # Plain, whatever the data port: the kubelet's gRPC probe speaks no TLS.
            self.health_port = _bind(self._health_server, address, "health_port", None)
        for work in self.background:
            await work.start()
        await self._server.start()
        if self._health_server is not None:
            await self._health_server.start()
        await self.health.set(SERVICE_NAME, _SERVING)
        if self.redis is not None:
            await self.health.set(REDIS_HEALTH_NAME, _SERVING if self.redis.up else _NOT_SERVING)
        if self.settings.metrics_port:
            self._metrics_server = MetricsServer(self.registry)
            self.metrics_port = await self._metrics_server.start(
                self.settings.served_metrics_host, self.settings.metrics_port
            )
        logger.info("serving solaris.v1.EmbeddingStore on %s", self.address)
        if _token_in_the_clear(settings):
            logger.warning(
                "auth_token is sent in the clear: host %s is off loopback and tls_cert is not "
                "set (set tls-cert and tls-key, or keep host on loopback)",
                settings.host,
            )
        if self.health_port:
            logger.info("health checks on %s:%s", settings.served_health_host, self.health_port)

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
        if self._health_server is not None:
            await self._health_server.stop(0)
        for work in reversed(self.background):
            await work.stop()
        if self._metrics_server is not None:
            await self._metrics_server.stop()
        await self.service.store.close()
        logger.info("stopped")

    def _grpc_server(self) -> grpc.aio.Server:
        token = self.settings.auth_token
        server = grpc.aio.server(
            options=server_options(self.settings),
            interceptors=[TokenCheck(token)] if token else None,
        )
        add_to_server(EmbeddingStoreHandlers(self.service, self.admission), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if self.settings.reflection:
            services = (SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME)
            reflection.enable_server_reflection(services, server)
        return server

    def _health_only_server(self) -> grpc.aio.Server:
        """A server of the health service alone (the same one), for probes from off the pod."""
        server = grpc.aio.server(options=HEALTH_SERVER_OPTIONS)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        return server

    def _report_redis(self, up: bool) -> None:
        update = asyncio.get_running_loop().create_task(
            self.health.set(REDIS_HEALTH_NAME, _SERVING if up else _NOT_SERVING)
        )
        self._health_updates.add(update)
        update.add_done_callback(self._health_updates.discard)


def _token_in_the_clear(settings: SidecarSettings) -> bool:
    """Whether callers' tokens cross a network unencrypted."""
    if not settings.auth_token or settings.tls_cert:
        return False
    try:
        return not ipaddress.ip_address(settings.host).is_loopback
    except ValueError:
        return settings.host != "localhost"


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
