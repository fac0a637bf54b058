"""The composition root: builds each deployment's parts from its settings, in one place.

`solaris serve` is one of two deployments, and both give the same set of parts (`SidecarParts`):
- embedded (no --redis): the store is L1 alone, Prefetch work goes to the in-process queue, and
  the daemon (if any) reads that queue, through the embedded speculator when speculation is on;
- shared (--redis): L1 in front of Redis, Prefetch work to the shared stream, reads shipped to
  the request stream, and the daemon (if any) takes work from the stream beside the shared
  speculator.
`solaris precompute` builds the shared daemon alone (`daemon_parts`).

The model stack is imported only where a daemon is built, so a serve-only sidecar never loads
ONNX Runtime or PyTorch.
"""

import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import CollectorRegistry

from solaris.app.extras import missing_extra, provides
from solaris.app.settings import DaemonSettings
from solaris.precompute.daemon import PrecomputeDaemon, WorkSource
from solaris.precompute.embedded_speculation import EmbeddedSpeculation
from solaris.precompute.metrics import (
    daemon_values,
    embedded_speculation_values,
    shared_speculation_values,
    stream_source_values,
)
from solaris.precompute.settings import PrecomputeSettings
from solaris.precompute.shared_speculation import SharedSpeculation
from solaris.precompute.speculator import Speculator
from solaris.server.background import Background, OnThread
from solaris.server.core import EmbeddingService, WorkQueue
from solaris.server.grpc_api.admission import Admission
from solaris.server.l1 import MemoryStore
from solaris.server.metrics import (
    LiveValues,
    ReadMetrics,
    admission_values,
    l1_values,
    prefetch_queue_values,
    redis_values,
    request_log_values,
    rollout_values,
    shipper_values,
)
from solaris.server.prefetch_queue import PrefetchQueue
from solaris.server.reachability import (
    CLIENT_TIMEOUT_SECONDS,
    SLOW_REDIS_SECONDS,
    Reachability,
    RedisPing,
)
from solaris.server.redis_store import (
    DAEMON_REDIS_TIMEOUT_SECONDS,
    STORED_DTYPES,
    RedisStore,
    connect,
    connect_blocking,
    redacted,
)
from solaris.server.request_log import RequestLog
from solaris.server.request_stream import RequestShipper
from solaris.server.rollout import Rollout, RolloutPolicy
from solaris.server.settings import SettingsError, SidecarSettings, StoreSettings
from solaris.server.sidecar import Sidecar
from solaris.server.store import Store
from solaris.server.tiered import TieredStore
from solaris.server.work_stream import StreamWorkQueue, StreamWorkSource

AGGREGATE_SHARE = 1 / 16
"""The most of L1's cap the miss ladder's aggregates may take: a user's aggregate stands in
for all of its pairs, so a few of them buy much coverage for little room."""

if TYPE_CHECKING:
    from solaris.precompute.runner import OnnxRunner

logger = logging.getLogger("solaris.app")


@dataclass
class SidecarParts:
    """What one `solaris serve` process is made of, whichever the deployment."""

    settings: SidecarSettings
    l1: MemoryStore
    request_log: RequestLog
    prefetch_queue: PrefetchQueue
    live: LiveValues
    registry: CollectorRegistry
    store: Store
    """What reads and writes go to: L1, or L1 in front of Redis."""
    work_queue: WorkQueue
    """Where Prefetch work goes: the in-process queue, or the shared stream."""
    l2: RedisStore | None = None
    rollout: Rollout | None = None
    """Which model version L2 serves (with Redis)."""
    reachability: Reachability | None = None
    background: list[Background] = field(default_factory=list)
    daemon: PrecomputeDaemon | None = None

    def sidecar(self) -> Sidecar:
        """The sidecar serving these parts (build it once: it registers its read metrics)."""
        metrics = ReadMetrics(self.registry)
        service = EmbeddingService(
            self.settings,
            self.store,
            self.request_log,
            self.work_queue,
            metrics,
            aggregates=self.l1.aggregates,
        )
        admission = Admission(self.settings.unsent_bytes_cap)
        admission_values(self.live, admission)
        return Sidecar(
            self.settings, service, self.registry, self.background, self.reachability, admission
        )


def build_sidecar(
    settings: SidecarSettings, precompute: PrecomputeSettings | None = None
) -> Sidecar:
    """The sidecar for these settings, with its daemon when there are `precompute` settings."""
    return sidecar_parts(settings, precompute).sidecar()


def sidecar_parts(
    settings: SidecarSettings, precompute: PrecomputeSettings | None = None
) -> SidecarParts:
    parts = _local_parts(settings)
    if settings.redis:
        _share_over_redis(parts, settings.redis)
    if precompute is not None:
        _add_daemon(parts, precompute)
    return parts


