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
from solaris.server.grpc_api.servicer import EmbeddingStoreHandlers, add_to_server
from solaris.server.metrics import serve_metrics
from solaris.server.settings import BindError, SidecarSettings
from solaris.server.tiered import Reachability
from solaris.v1 import embedding_store_pb2

SERVICE_NAME = embedding_store_pb2.DESCRIPTOR.services_by_name["EmbeddingStore"].full_name
REDIS_HEALTH_NAME = "solaris.redis"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
logger = logging.getLogger("solaris.server")


class Sidecar:
    """One sidecar: build it, `await start()`, and `await stop()` to drain and close."""

    def __init__(
        self,
        settings: SidecarSettings,
        service: EmbeddingService,
        registry: CollectorRegistry,
        background: Sequence[Background] = (),
        redis: Reachability | None = None,
    ) -> None:
        """`redis`, whether the store's Redis tier answers (when it has one), is reported as
        the health service's `solaris.redis`: the sidecar itself stays SERVING (it answers
        from L1), and a probe or an operator can see the degradation."""
        self.settings = settings
        self.service = service
        self.registry = registry
        self.background = list(background)
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
        """Reports NOT_SERVING, refuses new calls, lets in-flight ones finish within `grace`,
        then stops the background work, newest first."""
        if self._server is None:
            return
        await self.health.enter_graceful_shutdown()
        await self._server.stop(self.settings.grace_seconds if grace is None else grace)
        self._server = None
        for work in reversed(self.background):
            await work.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        await self.service.store.close()
        logger.info("stopped")

    def _grpc_server(self) -> grpc.aio.Server:
        limit = self.settings.max_message_bytes
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
                # Clients keep idle connections alive with pings; allow them every 10 s.
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ]
        )
        add_to_server(EmbeddingStoreHandlers(self.service), server)
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
