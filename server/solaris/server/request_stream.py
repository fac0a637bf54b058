"""The request log on a capped Redis stream, so that one speculator sees every sidecar's
traffic. Reads never wait on Redis: a read appends to a bounded buffer, and a background task
encodes the buffer a slice at a time and ships each slice in pipelined XADDs (`MAXLEN ~`).
When Redis is slow or down, the buffer keeps the newest requests and counts the ones it
dropped.

An entry (field `read`) is compact binary and names ids by number. The speculator hands out
real pairs, so ids must come back whole: a hash would need the same table to be read back.
Each sender (a shipper, for one epoch) numbers the ids it meets 0, 1, 2, ... and never gives
a number twice; an entry carries the sender's random 64-bit id, the user's and each item's
number (in the fewest of 0, 1, 2, 4, 8, 16, 24 or 32 bits that hold the entry's largest),
and a definition (number, id) for each id the sender has not sent in this epoch. A reader
learns each sender's table from the definitions, in stream order. An epoch lasts at most
`EPOCH_SECONDS`, and ends sooner when its table holds `table_bytes` or an entry may have been
lost on the way to Redis: the next one, under a new sender id, defines every id again at its
first use. So a reader that starts late, restarts, fell behind the trimming or forgot a table
names every id in use within `EPOCH_SECONDS`; until then it drops (and counts) the items it
cannot name, and it never names one wrongly, as no number is reused under one sender id.
Whole epochs, rather than each id defined again every so often: the sender pays one dict
lookup per item and keeps no time per id, and a reader lets go of a finished epoch whole.

A 500-item read whose ids are defined costs 2 bytes an item plus a 31-byte head (1,164 bytes
for bench/floor.py's read, against 5,070 with the ids whole and 18 KB as JSON); a definition
costs its id's bytes and a separator, once per id per epoch. Statuses take 2 bits each;
`stale_at` is sent for served rows only, as a table of its distinct values (a batch of rows
computed together shares one) and an index per row in the fewest bits that hold it (none
for a single value), or as is where that is no smaller. Entries of the first binary form
(version 1: ids whole) and JSON entries (field `request`) from older sidecars still decode.

Bounded in bytes: no entry is larger than `entry_bytes` (a larger read splits into parts,
each carrying the definitions of its own ids, which the reader joins), and the stream keeps
`stream_length(budget)` entries, so its Redis memory stays within the budget however small
the entries are (Redis packs small ones into shared nodes, for less memory each) and it
cannot crowd the embeddings out of Redis's maxmemory. Both ends' tables are bounded in bytes.
Sharded (`shards` keys, see `solaris.server.redis_streams`), a read goes to its user's shard,
all its parts together, each shard numbers its own ids, and each keeps its share of the
budget.
"""

import array
import asyncio
import contextlib
import itertools
import json
import logging
import math
import operator
import random
import struct
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from solaris.server.reachability import REDIS_ERRORS, Reachability, within
from solaris.server.redis_store import AsyncClient
from solaris.server.redis_streams import StreamFields, shard_keys, shard_of
from solaris.server.request_log import LoggedRequest
from solaris.server.store import RowStatus

REQUEST_STREAM_KEY = "solaris:requests"
FIELD = b"read"
LEGACY_FIELD = b"request"
"""The JSON entries of sidecars before the binary form."""
EPOCH_SECONDS = 30.0
"""The longest a sender keeps one table of ids: how late a reader may name an id."""
SENDER_TABLE_BYTES = 8 * 1024**2
"""A shipper's table of ids (80 bytes an id beside its string): a new epoch past it."""
READER_TABLE_BYTES = 64 * 1024**2
"""A reader's tables, all senders' together; the least recently read sender's go first."""
_SHIP_EVERY_SECONDS = 0.05
_SHIP_AT_MOST = 500
_SLICE_SECONDS = 0.0005
"""Longest the shipper encodes before it sends what it has and lets reads run."""
logger = logging.getLogger("solaris.redis")
Key = TypeVar("Key")
Value = TypeVar("Value")

