"""Callers that go away with answers still unsent cost `solaris serve` one DEBUG line each on
its stderr, not an ERROR traceback."""

import asyncio
import signal
from pathlib import Path

import grpc

from tests.conftest import wait_until
from tests.server.serving import (
    STALLED_OPTIONS,
    free_port,
    open_unread_batch_gets,
    serving,
    wait_until_serving,
)
from tests.server.test_stalled_readers import REQUEST, metric

CALLS = 4


async def call_and_go_away(port: int) -> None:
    """Opens BatchGets it never reads, waits until the sidecar has answered them (their headers
    came), then closes the connection with the answers unsent."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=STALLED_OPTIONS) as channel:
        await open_unread_batch_gets(channel, REQUEST, CALLS)


def test_a_caller_going_away_mid_answer_is_a_debug_line_not_a_traceback(tmp_path: Path) -> None:
    port, metrics_port, log = free_port(), free_port(), tmp_path / "stderr.log"
    flags = ["--port", str(port), "--metrics-port", str(metrics_port), "--grace-seconds", "1"]
    with log.open("w") as stderr, serving(flags, log_level="debug", stderr=stderr) as process:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            wait_until_serving(channel)

        asyncio.run(call_and_go_away(port))

        # gRPC either fails the answer's send (the case logged) or cancels the call first
        # (logged by nobody); either way the sidecar then holds no call.
        told = ("went away before its answer was sent", "ExecuteBatchError")

        def seen() -> bool:
            return any(text in log.read_text() for text in told) or not calls_held(metrics_port)

        assert wait_until(seen, timeout=30)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    written = log.read_text()
    assert "Traceback" not in written
    assert " ERROR " not in written


def calls_held(metrics_port: int) -> bool:
    """Whether the sidecar reports calls in flight (True if it reports no such thing)."""
    try:
        return metric(metrics_port, "solaris_calls_in_flight") > 0
    except AssertionError:
        return True
