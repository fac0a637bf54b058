"""The request stream's entries across reads: ids numbered by one sender and named back by
a reader that learns them from the stream, whenever it starts and whatever its tables keep.
(One entry read alone: tests.server.test_queues; on a real Redis: tests.redis.)"""

import gc
import random
import sys
import tracemalloc
from collections.abc import Iterator
from dataclasses import replace

import numpy as np

from solaris.server.request_log import LoggedRequest
from solaris.server.request_stream import (
    EPOCH_SECONDS,
    FIELD,
    PartJoiner,
    RequestDecoder,
    RequestEncoder,
    entry_bytes,
)
from solaris.server.store import RowStatus
from tests.server.test_queues import assert_same

SHAPES = ["", "\x00", "a\x00b", "é", "日本語", "🙂", "x" * 300, "\udcff"]
"""Ids beside plain ones: empty, NUL, non-ASCII, long, and a lone surrogate."""


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def random_reads(count: int, vocabulary: int, seed: int) -> Iterator[LoggedRequest]:
    """Reads over a shared vocabulary of ids of every shape, with duplicates, every status,
    and stale_at in a few batches or all distinct."""
    rng = random.Random(seed)
    words = [rng.choice(SHAPES) + str(n) if n % 7 == 0 else f"item-{n}" for n in range(vocabulary)]
    for n in range(count):
        size = rng.choice([1, 3, 50, 500])
        items = tuple(rng.choice(words) for _ in range(size))
        statuses = np.array(rng.choices(list(RowStatus), k=size), np.uint8)
        batches = np.array([rng.choice([1.7e9, 1.7e9 + 60]) for _ in range(size)])
        stale_at = batches if n % 2 else 1.7e9 + np.arange(size, dtype=float)
        stale_at[statuses == RowStatus.MISS] = -np.inf
        yield LoggedRequest(f"user-{rng.randrange(5)}\x00{n % 3}", items, statuses, 1.7e9, stale_at)


def shipped(
    encoder: RequestEncoder, reads: list[LoggedRequest], max_bytes: int
) -> list[list[bytes]]:
    return [encoder.encode(read, max_bytes) for read in reads]


def read_back(decoder: RequestDecoder, entries: list[list[bytes]]) -> list[LoggedRequest | None]:
    """Each read as the decoder names it: whole, left out (None), or the items it knows."""
    joiner = PartJoiner()
    named: list[LoggedRequest | None] = []
    for values in entries:
        parts = [decoder.decode({FIELD: value}) for value in values]
        joined = [joiner.add(part) for part in parts if part is not None]
        named.append(joined[-1] if len(joined) == len(values) else None)
    return named


def assert_named_truly(named: LoggedRequest, read: LoggedRequest) -> None:
    """`named` holds some of `read`'s rows, in order, each with its own id, status and
    stale_at: an item left out is allowed, a wrong one is not."""
    rows = iter(zip(read.item_ids, read.statuses.tolist(), read.stale_at.tolist(), strict=True))
    for row in zip(named.item_ids, named.statuses.tolist(), named.stale_at.tolist(), strict=True):
        assert row in rows, f"{row!r} is not among the read's rows, in order"
    assert (named.user_id, named.time) == (read.user_id, read.time)


def test_random_reads_come_back_whole_through_one_sender_and_one_reader() -> None:
    """Across epochs (by time and by a full table) and parts, a reader that reads every entry
    names every read whole."""
    clock = Clock()
    encoder = RequestEncoder(table_bytes=64 * 1024, clock=clock)
    decoder = RequestDecoder()
    reads = list(random_reads(120, 2_000, seed=1))
    entries = []
    for n, read in enumerate(reads):
        clock.now = n * EPOCH_SECONDS / 20
        entries.append(encoder.encode(read, 2_048))

    for named, read in zip(read_back(decoder, entries), reads, strict=True):
        assert_same(named, read)
    assert encoder.epochs > 6, "epochs began by time and by bytes"
    assert any(len(values) > 1 for values in entries), "some reads went in parts"
    assert max(len(value) for values in entries for value in values) <= 2_048
    assert decoder.unknown_items == decoder.malformed == 0


