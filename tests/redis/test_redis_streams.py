"""The typed readings of stream replies, on replies from a real redis-server."""

import os
import socket

import pytest
import redis

from solaris.server.redis_streams import autoclaimed, entries, process_name, stream_entries
from tests.redis.conftest import RedisProcess

STREAM = "test:stream"
GROUP = "test-group"


def test_read_entries_come_as_bytes_per_stream(redis_server: RedisProcess) -> None:
    client = redis_server.client()
    first = client.xadd(STREAM, {"a": "1"})
    client.xadd(STREAM, {"b": "2"})

    (key, news), *rest = stream_entries(client.xread({STREAM: "0-0"}))

    assert (key, rest) == (STREAM.encode(), [])
    assert news[0] == (first, {b"a": b"1"})
    assert [fields for _, fields in news] == [{b"a": b"1"}, {b"b": b"2"}]
    assert entries(client.xrevrange(STREAM, count=1)) == [news[1]]


def test_nothing_new_reads_as_no_streams(redis_server: RedisProcess) -> None:
    client = redis_server.client()
    client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)

    assert stream_entries(client.xreadgroup(GROUP, "c", {STREAM: ">"}, block=1)) == []
    assert entries(client.xrange(STREAM)) == []


def test_a_pending_entry_is_claimed_and_a_deleted_one_left_out(
    redis_server: RedisProcess,
) -> None:
    client = redis_server.client()
    client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    kept = client.xadd(STREAM, {"task": "kept"})
    deleted = client.xadd(STREAM, {"task": "deleted"})
    client.xreadgroup(GROUP, "stopped", {STREAM: ">"})
    client.xdel(STREAM, deleted)

    cursor, claimed = autoclaimed(client.xautoclaim(STREAM, GROUP, "survivor", 0, "0-0"))

    assert cursor == "0-0"
    assert claimed == [(kept, {b"task": b"kept"})]


def test_a_decoding_client_is_refused_not_misread(redis_server: RedisProcess) -> None:
    client = redis.Redis(port=redis_server.port, decode_responses=True)
    client.xadd(STREAM, {"a": "1"})

    with pytest.raises(TypeError, match="entry fields"):
        entries(client.xrange(STREAM))
    with pytest.raises(TypeError, match="stream key"):
        stream_entries(client.xread({STREAM: "0-0"}))


def test_each_name_names_this_process_and_is_its_own() -> None:
    names = {process_name() for _ in range(3)}

    assert len(names) == 3
    assert all(name.startswith(f"{socket.gethostname()}-{os.getpid()}-") for name in names)
