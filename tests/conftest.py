"""Shared fixtures: a real sidecar on a real loopback socket, a stub talking to it, and a tiny
reference model exported once per test session."""

import time
from collections.abc import AsyncIterator, Callable

import grpc
import pytest

from solaris.app.compose import SidecarParts, sidecar_parts
from solaris.precompute.export import ExportReport, export_model
from solaris.precompute.model import ModelConfig
from solaris.server.settings import SidecarSettings
from solaris.server.sidecar import Sidecar
from solaris.v1.embedding_store_pb2_grpc import EmbeddingStoreStub

DIM = 8
TINY = ModelConfig(
    dim=DIM,
    model_width=16,
    heads=2,
    layers=1,
    feedforward_width=32,
    mlp_width=32,
    history_cap=8,
    item_buckets=1000,
    user_buckets=100,
)


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Polls `condition()` until it holds or `timeout` passes."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> ExportReport:
    return export_model(TINY, tmp_path_factory.mktemp("model") / "tiny.onnx")


@pytest.fixture
def settings() -> SidecarSettings:
    return SidecarSettings(
        port=0,
        dim=DIM,
        cache_bytes=1024**2,
        max_items=64,
        max_id_bytes=32,
        max_history=16,
        prefetch_queue_pairs=10,
        request_log_bytes=1024**2,  # tests read the log back
        grace_seconds=0.5,
    )


@pytest.fixture
def parts(settings: SidecarSettings) -> SidecarParts:
    """A serve-only sidecar's parts, to look inside the sidecar the `sidecar` fixture runs."""
    return sidecar_parts(settings)


@pytest.fixture
async def sidecar(parts: SidecarParts) -> AsyncIterator[Sidecar]:
    running = parts.sidecar()
    await running.start()
    yield running
    await running.stop(grace=0)


@pytest.fixture
async def channel(sidecar: Sidecar) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(sidecar.address) as opened:
        yield opened


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> EmbeddingStoreStub:
    return EmbeddingStoreStub(channel)
