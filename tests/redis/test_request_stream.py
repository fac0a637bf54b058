"""The request stream on a real Redis: its memory within its budget whatever the reads, what a
sidecar ships counted, and ids named truly by a reader that starts after entries were trimmed
or a shipper that lost entries."""

import random
import time
from functools import partial

import numpy as np

from solaris.app.compose import sidecar_parts
from solaris.server.redis_store import connect
from solaris.server.request_log import LoggedRequest
from solaris.server.request_stream import (
    EPOCH_SECONDS,
    FIELD,
    REQUEST_STREAM_KEY,
    RequestDecoder,
    RequestEncoder,
    RequestShipper,
    decode_request,
    least_budget,
    redis_entry_bytes,
)
from solaris.server.settings import SidecarSettings
from solaris.server.store import RowStatus
from tests.redis.conftest import RedisProcess, batch_get

ID_BYTES = 32


def never() -> float:
    """A clock for an epoch that never ends."""
    return 0.0


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
    shipper = RequestShipper(
        client, budget, 1.0, ID_BYTES, new_encoder=partial(RequestEncoder, clock=never)
    )
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
    again = RequestEncoder(clock=never)
    sizes = [
        len(value) for request in requests for value in again.encode(request, shipper.entry_bytes)
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
    assert samples["solaris_request_stream_id_tables_total"] == 1
    assert samples["solaris_request_stream_id_table_bytes"] > 0
    assert samples["solaris_request_log_bytes"] == parts.request_log.nbytes > 0
    assert samples["solaris_request_log_evicted_total"] == 0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_a_reader_after_the_trimming_names_what_it_can_truly_and_all_a_little_later(
    redis_server: RedisProcess,
) -> None:
    """Every read holds the same 50 ids, defined in the first entry, which Redis trims, and 10
    of its own: a reader that comes once the first entries are gone names each read's own
    ids and leaves the rest out, counted; once the sender's epoch is over, it names all."""
    clock = Clock()
    client = connect(redis_server.url, 1.0)
    shipper = RequestShipper(
        client,
        least_budget(ID_BYTES),
        1.0,
        ID_BYTES,
        new_encoder=partial(RequestEncoder, clock=clock),
    )
    shared = tuple(f"shared-{n}" for n in range(50))
    reads = [own_read(f"u{n}", shared) for n in range(40)]
    for read in reads:
        shipper.append(read)
        await shipper.ship()
    check = redis_server.client()
    first_kept = int(check.xrange(REQUEST_STREAM_KEY, count=1)[0][0].split(b"-")[0])
    decoder = RequestDecoder()

    late = [decoder.decode(fields) for _, fields in check.xrange(REQUEST_STREAM_KEY)]

    kept = reads[-len(late) :]
    assert len(late) < len(reads), "the first entries were trimmed"
    assert first_kept > 0
    for part, read in zip(late, kept, strict=True):
        assert part is not None
        assert part.request.item_ids == read.item_ids[len(shared) :]
        assert part.request.statuses.tolist() == read.statuses[len(shared) :].tolist()
    assert decoder.unknown_items == len(shared) * len(kept)
    clock.now = EPOCH_SECONDS
    shipper.append(reads[0])
    await shipper.stop()
    await client.aclose()
    [(_, fields)] = check.xrevrange(REQUEST_STREAM_KEY, count=1)
    named = decoder.decode(fields)
    assert named is not None
    assert named.request.item_ids == reads[0].item_ids


def own_read(user: str, shared: tuple[str, ...]) -> LoggedRequest:
    items = (*shared, *(f"{user}-{n}" for n in range(10)))
    statuses = np.full(len(items), RowStatus.MISS, np.uint8)
    statuses[::3] = RowStatus.HIT
    return LoggedRequest(user, items, statuses, time.time(), np.full(len(items), time.time()))


async def test_after_redis_lost_entries_the_next_ones_define_their_ids_again(
    redis_server: RedisProcess,
) -> None:
    """Entries Redis may not have taken took their definitions with them: the shipper
    begins a new epoch, so that a reader names the next reads whole."""
    client = connect(redis_server.url, 0.5)
    shipper = RequestShipper(client, least_budget(ID_BYTES), 0.5, ID_BYTES)
    read = own_read("u", ("a", "b"))
    shipper.append(read)
    await shipper.ship()
    redis_server.kill()
    shipper.append(read)
    await shipper.ship()
    assert shipper.dropped == 1
    redis_server.start()

    shipper.append(read)
    await shipper.stop()
    await client.aclose()

    assert shipper.epochs == 2
    [(_, fields)] = redis_server.client().xrange(REQUEST_STREAM_KEY)
    shipped = decode_request(fields)  # read alone: it defines every id it names
    assert shipped is not None
    assert shipped.item_ids == read.item_ids
