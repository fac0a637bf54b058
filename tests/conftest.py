"""Shared fixtures: a real sidecar on a real loopback socket, and a stub talking to it."""

from collections.abc import AsyncIterator

import grpc
import pytest

from solaris.server.app import Sidecar
from solaris.server.settings import ServeSettings
from solaris.v1.embedding_store_pb2_grpc import EmbeddingStoreStub

DIM = 8


@pytest.fixture
def settings() -> ServeSettings:
    return ServeSettings(
        port=0,
        dim=DIM,
        cache_bytes=1024**2,
        max_items=64,
        max_id_bytes=32,
        max_history=16,
        prefetch_queue_pairs=10,
        grace_seconds=0.5,
    )


@pytest.fixture
async def sidecar(settings: ServeSettings) -> AsyncIterator[Sidecar]:
    running = Sidecar(settings)
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