_VERSION = 2
_HEAD = struct.Struct("<BBBdQIII")
"""version, flags, bits of a number, time, sender, user's number, items, stale_at table
size"""
_PARTS = struct.Struct("<QII")
"""Next in a part (flag `_IN_PARTS`): read id, part, parts."""
_DEFINITIONS = struct.Struct("<III")
"""Next in an entry that defines ids (flag `_DEFINES`): definitions, the first number defined,
the defined ids' bytes."""
_LENGTH_PREFIXED = 1
"""Flag: the defined ids are a u32 length each, then their bytes (else: joined by NUL)."""
_TABLE = 2
"""Flag: stale_at is a table of distinct values and an index per served row (else: as is)."""
_IN_PARTS = 4
_LISTED = 8
"""Flag: the defined numbers are listed (else: they run on from the first, as they do but in
a part)."""
_DEFINES = 16
_FLAGS = _LENGTH_PREFIXED | _TABLE | _IN_PARTS | _LISTED | _DEFINES
_BITS = (0, 1, 2, 4, 8, 16, 24, 32)
"""The widths a number or a stale_at index is packed in."""
_MOST_NUMBERS = 1 << 32
_DEFINITION_BYTES = 8
"""The most bytes a definition adds beyond its id's: its number (4, if listed) and its
length (4, if length-prefixed)."""
_ITEM_BYTES = 13
"""The most bytes an item adds beyond its definition: its number (4), its status (under 1),
its stale_at (8)."""
_ID_TABLE_BYTES = 80
"""Memory an id's place in a table takes beside its string (dict slot, number, list slot),
measured with tracemalloc (tests.server.test_request_stream)."""
_MISS = int(RowStatus.MISS)
if array.array("I").itemsize != 4:
    raise ImportError("request stream numbers are packed as C unsigned ints of 4 bytes")
if max(RowStatus) > 3:
    raise ImportError("request stream entries give a RowStatus 2 bits: widen them first")

_NODE_BYTES = 16 * 1024
_REDIS_OVERHEAD = 64
"""Redis's own bytes beside an entry's value in a stream node (measured on Redis 7.0 with
jemalloc: a value of 16,320 bytes takes a 16 KiB allocation, 16,350 a 20 KiB one)."""
_REDIS_INDEX_BYTES = 512
"""The stream's index per entry and what `MEMORY USAGE` counts beyond the allocation."""


def entry_bytes(max_id_bytes: int) -> int:
    """The most bytes one entry holds: 16 KiB with Redis's overhead, or the next power of
    two where a part defining a user and one item at `max_id_bytes` each would not fit."""
    heads = _HEAD.size + _PARTS.size + _DEFINITIONS.size
    least = heads + 2 * (max_id_bytes + _DEFINITION_BYTES) + _ITEM_BYTES
    node = _NODE_BYTES
    while node - _REDIS_OVERHEAD < least:
        node *= 2
    return node - _REDIS_OVERHEAD


def redis_entry_bytes(max_id_bytes: int) -> int:
    """The most Redis memory one entry takes: 16.5 KiB unless ids are very long."""
    return entry_bytes(max_id_bytes) + _REDIS_OVERHEAD + _REDIS_INDEX_BYTES


def stream_length(budget_bytes: int, max_id_bytes: int) -> int:
    """The MAXLEN that keeps the stream within `budget_bytes` of Redis memory when every
    entry is as large as it may be; two entries kept back for `MAXLEN ~`, which trims whole
    stream nodes only (a node holds one large entry, or at most 4 KiB of small ones, with
    Redis's default stream-node-max-bytes)."""
    return budget_bytes // redis_entry_bytes(max_id_bytes) - 2


def least_budget(max_id_bytes: int) -> int:
    """The smallest budget that keeps one entry."""
    return 3 * redis_entry_bytes(max_id_bytes)


@dataclass(frozen=True, slots=True)
class RequestPart:
    """One stream entry's request: a whole read (part 0 of 1), or part `part` of `parts` of a
    larger read, whose parts share `read_id`."""

    request: LoggedRequest
    read_id: int = 0
    part: int = 0
    parts: int = 1


