"""Real `redis-server` processes on free ports, which tests may kill and restart, and sidecars
and daemons sharing one."""

import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator

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


class RedisProcess:
    """A redis-server of our own, keeping nothing on disk."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS_SERVER is not None
        command = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
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
