"""L2: embeddings in Redis, shared by every sidecar and precompute daemon.

Keys carry the model version and a hash tag of the user, `solaris:<version>:{<user>}:<item>`,
so all of a user's pairs share a Redis Cluster slot and one MGET answers a BatchGet. The
user part is escaped so that it cannot close the tag early, which keeps keys unambiguous.
A value is a format byte, its times and its values, float16 unless the redis_dtype setting
says float32 (`value_layout`); readers take both, and the first layout, which also held the
dim and the model version (`legacy_layout`). Expiry is Redis's own (SET PX).

A store reads one model version's keys, `model_version`: its daemon's own, or the one a
sidecar's `solaris.server.rollout.Rollout` chooses from the versions the daemons announce.
"""

import functools
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import hiredis
import numpy as np
import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.asyncio.connection import AbstractConnection
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.typing import EncodableT, KeysT

from solaris.server.store import (
    FLOAT16,
    FLOAT32,
    TIMES,
    Freshness,
    Rows,
    UserItems,
    UserVectors,
    never_stored,
)

LEGACY_FLOAT32 = 1
"""The first layout's format byte: dtype, dim, times, the model version, float32 values."""
COMPACT_FORMATS: dict[int, np.dtype] = {2: FLOAT16, 3: FLOAT32}
"""Format byte -> dtype of the compact layout: times, then the values, nothing else."""
STORED_DTYPES: dict[str, np.dtype] = {"float16": FLOAT16, "float32": FLOAT32}
"""The dtypes a value can be written in, by the name the redis_dtype setting gives."""
MODEL_VERSION_KEY = "solaris:model-version"
"""Where daemons before rollouts set their version (`solaris.server.rollout` reads it)."""
PASSWORD_ENV = "SOLARIS_REDIS_PASSWORD"
CLUSTER_SCHEMES = {"redis+cluster://": "redis://", "rediss+cluster://": "rediss://"}
"""A URL naming one node of a Redis Cluster (TCP, or TLS), and the scheme redis-py reads."""
DAEMON_REDIS_TIMEOUT_SECONDS = 2.0
"""Off the serving path, a daemon can wait longer for Redis than a read can."""
logger = logging.getLogger("solaris.redis")

_SET_EACH = """
for i, key in ipairs(KEYS) do
  redis.call('SET', key, ARGV[i + 1], 'PX', ARGV[1])
end
return #KEYS
"""
"""SET PX for each of a user's pairs in one command (KEYS: the pairs' keys; ARGV: the TTL in
milliseconds, then each key's value): one command a user rather than one a pair, which is most
of what a daemon spends beside its model. A user's keys share a slot, so a cluster takes it."""


def pair_key(model_version: str, user_id: str, item_id: str) -> str:
    return user_key_prefix(model_version, user_id) + item_id


def user_key_prefix(model_version: str, user_id: str) -> str:
    """What every key of the user's pairs starts with: a read builds it once, not per item."""
    escaped = user_id.replace("%", "%25").replace("}", "%7D")
    return f"solaris:{model_version}:{{{escaped}}}:"


def value_layout(dim: int, dtype: np.dtype = FLOAT16) -> np.dtype:
    """One value as a packed record: its format byte, its times, then `dim` values of `dtype`.
    The key carries the model version and the value's length gives the dim, so neither is
    repeated: a header of 25 bytes (a 128-dim float16 value fits the same allocation size in
    Redis as it would with no header at all)."""
    return np.dtype([("format", "u1"), ("times", TIMES), ("values", dtype, (dim,))])


def legacy_layout(dim: int, model_version: str) -> np.dtype:
    """The first layout (format LEGACY_FLOAT32), which sidecars and daemons before the compact
    one write: read still, so that a rolling upgrade, with both kinds of writer, has no miss
    cliff; never written."""
    return np.dtype(
        [
            ("format", "u1"),
            ("dtype", "u1"),
            ("dim", "<u4"),
            ("times", TIMES),
            ("version_length", "u1"),
            ("model_version", f"S{len(model_version.encode())}"),
            ("values", "<f4", (dim,)),
        ]
    )


_FORMAT_OF = {dtype: number for number, dtype in COMPACT_FORMATS.items()}


