"""The request log on a capped Redis stream, so that one speculator sees every sidecar's
traffic. Reads never wait on Redis: a read appends to a bounded buffer, and a background task
encodes the buffer a slice at a time and ships each slice in pipelined XADDs (`MAXLEN ~`).
When Redis is slow or down, the buffer keeps the newest requests and counts the ones it
dropped.

An entry is compact binary (field `read`), about the ids' own bytes plus 2 bytes per item: a
500-item read of 12-byte ids is about 7 KB against 18 KB as JSON. The ids stay whole (the
speculator hands out real pairs), joined by NUL, or length-prefixed where an id holds a NUL;
statuses take 2 bits each; `stale_at` is sent for served rows only, as a table of its
distinct values (a batch of rows computed together shares one) and an index per row, or as
is where that is no smaller. JSON entries (field `request`) from older sidecars still decode.

Bounded in bytes: no entry is larger than `entry_bytes` (a larger read splits into parts,
which the reader joins), and the stream keeps `stream_length(budget)` entries, so its Redis
memory stays within the budget and it cannot crowd the embeddings out of Redis's maxmemory.
Sharded (`shards` keys, see `solaris.server.redis_streams`), a read goes to its user's shard,
all its parts together, and each shard keeps its share of the budget.
"""

import asyncio
import contextlib
import itertools
import json
import logging
import math
import random
import struct
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

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
_SHIP_EVERY_SECONDS = 0.05
_SHIP_AT_MOST = 500
_SLICE_SECONDS = 0.0005
"""Longest the shipper encodes before it sends what it has and lets reads run."""
logger = logging.getLogger("solaris.redis")

