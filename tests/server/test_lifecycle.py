"""`solaris serve` as a real process: it becomes healthy, and on SIGTERM reports NOT_SERVING
to health watchers, stops, and exits 0; serving only, it never loads the model stack."""

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from solaris.precompute.export import ExportReport
from solaris.v1 import embedding_store_pb2 as pb
from solaris.v1.embedding_store_pb2_grpc import EmbeddingStoreStub
from tests.conftest import DIM
from tests.server.serving import SERVICE, free_port, wait_until_serving


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
        wait_until_serving(channel)
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=20)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING

        process.send_signal(signal.SIGTERM)

        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert process.wait(timeout=20) == 0
    assert "draining" in process.stderr.read()


MODEL_STACK = {"torch", "onnx", "onnxruntime", "onnxscript", "onnx_ir", "matplotlib"}
RECORD_MODULES_AT_EXIT = """
import atexit, json, sys
atexit.register(lambda: open(sys.argv[1], "w").write(json.dumps(sorted(sys.modules))))
from solaris.app.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_serve_only_sidecar_never_imports_the_model_stack(tmp_path: Path) -> None:
    """The real `solaris serve --precompute false` process, after it has answered a read and
    a Prefetch, has no module of PyTorch, ONNX or ONNX Runtime loaded."""
    port, modules = free_port(), tmp_path / "modules.json"
    command = ["serve", "--precompute", "false", "--port", str(port), "--grace-seconds", "1"]
    process = subprocess.Popen(
        [sys.executable, "-c", RECORD_MODULES_AT_EXIT, str(modules), *command]
    )
    with process, grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        wait_until_serving(channel)
        stub = EmbeddingStoreStub(channel)
        stub.BatchGet(pb.BatchGetRequest(user_id="u", item_ids=["a", "b"]), timeout=5)
        stub.Prefetch(pb.PrefetchRequest(user_id="u", item_ids=["a"]), timeout=5)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    loaded = set(json.loads(modules.read_text()))
    assert "solaris.server.sidecar" in loaded
    assert not {name.split(".")[0] for name in loaded} & MODEL_STACK