def encode_values(
    vectors: np.ndarray, freshness: Freshness, dtype: np.dtype = FLOAT16
) -> list[bytes]:
    """Each row of `vectors` (float32) as a value of `dtype` in the compact layout; float16
    rounds to nearest, as numpy casts."""
    layout = value_layout(vectors.shape[1], dtype)
    records = np.empty(len(vectors), layout)
    records["format"] = _FORMAT_OF[dtype]
    records["times"] = np.array(tuple(freshness[1:]), TIMES)
    records["values"] = vectors
    packed, size = records.tobytes(), layout.itemsize
    return [packed[start : start + size] for start in range(0, len(packed), size)]


@dataclass(frozen=True)
class Decoded:
    """Rows parsed from MGET's blobs, and how many were present but unreadable."""

    values: np.ndarray
    times: np.ndarray
    corrupt: int


@functools.lru_cache(maxsize=64)
def layouts(dim: int, model_version: str) -> dict[int, np.dtype]:
    """Every layout a reader takes, by the length of its values: none shares a length (the
    compact ones differ by 2 x dim bytes; the legacy one is longer than compact float32 by 6
    bytes and the version's)."""
    kinds = [value_layout(dim, dtype) for dtype in COMPACT_FORMATS.values()]
    return {layout.itemsize: layout for layout in [*kinds, legacy_layout(dim, model_version)]}


def decode_values(
    blobs: Sequence[bytes | str | None],
    dim: int,
    model_version: str,
    dtype: np.dtype | None = None,
) -> Decoded:
    """Rows for the blobs MGET returned, as `dtype`, or with None as they were stored (float32
    where a batch mixes float16 and float32). Both layouts are read: a rolling upgrade has
    writers of each. None and corrupt values (a length no layout has, another format byte; in
    the legacy layout another dtype, dim or version; text, from a client that decodes replies)
    are rows never stored. Vectorised: one parse for the usual batch, one per layout else."""
    by_size = layouts(dim, model_version)
    layout = by_size.get(_common_size(blobs), None)
    if layout is not None:
        records = np.frombuffer(b"".join(cast(Sequence[bytes], blobs)), layout)
        if _header_fits(records, layout, dim, model_version).all():
            return Decoded(_as(records["values"], dtype), records["times"].copy(), 0)
    found: list[tuple[np.ndarray, np.ndarray]] = []  # (rows, records) of each layout
    for size, layout in by_size.items():
        fit = [i for i, blob in enumerate(blobs) if isinstance(blob, bytes) and len(blob) == size]
        if fit:
            records = np.frombuffer(b"".join(cast(bytes, blobs[i]) for i in fit), layout)
            valid = _header_fits(records, layout, dim, model_version)
            found.append((np.array(fit, np.int64)[valid], records[valid]))
    stored = {_values_field(records.dtype)[0] for _, records in found if records.size}
    kind = dtype or (stored.pop() if len(stored) == 1 else FLOAT32)
    values = np.zeros((len(blobs), dim), kind)
    times = never_stored(len(blobs))
    for rows, records in found:
        values[rows] = records["values"]
        times[rows] = records["times"]
    present = sum(blob is not None for blob in blobs)
    return Decoded(values, times, present - sum(rows.size for rows, _ in found))


def _common_size(blobs: Sequence[bytes | str | None]) -> int:
    """The length of every blob when all are bytes of one length (the usual MGET), else -1."""
    if set(map(type, blobs)) - {bytes}:
        return -1
    sizes = set(map(len, cast(Sequence[bytes], blobs)))
    return sizes.pop() if len(sizes) == 1 else -1


