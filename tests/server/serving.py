"""Helpers for tests that run `solaris serve` as a real process: a free port, the process
itself, and a wait until its health service says SERVING."""

import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICE = "solaris.v1.EmbeddingStore"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


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
