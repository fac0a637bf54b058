"""The request stream on a real Redis: its memory within its budget whatever the reads, and
what a sidecar ships counted."""

import random
import time

import numpy as np

from solaris.app.compose import sidecar_parts
from solaris.server.redis_store import connect
from solaris.server.request_log import LoggedRequest
from solaris.server.request_stream import (
    FIELD,
    REQUEST_STREAM_KEY,
    RequestShipper,
    decode_request,
    encode_entries,
    redis_entry_bytes,
)
from solaris.server.settings import SidecarSettings
from solaris.server.store import RowStatus
from tests.redis.conftest import RedisProcess, batch_get

ID_BYTES = 32


def a_read(user: str, count: int, rng: random.Random) -> LoggedRequest:
    items = tuple(f"{user}-{n}-".ljust(rng.choice([4, ID_BYTES]), "x") for n in range(count))
    statuses = np.array(rng.choices(list(RowStatus), k=count), np.uint8)
    stale_at = time.time() + np.array([rng.uniform(0, 3600) for _ in range(count)])
    return LoggedRequest(user, items, statuses, time.time(), stale_at)


async def test_the_stream_stays_within_its_bytes_whatever_the_reads(
    redis_server: RedisProcess,
) -> None:
    """Reads of every size, the last ones so large that each fills several entries to the
    most an entry holds: the stream's Redis memory stays within the budget, and it is full."""
    budget = 30 * redis_entry_bytes(ID_BYTES)
    client = connect(redis_server.url, 1.0)
    shipper = RequestShipper(client, budget, 1.0, ID_BYTES)
    rng = random.Random(0)
    requests = [a_read(f"u{n}", rng.choice([1, 50, 500]), rng) for n in range(60)]
    requests += [a_read(f"big{n}", 3000, rng) for n in range(15)]
    for request in requests:
        shipper.append(request)

    await shipper.stop()
    await client.aclose()

    check = redis_server.client()
    assert check.memory_usage(REQUEST_STREAM_KEY, samples=0) <= budget  # type: ignore[operator]
    assert check.xlen(REQUEST_STREAM_KEY) >= shipper.max_length
    sizes = [
        len(value) for request in requests for value in encode_entries(request, shipper.entry_bytes)
    ]
    assert shipper.shipped == len(requests)
    assert (shipper.shipped_entries, shipper.shipped_bytes) == (len(sizes), sum(sizes))
    assert max(sizes) > 16_000, "the last entries are as large as an entry may be"


async def test_a_sidecar_counts_the_reads_it_logs_and_ships(
    shared_settings: SidecarSettings, redis_server: RedisProcess
) -> None:
    parts = sidecar_parts(shared_settings)
    sidecar = parts.sidecar()
    await sidecar.start()
    try:
        await batch_get(sidecar, "user-1", ["a", "b"])
    finally:
        await sidecar.stop(grace=0)

    [(_, fields)] = redis_server.client().xrange(REQUEST_STREAM_KEY)
    shipped = decode_request(fields)
    assert shipped is not None
    assert shipped.item_ids == ("a", "b")
    samples = {
        sample.name: sample.value
        for family in parts.registry.collect()
        for sample in family.samples
    }
    assert samples["solaris_request_stream_entries_total"] == 1
    assert samples["solaris_request_stream_bytes_total"] == len(fields[FIELD])
    assert samples["solaris_request_stream_dropped_total"] == 0
    assert samples["solaris_request_log_bytes"] == parts.request_log.nbytes > 0
    assert samples["solaris_request_log_evicted_total"] == 0
