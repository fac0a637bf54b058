"""L2: embeddings in Redis, shared by every sidecar and precompute daemon.

Keys carry the model version and a hash tag of the user, `solaris:<version>:{<user>}:<item>`,
so all of a user's pairs share a Redis Cluster slot and one MGET answers a BatchGet. The
user part is escaped so that it cannot close the tag early, which keeps keys unambiguous.
Values are a small header and the float32 bytes; expiry is Redis's own (SET PX).

The current model version is a key of its own, set by the daemon that computes with it and
read by sidecars (every few seconds), so a new model's keys take over without a restart.
"""

import logging
import os
import time
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

from solaris.server.store import FLOAT32, Freshness, Rows, never_stored

FORMAT_VERSION = 1
DTYPE_FLOAT32 = 1
MODEL_VERSION_KEY = "solaris:model-version"
PASSWORD_ENV = "SOLARIS_REDIS_PASSWORD"
CLUSTER_SCHEMES = {"redis+cluster://": "redis://", "rediss+cluster://": "rediss://"}
"""A URL naming one node of a Redis Cluster (TCP, or TLS), and the scheme redis-py reads."""
DAEMON_REDIS_TIMEOUT_SECONDS = 2.0
"""Off the serving path, a daemon can wait longer for Redis than a read can."""
_UNKNOWN_VERSION_REFRESH_SECONDS = 0.5
logger = logging.getLogger("solaris.redis")


def pair_key(model_version: str, user_id: str, item_id: str) -> str:
    return user_key_prefix(model_version, user_id) + item_id


def user_key_prefix(model_version: str, user_id: str) -> str:
    """What every key of the user's pairs starts with: a read builds it once, not per item."""
    escaped = user_id.replace("%", "%25").replace("}", "%7D")
    return f"solaris:{model_version}:{{{escaped}}}:"


def value_layout(dim: int, model_version: str) -> np.dtype:
    """One stored value as a packed record: header, then `dim` float32 values."""
    return np.dtype(
        [
            ("format", "u1"),
            ("dtype", "u1"),
            ("dim", "<u4"),
            ("computed_at", "<f8"),
            ("stale_at", "<f8"),
            ("expires_at", "<f8"),
            ("version_length", "u1"),
            ("model_version", f"S{len(model_version.encode())}"),
            ("values", "<f4", (dim,)),
        ]
    )


def encode_values(vectors: np.ndarray, freshness: Freshness) -> list[bytes]:
    version = freshness.model_version.encode()
    records = np.zeros(len(vectors), value_layout(vectors.shape[1], freshness.model_version))
    records["format"] = FORMAT_VERSION
    records["dtype"] = DTYPE_FLOAT32
    records["dim"] = vectors.shape[1]
    records["computed_at"] = freshness.computed_at
    records["stale_at"] = freshness.stale_at
    records["expires_at"] = freshness.expires_at
    records["version_length"] = len(version)
    records["model_version"] = version
    records["values"] = vectors
    return [record.tobytes() for record in records]


@dataclass(frozen=True)
class Decoded:
    """Rows parsed from MGET's blobs, and how many were present but unreadable."""

    values: np.ndarray
    times: np.ndarray
    corrupt: int


def decode_values(blobs: Sequence[bytes | str | None], dim: int, model_version: str) -> Decoded:
    """Rows for the blobs MGET returned; None and corrupt values (wrong length, format, dtype,
    dim or version; text, from a client that decodes replies) are rows never stored.
    Vectorised: one parse for the whole batch."""
    layout = value_layout(dim, model_version)
    all_fitting = _fitting(blobs, layout.itemsize)
    if all_fitting is not None:
        return _decode_fitting(all_fitting, layout, dim, model_version)
    values = np.zeros((len(blobs), dim), FLOAT32)
    times = never_stored(len(blobs))
    present = sum(blob is not None for blob in blobs)
    fitting = [
        (i, blob)
        for i, blob in enumerate(blobs)
        if isinstance(blob, bytes) and len(blob) == layout.itemsize
    ]
    fits = [i for i, _ in fitting]
    records = np.frombuffer(b"".join(blob for _, blob in fitting), layout)
    valid = _header_fits(records, dim, model_version)
    rows = np.array(fits, dtype=np.int64)[valid]
    values[rows] = records["values"][valid]
    for column in ("computed_at", "stale_at", "expires_at"):
        times[column][rows] = records[column][valid]
    return Decoded(values, times, present - len(rows))


def _fitting(blobs: Sequence[bytes | str | None], size: int) -> Sequence[bytes] | None:
    """The blobs, when every one is bytes of `size` (the usual MGET of stored values)."""
    if set(map(type, blobs)) - {bytes}:
        return None
    fitting = cast(Sequence[bytes], blobs)
    return fitting if set(map(len, fitting)) <= {size} else None


