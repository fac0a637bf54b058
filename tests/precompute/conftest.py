"""A sidecar that runs the precompute daemon in-process, on the tiny model."""

from collections.abc import AsyncIterator

import grpc
import pytest

from solaris.app.compose import SidecarParts, sidecar_parts
from solaris.precompute.export import ExportReport
from solaris.precompute.settings import PrecomputeSettings
from solaris.server.settings import SidecarSettings
from solaris.server.sidecar import Sidecar
from solaris.v1.embedding_store_pb2_grpc import EmbeddingStoreStub


@pytest.fixture
def precompute_settings(tiny_model: ExportReport) -> PrecomputeSettings:
    return PrecomputeSettings(model=str(tiny_model.path), batch_wait_ms=1.0)


@pytest.fixture
def embedded_parts(
    settings: SidecarSettings, precompute_settings: PrecomputeSettings
) -> SidecarParts:
    return sidecar_parts(settings, precompute_settings)


@pytest.fixture
async def embedded(embedded_parts: SidecarParts) -> AsyncIterator[Sidecar]:
    """A sidecar with the daemon running in-process, as `solaris serve` runs by default."""
    running = embedded_parts.sidecar()
    await running.start()
    yield running
    await running.stop(grace=0)


@pytest.fixture
async def embedded_stub(embedded: Sidecar) -> AsyncIterator[EmbeddingStoreStub]:
    async with grpc.aio.insecure_channel(embedded.address) as channel:
        yield EmbeddingStoreStub(channel)