class RequestEncoder:
    """A sender's side: numbers ids in a table of its own, one epoch at a time (the module's
    docstring). `clock` says when an epoch is over (monotonic seconds)."""

    def __init__(
        self,
        table_bytes: int = SENDER_TABLE_BYTES,
        epoch_seconds: float = EPOCH_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.table_bytes = table_bytes
        self.epoch_seconds = epoch_seconds
        self._clock = clock
        self.epochs = 0
        """Epochs begun, this one included."""
        self._begin_epoch()

    def _begin_epoch(self) -> None:
        self.sender = random.getrandbits(64)
        self.nbytes = 0
        """The memory the table takes (its ids' strings included); at most `table_bytes`
        plus one read's ids."""
        self._numbers: dict[str, int] = {}
        self._ids: list[str] = []
        self._ends = self._clock() + self.epoch_seconds
        self.epochs += 1

    def forget(self) -> None:
        """Begins a new epoch: entries were lost, and with them definitions that later
        entries would count on."""
        self._begin_epoch()

    def encode(self, request: LoggedRequest, max_bytes: int) -> list[bytes]:
        """The entry values for `request`, in order, each at most `max_bytes` (which must fit
        a part: `entry_bytes`); more than one only for a read too large for one. Each defines
        the ids it holds that no entry of this epoch did."""
        full = len(self._ids) + len(request.item_ids) >= _MOST_NUMBERS  # tens of GB of table
        if full or self.nbytes >= self.table_bytes or self._clock() >= self._ends:
            self._begin_epoch()
        first_new = len(self._ids)
        user = self._number(request.user_id)
        numbers = self._numbers_of(request.item_ids)
        read = _Numbered(self.sender, request, user, numbers, first_new, self._ids)
        whole = read.encode(0, len(numbers))
        if len(whole) <= max_bytes:
            return [whole]
        read_id = random.getrandbits(63) + 1
        bounds = read.part_bounds(max_bytes)
        return [
            read.encode(start, end, (read_id, part, len(bounds)))
            for part, (start, end) in enumerate(bounds)
        ]

    def _numbers_of(self, items: Sequence[str]) -> np.ndarray:
        """Each item's number, given anew to those the table lacks."""
        try:  # every id known: the common case, one C loop
            found = _get_all(self._numbers, items)
        except KeyError:
            found = tuple(map(self._number, items))
        return np.frombuffer(array.array("I", found), np.uint32)

    def _number(self, id_: str) -> int:
        number = self._numbers.get(id_)
        if number is None:
            number = self._numbers[id_] = len(self._ids)
            self._ids.append(id_)
            self.nbytes += sys.getsizeof(id_) + _ID_TABLE_BYTES
        return number


@dataclass(frozen=True, slots=True)
class _Numbered:
    """A read with its ids numbered: what `RequestEncoder` encodes, whole or in parts."""

    sender: int
    request: LoggedRequest
    user: int
    numbers: np.ndarray
    first_new: int
    """Numbers from this one on were given for this read: its entries define them."""
    ids: list[str]
    """The sender's ids by number."""

    def encode(self, start: int, end: int, part: tuple[int, int, int] | None = None) -> bytes:
        """The entry for items `start:end`, defining the new ids among them and the user."""
        request, numbers = self.request, self.numbers[start:end]
        bits = _bits_for(max(self.user, int(numbers.max()) if len(numbers) else 0))
        flags, definitions = self._definitions(numbers, bits)
        statuses = np.asarray(request.statuses[start:end], np.uint8)
        table, stale = _encode_stale_at(statuses, request.stale_at[start:end])
        flags |= (0 if table is None else _TABLE) | (0 if part is None else _IN_PARTS)
        table_size = 0 if table is None else len(table) // 8
        head = _HEAD.pack(
            _VERSION, flags, bits, request.time, self.sender, self.user, len(numbers), table_size
        )
        return b"".join(
            (
                head,
                b"" if part is None else _PARTS.pack(*part),
                definitions,
                _pack(numbers, bits),
                _pack(statuses, 2),
                table or b"",
                stale,
            )
        )

    def _definitions(self, numbers: np.ndarray, bits: int) -> tuple[int, bytes]:
        """The flags and bytes that define the ids given for this read among `numbers` (and
        the user): nothing where none was."""
        defined = self._defined(numbers)
        if not len(defined):
            return 0, b""
        flags, ids = _encode_ids([self.ids[number] for number in defined.tolist()])
        first = int(defined[0])
        listed = int(defined[-1]) - first + 1 != len(defined)  # sorted: a run unless listed
        head = _DEFINITIONS.pack(len(defined), first, len(ids))
        if listed:
            return flags | _DEFINES | _LISTED, head + _pack(defined, bits) + ids
        return flags | _DEFINES, head + ids

    def _defined(self, numbers: np.ndarray) -> np.ndarray:
        """The numbers an entry holding `numbers` defines: those given for this read."""
        if len(self.ids) == self.first_new:
            return numbers[:0]  # none given: the common case, spared the sort
        defined = np.unique(numbers[numbers >= self.first_new])
        return np.union1d(defined, [self.user]) if self.user >= self.first_new else defined

    def part_bounds(self, max_bytes: int) -> list[tuple[int, int]]:
        """`(start, end)` of each part, each part's entry within `max_bytes`: at most its
        heads, its numbers (and its definitions', if listed) in the bits of the read's
        largest, its definitions' ids and separators (counted at each occurrence of an id
        new to this read), its statuses, and 8 bytes of stale_at per served row (a table is
        sent only where smaller). An item that alone would not fit (longer than
        `entry_bytes` allows for) gets a part of its own."""
        bits = _bits_for(max(self.user, int(self.numbers.max()) if len(self.numbers) else 0))
        new_ids = self.ids[self.first_new :]
        separator = 4 if any("\x00" in id_ for id_ in new_ids) else 1
        user_new = self.user >= self.first_new
        user_bytes = _utf8_bytes(self.request.user_id) + separator if user_new else 0
        room = max_bytes - _HEAD.size - _PARTS.size - _DEFINITIONS.size
        served = (np.asarray(self.request.statuses) != _MISS).tolist()
        new = (self.numbers >= self.first_new).tolist()
        bounds: list[tuple[int, int]] = []
        start, used, defined = 0, user_bytes, int(user_new)
        for index, (item, is_served, is_new) in enumerate(
            zip(self.request.item_ids, served, new, strict=True)
        ):
            size = 8 * is_served + (_utf8_bytes(item) + separator if is_new else 0)
            count = index - start + 1
            packed = _packed_bytes(count, bits) + _packed_bytes(count, 2)
            packed += _packed_bytes(defined + is_new, bits)
            if index > start and used + size + packed > room:
                bounds.append((start, index))
                start, used, defined = index, user_bytes, int(user_new)
            used += size
            defined += is_new
        bounds.append((start, len(self.numbers)))
        return bounds


class RequestDecoder:
    """A reader's side: reads entries in stream order, learning each sender's ids from their
    definitions, within `table_bytes` (the least recently read sender's table goes first;
    one sender alone past it defines no more until its next epoch). A sender's table is let
    go once the stream's reads are `finished_seconds` newer than its last: its epoch is over
    (twice an epoch, for reads that waited to be shipped and clocks a little apart)."""

    def __init__(
        self, table_bytes: int = READER_TABLE_BYTES, finished_seconds: float = 2 * EPOCH_SECONDS
    ) -> None:
        self.table_bytes = table_bytes
        self.finished_seconds = finished_seconds
        self.nbytes = 0
        """The memory the tables take, their ids' strings included."""
        self.malformed = 0
        """Entries not read: not ours, or not well formed."""
        self.unknown_items = 0
        """Items dropped for a number not (yet) defined: the reader started late, or entries
        were trimmed before it read them (it learns them within `EPOCH_SECONDS`)."""
        self._tables: OrderedDict[int, _SenderTable] = OrderedDict()
        self._newest = -math.inf
        """The latest read time seen."""

    def decode(self, fields: dict[bytes, bytes]) -> RequestPart | None:
        """The request (or part of one) in an entry, the items it cannot name left out; None
        for an entry malformed, not ours, or of a user it cannot name."""
        if FIELD in fields:
            value = fields[FIELD]
            if value[:1] == b"\x01":
                return self._counted(_decode_whole(value))
            entry = _decode(value)
            return self._counted(None) if entry is None else self._named(entry)
        if LEGACY_FIELD in fields:
            request = _decode_json(fields[LEGACY_FIELD])
            return self._counted(None if request is None else RequestPart(request))
        return self._counted(None)

    def _counted(self, entry: RequestPart | None) -> RequestPart | None:
        self.malformed += entry is None
        return entry

    def _named(self, entry: "_Entry") -> RequestPart | None:
        table = self._table(entry.sender, entry.time)
        self._define(table, entry.defined, entry.ids)
        user = table.ids.get(entry.user)
        if user is None:
            self.unknown_items += len(entry.numbers)
            return None
        numbers, statuses, stale_at = entry.numbers.tolist(), entry.statuses, entry.stale_at
        try:  # every id known: the common case, one C loop
            items = _get_all(table.ids, numbers)
        except KeyError:
            known = np.fromiter(map(table.ids.__contains__, numbers), bool, len(numbers))
            items = tuple(table.ids[number] for number in itertools.compress(numbers, known))
            statuses, stale_at = statuses[known], stale_at[known]
            self.unknown_items += len(numbers) - len(items)
        request = LoggedRequest(user, items, statuses, entry.time, stale_at)
        return RequestPart(request, *entry.part)

    def _table(self, sender: int, at: float) -> "_SenderTable":
        """The sender's table, read now by a read of time `at`; finished ones let go."""
        table = self._tables.get(sender)
        if table is None:
            table = self._tables[sender] = _SenderTable()
        self._tables.move_to_end(sender)
        table.last_read = max(table.last_read, at)
        self._newest = max(self._newest, at)
        finished = self._newest - self.finished_seconds
        while len(self._tables) > 1 and next(iter(self._tables.values())).last_read < finished:
            self._let_go_oldest()
        return table

    def _let_go_oldest(self) -> None:
        _, oldest = self._tables.popitem(last=False)
        self.nbytes -= oldest.nbytes

    def _define(self, table: "_SenderTable", numbers: np.ndarray, ids: tuple[str, ...]) -> None:
        for number, id_ in zip(numbers.tolist(), ids, strict=True):
            if number in table.ids:
                continue  # a part defining it again: a sender never gives a number twice
            size = sys.getsizeof(id_) + _ID_TABLE_BYTES
            while self.nbytes + size > self.table_bytes and len(self._tables) > 1:
                self._let_go_oldest()
            if self.nbytes + size > self.table_bytes:
                return
            table.ids[number] = id_
            table.nbytes += size
            self.nbytes += size


@dataclass(slots=True)
class _SenderTable:
    ids: dict[int, str] = field(default_factory=dict)
    nbytes: int = 0
    last_read: float = -math.inf
    """The latest time of the reads it named."""


@dataclass(frozen=True, slots=True)
class _Entry:
    """An entry as sent, numbers not yet named."""

    sender: int
    time: float
    user: int
    defined: np.ndarray
    ids: tuple[str, ...]
    numbers: np.ndarray
    statuses: np.ndarray
    stale_at: np.ndarray
    part: tuple[int, int, int]


def encode_entries(request: LoggedRequest, max_bytes: int) -> list[bytes]:
    """The entry values for `request` from a sender of its own, so that they define every
    id they hold (for tests and benchmarks: the shipper numbers ids across reads)."""
    return RequestEncoder().encode(request, max_bytes)


def encode_request(request: LoggedRequest) -> StreamFields:
    """The fields of one entry holding all of `request`, whatever its size, that defines
    every id it holds (for tests and benchmarks)."""
    return {FIELD: RequestEncoder().encode(request, sys.maxsize)[0]}


def decode_entry(fields: dict[bytes, bytes]) -> RequestPart | None:
    """The request (or part of one) in a stream entry read alone: whole where it defines its
    ids (as `encode_entries` makes them); None for an entry not ours."""
    return RequestDecoder().decode(fields)


def decode_request(fields: dict[bytes, bytes]) -> LoggedRequest | None:
    """The request in one stream entry read alone (for a part of a larger read, the items
    it holds)."""
    entry = decode_entry(fields)
    return None if entry is None else entry.request


class PartJoiner:
    """Joins the parts of reads too large for one entry. A sidecar sends a read's parts
    together, but other sidecars' entries may come between them; a read whose parts do not
    all come (trimmed, or before the reader started) is let go once `max_pending` newer
    reads wait, and counted."""

    def __init__(self, max_pending: int = 256) -> None:
        self.max_pending = max_pending
        self.incomplete = 0
        self._pending: OrderedDict[tuple[int, str, int], dict[int, LoggedRequest]] = OrderedDict()

    def add(self, entry: RequestPart) -> LoggedRequest | None:
        """The whole read once `entry` completes it, else None."""
        if entry.parts == 1:
            return entry.request
        key = (entry.read_id, entry.request.user_id, entry.parts)
        parts = self._pending.setdefault(key, {})
        parts[entry.part] = entry.request
        if len(parts) == entry.parts:
            del self._pending[key]
            return _joined([parts[index] for index in range(entry.parts)])
        while len(self._pending) > self.max_pending:
            self._pending.popitem(last=False)
            self.incomplete += 1
        return None


def _joined(parts: list[LoggedRequest]) -> LoggedRequest:
    first = parts[0]
    return LoggedRequest(
        first.user_id,
        tuple(itertools.chain.from_iterable(part.item_ids for part in parts)),
        np.concatenate([part.statuses for part in parts]),
        first.time,
        np.concatenate([part.stale_at for part in parts]),
    )


def _get_all(table: dict[Key, Value], keys: Sequence[Key]) -> tuple[Value, ...]:
    """`table[key]` for each of `keys`; a KeyError for one it lacks."""
    if len(keys) > 1:
        found: tuple[Value, ...] = operator.itemgetter(*keys)(table)
        return found
    return tuple(table[key] for key in keys)


def _utf8_bytes(id_: str) -> int:
    return len(id_.encode("utf-8", "surrogatepass"))


def _encode_ids(items: Sequence[str]) -> tuple[int, bytes]:
    joined = "\x00".join(items)
    if items and joined.count("\x00") == len(items) - 1:
        return 0, joined.encode("utf-8", "surrogatepass")
    encoded = [item.encode("utf-8", "surrogatepass") for item in items]
    lengths = np.fromiter(map(len, encoded), "<u4", len(encoded))
    return _LENGTH_PREFIXED, lengths.tobytes() + b"".join(encoded)


def _bits_for(largest: int) -> int:
    """The fewest of `_BITS` that hold every number up to `largest`."""
    return next(bits for bits in _BITS if largest < 1 << bits)


def _pack(values: np.ndarray, bits: int) -> bytes:
    """`values` (each under `1 << bits`) in `bits` each, little-endian; below 8 bits, the
    first value in a byte's lowest bits."""
    if bits == 0:
        return b""
    if bits < 8:
        per_byte = 8 // bits
        padded = np.zeros(-(-len(values) // per_byte) * per_byte, np.uint8)
        padded[: len(values)] = values
        weights = (1 << (bits * np.arange(per_byte))).astype(np.uint8)
        packed: np.ndarray = padded.reshape(-1, per_byte) @ weights  # each sum under 256
        return packed.tobytes()
    if bits == 24:
        return np.asarray(values, "<u4").view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    return np.asarray(values, f"<u{bits // 8}").tobytes()


def _spread(bits: int) -> np.ndarray:
    """Each byte's values of `bits` each, first the lowest: a table to unpack by."""
    shifts = bits * np.arange(8 // bits)
    return (np.arange(256)[:, None] >> shifts) & ((1 << bits) - 1)


_SPREAD = {bits: _spread(bits) for bits in (1, 2, 4)}


def _packed_bytes(count: int, bits: int) -> int:
    return -(-count * bits // 8)


def _unpack(value: bytes, offset: int, count: int, bits: int) -> tuple[np.ndarray, int]:
    """`count` values of `bits` each at `offset`, and the offset past them; a ValueError
    where `value` holds fewer."""
    end = offset + _packed_bytes(count, bits)
    if end > len(value):
        raise ValueError("cut short")
    if bits == 0:
        return np.zeros(count, np.int64), end
    if bits < 8:
        packed = np.frombuffer(value, np.uint8, end - offset, offset)
        return _SPREAD[bits][packed].reshape(-1)[:count], end
    if bits == 24:
        wide = np.zeros((count, 4), np.uint8)
        wide[:, :3] = np.frombuffer(value, np.uint8, 3 * count, offset).reshape(count, 3)
        return wide.view("<u4").reshape(-1).astype(np.int64), end
    return np.frombuffer(value, f"<u{bits // 8}", count, offset).astype(np.int64), end


def _encode_stale_at(statuses: np.ndarray, stale_at: np.ndarray) -> tuple[bytes | None, bytes]:
    """The served rows' stale_at (a miss's means nothing): `(table, index)`, or `(None,
    values)` where the table would be no smaller. NaN, which no row holds, reads as -inf."""
    served = np.asarray(stale_at, "<f8")[statuses != _MISS]
    if np.isnan(served).any():
        served = np.where(np.isnan(served), -np.inf, served)
    if len(served) > 1 and (served == served[0]).all():
        return served[:1].tobytes(), b""  # one batch of rows: one value, no index, no sort
    table = np.unique(served)
    bits = _bits_for(len(table) - 1) if len(table) else 0
    if len(table) * 8 + _packed_bytes(len(served), bits) >= len(served) * 8:
        return None, served.tobytes()
    return table.tobytes(), _pack(np.searchsorted(table, served), bits)


class _Malformed(ValueError):
    """An entry with a length or a value out of place."""


def _check(condition: bool) -> None:
    if not condition:
        raise _Malformed


def _decode(value: bytes) -> _Entry | None:
    """An entry of this version, checked whole: anything out of place reads as None."""
    try:
        return _parse(value)
    except (struct.error, ValueError, IndexError):
        return None


def _parse(value: bytes) -> _Entry:
    version, flags, bits, at, sender, user, count, table_size = _HEAD.unpack_from(value)
    _check(version == _VERSION and not flags & ~_FLAGS and bits in _BITS)
    _check(math.isfinite(at) and user < 1 << bits)
    offset, part = _HEAD.size, (0, 0, 1)
    if flags & _IN_PARTS:
        part, offset = _PARTS.unpack_from(value, offset), offset + _PARTS.size
        _check(part[1] < part[2])
    numbers_defined, ids, offset = _parse_definitions(value, offset, flags, bits)
    numbers, offset = _unpack(value, offset, count, bits)
    index_bits = _bits_for(table_size - 1) if table_size else 0
    statuses, stale_at = _decode_rows(value, offset, count, flags, table_size, index_bits)
    return _Entry(sender, at, user, numbers_defined, ids, numbers, statuses, stale_at, part)


def _parse_definitions(
    value: bytes, offset: int, flags: int, bits: int
) -> tuple[np.ndarray, tuple[str, ...], int]:
    """The numbers and ids an entry defines, and the offset past them."""
    if not flags & _DEFINES:
        _check(not flags & (_LISTED | _LENGTH_PREFIXED))
        return np.zeros(0, np.int64), (), offset
    defined, first, id_bytes = _DEFINITIONS.unpack_from(value, offset)
    offset += _DEFINITIONS.size
    if flags & _LISTED:
        numbers, offset = _unpack(value, offset, defined, bits)
    else:
        numbers = np.arange(first, first + defined)
    ids = _decode_ids(value[offset : offset + id_bytes], defined, flags)
    return numbers, ids, offset + id_bytes


def _decode_ids(blob: bytes, count: int, flags: int) -> tuple[str, ...]:
    if not flags & _LENGTH_PREFIXED:
        items = tuple(blob.decode("utf-8", "surrogatepass").split("\x00"))
        _check(len(items) == count)
        return items
    lengths = np.frombuffer(blob, "<u4", count).astype(np.int64)
    ends = np.cumsum(lengths) + 4 * count
    _check((int(ends[-1]) if count else 0) == len(blob))
    starts = ends - lengths
    return tuple(
        blob[start:end].decode("utf-8", "surrogatepass")
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True)
    )


def _decode_rows(
    value: bytes, offset: int, count: int, flags: int, table_size: int, index_bits: int
) -> tuple[np.ndarray, np.ndarray]:
    """The statuses and stale_at that end an entry: stale_at of served rows as is, or (flag
    `_TABLE`) a table and an index of `index_bits` each."""
    statuses, offset = _unpack(value, offset, count, 2)
    _check(not (statuses == 0).any())
    served = statuses != _MISS
    served_count = int(np.count_nonzero(served))
    if flags & _TABLE:
        table = np.frombuffer(value, "<f8", table_size, offset)
        index, offset = _unpack(value, offset + 8 * table_size, served_count, index_bits)
        _check(not len(index) or int(index.max()) < table_size)
        values = table[index]
    else:
        values = np.frombuffer(value, "<f8", served_count, offset)
        offset += 8 * served_count
    _check(offset == len(value) and not np.isnan(values).any())
    if served_count == count:
        return statuses.astype(np.uint8), values.astype(float)  # a copy of its own
    stale_at = np.full(count, -np.inf)
    stale_at[served] = values
    return statuses.astype(np.uint8), stale_at


_WHOLE_HEAD = struct.Struct("<BBdQIIIIII")
"""Version 1: version, flags, time, read id, part, parts, user id bytes, items, id bytes,
table size; then the user, the ids whole, the statuses, and stale_at (its index in 8, 16 or
32 bits as the table's size needs)."""


def _decode_whole(value: bytes) -> RequestPart | None:
    """A version 1 entry (ids whole), checked whole."""
    try:
        _, flags, at, read_id, part, parts, user_bytes, count, id_bytes, table_size = (
            _WHOLE_HEAD.unpack_from(value)
        )
        _check(math.isfinite(at) and part < parts)
        offset = _WHOLE_HEAD.size + user_bytes
        user = value[_WHOLE_HEAD.size : offset].decode("utf-8", "surrogatepass")
        items = _decode_ids(value[offset : offset + id_bytes], count, flags)
        index_bits = 8 if table_size <= 1 << 8 else 16 if table_size <= 1 << 16 else 32
        statuses, stale_at = _decode_rows(
            value, offset + id_bytes, count, flags, table_size, index_bits
        )
    except (struct.error, ValueError, IndexError):
        return None
    return RequestPart(LoggedRequest(user, items, statuses, at, stale_at), read_id, part, parts)


def _decode_json(value: bytes) -> LoggedRequest | None:
    """JSON: `[user, items, statuses, time, stale_at]`, a stale_at that is not finite as
    null. An entry from a sidecar that predates `stale_at` reads as never going stale."""
    try:
        user_id, items, statuses, at, *rest = json.loads(value)
        stale_at = rest[0] if rest else [math.inf] * len(items)
        well_formed = (
            isinstance(user_id, str)
            and all(isinstance(item, str) for item in items)
            and all(isinstance(status, int) and 0 <= status <= 255 for status in statuses)
            and len(items) == len(statuses) == len(stale_at)
            and _is_time(at)
            and all(until is None or isinstance(until, int | float) for until in stale_at)
        )
        if not well_formed:
            return None
        stale = np.array([-math.inf if until is None else until for until in stale_at], float)
        if np.isnan(stale).any():
            return None
        statuses_array = np.array(statuses, np.uint8)
        return LoggedRequest(user_id, tuple(items), statuses_array, float(at), stale)
    except (KeyError, ValueError, TypeError):
        return None


def _is_time(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


class RequestShipper:
    """Ships the sidecar's logged reads to the request stream, off the serving path: a read
    only appends to the buffer (at most `buffer_pairs` requested pairs, oldest dropped); the
    shipper encodes and sends."""

    def __init__(
        self,
        client: AsyncClient,
        budget_bytes: int,
        timeout_seconds: float,
        max_id_bytes: int,
        buffer_pairs: int = 250_000,
        reachability: Reachability | None = None,
        shards: int = 1,
        new_encoder: Callable[[], "RequestEncoder"] | None = None,
    ) -> None:
        """Each shipment is reported to `reachability`: the shipper talks to Redis every
        50 ms, whatever the reads. `budget_bytes` is the whole stream's, over `shards` keys.
        Each shard has an encoder of its own, so that an entry's ids are defined in the shard
        it is read from (a reader reads shards in no set order)."""
        self.client = client
        self.encoders = [(new_encoder or RequestEncoder)() for _ in range(shards)]
        self.reachability = reachability or Reachability()
        self.keys = shard_keys(REQUEST_STREAM_KEY, shards)
        self.max_length = stream_length(budget_bytes // shards, max_id_bytes)
        self.entry_bytes = entry_bytes(max_id_bytes)
        self.timeout_seconds = timeout_seconds
        self.buffer_pairs = buffer_pairs
        self.shipped = 0
        """Requests shipped."""
        self.shipped_entries = 0
        self.shipped_bytes = 0
        """The entries' values, as sent."""
        self.dropped = 0
        """Requests not shipped: the buffer was full, or Redis failed."""
        self._buffer: deque[LoggedRequest] = deque()
        self._pairs = 0
        self._stopping = asyncio.Event()
        self._shipping: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Ships in the background, from the running event loop, until `stop`."""
        self._stopping.clear()
        self._shipping = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        """Stops shipping, then ships what the buffer still holds, once. Stopping is asked
        for, not cancelled: on Python 3.11 a cancel that lands as `ship`'s own timeout ends
        can be lost, and the loop would go on (seen here: a sidecar that never exited)."""
        self._stopping.set()
        if self._shipping is not None:
            await self._shipping
            self._shipping = None
        await self.ship()

    def append(self, request: LoggedRequest) -> None:
        """Called on the serving path (on the event loop): an append, and no encoding."""
        self._buffer.append(request)
        self._pairs += len(request.item_ids)
        while self._pairs > self.buffer_pairs and len(self._buffer) > 1:
            self._pairs -= len(self._buffer.popleft().item_ids)
            self.dropped += 1

    async def run(self) -> None:
        """Ships every `_SHIP_EVERY_SECONDS` until `stop`."""
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), _SHIP_EVERY_SECONDS)
            await self.ship()

    async def ship(self) -> None:
        """Ships up to `_SHIP_AT_MOST` buffered requests, a slice at a time; after a slice
        Redis fails to take (dropped), the rest waits for the next round."""
        left = _SHIP_AT_MOST
        while left > 0 and self._buffer:
            requests, values = self._encode_slice(left)
            left -= requests
            if not await self._send(requests, values):
                return

    def _encode_slice(self, at_most: int) -> tuple[int, list[tuple[str, bytes]]]:
        """Takes and encodes requests from the buffer for up to `_SLICE_SECONDS`: the event
        loop serves reads between slices. (A thread would not spare the loop: the GIL lets a
        read wait for an encoding thread up to the 5 ms switch interval.)"""
        values: list[tuple[str, bytes]] = []
        end = time.perf_counter() + _SLICE_SECONDS
        taken = 0
        while taken < at_most and self._buffer and (taken == 0 or time.perf_counter() < end):
            request = self._buffer.popleft()
            self._pairs -= len(request.item_ids)
            shard = shard_of(request.user_id, len(self.keys))
            encoded = self.encoders[shard].encode(request, self.entry_bytes)
            values += ((self.keys[shard], value) for value in encoded)
            taken += 1
        return taken, values

    async def _send(self, requests: int, values: list[tuple[str, bytes]]) -> bool:
        # No `async with`: a pipeline past its budget runs on (and resets itself when done).
        pipe = self.client.pipeline(transaction=False)
        for key, value in values:
            pipe.xadd(key, {FIELD: value}, maxlen=self.max_length, approximate=True)
        try:
            await within(pipe.execute(), self.timeout_seconds, self.reachability)
        except asyncio.CancelledError:
            self._lost(requests)
            raise
        except REDIS_ERRORS as error:
            self._lost(requests)
            logger.debug("request log not shipped (%r)", error)
            return False
        self.shipped += requests
        self.shipped_entries += len(values)
        self.shipped_bytes += sum(len(value) for _, value in values)
        return True

    def _lost(self, requests: int) -> None:
        """Counts `requests` dropped; whether or not Redis took some of their entries, the
        definitions in them are unknown to readers, so the encoders start afresh."""
        self.dropped += requests
        for encoder in self.encoders:
            encoder.forget()

    @property
    def id_table_bytes(self) -> int:
        return sum(encoder.nbytes for encoder in self.encoders)

    @property
    def epochs(self) -> int:
        return sum(encoder.epochs for encoder in self.encoders)
