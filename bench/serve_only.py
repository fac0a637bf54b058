"""A serve-only sidecar (`solaris serve --precompute false`) as a real process: how long a
restart takes (process start to health SERVING), its RSS at idle, and whether it loaded any of
the model stack.

    .venv/bin/python bench/serve_only.py [--runs 5] [-- python -m solaris.app.cli]

The command after `--` runs the CLI (default: this checkout's), so an older checkout can be
measured beside this one in the same run.
"""

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

MODEL_STACK = ("torch", "onnx", "onnxruntime", "onnxscript", "matplotlib")


@dataclass(frozen=True)
class Start:
    seconds_to_serving: float
    rss_mib: float
    model_modules: int


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_serving(port: int, timeout: float = 60.0) -> None:
    request = health_pb2.HealthCheckRequest(service="")
    give_up = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < give_up:
            try:
                if health.Check(request, timeout=0.5).status == 1:
                    return
            except grpc.RpcError:
                time.sleep(0.02)
    raise RuntimeError("the sidecar never became healthy")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def model_modules(pid: int) -> int:
    """Shared objects of the model stack mapped into the process."""
    with open(f"/proc/{pid}/maps") as maps:
        paths = {line.split()[-1] for line in maps if "/site-packages/" in line}
    return sum(any(f"/site-packages/{name}/" in path for name in MODEL_STACK) for path in paths)


def start_once(command: list[str]) -> Start:
    port = free_port()
    args = [*command, "serve", "--precompute", "false", "--port", str(port)]
    started = time.perf_counter()
    process = subprocess.Popen(args, stderr=subprocess.DEVNULL)
    try:
        wait_serving(port)
        took = time.perf_counter() - started
        time.sleep(1.0)
        return Start(took, rss_mib(process.pid), model_modules(process.pid))
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def main() -> None:
    argv = sys.argv[1:]
    command = [sys.executable, "-m", "solaris.app.cli"]
    if "--" in argv:
        command = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    runs = parser.parse_args(argv).runs
    starts = [start_once(command) for _ in range(runs)]
    print(f"command: {' '.join(command)} serve --precompute false  (pid {os.getpid()} ran it)")
    seconds = statistics.median(start.seconds_to_serving for start in starts)
    rss = statistics.median(start.rss_mib for start in starts)
    print(f"restart to SERVING: median {seconds:.2f} s over {runs} runs")
    mapped = starts[0].model_modules
    print(f"RSS at idle: median {rss:.0f} MiB; model-stack libraries mapped: {mapped}")


if __name__ == "__main__":
    main()