def test_a_reader_that_starts_late_names_every_id_within_an_epoch_and_never_a_wrong_one() -> None:
    clock = Clock()
    encoder = RequestEncoder(clock=clock)
    reads = list(random_reads(60, 300, seed=2))
    missed = shipped(encoder, reads[:20], entry_bytes(256))  # trimmed before the reader came
    late = shipped(encoder, reads[20:40], entry_bytes(256))
    clock.now = EPOCH_SECONDS
    next_epoch = shipped(encoder, reads[40:], entry_bytes(256))
    decoder = RequestDecoder()

    named_late = read_back(decoder, late)
    named_next = read_back(decoder, next_epoch)

    assert missed
    assert decoder.unknown_items > 0
    left_out = sum(len(read.item_ids) for read in reads[20:40])
    for named, read in zip(named_late, reads[20:40], strict=True):
        if named is not None:
            assert_named_truly(named, read)
            left_out -= len(named.item_ids)
    assert decoder.unknown_items == left_out
    for named, read in zip(named_next, reads[40:], strict=True):
        assert_same(named, read)


def test_senders_and_tables_rolling_over_never_name_an_id_wrongly() -> None:
    """Many senders (sidecars, and each one's epochs) with small tables, read by a reader
    whose tables hold far fewer ids than the senders use: it names what it can, truly, and
    stays within its bytes."""
    clock = Clock()
    senders = [RequestEncoder(table_bytes=8 * 1024, clock=clock) for _ in range(4)]
    decoder = RequestDecoder(table_bytes=16 * 1024)
    reads = list(random_reads(200, 5_000, seed=3))
    named_any = 0
    for n, read in enumerate(reads):
        clock.now = n * EPOCH_SECONDS / 40
        entries = [senders[n % len(senders)].encode(read, entry_bytes(256))]
        (named,) = read_back(decoder, entries)
        if named is not None:
            assert_named_truly(named, read)
            named_any += len(named.item_ids)
        assert decoder.nbytes <= decoder.table_bytes
    assert 0 < named_any < sum(len(read.item_ids) for read in reads)
    assert sum(sender.epochs for sender in senders) > 20


def test_a_reader_lets_go_of_a_senders_table_once_its_epoch_is_over() -> None:
    """Reads more than two epochs newer than a sender's last: no entry of that sender can
    come any more, and its table goes."""
    first, second = RequestEncoder(), RequestEncoder()
    decoder = RequestDecoder()
    reads = list(random_reads(3, 100, seed=6))
    decoder.decode({FIELD: first.encode(reads[0], sys.maxsize)[0]})
    alone = decoder.nbytes
    soon = replace(reads[1], time=reads[0].time + 2 * EPOCH_SECONDS)
    decoder.decode({FIELD: second.encode(soon, sys.maxsize)[0]})
    assert decoder.nbytes > alone, "both tables kept"

    later = replace(reads[2], time=soon.time + 1)
    decoder.decode({FIELD: second.encode(later, sys.maxsize)[0]})

    assert decoder.nbytes == second.nbytes < alone + second.nbytes


def test_an_entry_out_of_shape_is_counted_and_teaches_the_reader_nothing() -> None:
    encoder, decoder = RequestEncoder(), RequestDecoder()
    read = next(random_reads(1, 10, seed=5))
    (value,) = encoder.encode(read, entry_bytes(256))

    assert decoder.decode({FIELD: value[:-1]}) is None
    assert decoder.decode({b"other": value}) is None
    assert (decoder.malformed, decoder.nbytes) == (2, 0)
    (again,) = encoder.encode(read, entry_bytes(256))  # names them by number only
    assert decoder.decode({FIELD: again}) is None, "not even its user was learnt"
    assert decoder.unknown_items == len(read.item_ids)
    assert decoder.malformed == 2


