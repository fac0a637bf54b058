"""A caller that never reads its answers cannot take `solaris serve` past its memory bound:
answers not yet sent are capped in bytes (--max-unsent-bytes), reads past the cap get
RESOURCE_EXHAUSTED, and the process's RSS grows by a small multiple of the cap at most."""

import asyncio
import os
import re
import urllib.request
from collections import Counter

import grpc

from solaris.v1 import embedding_store_pb2 as pb
from tests.server.serving import (
    STALLED_OPTIONS,
    free_port,
    open_unread_batch_gets,
    rss_bytes,
    serving,
    wait_until_serving,
)

MiB = 1024**2
CAP = 32 * MiB
STALLED_CALLS = 60
"""Each answers 4096 rows of 128 float32 (2 MiB): 120 MiB in all, nearly four caps."""
REQUEST = pb.BatchGetRequest(user_id="u", item_ids=[f"item-{i}" for i in range(4096)])


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, name
    return float(match.group(1))


async def stall(port: int, pid: int) -> tuple[Counter[str], list[str], int]:
    """Opens STALLED_CALLS BatchGets on one connection, reads none of them, and once every
    call is either refused or held by the sidecar, returns how they ended, their messages,
    and the sidecar's RSS then."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=STALLED_OPTIONS) as channel:
        calls = await open_unread_batch_gets(channel, REQUEST, STALLED_CALLS)
        rss = rss_bytes(pid)
        print(f"RSS with {STALLED_CALLS} stalled calls: {rss / MiB:.0f} MiB")
        done = [call for call in calls if call.done()]
        codes = Counter([(await call.code()).name for call in done])
        messages = [await call.details() or "" for call in done]
        for call in calls:
            call.cancel()
        return codes, messages, rss


def test_stalled_readers_get_resource_exhausted_past_the_cap_and_rss_stays_bounded() -> None:
    port, metrics_port = free_port(), free_port()
    flags = ["--port", str(port), "--metrics-port", str(metrics_port), "--grace-seconds", "0"]
    env = {**os.environ, "SOLARIS_MAX_UNSENT_BYTES": str(CAP)}
    with serving(flags, env) as process:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            wait_until_serving(channel)
        rss_before = rss_bytes(process.pid)
        print(f"RSS before: {rss_before / MiB:.0f} MiB")

        codes, messages, rss_stalled = asyncio.run(stall(port, process.pid))

        assert codes["RESOURCE_EXHAUSTED"] >= STALLED_CALLS // 2, codes
        assert any("max-unsent-bytes" in message for message in messages)
        assert rss_stalled - rss_before < 4 * CAP  # each unsent byte costs about two
        assert (
            metric(metrics_port, "solaris_refused_unsent_full_total") == codes["RESOURCE_EXHAUSTED"]
        )
