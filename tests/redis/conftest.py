"""Real `redis-server` processes on free ports, which tests may kill and restart, and sidecars
and daemons sharing one; a real Redis Cluster of six of them (`redis_cluster`)."""

import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import grpc
import pytest
import redis

from solaris.app.compose import build_sidecar
from solaris.precompute.export import ExportReport
from solaris.precompute.settings import PrecomputeSettings
from solaris.server.settings import SidecarSettings
from solaris.server.sidecar import Sidecar
from solaris.v1 import embedding_store_pb2 as pb
from solaris.v1.embedding_store_pb2_grpc import EmbeddingStoreStub
from tests.clients.conftest import free_port

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")


class RedisProcess:
    """A redis-server of our own, keeping nothing on disk; `options` are more of its flags,
    and it runs in `folder` (where a cluster node writes its nodes file)."""

    def __init__(self, options: Sequence[str] = (), folder: Path | None = None) -> None:
        self.port = free_port()
        self.options = list(options)
        self.folder = folder
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS_SERVER is not None
        command = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", *self.options]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, cwd=self.folder)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        client.close()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


@pytest.fixture
def redis_server() -> Iterator[RedisProcess]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    server = RedisProcess()
    server.start()
    yield server
    server.kill()


CLUSTER_NODE_TIMEOUT_MS = 1000
"""How long a master may be silent before its replica takes over: low, so tests see it."""


class ClusterProcesses:
    """A Redis Cluster of `masters` masters with one replica each, on free loopback ports (each
    node's bus port too), every node in a folder of its own under a temporary one."""

    def __init__(self, masters: int = 3) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="solaris-cluster-")
        self.nodes: list[RedisProcess] = []
        for index in range(2 * masters):
            folder = Path(self._folder.name) / str(index)
            folder.mkdir()
            options = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            options += ["--cluster-port", str(free_port())]
            options += ["--cluster-node-timeout", str(CLUSTER_NODE_TIMEOUT_MS)]
            self.nodes.append(RedisProcess(options, folder))

    @property
    def url(self) -> str:
        """The URL `--redis` takes for this cluster: one node; the client finds the rest."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        assert REDIS_CLI is not None
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        replicas = ["--cluster-replicas", "1", "--cluster-yes"]
        subprocess.run(
            [REDIS_CLI, "--cluster", "create", *addresses, *replicas],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        self.wait_until_ok()
        self.wait_for_replicas()

    def wait_until_ok(self, timeout: float = 30.0) -> None:
        """Until every running node says `cluster_state:ok` and knows every slot's master."""
        deadline = time.monotonic() + timeout
        while not all(self._ok(node) for node in self.running()):
            if time.monotonic() > deadline:
                raise AssertionError("the cluster never became ok")
            time.sleep(0.05)

    def running(self) -> list[RedisProcess]:
        return [node for node in self.nodes if node.process is not None]

    def master_of(self, key: str) -> RedisProcess:
        """The running node that serves `key`'s slot, once every running node agrees on one
        (after a master was killed: once its replica took over)."""
        deadline = time.monotonic() + 30
        while True:
            owners = {self._owner(node, key) for node in self.running()}
            found = [node for node in self.running() if {node.port} == owners]
            if found and all(self._ok(node) for node in self.running()):
                return found[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no running node serves {key!r}")
            time.sleep(0.05)

    @staticmethod
    def _owner(node: RedisProcess, key: str) -> int:
        """The port of the master serving `key`'s slot, as `node` sees it."""
        with node.client() as client:
            slot = int(client.cluster("keyslot", key))
            ranges = client.cluster("slots")
        return int(next(master[1] for start, end, master, *_ in ranges if start <= slot <= end))

    def wait_for_replicas(self, timeout: float = 30.0) -> None:
        """Until every running replica has synced with its master (so a failover loses only
        writes from the last moments)."""
        deadline = time.monotonic() + timeout
        while not all(self._synced(node) for node in self.running()):
            if time.monotonic() > deadline:
                raise AssertionError("the replicas never synced")
            time.sleep(0.05)

    def wait_until_replicated(self, master: RedisProcess, timeout: float = 30.0) -> None:
        """Until `master`'s replica has every write it took so far."""
        deadline = time.monotonic() + timeout
        while True:
            with master.client() as client:
                info = client.info("replication")
            if info.get("slave0", {}).get("offset") == info["master_repl_offset"]:
                return
            if time.monotonic() > deadline:
                raise AssertionError("the replica never caught up")
            time.sleep(0.02)

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()
        self._folder.cleanup()

    @staticmethod
    def _ok(node: RedisProcess) -> bool:
        with node.client() as client:
            try:
                info = client.cluster("info")
            except redis.exceptions.RedisError:
                return False
        return info.get("cluster_state") == "ok" and info.get("cluster_slots_ok") == "16384"

    @staticmethod
    def _synced(node: RedisProcess) -> bool:
        with node.client() as client:
            info = client.info("replication")
        return info["role"] == "master" or info.get("master_link_status") == "up"


@pytest.fixture
def redis_cluster() -> Iterator[ClusterProcesses]:
    if REDIS_SERVER is None or REDIS_CLI is None:
        pytest.skip("redis-server and redis-cli are not installed")
    cluster = ClusterProcesses()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.kill()


NO_DAEMON = None  # a sidecar given no daemon settings runs no daemon


@pytest.fixture
def shared_settings(settings: SidecarSettings, redis_server: RedisProcess) -> SidecarSettings:
    return settings.model_copy(
        update={
            "redis": redis_server.url,
            "redis_timeout_ms": 100,
            "claim_idle_seconds": 1.0,
            "prefetch_queue_pairs": 10_000,
        }
    )


@pytest.fixture
def with_daemon(tiny_model: ExportReport) -> PrecomputeSettings:
    return PrecomputeSettings(model=str(tiny_model.path), batch_wait_ms=1.0, batch_pairs=64)


async def started(settings: SidecarSettings, precompute: PrecomputeSettings | None) -> Sidecar:
    sidecar = build_sidecar(settings, precompute)
    await sidecar.start()
    return sidecar


@pytest.fixture
async def sidecars() -> AsyncIterator[list[Sidecar]]:
    """Sidecars a test starts; all stopped at the end."""
    running: list[Sidecar] = []
    yield running
    for sidecar in running:
        await sidecar.stop(grace=0)


async def batch_get(sidecar: Sidecar, user: str, items: list[str]) -> pb.BatchGetResponse:
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        return await EmbeddingStoreStub(channel).BatchGet(
            pb.BatchGetRequest(user_id=user, item_ids=items), timeout=2
        )
