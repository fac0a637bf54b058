"""What the Redis stream users share: the name a process goes by in Redis, the keys a stream
is sharded over, the field types XADD takes, and typed readings of redis-py's stream replies.

A stream may be spread over several keys (shards), so that on a Redis Cluster its load spreads
over the masters: each key is hash-tagged to a slot of its own share of the slot space (as
`redis-cli --cluster create` shares the slots out among masters), and a writer picks a user's
shard by a stable hash of the user, so that one user's entries keep their order in one key.

redis-py types a stream reply as a union over both protocols and both response modes
(`bytes | str | None`, lists or dicts). Our clients use its defaults (RESP2 shapes, no
decoding), so a reply is bytes in lists; these helpers check that shape once and hand on
plain types. A reply of another shape means a client made otherwise: a TypeError, not data.
"""

import os
import socket
import uuid
import zlib
from functools import cache

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.typing import EncodableT, FieldT

StreamFields = dict[FieldT, EncodableT]
"""An entry's fields as XADD takes them."""
Entry = tuple[bytes, dict[bytes, bytes]]
"""A stream entry: its id and its fields."""


def process_name() -> str:
    """Unique to this call: host and pid say which process, for people reading Redis; the
    random part keeps two holders in one process (or a restarted pid) apart."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def shard_of(user_id: str, shards: int) -> int:
    """The user's shard of `shards`: the same in every process (unlike `hash`)."""
    return zlib.crc32(user_id.encode("utf-8", "surrogatepass")) % shards


@cache
def shard_keys(key: str, shards: int) -> tuple[str, ...]:
    """The keys of a stream named `key` spread over `shards`: `key` itself for one (as
    before sharding), else `key:{<shard>-<n>}` with the first `n` that puts shard `i`'s slot in
    the `i`-th of `shards` equal parts of the slot space."""
    if shards == 1:
        return (key,)
    return tuple(_shard_key(key, shard, shards) for shard in range(shards))


def _shard_key(key: str, shard: int, shards: int) -> str:
    low = shard * REDIS_CLUSTER_HASH_SLOTS // shards
    high = (shard + 1) * REDIS_CLUSTER_HASH_SLOTS // shards
    n = 0
    while not low <= key_slot(f"{key}:{{{shard}-{n}}}".encode()) < high:
        n += 1
    return f"{key}:{{{shard}-{n}}}"


def entries(reply: object) -> list[Entry]:
    """The entries of an XRANGE-shaped reply (None, a nil reply, has none). An entry deleted
    while pending (XAUTOCLAIM gives it as `(None, None)` before Redis 7) is left out: there is
    nothing in it to do."""
    if reply is None:
        return []
    if not isinstance(reply, list):
        raise _unexpected("stream entries", reply)
    found = (_entry(item) for item in reply)
    return [entry for entry in found if entry is not None]


def stream_entries(reply: object) -> list[tuple[bytes, list[Entry]]]:
    """The entries per stream of an XREAD or XREADGROUP reply: `[key, entries]` pairs."""
    if not isinstance(reply, list):
        raise _unexpected("XREAD", reply)
    return [(_bytes(pair[0], "stream key"), entries(pair[1])) for pair in map(_pair, reply)]


def autoclaimed(reply: object) -> tuple[str, list[Entry]]:
    """The cursor to claim from next time and the entries claimed, of an XAUTOCLAIM reply
    (Redis 7 adds the ids it found deleted, which nothing here needs)."""
    if not isinstance(reply, list) or len(reply) < 2:
        raise _unexpected("XAUTOCLAIM", reply)
    return _bytes(reply[0], "cursor").decode(), entries(reply[1])


def _entry(item: object) -> Entry | None:
    entry_id, fields = _pair(item)
    if fields is None:
        return None
    if not isinstance(fields, dict) or not all(
        isinstance(name, bytes) and isinstance(value, bytes) for name, value in fields.items()
    ):
        raise _unexpected("entry fields", fields)
    return _bytes(entry_id, "entry id"), fields


def _pair(item: object) -> tuple[object, object]:
    if not isinstance(item, list | tuple) or len(item) != 2:
        raise _unexpected("pair", item)
    return item[0], item[1]


def _bytes(value: object, what: str) -> bytes:
    if not isinstance(value, bytes):
        raise _unexpected(what, value)
    return value


def _unexpected(what: str, reply: object) -> TypeError:
    return TypeError(f"unexpected {what} in a Redis reply: {reply!r:.200}")
