"""The sidecar assembled: store, request log, Prefetch queue, core, a grpc.aio server that
also serves standard health checking and reflection, and (embedded mode, the default) the
precompute daemon on its own thread."""

import asyncio
import logging
import signal
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from solaris.precompute.daemon import PrecomputeDaemon, WorkSource
from solaris.precompute.embedded_speculation import SpeculativeSource
from solaris.precompute.settings import PrecomputeSettings
from solaris.precompute.shared_speculation import SharedSpeculation, shared_speculation
from solaris.precompute.speculator import Speculator
from solaris.server.core import EmbeddingService, WorkQueue
from solaris.server.grpc_api.servicer import EmbeddingStoreServicer, add_to_server
from solaris.server.l1 import MemoryStore
from solaris.server.metrics import (
    LiveValues,
    ReadMetrics,
    daemon_values,
    serve_metrics,
    speculation_values,
)
from solaris.server.prefetch_queue import PrefetchQueue
from solaris.server.redis_store import (
    DAEMON_REDIS_TIMEOUT_SECONDS,
    RedisStore,
    connect,
    redacted,
)
from solaris.server.request_log import RequestLog
from solaris.server.request_stream import RequestShipper
from solaris.server.settings import BindError, SidecarSettings
from solaris.server.store import Store
from solaris.server.tiered import Reachability, TieredStore
from solaris.server.work_stream import StreamWorkQueue
from solaris.v1 import embedding_store_pb2

SERVICE_NAME = embedding_store_pb2.DESCRIPTOR.services_by_name["EmbeddingStore"].full_name
REDIS_HEALTH_NAME = "solaris.redis"
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
logger = logging.getLogger("solaris.server")


