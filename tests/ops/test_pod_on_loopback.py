"""A pod on loopback: the example ranker, the sidecar and a precompute daemon run as separate
processes with exactly the commands, arguments and environment the cpu overlay gives them
(ports moved to free ones, and the Redis Service to a redis-server of our own that wants the
Secret's password), and the ranker ends up ranking with embeddings the daemon computed."""

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from solaris.server.sidecar import SERVICE_NAME
from tests.clients.conftest import free_port
from tests.ops.manifests import REPO, Container, containers, tool
from tests.ops.test_metrics import scrape
from tests.redis.conftest import REDIS_SERVER

OVERLAY = "cpu"


def moved(container: Container, replacements: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The container's argv and environment, with each `replacements` key swapped in values."""

    def swap(text: str) -> str:
        for old, new in replacements.items():
            text = text.replace(old, new)
        return text

    argv = [swap(arg) for arg in container.argv]
    env = {name: swap(value) for name, value in container.env.items()}
    return argv, env


def launch(argv: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    executables = {"solaris": tool("solaris"), "python": sys.executable}
    argv = [executables.get(argv[0], argv[0]), *argv[1:]]
    base = {key: os.environ[key] for key in ("PATH", "HOME", "PYTHONPATH") if key in os.environ}
    return subprocess.Popen(argv, env={**base, **env}, stdout=subprocess.PIPE, text=True)


@pytest.fixture
def pod_redis() -> Iterator[tuple[str, str]]:
    """A redis-server that wants the password from the overlay's Secret: (host:port, password)."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    sidecar = containers(OVERLAY, "ranker")["solaris-sidecar"]
    password = sidecar.env["SOLARIS_REDIS_PASSWORD"]
    port = free_port()
    command = [REDIS_SERVER, "--port", str(port), "--save", "", "--requirepass", password]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    yield f"127.0.0.1:{port}", password
    process.kill()
    process.wait()


def wait_serving(address: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < end:
            try:
                request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
                if stub.Check(request, timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise AssertionError(f"sidecar at {address} never became SERVING")


def rank(port: int, items: list[str]) -> dict[str, object]:
    body = json.dumps({"user_id": "user-1", "item_ids": items}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/rank", data=body, method="POST")
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def test_the_ranker_gets_embeddings_wired_as_the_manifest_wires_it(
    pod_redis: tuple[str, str],
) -> None:
    redis_address, _ = pod_redis
    pod = containers(OVERLAY, "ranker")
    daemon = containers(OVERLAY, "solaris-precompute")["precompute"]
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    health_port = free_port()
    cluster = {"solaris-redis:6379": redis_address}
    sidecar_ports = {"50051": str(grpc_port), "50052": str(health_port), "9400": str(metrics_port)}
    sidecar_argv, sidecar_env = moved(pod["solaris-sidecar"], {**cluster, **sidecar_ports})
    ranker_argv, ranker_env = moved(
        pod["ranker"],
        {
            "50051": str(grpc_port),
            "8080": str(http_port),
            "/app/examples": str(REPO / "clients" / "examples"),
        },
    )
    daemon_argv, daemon_env = moved(daemon, {**cluster, "9400": str(free_port())})
    daemon_env["SOLARIS_MODEL_DIR"] = "~/.cache/solaris/models"
    processes = [launch(sidecar_argv, sidecar_env)]
    try:
        wait_serving(f"127.0.0.1:{health_port}")  # where the kubelet probes (the Pod IP)
        processes.append(launch(daemon_argv, daemon_env))
        processes.append(launch(ranker_argv, ranker_env))
        assert processes[-1].stdout is not None
        assert "ranking on" in processes[-1].stdout.readline()
        items = [f"movie-{n}" for n in range(5)]
        first = rank(http_port, items)
        assert sorted(first["ranked"]) == sorted(items)  # type: ignore[arg-type]
        answer = first
        end = time.monotonic() + 180
        while answer["from_store"] != len(items) and time.monotonic() < end:
            time.sleep(0.5)
            answer = rank(http_port, items)
        assert answer["from_store"] == len(items)
        assert answer["fallback_reason"] is None
        assert scrape(metrics_port)['solaris_rows_total{status="hit"}'] >= len(items)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)
            if process.stdout is not None:
                process.stdout.close()
