"""The /metrics endpoint, scraped over HTTP after real traffic, against what was served."""

import asyncio
import re
import urllib.request
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from solaris.app.compose import build_sidecar, sidecar_parts
from solaris.server.aggregates import RowTier
from solaris.server.metrics import READ_SECONDS_BUCKETS, REQUEST_ITEMS_BUCKETS, ReadMetrics
from solaris.server.settings import SidecarSettings
from solaris.server.sidecar import Sidecar
from solaris.server.store import RowStatus
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
        await stub.BatchGet(
            pb.BatchGetRequest(user_id="user", item_ids=["z"], miss_fill=pb.ENRICHED)
        )
        await stub.Prefetch(pb.PrefetchRequest(user_id="user", item_ids=["x", "y"]))
    assert measured.metrics_port is not None
    # The sidecar serves /metrics on its event loop, which this test's loop is.
    samples = await asyncio.to_thread(scrape, measured.metrics_port)
    assert samples['solaris_rows_total{status="hit"}'] == 3
    assert samples['solaris_rows_total{status="miss"}'] == 2  # an enriched row is a MISS
    assert samples['solaris_rows_total{status="stale"}'] == 0
    assert samples['solaris_rows_by_tier_total{tier="pair"}'] == 3
    assert samples['solaris_rows_by_tier_total{tier="user"}'] == 1
    assert samples['solaris_rows_by_tier_total{tier="none"}'] == 1
    assert samples['solaris_rows_by_tier_total{tier="item"}'] == 0
    assert samples["solaris_read_seconds_count"] == 3
    assert samples["solaris_read_items_sum"] == 5
    assert samples["solaris_l1_entries"] == 2
    assert samples["solaris_l1_bytes"] > 0
    assert samples["solaris_l1_aggregates"] == 4  # the user's, a's, b's and v1's global
    assert 0 < samples["solaris_l1_aggregate_bytes"] < samples["solaris_l1_bytes"]
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


def test_read_metrics_export_what_prometheus_clients_own_metrics_would() -> None:
    """The serving path keeps plain counts; the scrape shows them as prometheus_client's Counter
    and Histogram would have, a value on a bucket's bound counted in that bucket."""
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    metrics = ReadMetrics(ours)
    rows = Counter("solaris_rows", "Rows answered, by status.", ["status"], registry=theirs)
    by_status = {status: rows.labels(status.name.lower()) for status in RowStatus}
    tier_rows = Counter(
        "solaris_rows_by_tier",
        "Rows answered, by the tier that filled them: pair (HIT or STALE), the miss "
        "ladder's user, item or global aggregate, or none (zeros).",
        ["tier"],
        registry=theirs,
    )
    by_tier = {tier: tier_rows.labels(tier.name.lower()) for tier in RowTier}
    seconds = Histogram(
        "solaris_read_seconds",
        "Time to answer a Get or BatchGet inside the sidecar.",
        buckets=READ_SECONDS_BUCKETS,
        registry=theirs,
    )
    items = Histogram(
        "solaris_read_items",
        "Items asked for in one Get or BatchGet.",
        buckets=REQUEST_ITEMS_BUCKETS,
        registry=theirs,
    )
    reads = [([1, 1, 2], 0.0005), ([3], 0.00025), ([1] * 500, 0.02), ([2] * 5000, 1.0), ([1], 0)]
    for statuses, took in reads:
        # A MISS filled from the user's or item's aggregate by turns, or none.
        tiers = [
            RowTier.PAIR if s != RowStatus.MISS else RowTier(2 + i % 4)
            for i, s in enumerate(statuses)
        ]
        metrics.observe(np.array(statuses, np.uint8), np.array(tiers, np.uint8), took)
        for status in RowStatus:
            if statuses.count(status):
                by_status[status].inc(statuses.count(status))
        for tier in RowTier:
            if tiers.count(tier):
                by_tier[tier].inc(tiers.count(tier))
        seconds.observe(took)
        items.observe(len(statuses))

    assert without_created(generate_latest(ours)) == without_created(generate_latest(theirs))


def without_created(exposition: bytes) -> str:
    """The text exposition with each _created sample's timestamp left out."""
    return re.sub(r"(_created(\{[^}]*\})?) \S+", r"\1", exposition.decode())


def test_read_metrics_are_registered_once() -> None:
    registry = CollectorRegistry()
    ReadMetrics(registry)

    with pytest.raises(ValueError, match="Duplicated timeseries"):
        ReadMetrics(registry)