def test_a_500_item_read_of_the_benchs_ids_is_under_2_kb_once_they_are_defined() -> None:
    """bench/floor.py's read: 500 ids `item-N` of one user of 40, every row a hit, its rows
    computed together. The first read defines the ids; every other read costs 2 bytes an
    item (plus its user's definition on its first read)."""
    items = tuple(f"item-{n}" for n in range(500))
    hits = np.full(500, RowStatus.HIT, np.uint8)
    reads = [
        LoggedRequest(f"user-{user}", items, hits, 1.7e9, np.full(500, 1.7e9 + 3600))
        for user in range(40)
    ]

    entries = shipped(RequestEncoder(), reads, entry_bytes(256))

    first, *rest = (len(value) for values in entries for value in values)
    assert first > 500 * len("item-250")
    assert len(rest) == 39
    assert max(rest) < 2_000
    for named, read in zip(read_back(RequestDecoder(), entries), reads, strict=True):
        assert_same(named, read)


V1_ENTRIES = [
    (
        "010200000040fc54d9410000000000000000000000000100000007000000040000000700000002000000"
        "757365722dc3bc61006200630064790000004ffc54d9410000005efc54d941000001",
        LoggedRequest(
            "user-ü",
            ("a", "b", "c", "d"),
            np.array([1, 2, 3, 1], np.uint8),
            1.7e9,
            np.array([1.7e9 + 60, -np.inf, 1.7e9 + 60, 1.7e9 + 120]),
        ),
    ),
    (
        "010100004040fc54d9410000000000000000000000000100000001000000030000001800000000000000"
        "750600000000000000060000006e756c00696ee697a5e69cac2700000000000014400000000000001840",
        LoggedRequest(
            "u",
            ("nul\x00in", "", "日本"),
            np.array([3, 1, 2], np.uint8),
            1.7e9 + 1,
            np.array([5.0, 6.0, -np.inf]),
        ),
    ),
]
"""Entries of the first binary form (ids whole), as its encoder wrote them: ids joined by
NUL with a stale_at table, and length-prefixed with stale_at as is."""
V1_PART = (
    "010000000040fc54d9415d61a95a8924017e010000000800000004000000050000003100000000000000"
    "757365726974656d2d30303035006974656d2d30303036006974656d2d30303037006974656d2d3030"
    "3038006974656d2d30303039aa02"
)
"""Part 1 of 8 of a read of 40 misses of user "user", `item-0005` to `item-0009`."""


def test_entries_of_the_first_binary_form_still_decode() -> None:
    decoder = RequestDecoder()

    for value, read in V1_ENTRIES:
        part = decoder.decode({FIELD: bytes.fromhex(value)})
        assert part is not None
        assert_same(part.request, read)
    part = decoder.decode({FIELD: bytes.fromhex(V1_PART)})

    assert part is not None
    assert (part.read_id, part.part, part.parts) == (9079578496105800029, 1, 8)
    assert part.request.item_ids == tuple(f"item-{n:04d}" for n in range(5, 10))
    assert part.request.statuses.tolist() == [RowStatus.MISS] * 5
    assert decoder.malformed == 0


def test_each_end_counts_the_memory_its_table_holds() -> None:
    """What the sender's and the reader's tables count is what they keep alive, the ids'
    strings included (an upper bound, within 20%)."""
    encoder, decoder = RequestEncoder(table_bytes=1024**3), RequestDecoder(1024**3)
    encoder.encode(LoggedRequest("warm", (), np.zeros(0, np.uint8), 0.0, np.zeros(0)), 100)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        entries = shipped(encoder, list(random_reads(40, 20_000, seed=4)), sys.maxsize)
        gc.collect()
        sender = tracemalloc.get_traced_memory()[0] - before - entries_bytes(entries)
        before = tracemalloc.get_traced_memory()[0]
        read_back(decoder, entries)
        gc.collect()
        reader = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()

    assert 0.8 * encoder.nbytes <= sender <= encoder.nbytes
    assert 0.8 * decoder.nbytes <= reader <= decoder.nbytes


def entries_bytes(entries: list[list[bytes]]) -> int:
    values = [value for values in entries for value in values]
    held = sys.getsizeof(entries) + sum(map(sys.getsizeof, entries))
    return held + sum(map(sys.getsizeof, values))