def _local_parts(settings: SidecarSettings) -> SidecarParts:
    """The embedded deployment's parts: everything in this process's memory."""
    l1 = MemoryStore(
        settings.l1_bytes,
        settings.dim,
        np.dtype(settings.l1_dtype),
        aggregate_share=AGGREGATE_SHARE,
        half_life_seconds=settings.ttl_seconds or 3600.0,
        aggregate_max_age_seconds=settings.ttl_seconds + settings.stale_seconds,
    )
    prefetch_queue = PrefetchQueue(settings.prefetch_queue_pairs)
    registry, live = _metrics()
    request_log = RequestLog(settings.request_log_bytes)
    l1_values(live, l1)
    prefetch_queue_values(live, prefetch_queue)
    request_log_values(live, request_log)
    return SidecarParts(
        settings=settings,
        l1=l1,
        request_log=request_log,
        prefetch_queue=prefetch_queue,
        live=live,
        registry=registry,
        store=l1,
        work_queue=prefetch_queue,
    )


def _metrics() -> tuple[CollectorRegistry, LiveValues]:
    """A process's registry, and the live values its parts register on."""
    registry, live = CollectorRegistry(), LiveValues()
    registry.register(live)
    return registry, live


def _share_over_redis(parts: SidecarParts, url: str) -> None:
    """L1 in front of Redis, Prefetch work to the shared stream, reads to the request stream."""
    settings = parts.settings
    timeout = settings.redis_timeout_ms / 1000
    client = connect(url, CLIENT_TIMEOUT_SECONDS)
    parts.l2 = RedisStore(client, settings.dim, stored_dtype=STORED_DTYPES[settings.redis_dtype])
    reachability = parts.reachability = Reachability()
    parts.store = TieredStore(parts.l1, parts.l2, timeout, reachability)
    work_queue = parts.work_queue = StreamWorkQueue(
        client,
        settings.work_stream_bytes,
        settings.max_id_bytes,
        timeout,
        reachability,
        settings.shards,
    )
    rollout = parts.rollout = Rollout(
        client, parts.l2, rollout_policy(settings), reachability, work_queue.submit
    )
    if settings.model_version:
        rollout.pin(settings.model_version)
    shipper = RequestShipper(
        client,
        settings.request_stream_bytes,
        SLOW_REDIS_SECONDS,
        settings.max_id_bytes,
        reachability=reachability,
        shards=settings.shards,
    )
    parts.request_log.listeners += [shipper.append, rollout.observe]
    parts.background += [RedisPing(client, reachability), shipper, rollout]
    redis_values(parts.live, parts.reachability, parts.l2)
    rollout_values(parts.live, rollout)
    shipper_values(parts.live, shipper)
    logger.info("shared store and work queue on %s", redacted(url))


def rollout_policy(settings: SidecarSettings) -> RolloutPolicy:
    return RolloutPolicy(
        settings.rollout_fraction,
        settings.rollout_deadline_seconds,
        settings.rollout_samples_per_second,
        settings.rollout_window_reads,
    )


def _add_daemon(parts: SidecarParts, precompute: PrecomputeSettings) -> None:
    """The daemon in this process: on the in-process queue, or on the shared stream. With
    Redis, the sidecar serves the daemon's model's version."""
    settings = parts.settings
    runner = open_checked_runner(precompute, settings.dim, "serve only with --precompute false")
    if settings.model_version not in ("", runner.model_version):
        raise SettingsError(
            f"{settings.model_version!r}, but this process's daemon computes version "
            f"{runner.model_version!r}: serve with --precompute false to pin another",
            "model_version",
        )
    if parts.rollout is None:
        daemon = _embedded_daemon(parts, precompute, runner)
        daemon_values(parts.live, daemon)
    else:
        parts.rollout.pin(runner.model_version)
        l2 = daemon_l2(settings, runner.model_version)
        store = TieredStore(parts.l1, l2, DAEMON_REDIS_TIMEOUT_SECONDS)
        daemon, speculation = _shared_workers(settings, precompute, runner, store, parts.live)
        if speculation is not None:
            parts.background.append(OnThread(speculation))
    parts.daemon = daemon
    parts.background.insert(0, OnThread(daemon))


