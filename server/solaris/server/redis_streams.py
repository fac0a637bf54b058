"""What the Redis stream users share: the name a process goes by in Redis, the field types
XADD takes, and typed readings of redis-py's stream replies.

redis-py types a stream reply as a union over both protocols and both response modes
(`bytes | str | None`, lists or dicts). Our clients use its defaults (RESP2 shapes, no
decoding), so a reply is bytes in lists; these helpers check that shape once and hand on
plain types. A reply of another shape means a client made otherwise: a TypeError, not data.
"""

import os
import socket
import uuid

from redis.typing import EncodableT, FieldT

StreamFields = dict[FieldT, EncodableT]
"""An entry's fields as XADD takes them."""
Entry = tuple[bytes, dict[bytes, bytes]]
"""A stream entry: its id and its fields."""


def process_name() -> str:
    """Unique to this call: host and pid say which process, for people reading Redis; the
    random part keeps two holders in one process (or a restarted pid) apart."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


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
