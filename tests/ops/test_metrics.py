"""The /metrics endpoint, scraped over HTTP after real traffic, against what was served."""

import asyncio
import urllib.request
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from solaris.app.compose import build_sidecar, sidecar_parts
from solaris.server.settings import SidecarSettings
from solaris.server.sidecar import Sidecar
from solaris.v1 import embedding_store_pb2 as pb
from solaris.v1.embedding_store_pb2_grpc import EmbeddingStoreStub
from tests.clients.conftest import free_port
from tests.conftest import DIM


@pytest.fixture
async def measured(settings: SidecarSettings) -> AsyncIterator[Sidecar]:
    sidecar = build_sidecar(settings.model_copy(update={"metrics_port": free_port()}))
    await sidecar.start()
    yield sidecar
    await sidecar.stop(grace=0)


def scrape(port: int) -> dict[str, float]:
    """Every sample as `name{label="value"}` -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


async def test_counters_match_what_was_served(measured: Sidecar) -> None:
    vectors = np.ones((2, DIM), np.float32)
    await measured.service.put("user", ["a", "b"], vectors, "v1")
    async with grpc.aio.insecure_channel(measured.address) as channel:
        stub = EmbeddingStoreStub(channel)
        await stub.BatchGet(pb.BatchGetRequest(user_id="user", item_ids=["a", "b", "c"]))
        await stub.BatchGet(pb.BatchGetRequest(user_id="user", item_ids=["a"]))
        await stub.Prefetch(pb.PrefetchRequest(user_id="user", item_ids=["x", "y"]))
    assert measured.metrics_port is not None
    # The sidecar serves /metrics on its event loop, which this test's loop is.
    samples = await asyncio.to_thread(scrape, measured.metrics_port)
    assert samples['solaris_rows_total{status="hit"}'] == 3
    assert samples['solaris_rows_total{status="miss"}'] == 1
    assert samples['solaris_rows_total{status="stale"}'] == 0
    assert samples["solaris_read_seconds_count"] == 2
    assert samples["solaris_read_items_sum"] == 4
    assert samples["solaris_l1_entries"] == 2
    assert samples["solaris_l1_bytes"] > 0
    assert samples["solaris_prefetch_queue_pairs"] == 2


def test_each_part_registers_its_values_once_and_only_parts_that_run_do(
    settings: SidecarSettings,
) -> None:
    """A serve-only sidecar has no runner, so it exports no runner counters."""
    parts = sidecar_parts(settings)
    names = {metric.name for metric in parts.registry.collect()}
    parts.sidecar()
    assert {"solaris_l1_bytes", "solaris_prefetch_queue_pairs"} <= names
    assert not {name for name in names if name.startswith(("solaris_runner", "solaris_redis"))}