def _as(values: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
    """`values` (a view into MGET's joined replies) copied out contiguous, as `dtype`."""
    return np.ascontiguousarray(values) if dtype is None else values.astype(dtype)


AsyncClient = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster
"""A client for one Redis node, or for a Redis Cluster."""
AsyncPipeline = redis.asyncio.client.Pipeline | redis.asyncio.cluster.ClusterPipeline
BlockingClient = redis.Redis | redis.cluster.RedisCluster


def is_cluster(url: str) -> bool:
    """Whether `url` names a Redis Cluster (`redis+cluster://`, `rediss+cluster://`)."""
    return url.startswith(tuple(CLUSTER_SCHEMES))


def node_url(url: str) -> str:
    """`url` as redis-py reads it: a cluster's scheme made the plain one."""
    for cluster, plain in CLUSTER_SCHEMES.items():
        if url.startswith(cluster):
            return plain + url.removeprefix(cluster)
    return url


def _options(timeout_seconds: float) -> dict[str, Any]:
    """What every client is made with. No retries: the caller's budget is its own to keep (a
    cluster client still learns the new topology on the call after a failed one)."""
    return {
        "password": os.environ.get(PASSWORD_ENV) or None,
        "socket_timeout": timeout_seconds,
        "socket_connect_timeout": timeout_seconds,
        "retry": Retry(NoBackoff(), 0),
    }


def connect(url: str, timeout_seconds: float) -> AsyncClient:
    """A client for `url`: redis:// (rediss:// for TLS) or unix:// for one node,
    redis+cluster:// (rediss+cluster://) for a cluster, found from the one node named. The
    password comes from the URL or from SOLARIS_REDIS_PASSWORD. `timeout_seconds` is how long
    Redis may take before the client gives up on it (see `solaris.server.reachability.within`
    for the caller's own budget). Its connections, of the class the URL's scheme picks, pack
    commands with hiredis."""
    if is_cluster(url):
        return _cluster_client(url, timeout_seconds)
    client = redis.asyncio.Redis.from_url(url, **_options(timeout_seconds))
    pool = client.connection_pool
    pool.connection_class = _packed_by_hiredis(pool.connection_class)
    return client


class _OneSlotCluster(redis.asyncio.cluster.RedisCluster):
    """A cluster client whose MGET goes straight to the master of its first key's slot: every
    MGET here is of one user's keys, which share a slot. redis-py's own routing hashes every
    key to check that they do, which took 1.5 ms of a 2 ms MGET of 500 keys (measured here);
    Redis refuses a cross-slot MGET itself (CROSSSLOT)."""

    async def mget(self, keys: KeysT, *args: EncodableT) -> Any:
        names = [keys] if isinstance(keys, str | bytes | memoryview) else list(keys)
        await self.initialize()  # a no-op unless the topology is unknown or out of date
        node = self.nodes_manager.get_node_from_slot(self.keyslot(names[0]))
        return await self.execute_command("MGET", *names, *args, target_nodes=node)


def _cluster_client(url: str, timeout_seconds: float) -> redis.asyncio.cluster.RedisCluster:
    """A cluster client whose connections, to every node it finds, pack with hiredis. Made
    without I/O: it finds the cluster on its first call, so it starts while Redis is down."""
    client = _OneSlotCluster.from_url(node_url(url), **_options(timeout_seconds))
    # The nodes it finds later are made with these options; the node named already was.
    packed = _packed_by_hiredis(client.connection_kwargs["connection_class"])
    client.connection_kwargs["connection_class"] = packed
    for node in client.startup_nodes:
        node.connection_class = packed
    return client


_hiredis_pack = cast(Callable[[tuple[object, ...]], bytes], hiredis.pack_command)
"""hiredis.pack_command, typed as it is (its stub takes a tuple of one item)."""


def _pack_with_hiredis(_: object, *args: EncodableT) -> list[bytes]:
    """A command in Redis's protocol, packed by hiredis (C): redis-py's asyncio connections
    pack in Python, about 0.3 ms for a 500-key MGET against 0.03 ms. The same bytes; a
    command name holding spaces (`CONFIG GET`) is split as redis-py splits it."""
    name = args[0]
    if isinstance(name, str | bytes) and len(words := name.split()) > 1:
        args = (*words, *args[1:])
    try:
        return [_hiredis_pack(args)]
    except TypeError:
        pass  # a bytearray, which hiredis does not take, or a type neither takes
    packable = tuple(bytes(arg) if isinstance(arg, bytearray) else arg for arg in args)
    try:
        return [_hiredis_pack(packable)]
    except TypeError as error:
        raise redis.exceptions.DataError(str(error)) from error


_Connection = TypeVar("_Connection", bound=AbstractConnection)


def _packed_by_hiredis(kind: type[_Connection]) -> type[_Connection]:
    """`kind` (whichever the URL's scheme picked: TCP, TLS or a unix socket), packing with
    hiredis."""
    packed = type(f"Hiredis{kind.__name__}", (kind,), {"pack_command": _pack_with_hiredis})
    return cast(type[_Connection], packed)


def connect_blocking(url: str, timeout_seconds: float) -> BlockingClient:
    """A blocking client, for a daemon's thread: `timeout_seconds` must outlast its longest
    blocking read. A cluster's finds the cluster when made (it cannot wait for a first call):
    while no node answers, making it raises."""
    if is_cluster(url):
        return redis.cluster.RedisCluster.from_url(node_url(url), **_options(timeout_seconds))
    return redis.Redis.from_url(url, **_options(timeout_seconds))


def _nothing(rows: int, dim: int, dtype: np.dtype) -> Rows:
    """Rows never stored: what a read finds before any model version is published."""
    return Rows(np.zeros((rows, dim), dtype), never_stored(rows), "")


def redacted(url: str) -> str:
    """The URL with its passwords masked, for logs: the one in `user:password@` and any option
    named for one (`?password=`, `ssl_password=`: redis-py reads them all; a unix:// URL has
    only options)."""
    base, question, query = url.partition("?")
    parts = urlsplit(base)
    if parts.password is not None:
        userinfo, _, hostport = parts.netloc.rpartition("@")
        base = base.replace(parts.netloc, f"{userinfo.partition(':')[0]}:***@{hostport}", 1)
    options = (option.partition("=") for option in query.split("&"))
    query = "&".join(
        f"{name}=***" if "password" in name.lower() else f"{name}{sep}{value}"
        for name, sep, value in options
    )
    return base + question + query


def _header_fits(records: np.ndarray, layout: np.dtype, dim: int, model_version: str) -> np.ndarray:
    """Which `records` (of `layout`, or of its header alone) hold what a reader of `dim` values
    of `model_version` wants: a compact value says so by its format byte and its length."""
    if "dim" not in (layout.names or ()):
        fits: np.ndarray = records["format"] == _FORMAT_OF[_values_field(layout)[0]]
        return fits
    fits = (
        (records["format"] == LEGACY_FLOAT32)
        & (records["dtype"] == LEGACY_FLOAT32)
        & (records["dim"] == dim)
        & (records["model_version"] == model_version.encode())
    )
    return fits


def _values_field(layout: np.dtype) -> tuple[np.dtype, int]:
    """The dtype of one of `layout`'s values, and where they start."""
    fields = layout.fields
    assert fields is not None, "a record layout"
    kind, offset = fields["values"][:2]
    return kind.base, offset


def read_stale_at(
    client: BlockingClient, dim: int, model_version: str, pairs: Sequence[tuple[str, str]]
) -> np.ndarray:
    """When each (user, item) pair goes stale (-inf if not stored), in one round trip, reading
    only the values' headers and lengths: a speculator asks this of every pair it considers,
    so it fetches tens of bytes, not the embeddings."""
    by_size = layouts(dim, model_version)
    longest = max(_values_field(layout)[1] for layout in by_size.values())
    with client.pipeline(transaction=False) as pipe:
        for user_id, item_id in pairs:
            key = pair_key(model_version, user_id, item_id)
            pipe.getrange(key, 0, longest - 1)
            pipe.strlen(key)
        replies: list[bytes | int] = pipe.execute()
    headers, sizes = cast(list[bytes], replies[0::2]), cast(list[int], replies[1::2])
    stale_at = np.full(len(pairs), -np.inf)
    for size, layout in by_size.items():
        header = _header_of(layout)
        fits = [i for i, length in enumerate(sizes) if length == size]
        records = np.frombuffer(b"".join(headers[i][: header.itemsize] for i in fits), header)
        valid = _header_fits(records, layout, dim, model_version)
        stale_at[np.array(fits, dtype=np.int64)[valid]] = records["times"]["stale_at"][valid]
    return stale_at


def _header_of(layout: np.dtype) -> np.dtype:
    """`layout` without its values: the record a header-only read parses."""
    assert layout.fields is not None, "a record layout"
    fields = {name: (kind, offset) for name, (kind, offset, *_) in layout.fields.items()}
    del fields["values"]
    names = list(fields)
    return np.dtype(
        {
            "names": names,
            "formats": [fields[name][0] for name in names],
            "offsets": [fields[name][1] for name in names],
            "itemsize": _values_field(layout)[1],
        }
    )


class RedisStore:
    """The L2 tier. Raises redis and socket errors: the tier above decides what they mean."""

    def __init__(
        self,
        client: AsyncClient,
        dim: int,
        model_version: str = "",
        stored_dtype: np.dtype = FLOAT16,
    ) -> None:
        """With no `model_version`, every read is a miss until `use_version`. Writes values
        of `stored_dtype`; reads values of either dtype and layout."""
        self.client = client
        self.dim = dim
        self.stored_dtype = np.dtype(stored_dtype)
        self.model_version = model_version
        self.corrupt_values = 0

    def use_version(self, model_version: str) -> None:
        """Reads `model_version`'s keys from now on."""
        self.model_version = model_version

    async def close(self) -> None:
        await self.client.aclose()

    async def read(
        self,
        user_id: str,
        item_ids: Sequence[str],
        dtype: np.dtype | None,
        now: float,
        deadline: float | None = None,
        version: str | None = None,
    ) -> Rows:
        """The rows as `dtype`, or with None as Redis holds them (float32 if both dtypes are
        in the batch): the tier above converts once, to what it needs. `deadline` is the
        caller's to keep (TieredStore wraps this read in a timeout). `version`: the keys of
        that model version (the tier above's, so that one answer holds one), else ours."""
        version = self.model_version if version is None else version
        if not version:
            return _nothing(len(item_ids), self.dim, dtype or self.stored_dtype)
        prefix = user_key_prefix(version, user_id)
        blobs = await self.client.mget([prefix + item for item in item_ids])
        return self._rows(user_id, blobs, version, dtype, now)

    async def read_many(
        self,
        wanted: Sequence[UserItems],
        dtype: np.dtype | None,
        now: float,
        version: str | None = None,
    ) -> list[Rows]:
        """One MGET a user, pipelined: one round trip. `dtype` and `version` as for `read`."""
        version = self.model_version if version is None else version
        if not version:
            nothing = dtype or self.stored_dtype
            return [_nothing(len(item_ids), self.dim, nothing) for _, item_ids in wanted]
        async with self.client.pipeline(transaction=False) as pipe:
            for user_id, item_ids in wanted:
                prefix = user_key_prefix(version, user_id)
                # Not pipe.mget: redis-py refuses it in a cluster's pipeline, though a user's
                # keys share one slot.
                pipe.execute_command("MGET", *(prefix + item for item in item_ids))
            answers = await self._execute(pipe)
        return [
            self._rows(user_id, blobs, version, dtype, now)
            for (user_id, _), blobs in zip(wanted, answers, strict=True)
        ]

    async def write(
        self, user_id: str, item_ids: Sequence[str], vectors: np.ndarray, freshness: Freshness
    ) -> None:
        await self.write_many([UserVectors(user_id, item_ids, vectors)], freshness)

    async def write_many(self, batch: Sequence[UserVectors], freshness: Freshness) -> None:
        """One command a user (`_SET_EACH`), pipelined: one round trip. EVAL, not EVALSHA: no
        NOSCRIPT to recover from on a node that never saw the script (a cluster's, a restarted
        one); Redis compiles the script once and finds it by its hash after."""
        ttl_ms = int((freshness.expires_at - freshness.computed_at) * 1000)
        if ttl_ms <= 0:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for user_id, item_ids, vectors in batch:
                blobs = encode_values(self.as_stored(vectors), freshness, self.stored_dtype)
                prefix = user_key_prefix(freshness.model_version, user_id)
                keys = [prefix + item for item in item_ids]
                pipe.eval(_SET_EACH, len(keys), *keys, ttl_ms, *blobs)
            await self._execute(pipe)

    async def _execute(self, pipe: AsyncPipeline) -> list[Any]:
        """Runs `pipe`. On a cluster, a node lost makes the client look the topology up again
        at its next call: redis-py does so after a lone command, not after a pipeline (seen:
        a daemon's pipelines failing on a dead master long after its replica took over)."""
        try:
            return await pipe.execute()
        except redis.asyncio.cluster.RedisCluster.ERRORS_ALLOW_RETRY:
            if isinstance(self.client, redis.asyncio.cluster.RedisCluster):
                await self.client.aclose()
            raise

    def as_stored(self, vectors: np.ndarray) -> np.ndarray:
        """`vectors` as this store keeps them: through float32 (as the model computes), then
        in stored_dtype. What the writer's L1 takes too, so that every sidecar answers a pair
        alike."""
        vectors = np.asarray(vectors)
        if vectors.dtype == self.stored_dtype:
            return vectors
        return vectors.astype(FLOAT32, copy=False).astype(self.stored_dtype, copy=False)

    def _rows(
        self,
        user_id: str,
        blobs: Sequence[bytes | str | None],
        version: str,
        dtype: np.dtype | None,
        now: float,
    ) -> Rows:
        """The rows MGET's `blobs` hold as of `now`; corrupt values are counted misses."""
        decoded = decode_values(blobs, self.dim, version, dtype)
        if decoded.corrupt:
            self.corrupt_values += decoded.corrupt
            logger.warning("%d corrupt values for user %r read as misses", decoded.corrupt, user_id)
        expired = decoded.times["expires_at"] <= now
        if expired.any():
            decoded.times[expired] = never_stored(1)
            decoded.values[expired] = 0
        found = not expired.all()
        return Rows(decoded.values, decoded.times, version if found else "")