_VERSION = 1
_HEAD = struct.Struct("<BBdQIIIIII")
"""version, flags, time, read id, part, parts, user id bytes, items, id bytes, table size"""
_LENGTH_PREFIXED = 1
"""Flag: the ids are a u32 length each, then their bytes (else: joined by NUL)."""
_TABLE = 2
"""Flag: stale_at is a table of distinct values and an index per served row (else: as is)."""
_ITEM_BYTES = 13
"""The most bytes one item adds beyond its id's: a length (4), its status (under 1), its
stale_at (8)."""
_SHIFTS = np.array([0, 2, 4, 6], np.uint8)
_WEIGHTS = np.array([1, 4, 16, 64], np.uint8)
_MISS = int(RowStatus.MISS)
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
    two where a user and one item at `max_id_bytes` each would not fit in that."""
    node = _NODE_BYTES
    while node - _REDIS_OVERHEAD < _HEAD.size + 2 * max_id_bytes + _ITEM_BYTES + 1:
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


def encode_entries(request: LoggedRequest, max_bytes: int) -> list[bytes]:
    """The entry values for `request`, each at most `max_bytes` (which must fit a user and
    one item: `entry_bytes`); more than one only for a read too large for one."""
    whole = _encode(request)
    if len(whole) <= max_bytes:
        return [whole]
    read_id = random.getrandbits(63) + 1
    bounds = _part_bounds(request, max_bytes)
    return [
        _encode(_sliced(request, start, end), read_id, part, len(bounds))
        for part, (start, end) in enumerate(bounds)
    ]


def encode_request(request: LoggedRequest) -> StreamFields:
    """The fields of one entry holding all of `request`, whatever its size (for tests and
    benchmarks: the shipper keeps to `entry_bytes` with `encode_entries`)."""
    return {FIELD: _encode(request)}


def decode_entry(fields: dict[bytes, bytes]) -> RequestPart | None:
    """The request (or part of one) in a stream entry, or None for an entry not ours."""
    if FIELD in fields:
        return _decode(fields[FIELD])
    if LEGACY_FIELD in fields:
        request = _decode_json(fields[LEGACY_FIELD])
        return None if request is None else RequestPart(request)
    return None


def decode_request(fields: dict[bytes, bytes]) -> LoggedRequest | None:
    """The request in one stream entry (for a part of a larger read, the items it holds)."""
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


def _encode(request: LoggedRequest, read_id: int = 0, part: int = 0, parts: int = 1) -> bytes:
    user = request.user_id.encode("utf-8", "surrogatepass")
    flags, ids = _encode_ids(request.item_ids)
    statuses = np.asarray(request.statuses, np.uint8)
    table, stale = _encode_stale_at(statuses, request.stale_at)
    if table is not None:
        flags |= _TABLE
    sizes = (len(user), len(statuses), len(ids), 0 if table is None else len(table) // 8)
    head = _HEAD.pack(_VERSION, flags, request.time, read_id, part, parts, *sizes)
    return b"".join((head, user, ids, _pack_statuses(statuses), table or b"", stale))


def _encode_ids(items: Sequence[str]) -> tuple[int, bytes]:
    joined = "\x00".join(items)
    if items and joined.count("\x00") == len(items) - 1:
        return 0, joined.encode("utf-8", "surrogatepass")
    encoded = [item.encode("utf-8", "surrogatepass") for item in items]
    lengths = np.fromiter(map(len, encoded), "<u4", len(encoded))
    return _LENGTH_PREFIXED, lengths.tobytes() + b"".join(encoded)


def _pack_statuses(statuses: np.ndarray) -> bytes:
    padded = np.zeros(-(-len(statuses) // 4) * 4, np.uint8)
    padded[: len(statuses)] = statuses
    packed: np.ndarray = padded.reshape(-1, 4) @ _WEIGHTS  # uint8: at most 3 * 85
    return packed.tobytes()


def _encode_stale_at(statuses: np.ndarray, stale_at: np.ndarray) -> tuple[bytes | None, bytes]:
    """The served rows' stale_at (a miss's means nothing): `(table, index)`, or `(None,
    values)` where the table would be no smaller. NaN, which no row holds, reads as -inf."""
    served = np.asarray(stale_at, "<f8")[statuses != _MISS]
    if np.isnan(served).any():
        served = np.where(np.isnan(served), -np.inf, served)
    table = np.unique(served)
    width = _index_dtype(len(table)).itemsize
    if len(table) * 8 + len(served) * width >= len(served) * 8:
        return None, served.tobytes()
    index = np.searchsorted(table, served).astype(_index_dtype(len(table)))
    return table.tobytes(), index.tobytes()


def _index_dtype(table_size: int) -> np.dtype:
    if table_size <= 1 << 8:
        return np.dtype(np.uint8)
    return np.dtype("<u2" if table_size <= 1 << 16 else "<u4")


def _part_bounds(request: LoggedRequest, max_bytes: int) -> list[tuple[int, int]]:
    """`(start, end)` of each part, each part's encoding within `max_bytes`: an item costs
    at most its id, its separator or length, 8 bytes of stale_at if served (a table is used
    only where smaller) and 2 bits of status. An item that alone would not fit (longer than
    `entry_bytes` allows for) gets a part of its own."""
    items = request.item_ids
    room = max_bytes - _HEAD.size - len(request.user_id.encode("utf-8", "surrogatepass"))
    separator = 4 if any("\x00" in item for item in items) else 1
    served = (np.asarray(request.statuses) != _MISS).tolist()
    bounds: list[tuple[int, int]] = []
    start, used = 0, 0
    for index, (item, is_served) in enumerate(zip(items, served, strict=True)):
        size = len(item.encode("utf-8", "surrogatepass")) + separator + 8 * is_served
        if index > start and used + size + -(-(index - start + 1) // 4) > room:
            bounds.append((start, index))
            start, used = index, 0
        used += size
    bounds.append((start, len(items)))
    return bounds


def _sliced(request: LoggedRequest, start: int, end: int) -> LoggedRequest:
    return LoggedRequest(
        request.user_id,
        request.item_ids[start:end],
        request.statuses[start:end],
        request.time,
        request.stale_at[start:end],
    )


def _joined(parts: list[LoggedRequest]) -> LoggedRequest:
    first = parts[0]
    return LoggedRequest(
        first.user_id,
        tuple(itertools.chain.from_iterable(part.item_ids for part in parts)),
        np.concatenate([part.statuses for part in parts]),
        first.time,
        np.concatenate([part.stale_at for part in parts]),
    )


def _decode(value: bytes) -> RequestPart | None:
    """A binary entry, checked whole: any length or value out of place reads as None."""
    try:
        version, flags, at, read_id, part, parts, user_bytes, count, id_bytes, table_size = (
            _HEAD.unpack_from(value)
        )
        if version != _VERSION or not math.isfinite(at) or not part < parts:
            return None
        offset = _HEAD.size
        user = value[offset : offset + user_bytes].decode("utf-8", "surrogatepass")
        offset += user_bytes
        items = _decode_ids(value[offset : offset + id_bytes], count, flags)
        offset += id_bytes
        statuses = _unpack_statuses(value, offset, count)
        offset += -(-count // 4)
        stale_at, offset = _decode_stale_at(value, offset, statuses, flags, table_size)
    except (struct.error, ValueError, IndexError):
        return None
    if items is None or statuses is None or stale_at is None or offset != len(value):
        return None
    return RequestPart(LoggedRequest(user, items, statuses, at, stale_at), read_id, part, parts)


def _decode_ids(blob: bytes, count: int, flags: int) -> tuple[str, ...] | None:
    if not flags & _LENGTH_PREFIXED:
        items = tuple(blob.decode("utf-8", "surrogatepass").split("\x00"))
        return items if len(items) == count else None
    lengths = np.frombuffer(blob, "<u4", count).astype(np.int64)
    ends = np.cumsum(lengths) + 4 * count
    if (int(ends[-1]) if count else 0) != len(blob):
        return None
    starts = ends - lengths
    return tuple(
        blob[start:end].decode("utf-8", "surrogatepass")
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True)
    )


def _unpack_statuses(value: bytes, offset: int, count: int) -> np.ndarray | None:
    packed = np.frombuffer(value, np.uint8, -(-count // 4), offset)
    statuses = ((packed[:, None] >> _SHIFTS) & 3).reshape(-1)[:count]
    return None if len(statuses) != count or (statuses == 0).any() else statuses


def _decode_stale_at(
    value: bytes, offset: int, statuses: np.ndarray | None, flags: int, table_size: int
) -> tuple[np.ndarray | None, int]:
    if statuses is None:
        return None, offset
    served = statuses != _MISS
    count = int(served.sum())
    stale_at = np.full(len(statuses), -np.inf)
    if flags & _TABLE:
        table = np.frombuffer(value, "<f8", table_size, offset)
        offset += 8 * table_size
        index_dtype = _index_dtype(table_size)
        index = np.frombuffer(value, index_dtype, count, offset)
        offset += count * index_dtype.itemsize
        if count and int(index.max()) >= table_size:
            return None, offset
        stale_at[served] = table[index]
    else:
        stale_at[served] = np.frombuffer(value, "<f8", count, offset)
        offset += 8 * count
    return (None if np.isnan(stale_at).any() else stale_at), offset


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
    ) -> None:
        """Each shipment is reported to `reachability`: the shipper talks to Redis every
        50 ms, whatever the reads. `budget_bytes` is the whole stream's, over `shards` keys."""
        self.client = client
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
            key = self.keys[shard_of(request.user_id, len(self.keys))]
            values += ((key, value) for value in encode_entries(request, self.entry_bytes))
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
            self.dropped += requests
            raise
        except REDIS_ERRORS as error:
            self.dropped += requests
            logger.debug("request log not shipped (%r)", error)
            return False
        self.shipped += requests
        self.shipped_entries += len(values)
        self.shipped_bytes += sum(len(value) for _, value in values)
        return True