def _embedded_daemon(
    parts: SidecarParts, precompute: PrecomputeSettings, runner: "OnnxRunner"
) -> PrecomputeDaemon:
    """The daemon reads the Prefetch queue as it comes, or (with speculation on) through the
    speculator, which also learns from every read this sidecar answers."""
    source: WorkSource = parts.prefetch_queue
    if precompute.policies:
        speculator = Speculator(
            precompute.speculation_settings(parts.settings.ttl_seconds), parts.l1.stale_at
        )
        embedded = EmbeddedSpeculation(parts.prefetch_queue, speculator, precompute.history_bytes)
        parts.request_log.listeners.append(embedded.observe)
        embedded_speculation_values(parts.live, embedded)
        source = embedded
    settings = parts.settings
    return PrecomputeDaemon(
        runner, parts.store, source, precompute, settings.ttl_seconds, settings.stale_seconds
    )


def open_checked_runner(
    precompute: PrecomputeSettings, dim: int, otherwise: str = ""
) -> "OnnxRunner":
    """The model's runner (importing the model stack here, and only here), once its width is
    the store's. Without the model stack, a refusal saying what to install (or `otherwise`)."""
    try:
        from solaris.precompute.runner import open_runner
    except ModuleNotFoundError as missing:
        if not provides("model", missing):
            raise
        raise missing_extra(missing, "model", "precompute", otherwise) from None
    runner = open_runner(precompute)
    if runner.dim != dim:
        raise SettingsError(
            f"dim: the model {runner.path} makes {runner.dim}-wide embeddings, but dim is {dim}"
        )
    return runner


def daemon_l2(settings: StoreSettings, model_version: str) -> RedisStore:
    """A RedisStore of the daemon's own: its client belongs to the daemon's event loop."""
    client = connect(settings.redis, DAEMON_REDIS_TIMEOUT_SECONDS)
    return RedisStore(
        client, settings.dim, model_version, stored_dtype=STORED_DTYPES[settings.redis_dtype]
    )


def _shared_workers(
    settings: StoreSettings,
    precompute: PrecomputeSettings,
    runner: "OnnxRunner",
    store: Store,
    live: LiveValues,
) -> tuple[PrecomputeDaemon, SharedSpeculation | None]:
    """A daemon on the shared stream and the candidate shared speculator, with their metrics:
    the same in `solaris precompute` and in `solaris serve --redis`."""
    daemon = shared_daemon(settings, precompute, runner, store)
    daemon_values(live, daemon)
    if isinstance(daemon.source, StreamWorkSource):
        stream_source_values(live, daemon.source)
    speculation = shared_speculation(settings, precompute, runner.model_version)
    if speculation is not None:
        shared_speculation_values(live, speculation)
    return daemon, speculation


def shared_daemon(
    settings: StoreSettings, precompute: PrecomputeSettings, runner: "OnnxRunner", store: Store
) -> PrecomputeDaemon:
    """A daemon taking work from the shared stream."""
    client = connect_blocking(settings.redis, DAEMON_REDIS_TIMEOUT_SECONDS)
    source = StreamWorkSource(
        client, settings.claim_idle_seconds, runner.model_version, settings.shards
    )
    return PrecomputeDaemon(
        runner, store, source, precompute, settings.ttl_seconds, settings.stale_seconds
    )


def shared_speculation(
    settings: StoreSettings, precompute: PrecomputeSettings, model_version: str
) -> SharedSpeculation | None:
    """The candidate for the one speculator over every sidecar's reads (None with speculation
    off); it speculates only while it holds the lease."""
    if not precompute.policies:
        return None
    speculation = precompute.speculation_settings(settings.ttl_seconds)
    shards = precompute.speculator_shards
    return SharedSpeculation(
        connect_blocking(settings.redis, DAEMON_REDIS_TIMEOUT_SECONDS),
        replace(speculation, budget_pairs_per_second=speculation.budget_pairs_per_second / shards),
        settings.dim,
        model_version,
        work_stream_bytes=settings.work_stream_bytes,
        max_id_bytes=settings.max_id_bytes,
        history_bytes=precompute.history_bytes,
        shards=shards,
        stream_shards=settings.shards,
    )


@dataclass
class DaemonParts:
    """What one `solaris precompute` process is made of."""

    daemon: PrecomputeDaemon
    speculation: SharedSpeculation | None
    registry: CollectorRegistry
    model_version: str


def daemon_parts(settings: DaemonSettings, runner: "OnnxRunner | None" = None) -> DaemonParts:
    """The shared daemon alone: work from the stream, results to Redis, the shared speculator,
    with `runner` (opened here if None). (DaemonSettings has refused an empty `redis`
    already.) On a Redis Cluster, raises RedisClusterException while no node answers."""
    runner = runner or open_checked_runner(settings, settings.dim)
    registry, live = _metrics()
    store = daemon_l2(settings, runner.model_version)
    daemon, speculation = _shared_workers(settings, settings, runner, store, live)
    return DaemonParts(daemon, speculation, registry, runner.model_version)