class Sidecar:
    """One sidecar: build it, `await start()`, and `await stop()` to drain and close."""

    def __init__(
        self, settings: SidecarSettings, precompute: PrecomputeSettings | None = None
    ) -> None:
        self.settings = settings
        self.precompute_settings = precompute
        self.daemon: PrecomputeDaemon | None = None
        self.speculation: SharedSpeculation | None = None
        self.l1 = MemoryStore(settings.l1_bytes, settings.dim)
        self.request_log = RequestLog(settings.request_log_rows)
        self.prefetch_queue = PrefetchQueue(settings.prefetch_queue_pairs)
        self.health = HealthServicer()
        self.store: Store = self.l1
        self.l2: RedisStore | None = None
        self.shipper: RequestShipper | None = None
        self._shipping: asyncio.Task[None] | None = None
        self._health_updates: set[asyncio.Task[None]] = set()
        self.work_queue: WorkQueue = self.prefetch_queue
        if settings.redis:
            self._use_redis(settings)
        self.registry = CollectorRegistry()
        self.service = EmbeddingService(
            settings, self.store, self.request_log, self.work_queue, ReadMetrics(self.registry)
        )
        self.registry.register(self._live_values())
        self.metrics_port: int | None = None
        self._metrics_server: Any = None
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def start(self) -> None:
        if self.precompute_settings is not None:
            self.daemon = await asyncio.to_thread(self._build_daemon, self.precompute_settings)
            self.daemon.start()
            if self.l2 is not None:
                self.speculation = await asyncio.to_thread(
                    shared_speculation,
                    self.settings,
                    self.precompute_settings,
                    self.daemon.model.model_version,
                )
            if self.speculation is not None:
                self.speculation.start()
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
        add_to_server(EmbeddingStoreServicer(self.service), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        address = f"{self.settings.host}:{self.settings.port}"
        try:
            self.port = server.add_insecure_port(address)
        except RuntimeError as error:
            raise BindError("port", address) from error
        await server.start()
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        if self.settings.redis:
            await self.health.set(REDIS_HEALTH_NAME, health_pb2.HealthCheckResponse.SERVING)
        self._server = server
        if self.shipper is not None:
            self._shipping = asyncio.get_running_loop().create_task(self.shipper.run())
        if self.settings.metrics_port:
            self._metrics_server, self.metrics_port = serve_metrics(
                self.registry, self.settings.metrics_host, self.settings.metrics_port
            )
        logger.info("serving solaris.v1.EmbeddingStore on %s", self.address)

    async def stop(self, grace: float | None = None) -> None:
        """Reports NOT_SERVING, refuses new calls, lets in-flight ones finish within `grace`."""
        if self._server is None:
            return
        await self.health.enter_graceful_shutdown()
        await self._server.stop(self.settings.grace_seconds if grace is None else grace)
        self._server = None
        if self.speculation is not None:
            await asyncio.to_thread(self.speculation.stop)
        if self.daemon is not None:
            await asyncio.to_thread(self.daemon.stop)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        if self._shipping is not None and self.shipper is not None:
            self._shipping.cancel()
            await asyncio.gather(self._shipping, return_exceptions=True)
            await self.shipper.ship()
        if self.l2 is not None:
            await self.l2.close()
        logger.info("stopped")

    def _live_values(self) -> LiveValues:
        live = LiveValues()
        live.gauges["solaris_l1_bytes"] = ("Bytes the L1 holds, as capped.", lambda: self.l1.nbytes)
        live.gauges["solaris_l1_entries"] = ("Pairs the L1 holds.", lambda: len(self.l1))
        live.counters["solaris_l1_evictions"] = ("L1 rows evicted.", lambda: self.l1.evictions)
        live.gauges["solaris_prefetch_queue_pairs"] = (
            "Pairs waiting in the in-process Prefetch queue.",
            lambda: self.prefetch_queue.pairs,
        )
        daemon_values(live, lambda: self.daemon.stats if self.daemon is not None else None)
        live.counters["solaris_speculator_reads_dropped"] = (
            "Reads the embedded speculator never learnt from: its buffer was full.",
            self._speculator_reads_dropped,
        )
        speculation_values(
            live, lambda: self.speculation.stats if self.speculation is not None else None
        )
        if isinstance(self.store, TieredStore):
            reach, l2 = self.store.reachability, self.store.l2
            live.gauges["solaris_redis_up"] = ("1 while Redis answers.", lambda: int(reach.up))
            live.counters["solaris_redis_errors"] = ("Redis calls failed.", lambda: reach.errors)
            live.counters["solaris_redis_corrupt_values"] = (
                "Redis values read as misses: header did not fit.",
                lambda: l2.corrupt_values,
            )
        if self.shipper is not None:
            shipper = self.shipper
            live.counters["solaris_request_log_dropped"] = (
                "Logged requests not shipped to Redis.",
                lambda: shipper.dropped,
            )
        return live

    def _speculator_reads_dropped(self) -> int:
        source = self.daemon.source if self.daemon is not None else None
        return source.dropped_reads if isinstance(source, SpeculativeSource) else 0

    def _embedded_source(self, precompute: PrecomputeSettings) -> WorkSource:
        """The Prefetch queue as it comes, or (with speculation on) through the speculator,
        which also learns from every read this sidecar answers."""
        if not precompute.policies:
            return self.prefetch_queue
        speculator = Speculator(precompute.speculation_settings(), self.l1.fresh_until)
        source = SpeculativeSource(self.prefetch_queue, speculator, precompute.history_users)
        self.request_log.listeners.append(source.observe)
        return source

    def _use_redis(self, settings: SidecarSettings) -> None:
        """L1 in front of Redis, and Prefetch work to the shared stream."""
        timeout = settings.redis_timeout_ms / 1000
        client = connect(settings.redis, timeout)
        self.l2 = RedisStore(client, settings.dim)
        reachability = Reachability(on_change=self._report_redis)
        self.store = TieredStore(self.l1, self.l2, timeout, reachability)
        self.work_queue = StreamWorkQueue(client, settings.work_stream_length, timeout)
        self.shipper = RequestShipper(client, settings.request_stream_length, timeout)
        self.request_log.listeners.append(self.shipper.append)
        logger.info("shared store and work queue on %s", redacted(settings.redis))

    def _report_redis(self, up: bool) -> None:
        """Redis's state as the health service's `solaris.redis`: the sidecar itself stays
        SERVING (it answers from L1), and a probe or an operator can see the degradation."""
        status = health_pb2.HealthCheckResponse.SERVING if up else _NOT_SERVING
        update = asyncio.get_running_loop().create_task(self.health.set(REDIS_HEALTH_NAME, status))
        self._health_updates.add(update)
        update.add_done_callback(self._health_updates.discard)

    def _build_daemon(self, precompute: PrecomputeSettings) -> PrecomputeDaemon:
        # Here, not at the top: a sidecar that only serves never loads ONNX Runtime or the
        # exporter's PyTorch (about 190 MiB of a pod's memory limit).
        from solaris.app.daemon_process import (
            check_dim,
            daemon_l2,
            shared_daemon,
        )
        from solaris.precompute.runner import open_runner

        runner = open_runner(precompute)
        check_dim(runner, self.settings.dim)
        if self.l2 is not None:
            self.l2.use_version(runner.model_version)
            l2 = daemon_l2(self.settings, runner.model_version)
            store = TieredStore(self.l1, l2, DAEMON_REDIS_TIMEOUT_SECONDS)
            return shared_daemon(self.settings, precompute, runner, store)
        return PrecomputeDaemon(
            runner,
            self.store,
            self._embedded_source(precompute),
            precompute,
            self.settings.ttl_seconds,
            self.settings.stale_seconds,
        )


async def serve_until_signalled(
    settings: SidecarSettings, precompute: PrecomputeSettings | None = None
) -> None:
    """Runs a sidecar until SIGTERM or SIGINT, then drains it."""
    sidecar = Sidecar(settings, precompute)
    await sidecar.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    logger.info("signal received: draining for up to %.1fs", settings.grace_seconds)
    await sidecar.stop()
