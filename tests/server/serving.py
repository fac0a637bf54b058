"""Helpers for tests that run `solaris serve` as a real process: a free port, the process
itself, and a wait until its health service says SERVING."""

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import IO, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from solaris.v1 import embedding_store_pb2 as pb
from tests.clients.conftest import free_port

SERVICE = "solaris.v1.EmbeddingStore"
STALLED_OPTIONS = [("grpc.http2.bdp_probe", 0), ("grpc.max_receive_message_length", -1)]
"""A caller's transport takes no more of an answer than its reader asks for once BDP probing
(which grows the window on its own) is off: with these, a caller that never reads."""
__all__ = [
    "SERVICE",
    "STALLED_OPTIONS",
    "free_port",
    "open_unread_batch_gets",
    "rss_bytes",
    "serving",
    "wait_until_serving",
]


def wait_until_serving(channel: grpc.Channel, timeout: float = 30.0) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        try:
            response = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=1)
            if response.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            time.sleep(0.1)
    raise AssertionError("the sidecar never became healthy")


@contextmanager
def serving(
    flags: Sequence[str],
    env: dict[str, str] | None = None,
    log_level: str = "info",
    stderr: IO[str] | int = subprocess.PIPE,
) -> Iterator[subprocess.Popen[str]]:
    """`solaris serve --precompute false` with `flags`, its stderr piped (or to `stderr`);
    killed if still running at the end."""
    command = [sys.executable, "-m", "solaris.app.cli", "--log-level", log_level, "serve"]
    command += ["--precompute", "false", *flags]
    process = subprocess.Popen(command, stderr=stderr, text=True, env=env)
    with process:
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()


def rss_bytes(pid: int) -> int:
    """The process's resident set size, from /proc."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


async def open_unread_batch_gets(
    channel: grpc.aio.Channel, request: pb.BatchGetRequest, calls: int
) -> list[Any]:
    """`calls` BatchGets on `channel` (opened with STALLED_OPTIONS) whose answers are never
    read, once each was answered or refused: headers are not flow-controlled, so each call has
    them once its answer is built (and held unsent) or it was refused."""
    # Called as a stream, the answer is read only when iterated: never, here.
    batch_get = channel.unary_stream(
        "/solaris.v1.EmbeddingStore/BatchGet",
        request_serializer=pb.BatchGetRequest.SerializeToString,
        response_deserializer=pb.BatchGetResponse.FromString,
    )
    opened = [batch_get(request) for _ in range(calls)]
    await asyncio.wait_for(asyncio.gather(*(call.initial_metadata() for call in opened)), 60)
    return opened
