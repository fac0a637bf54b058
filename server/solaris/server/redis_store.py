"""L2: embeddings in Redis, shared by every sidecar and precompute daemon.

Keys carry the model version and a hash tag of the user, `solaris:<version>:{<user>}:<item>`,
so all of a user's pairs share a Redis Cluster slot and one MGET answers a BatchGet. The
user part is escaped so that it cannot close the tag early, which keeps keys unambiguous.
Values are a small header and the float32 bytes; expiry is Redis's own (SET PX).

A store reads one model version's keys, `model_version`: its daemon's own, or the one a
sidecar's `solaris.server.rollout.Rollout` chooses from the versions the daemons announce.
"""

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import hiredis
import numpy as np
import redis
import redis.asyncio
from redis.asyncio.connection import AbstractConnection
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.typing import EncodableT

from solaris.server.store import FLOAT32, Freshness, Rows, never_stored

FORMAT_VERSION = 1
DTYPE_FLOAT32 = 1
MODEL_VERSION_KEY = "solaris:model-version"
"""Where daemons before rollouts set their version (`solaris.server.rollout` reads it)."""
PASSWORD_ENV = "SOLARIS_REDIS_PASSWORD"
DAEMON_REDIS_TIMEOUT_SECONDS = 2.0
"""Off the serving path, a daemon can wait longer for Redis than a read can."""
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


def connect(url: str, timeout_seconds: float) -> redis.asyncio.Redis:
    """A client for `url` (redis:// or rediss:// for TLS). The password comes from the URL or
    from SOLARIS_REDIS_PASSWORD. No retries: the caller's budget is its own to keep (see
    `solaris.server.reachability.within`); `timeout_seconds` is how long Redis may take before
    the client gives up on it. Its connections, of the class the URL's scheme picks, pack
    commands with hiredis."""
    client = redis.asyncio.Redis.from_url(
        url,
        password=os.environ.get(PASSWORD_ENV) or None,
        socket_timeout=timeout_seconds,
        socket_connect_timeout=timeout_seconds,
        retry=Retry(NoBackoff(), 0),
    )
    pool = client.connection_pool
    pool.connection_class = _packed_by_hiredis(pool.connection_class)
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


def _packed_by_hiredis(kind: type[AbstractConnection]) -> type[AbstractConnection]:
    """`kind` (whichever the URL's scheme picked: TCP, TLS or a unix socket), packing with
    hiredis."""
    return type(f"Hiredis{kind.__name__}", (kind,), {"pack_command": _pack_with_hiredis})


def connect_blocking(url: str, timeout_seconds: float) -> redis.Redis:
    """A blocking client, for a daemon's thread: `timeout_seconds` must outlast its longest
    blocking read."""
    return redis.Redis.from_url(
        url,
        password=os.environ.get(PASSWORD_ENV) or None,
        socket_timeout=timeout_seconds,
        socket_connect_timeout=timeout_seconds,
        retry=Retry(NoBackoff(), 0),
    )


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
    client: redis.Redis, dim: int, model_version: str, pairs: Sequence[tuple[str, str]]
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

    def __init__(self, client: redis.asyncio.Redis, dim: int, model_version: str = "") -> None:
        """With no `model_version`, every read is a miss until `use_version`."""
        self.client = client
        self.dim = dim
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
        dtype: np.dtype,
        now: float,
        deadline: float | None = None,
    ) -> Rows:
        """`deadline` is the caller's to keep (TieredStore wraps this read in a timeout)."""
        version = self.model_version
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