def _decode_fitting(
    blobs: Sequence[bytes], layout: np.dtype, dim: int, model_version: str
) -> Decoded:
    """decode_values for blobs that all fit the layout: one parse, no per-blob bookkeeping."""
    records = np.frombuffer(b"".join(blobs), layout)
    valid = _header_fits(records, dim, model_version)
    times = never_stored(len(blobs))
    if valid.all():
        values = np.ascontiguousarray(records["values"])
        for column in ("computed_at", "stale_at", "expires_at"):
            times[column] = records[column]
        return Decoded(values, times, 0)
    values = np.zeros((len(blobs), dim), FLOAT32)
    values[valid] = records["values"][valid]
    for column in ("computed_at", "stale_at", "expires_at"):
        times[column][valid] = records[column][valid]
    return Decoded(values, times, len(blobs) - int(valid.sum()))


AsyncClient = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster
"""A client for one Redis node, or for a Redis Cluster."""
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


def _header_fits(records: np.ndarray, dim: int, model_version: str) -> np.ndarray:
    fits: np.ndarray = (
        (records["format"] == FORMAT_VERSION)
        & (records["dtype"] == DTYPE_FLOAT32)
        & (records["dim"] == dim)
        & (records["model_version"] == model_version.encode())
    )
    return fits


def read_stale_at(
    client: BlockingClient, dim: int, model_version: str, pairs: Sequence[tuple[str, str]]
) -> np.ndarray:
    """When each (user, item) pair goes stale (-inf if not stored), in one round trip, reading
    only the values' headers: a speculator asks this of every pair it considers, so it fetches
    tens of bytes, not the embeddings."""
    layout = value_layout(0, model_version)
    with client.pipeline(transaction=False) as pipe:
        for user_id, item_id in pairs:
            pipe.getrange(pair_key(model_version, user_id, item_id), 0, layout.itemsize - 1)
        headers: list[bytes] = pipe.execute()
    stale_at = np.full(len(pairs), -np.inf)
    fits = [i for i, header in enumerate(headers) if len(header) == layout.itemsize]
    records = np.frombuffer(b"".join(headers[i] for i in fits), layout)
    valid = _header_fits(records, dim, model_version)
    stale_at[np.array(fits, dtype=np.int64)[valid]] = records["stale_at"][valid]
    return stale_at


class RedisStore:
    """The L2 tier. Raises redis and socket errors: the tier above decides what they mean."""

    def __init__(
        self,
        client: AsyncClient,
        dim: int,
        model_version: str = "",
        version_refresh_seconds: float = 5.0,
    ) -> None:
        """With no `model_version`, reads the published one every `version_refresh_seconds`."""
        self.client = client
        self.dim = dim
        self.model_version = model_version
        self.corrupt_values = 0
        self._refresh_seconds = None if model_version else version_refresh_seconds
        self._version_read_at = -np.inf

    def use_version(self, model_version: str) -> None:
        """Reads `model_version`'s keys from now on (the embedded daemon's model)."""
        self.model_version = model_version
        self._refresh_seconds = None

    async def close(self) -> None:
        await self.client.aclose()

    async def read(
        self,
        user_id: str,
        item_ids: Sequence[str],
        dtype: np.dtype,
        now: float,
        deadline: float | None = None,
    ) -> Rows:
        """`deadline` is the caller's to keep (TieredStore wraps this read in a timeout)."""
        version = await self._current_version()
        if not version:
            return Rows(np.zeros((len(item_ids), self.dim), dtype), never_stored(len(item_ids)), "")
        prefix = user_key_prefix(version, user_id)
        blobs = await self.client.mget([prefix + item for item in item_ids])
        decoded = decode_values(blobs, self.dim, version)
        if decoded.corrupt:
            self.corrupt_values += decoded.corrupt
            logger.warning("%d corrupt values for user %r read as misses", decoded.corrupt, user_id)
        expired = decoded.times["expires_at"] <= now
        if expired.any():
            decoded.times[expired] = never_stored(1)
            decoded.values[expired] = 0
        found = not expired.all()
        values = decoded.values.astype(dtype, copy=False)
        return Rows(values, decoded.times, version if found else "")

    async def write(
        self, user_id: str, item_ids: Sequence[str], vectors: np.ndarray, freshness: Freshness
    ) -> None:
        ttl_ms = int((freshness.expires_at - freshness.computed_at) * 1000)
        if ttl_ms <= 0:
            return
        blobs = encode_values(np.asarray(vectors, FLOAT32), freshness)
        async with self.client.pipeline(transaction=False) as pipe:
            for item_id, blob in zip(item_ids, blobs, strict=True):
                pipe.set(pair_key(freshness.model_version, user_id, item_id), blob, px=ttl_ms)
            await pipe.execute()

    async def _current_version(self) -> str:
        """The version whose keys to read: our own model's, or the one the daemons publish."""
        now = time.monotonic()
        refresh = self._refresh_seconds
        if refresh is not None and not self.model_version:
            refresh = min(refresh, _UNKNOWN_VERSION_REFRESH_SECONDS)
        if refresh is not None and now - self._version_read_at >= refresh:
            self._version_read_at = now
            published = await self.client.get(MODEL_VERSION_KEY)
            if isinstance(published, bytes) and published:
                self.model_version = published.decode(errors="replace")
            # A missing key (Redis restarted) keeps the last version known.
        return self.model_version
