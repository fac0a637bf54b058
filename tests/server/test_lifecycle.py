"""`solaris serve` as a real process: it becomes healthy, and on SIGTERM reports NOT_SERVING
to health watchers, stops, and exits 0."""

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from solaris.precompute.export import ExportReport
from tests.conftest import DIM

SERVICE = "solaris.v1.EmbeddingStore"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_serving(stub: health_pb2_grpc.HealthStub, timeout: float = 30.0) -> None:
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=1)
            if response.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            time.sleep(0.1)
    raise AssertionError("the sidecar never became healthy")


@pytest.fixture
def sidecar_process(tiny_model: ExportReport) -> Iterator[tuple[subprocess.Popen[str], int]]:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "solaris.app.cli",
            "serve",
            "--port",
            str(port),
            "--grace-seconds",
            "1",
            "--dim",
            str(DIM),
            "--model",
            str(tiny_model.path),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    with process:
        yield process, port
        if process.poll() is None:
            process.kill()


def test_sigterm_flips_health_to_not_serving_then_exits_zero(
    sidecar_process: tuple[subprocess.Popen[str], int],
) -> None:
    process, port = sidecar_process
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        wait_until_serving(health)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=20)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING

        process.send_signal(signal.SIGTERM)

        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert process.wait(timeout=20) == 0
    assert "draining" in process.stderr.read()
